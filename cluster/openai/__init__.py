"""The OpenAI-compatible HTTP API's protocol layer: pure, no server, no Ray.

    model = ServedModel.load(path, name, max_model_len)          # once, at ingress start
    request = parse_request(ChatCompletionRequest, body)          # 400 on a malformed body
    call = convert_chat(request, model)                           # -> call.prompt_ids, call.params
    items = resumable_stream(outputs, call.prompt_ids, call.params, call.request_id, client)   # cluster.resume
    chat_response(call, items, model.tokenizer)                   # or SSEStream / sse_events
    any exception -> from_exception(err): .status_code, .to_json()

Modules: `protocol` (request and response bodies), `errors` (status + error body),
`chat_template` (messages -> prompt text), `served_model` (the model's name, tokenizer, limits),
`convert` (requests -> prompt ids + SamplingParams), `responses` (router items -> bodies, SSE).
"""

from moeray.cluster.openai.chat_template import BUILTIN_TEMPLATE, ChatTemplate, TemplateRejected
from moeray.cluster.openai.convert import GenerateRequest, convert_chat, convert_completion, parse_request
from moeray.cluster.openai.errors import (
    OpenAIError, from_exception, from_validation_error, invalid_request, model_not_found, overloaded)
from moeray.cluster.openai.protocol import (
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionRequest, ErrorResponse, ModelList)
from moeray.cluster.openai.responses import (
    SSEStream, chat_response, completion_response, model_list, sse_error, sse_events)
from moeray.cluster.openai.served_model import ServedModel

__all__ = [
    "BUILTIN_TEMPLATE", "ChatCompletion", "ChatCompletionChunk", "ChatCompletionRequest", "ChatTemplate", "Completion",
    "CompletionRequest", "ErrorResponse", "GenerateRequest", "ModelList", "OpenAIError", "SSEStream", "ServedModel",
    "TemplateRejected", "chat_response", "completion_response", "convert_chat", "convert_completion",
    "from_exception", "from_validation_error", "invalid_request", "model_not_found", "model_list", "overloaded",
    "parse_request", "sse_error", "sse_events",
]
