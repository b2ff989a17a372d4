"""OpenAI requests -> what the router runs: prompt token ids and `SamplingParams`.

Pure (no I/O, no Ray): every refusal is an `OpenAIError` raised before the request reaches the
router — 400 naming the field and its value, 404 for a model this server does not serve.

Defaults for fields left out are OpenAI's: temperature 1.0, top_p 1.0, `max_tokens` 16 for
completions (the legacy endpoint's default) and all the context has left for chat. Sampling
values are checked by `SamplingParams` itself; its messages ("top_p=0 must be in (0, 1]") are
passed on with `param` set. A prompt must leave room for one output token, and an explicit
`max_tokens` must fit beside the prompt (`context_length_exceeded`, as OpenAI answers).

Refused rather than ignored, because honouring them would change the output: n > 1, best_of > 1,
penalties other than 0, logit_bias, suffix, tools / functions, a response_format other than
text, alternatives to the chosen token (completions logprobs > 0, chat top_logprobs > 0), echo
together with logprobs (it needs the prompt's logprobs), and content parts other than text.
"""

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from pydantic import ValidationError

from moeray.actors.sequence import SamplingParams
from moeray.cluster.openai.chat_template import TemplateRejected
from moeray.cluster.openai.errors import (
    from_validation_error, from_value_error, invalid_request, model_not_found, unsupported)
from moeray.cluster.openai.protocol import ChatCompletionRequest, CompletionRequest
from moeray.cluster.openai.served_model import ServedModel

RequestT = TypeVar("RequestT", CompletionRequest, ChatCompletionRequest)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left


@dataclass(frozen=True)
class GenerateRequest:
    """One request as the router runs it, plus what the response needs to be written."""

    request_id: str  # "cmpl-<hex>" / "chatcmpl-<hex>": the response's id and the router's abort handle
    kind: Literal["completion", "chat"]
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False  # stream: a last chunk with the usage
    logprobs: bool = False  # report the chosen token's logprob per output token
    echo_text: str = ""  # completions with echo: the prompt's text, put before the output
    system_fingerprint: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def parse_request(cls: type[RequestT], body: bytes | str | dict) -> RequestT:
    """A request body (raw JSON, or already decoded) -> `CompletionRequest` / `ChatCompletionRequest`;
    a malformed one -> 400 naming the field (`messages[0].role: Input should be 'system', ...`)."""
    try:
        return cls.model_validate(body) if isinstance(body, dict) else cls.model_validate_json(body)
    except ValidationError as err:
        raise from_validation_error(err) from None


def convert_completion(request: CompletionRequest, model: ServedModel) -> GenerateRequest:
    _check_common(request, model)
    if request.suffix:
        raise unsupported("suffix", request.suffix, "moeray generates after the prompt only; leave suffix out")
    if request.best_of not in (None, 1):
        raise unsupported("best_of", request.best_of, "moeray generates one sequence per request; send best_of=1")
    logprobs = request.logprobs
    if logprobs is not None and logprobs < 0:
        raise invalid_request(f"logprobs={logprobs} must be >= 0", "logprobs")
    if logprobs:
        raise unsupported("logprobs", logprobs, "moeray returns the chosen token's logprob only; send logprobs=0")
    if request.echo and logprobs is not None:
        raise unsupported("echo", True, "echo with logprobs needs the prompt's logprobs, which moeray does not "
                                        "compute; send one or the other")
    prompt_ids = _prompt_ids(request.prompt, model)
    echo_text = ""
    if request.echo:  # the prompt as sent; token ids as their text
        echo_text = request.prompt if isinstance(request.prompt, str) else model.tokenizer.decode(prompt_ids)
    params = _sampling_params(request, model, len(prompt_ids), request.max_tokens, "max_tokens",
                              DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
    return GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex}", kind="completion", model=model.name,
                           prompt_ids=prompt_ids, params=params, stream=bool(request.stream),
                           include_usage=_include_usage(request), logprobs=logprobs == 0, echo_text=echo_text,
                           system_fingerprint=model.system_fingerprint)


def convert_chat(request: ChatCompletionRequest, model: ServedModel) -> GenerateRequest:
    _check_common(request, model)
    for name in ("tools", "functions"):
        if getattr(request, name):
            raise invalid_request(f"{name} are not supported ({len(getattr(request, name))} given): moeray does not "
                                  f"call tools; leave {name} out", name, "unsupported_value")
    for name in ("tool_choice", "function_call"):
        if getattr(request, name) not in (None, "none", "auto"):
            raise unsupported(name, getattr(request, name), 'moeray does not call tools; send "none" or leave it out')
    if request.response_format is not None and request.response_format.type != "text":
        raise unsupported("response_format.type", request.response_format.type, 'moeray generates free text; '
                          'send {"type": "text"} or leave it out')
    if request.top_logprobs not in (None, 0):
        raise unsupported("top_logprobs", request.top_logprobs,
                          "moeray returns the chosen token's logprob only (logprobs=true); send 0 or leave it out")
    try:
        text = model.chat_template.render(chat_messages(request))
    except TemplateRejected as err:
        raise invalid_request(str(err), "messages") from None
    prompt_ids = _encode_rendered(text, model)
    max_tokens, max_tokens_param = request.max_tokens, "max_tokens"
    if request.max_completion_tokens is not None:
        max_tokens, max_tokens_param = request.max_completion_tokens, "max_completion_tokens"
    params = _sampling_params(request, model, len(prompt_ids), max_tokens, max_tokens_param, None, "messages")
    return GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex}", kind="chat", model=model.name,
                           prompt_ids=prompt_ids, params=params, stream=bool(request.stream),
                           include_usage=_include_usage(request), logprobs=bool(request.logprobs),
                           system_fingerprint=model.system_fingerprint)


