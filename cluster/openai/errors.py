"""OpenAI-style errors: an HTTP status and `{"error": {"message", "type", "param", "code"}}`.

Whatever goes wrong with a request ends as one `OpenAIError`, so the ingress has one exception
handler and clients get the body OpenAI's SDKs turn into `BadRequestError`, `NotFoundError`,
`RateLimitError` (retried with backoff) or `InternalServerError`:

| cause                                             | status | type                  | code                          |
| ------------------------------------------------- | ------ | --------------------- | ----------------------------- |
| bad body or value (ValueError, ValidationError)   | 400    | invalid_request_error | None                          |
| a value OpenAI takes and moeray does not (n=2)    | 400    | invalid_request_error | `unsupported_value`           |
| prompt (+ max_tokens) beyond the context          | 400    | invalid_request_error | `context_length_exceeded`     |
| a model this server does not serve                | 404    | invalid_request_error | `model_not_found`             |
| a body larger than `max_request_bytes`            | 413    | invalid_request_error | `request_too_large`           |
| router queue full (`OverloadedError`), Serve back-pressure | 429 | rate_limit_error | `server_overloaded`          |
| anything else                                     | 500    | server_error          | None                          |

`param` names the request field at fault (`messages[0].content`); our ValueErrors start with
the field's name (`temperature=-1 must be >= 0`), which is how `from_exception` finds it.
"""

import re

from pydantic import ValidationError

from moeray.cluster.openai.protocol import ChatCompletionRequest, CompletionRequest, ErrorDetail, ErrorResponse
from moeray.cluster.remote_errors import unwrap

REQUEST_FIELDS = frozenset(CompletionRequest.model_fields) | frozenset(ChatCompletionRequest.model_fields)


class OpenAIError(Exception):
    def __init__(self, status_code: int, message: str, type: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code, self.message, self.type, self.param, self.code = status_code, message, type, param, code

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def to_json(self) -> str:
        return self.body().model_dump_json()


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", param, code)


def unsupported(param: str, value: object, why: str) -> OpenAIError:
    """400 for a value OpenAI accepts and moeray does not (n=2, tools, ...); `why` says what to send."""
    return invalid_request(f"{param}={value!r} is not supported: {why}", param, "unsupported_value")


def too_large(size: int | None, limit: int) -> OpenAIError:
    got = f"{size} bytes" if size is not None else "more"
    return OpenAIError(413, f"the request body is {got}; this server takes at most {limit} bytes (max_request_bytes)",
                       "invalid_request_error", None, "request_too_large")


def model_not_found(model: str, served: str) -> OpenAIError:
    return OpenAIError(404, f"The model {model!r} does not exist; this server serves {served!r}",
                       "invalid_request_error", "model", "model_not_found")


def overloaded(message: str) -> OpenAIError:
    return OpenAIError(429, message, "rate_limit_error", None, "server_overloaded")


def from_validation_error(err: ValidationError | list[dict]) -> OpenAIError:
    """A pydantic error (or FastAPI's `RequestValidationError.errors()`) -> 400 naming the field.

    One problem is reported, the first, as OpenAI does."""
    first = (err.errors() if isinstance(err, ValidationError) else err)[0]
    param, message = _path(first.get("loc", ())), first["msg"]
    if first["type"] == "json_invalid":
        return invalid_request(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', message)}")
    if first["type"] == "value_error":  # our own validators: the message names the field and value
        return invalid_request(message.removeprefix("Value error, "), param)
    if first["type"] != "missing" and "input" in first:
        message = f"{message} (got {_short(first['input'])})"
    return invalid_request(f"{param}: {message}" if param else message, param)


def from_exception(err: BaseException, rename: dict[str, str] | None = None) -> OpenAIError:
    """Any exception -> the error to send. `rename` maps engine names to this request's fields
    (chat: {"prompt": "messages"}), for ValueErrors the router raises after `convert` passed."""
    err = unwrap(err)
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, ValidationError):
        return from_validation_error(err)
    if isinstance(err, ValueError):
        return from_value_error(err, rename)
    if isinstance(err, _overload_errors()):
        return overloaded(str(err))
    if isinstance(err, _unavailable_errors()):
        return OpenAIError(503, str(err), "server_error", None, "router_unavailable")
    return OpenAIError(500, f"internal error ({type(err).__name__}): {err}", "server_error")


def from_value_error(err: ValueError, rename: dict[str, str] | None = None) -> OpenAIError:
    """"temperature=-1 must be >= 0" -> 400 with param "temperature"; `rename` as in `from_exception`."""
    message, param = str(err), param_of(str(err))
    if param is not None and rename and param in rename:
        message, param = rename[param] + message[len(param):], rename[param]
    return invalid_request(message, param)


def param_of(message: str) -> str | None:
    """The request field a ValueError's message starts with ("top_p=0 must be in (0, 1]" -> "top_p")."""
    match = re.match(r"[a-z_]+", message)
    return match.group() if match and match.group() in REQUEST_FIELDS else None


def _path(loc: tuple) -> str | None:
    """pydantic's error location -> "messages[0].content". FastAPI puts "body" first; pydantic names
    the branch of a union it tried ("str", "list[int]", "ContentPart"): neither is part of the path."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif item == "body" and not out:
            continue
        elif re.fullmatch(r"[a-z_][a-z0-9_]*", item) and item not in {"str", "int", "float", "bool", "list", "dict"}:
            out += f".{item}" if out else item
    return out or None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


    from ray.exceptions import RayTaskError

    while isinstance(err, RayTaskError) and isinstance(err.cause, BaseException):
        err = err.cause
    return err


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """The router died and did not come back in time (`cluster.resume`): 503."""
    from moeray.cluster.resume import RouterUnavailableError

    return (RouterUnavailableError,)


def _overload_errors() -> tuple[type[BaseException], ...]:
    """Refusals that mean "try again later": the router's full queue, Serve's own back-pressure.
    Imported here, not at the top, so the protocol layer loads without torch and Ray Serve."""
    from ray.serve.exceptions import BackPressureError

    from moeray.actors.router_actor import OverloadedError

    return OverloadedError, BackPressureError
