"""Router stream items -> OpenAI response bodies: one JSON object, or server-sent events.

The router streams dicts `{token_ids, text, logprobs, finished, finish_reason}` per request
(`cluster.resume.resumable_stream`), one per step (several merged when the reader lags). Not streamed, `completion_response` /
`chat_response` concatenate them into one body. Streamed, `SSEStream` turns each item into at
most one `data: {chunk}\\n\\n` event and `close()` ends the stream: with
`stream_options.include_usage` a chunk with empty `choices` and the usage, then `data: [DONE]`.
The ingress drives it from its own (async) loop:

    events = SSEStream(call, model.tokenizer)
    async for item in router_stream:
        if event := events.push(item):
            yield event
    yield events.close()

An error after the response has started goes out as one more event, `sse_error(err)`, which
the openai SDK raises as `APIError`. A chat stream's first chunk carries `role: "assistant"`.

Logprobs are the chosen token's, one per output token; a token's text is that token decoded
alone, so a token holding part of a UTF-8 character reads "\\ufffd" (chat `bytes` is then None)
and completions' `text_offset` counts those characters. The router's finish_reason "abort" (the
client went away) is written as "stop": nobody reads it, and the body stays one clients parse.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from moeray.cluster.openai.convert import GenerateRequest
from moeray.cluster.openai.errors import OpenAIError
from moeray.cluster.openai.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs,
    Completion, CompletionChoice, CompletionLogprobs, ModelCard, ModelList, TokenLogprob, Usage)
from moeray.cluster.openai.served_model import ServedModel
from moeray.models.tokenizer import Tokenizer

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop"}  # router's -> OpenAI's
DONE = "data: [DONE]\n\n"


def completion_response(call: GenerateRequest, items: Iterable[dict], tokenizer: Tokenizer) -> Completion:
    out = _collect(items)
    choice = CompletionChoice(text=call.echo_text + out.text, finish_reason=out.finish_reason,
                              logprobs=_completion_logprobs(call, out.token_ids, out.logprobs, tokenizer, 0))
    return Completion(id=call.request_id, created=call.created, model=call.model,
                      system_fingerprint=call.system_fingerprint, choices=[choice],
                      usage=_usage(call, len(out.token_ids)))


def chat_response(call: GenerateRequest, items: Iterable[dict], tokenizer: Tokenizer) -> ChatCompletion:
    out = _collect(items)
    choice = ChatChoice(message=AssistantMessage(content=out.text), finish_reason=out.finish_reason,
                        logprobs=_chat_logprobs(call, out.token_ids, out.logprobs, tokenizer))
    return ChatCompletion(id=call.request_id, created=call.created, model=call.model,
                          system_fingerprint=call.system_fingerprint, choices=[choice],
                          usage=_usage(call, len(out.token_ids)))


class SSEStream:
    """One streamed request's events; `push` each router item, then `close`."""

    def __init__(self, call: GenerateRequest, tokenizer: Tokenizer):
        self.call, self.tokenizer = call, tokenizer
        self.num_tokens = 0  # output tokens so far, for the usage chunk
        self.text_offset = len(call.echo_text)  # completions logprobs: where the next token's text starts
        self.started = False  # a chunk has been sent

    def push(self, item: dict) -> str:
        """One router item -> one `data:` event, or "" when it has nothing to show yet (tokens whose
        text is held back, say the first bytes of a character)."""
        ids, text = item["token_ids"], item["text"]
        finish_reason = FINISH_REASONS[item["finish_reason"]] if item["finished"] else None
        self.num_tokens += len(ids)
        first = not self.started
        if not (text or finish_reason or (self.call.logprobs and ids) or (first and self.call.echo_text)):
            return ""
        self.started = True
        if self.call.kind == "chat":
            choice = ChatChunkChoice(delta=ChatDelta(role="assistant" if first else None, content=text),
                                     logprobs=_chat_logprobs(self.call, ids, item["logprobs"], self.tokenizer),
                                     finish_reason=finish_reason)
            return _event(self._chat_chunk([choice]))
        text = (self.call.echo_text if first else "") + text
        logprobs = _completion_logprobs(self.call, ids, item["logprobs"], self.tokenizer, self.text_offset)
        self.text_offset += sum(len(t) for t in logprobs.tokens) if logprobs else 0
        return _event(self._completion_chunk([CompletionChoice(text=text, logprobs=logprobs,
                                                               finish_reason=finish_reason)]))

    def close(self) -> str:
        """The usage chunk (when asked for) and `data: [DONE]`."""
        if not self.call.include_usage:
            return DONE
        usage = _usage(self.call, self.num_tokens)
        chunk = self._chat_chunk([], usage) if self.call.kind == "chat" else self._completion_chunk([], usage)
        return _event(chunk) + DONE

    def _chat_chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.call.request_id, created=self.call.created, model=self.call.model,
                                   system_fingerprint=self.call.system_fingerprint, choices=choices, usage=usage)

    def _completion_chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=self.call.request_id, created=self.call.created, model=self.call.model,
                          system_fingerprint=self.call.system_fingerprint, choices=choices, usage=usage)


def sse_events(call: GenerateRequest, items: Iterable[dict], tokenizer: Tokenizer) -> Iterator[str]:
    """`SSEStream` over a plain iterable: every event of the response, `data: [DONE]` last."""
    stream = SSEStream(call, tokenizer)
    for item in items:
        if event := stream.push(item):
            yield event
    yield stream.close()


def sse_error(err: OpenAIError) -> str:
    """An error after the stream started: the error body as one event (no [DONE] follows)."""
    return f"data: {err.to_json()}\n\n"


def model_list(model: ServedModel) -> ModelList:
    """The `/v1/models` body."""
    return ModelList(data=[ModelCard(id=model.name, created=model.created, max_model_len=model.max_model_len)])


@dataclass
class _Output:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


def _collect(items: Iterable[dict]) -> _Output:
    out = _Output()
    for item in items:
        out.token_ids += item["token_ids"]
        out.text += item["text"]
        out.logprobs += item["logprobs"]
        if item["finished"]:
            out.finish_reason = FINISH_REASONS[item["finish_reason"]]
    if out.finish_reason is None:
        raise RuntimeError(f"the router's stream ended before the request finished ({len(out.token_ids)} tokens)")
    return out


def _usage(call: GenerateRequest, num_output_tokens: int) -> Usage:
    return Usage(prompt_tokens=len(call.prompt_ids), completion_tokens=num_output_tokens,
                 total_tokens=len(call.prompt_ids) + num_output_tokens)


def _completion_logprobs(call: GenerateRequest, ids: list[int], logprobs: list[float], tokenizer: Tokenizer,
                         offset: int) -> CompletionLogprobs | None:
    if not call.logprobs:
        return None
    tokens = [tokenizer.decode([t]) for t in ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, text_offset=offsets,
                              top_logprobs=[{t: lp} for t, lp in zip(tokens, logprobs)])


def _chat_logprobs(call: GenerateRequest, ids: list[int], logprobs: list[float],
                   tokenizer: Tokenizer) -> ChatLogprobs | None:
    if not call.logprobs:
        return None
    tokens = [tokenizer.decode([t]) for t in ids]
    return ChatLogprobs(content=[TokenLogprob(token=t, bytes=None if "\ufffd" in t else list(t.encode()), logprob=lp)
                                 for t, lp in zip(tokens, logprobs)])


def _event(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"