def chat_messages(request: ChatCompletionRequest) -> list[dict]:
    """The messages as the template reads them: content always a string (text parts joined by
    newlines, null content as ""), `name` only where the client sent one."""
    if not request.messages:
        raise invalid_request("messages is empty: send at least one message", "messages")
    out = []
    for i, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text":
                    raise unsupported(f"messages[{i}].content[{j}].type", part.type, 'moeray serves text only; '
                                      'send parts of type "text"')
                if part.text is None:
                    where = f"messages[{i}].content[{j}].text"
                    raise invalid_request(f"{where} is missing", where)
            content = "\n".join(part.text for part in content)
        out.append({"role": message.role, "content": content or ""} | ({"name": message.name} if message.name else {}))
    return out


def _check_common(request: CompletionRequest | ChatCompletionRequest, model: ServedModel) -> None:
    if request.model is not None and request.model != model.name:
        raise model_not_found(request.model, model.name)
    if request.n not in (None, 1):
        raise unsupported("n", request.n, "moeray returns one choice per request; send n=1 and more requests")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) not in (None, 0):
            raise unsupported(name, getattr(request, name), "moeray samples without penalties; send 0 or leave it out")
    if request.logit_bias:
        raise unsupported("logit_bias", request.logit_bias, "moeray does not bias logits; leave it out")
    if request.stream_options is not None and not request.stream:
        raise invalid_request("stream_options is only allowed when stream is true", "stream_options")


def _include_usage(request: CompletionRequest | ChatCompletionRequest) -> bool:
    return request.stream_options is not None and bool(request.stream_options.include_usage)


def _prompt_ids(prompt: str | list[int], model: ServedModel) -> list[int]:
    if not prompt:
        raise invalid_request("prompt is empty: send at least one character or token id", "prompt")
    if isinstance(prompt, str):
        return model.tokenizer.encode(prompt)
    bad = next((i for i, t in enumerate(prompt) if not 0 <= t < model.vocab_size), None)
    if bad is not None:
        raise invalid_request(f"prompt[{bad}]={prompt[bad]} is not a token id of this model "
                              f"(ids are in [0, {model.vocab_size}))", "prompt")
    return list(prompt)


def _encode_rendered(text: str, model: ServedModel) -> list[int]:
    """Token ids of a rendered chat. Templates write BOS themselves, and so does a tokenizer whose
    post-processor adds it (the default model's): keep one."""
    ids = model.tokenizer.encode(text)
    bos = model.chat_template.bos_token
    if bos and text.startswith(bos) and len(ids) >= 2 and ids[0] == ids[1]:
        ids = ids[1:]
    return ids


def _sampling_params(request: CompletionRequest | ChatCompletionRequest, model: ServedModel, num_prompt_tokens: int,
                     max_tokens: int | None, max_tokens_param: str, default_max_tokens: int | None,
                     prompt_param: str) -> SamplingParams:
    """Sampling fields -> SamplingParams, checked against what the context has left after the prompt."""
    room = model.max_model_len - num_prompt_tokens
    if room < 1:
        what = "prompt" if prompt_param == "prompt" else f"the prompt rendered from {prompt_param}"
        raise invalid_request(f"{what} is {num_prompt_tokens} tokens long; this model's context is "
                              f"{model.max_model_len} tokens (prompt + output), so a prompt may have "
                              f"{model.max_model_len - 1} at most", prompt_param, "context_length_exceeded")
    stop = request.stop if request.stop is not None else ()
    values = dict(max_tokens=max_tokens if max_tokens is not None else min(default_max_tokens or room, room),
                  temperature=1.0 if request.temperature is None else request.temperature,
                  top_p=1.0 if request.top_p is None else request.top_p,
                  top_k=0 if request.top_k in (None, -1) else request.top_k,  # -1: "off", as vLLM clients send it
                  seed=request.seed, stop=(stop,) if isinstance(stop, str) else tuple(stop),
                  ignore_eos=bool(request.ignore_eos))
    try:
        params = SamplingParams(**values)
    except ValueError as err:
        raise from_value_error(err, {"max_tokens": max_tokens_param}) from None
    if params.max_tokens > room:
        raise invalid_request(f"{max_tokens_param}={params.max_tokens} is too large: the prompt has "
                              f"{num_prompt_tokens} tokens and this model's context is {model.max_model_len}, "
                              f"so at most {room} more fit", max_tokens_param, "context_length_exceeded")
    return params
