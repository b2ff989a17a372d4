"""The OpenAI wire format: bodies of `/v1/completions`, `/v1/chat/completions` and `/v1/models`.

Requests declare every field OpenAI clients send, so a bad value fails under its own name, and
are parsed strictly (JSON `"5"` is not a number, `true` not an integer): a value OpenAI would
refuse is refused here too instead of being guessed at. Fields nobody declared are accepted and
ignored (`extra="allow"`; `ignored_fields` lists them for a log line): clients send extras
(`metadata`, `store`, vendor keys) and refusing those would break them. Fields that would change
the output and that moeray cannot honour (`n` > 1, `tools`, `logit_bias`, ...) are declared
loosely so that `convert` can refuse them by name rather than ignore them.

Responses mirror the `openai` SDK's types field for field; the unit tests parse our bodies
with those types, so an SDK client reads what we send.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

# ---------------------------------------------------------------- requests


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    @property
    def ignored_fields(self) -> list[str]:
        """Fields the client sent that moeray does not know and ignores."""
        return sorted(self.model_extra or {})


class StreamOptions(_Body):
    include_usage: bool | None = None  # one last chunk with empty `choices` and the request's `usage`


def _one_prompt(value: object) -> str | list[int]:
    """A prompt as OpenAI clients send it -> one text or one list of token ids.

    Accepted: "text", [1, 2, 3], ["text"], [[1, 2, 3]]. A batch of several prompts is refused:
    one request is one sequence in the router's batch, and clients can send requests in parallel."""
    if isinstance(value, str) or _is_ids(value):
        return value
    if isinstance(value, list) and len(value) == 1 and (isinstance(value[0], str) or _is_ids(value[0])):
        return value[0]
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str) or _is_ids(p) for p in value):
        raise ValueError(f"prompt holds {len(value)} prompts; moeray takes one prompt per request "
                         "(send the others as separate requests)")
    raise ValueError(f"prompt={_short(value)} must be a string, a list of token ids, "
                     "or a list holding one of those")


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


Prompt = Annotated[str | list[int], PlainValidator(_one_prompt), WithJsonSchema({
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}},
              {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "array"}]}, "maxItems": 1}]})]


class _GenerateBody(_Body):
    """Fields both endpoints share. None means "not sent": `convert` applies the defaults."""

    model: str | None = Field(None, description="the served model's name; left out: the served model")
    max_tokens: int | None = None
    temperature: float | None = None  # default 1.0, as OpenAI's
    top_p: float | None = None
    n: int | None = Field(None, description="only 1 is supported")
    stream: bool | None = None  # null is "not sent" for every field, as in OpenAI's API
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="refused unless empty")
    user: str | None = None  # accepted, unused
    top_k: int | None = Field(None, description="extension: sample among the k most likely tokens; 0 or -1 = off")
    ignore_eos: bool | None = Field(None, description="extension: keep generating past the end-of-sequence token")


class CompletionRequest(_GenerateBody):
    prompt: Prompt
    echo: bool | None = None
    logprobs: int | None = Field(None, description="0: the chosen token's logprob; larger values are refused")
    suffix: str | None = Field(None, description="refused unless empty")
    best_of: int | None = Field(None, description="only 1 is supported")


class ContentPart(_Body):
    type: str  # only "text" is served
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(_Body):
    type: str  # only "text" is served


class ChatCompletionRequest(_GenerateBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, description="wins over max_tokens when both are sent")
    logprobs: bool | None = Field(None, description="the chosen token's logprob per output token")
    top_logprobs: int | None = Field(None, description="only 0 is supported")
    tools: list | None = Field(None, description="refused unless empty")
    tool_choice: str | dict | None = Field(None, description='refused unless "none" or "auto" without tools')
    functions: list | None = Field(None, description="refused unless empty")
    function_call: str | dict | None = Field(None, description='refused unless "none" or "auto"')
    response_format: ResponseFormat | None = Field(None, description='only {"type": "text"}')


# ---------------------------------------------------------------- responses

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]  # the chosen token only: {token: logprob}
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None  # None in stream chunks before the last


class Completion(BaseModel):
    """A `/v1/completions` body, and also each of its stream chunks (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenLogprob(BaseModel):
    token: str
    bytes: list[int] | None  # None when the token is part of a UTF-8 character, not a whole one
    logprob: float
    top_logprobs: list = []  # alternatives are not computed


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None  # in the first chunk only
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]  # empty in the usage chunk
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moeray"
    max_model_len: int  # extension (vLLM has it too): prompt + output tokens at most


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
