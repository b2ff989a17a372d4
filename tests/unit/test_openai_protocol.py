"""The OpenAI protocol layer without a server: requests -> prompt ids + SamplingParams, every
refusal's status / type / param / message, chat templates, and response bodies and SSE streams
read back by the real `openai` SDK (its types, and its client over an in-process transport)."""

import json
import shutil

import openai
import pytest
from openai.types import Completion as SDKCompletion
from openai.types import Model as SDKModel
from openai.types.chat import ChatCompletion as SDKChatCompletion
from openai.types.chat import ChatCompletionChunk as SDKChatCompletionChunk
from openai.types.shared import ErrorObject as SDKErrorObject

from moeray.actors.sequence import SamplingParams
from moeray.cluster.openai import (
    ChatCompletionRequest, ChatTemplate, CompletionRequest, OpenAIError, SSEStream, ServedModel, TemplateRejected,
    chat_response,
    completion_response, convert_chat, convert_completion, from_exception, from_validation_error, model_list,
    parse_request, sse_error, sse_events)
from moeray.cluster.openai.convert import chat_messages
from moeray.models import DEFAULT_MODEL_DIR
from moeray.models.checkpoint import CheckpointError

try:  # the transport module the installed openai SDK is built on
    import httpx2 as httpx
except ImportError:  # openai < 3
    import httpx

NAME = "moeray-default"
MAX_MODEL_LEN = 64  # small, so context errors are cheap to reach

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
INST = ("{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def model() -> ServedModel:
    return ServedModel.load(DEFAULT_MODEL_DIR, NAME, MAX_MODEL_LEN, vocab_size=2048)


def checkpoint_with(tmp_path, **tokenizer_config):
    """A checkpoint folder holding the default tokenizer and this tokenizer_config.json."""
    shutil.copy(DEFAULT_MODEL_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return tmp_path


def completion(served, /, **body):
    return convert_completion(parse_request(CompletionRequest, json.dumps(body)), served)


def chat(served, /, **body):
    return convert_chat(parse_request(ChatCompletionRequest, json.dumps(body)), served)


def user(text):
    return [{"role": "user", "content": text}]


def router_items(tokenizer, text, finish_reason="stop", per_item=1):
    """What the router streams (per request, `cluster.resume`) for an output `text`: per step its tokens, the text they
    complete (a partial UTF-8 character is held back), their logprobs."""
    ids = tokenizer.encode(text)[1:]  # without the BOS the tokenizer adds
    items, shown = [], ""
    for start in range(0, len(ids), per_item):
        step = ids[start:start + per_item]
        last = start + per_item >= len(ids)
        full = tokenizer.decode(ids[:start + per_item])
        full = full if last else full.rstrip("\ufffd")
        items.append({"token_ids": step, "text": full[len(shown):], "logprobs": [-0.5 - 0.1 * t for t in step],
                      "finished": last, "finish_reason": finish_reason if last else None})
        shown = full
    return items


def events(stream: str) -> list:
    """SSE text -> its data payloads (JSON decoded; "[DONE]" kept as is), checking the framing."""
    assert stream.endswith("\n\n")
    out = []
    for event in stream.split("\n\n")[:-1]:
        assert event.startswith("data: ") and "\n" not in event, event
        data = event.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---------------------------------------------------------------- requests -> prompt ids + params


def test_completion_request_defaults(model):
    call = completion(model, model=NAME, prompt="The quick brown fox")
    assert call.prompt_ids == model.tokenizer.encode("The quick brown fox")
    assert call.prompt_ids[0] == 1  # the tokenizer's BOS, once
    assert call.params == SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0)  # OpenAI's defaults
    assert call.kind == "completion" and call.request_id.startswith("cmpl-") and call.model == NAME
    assert not call.stream and not call.include_usage and not call.logprobs and call.echo_text == ""


def test_completion_request_sampling_fields_and_extensions(model):
    call = completion(model, model=NAME, prompt="hi", max_tokens=7, temperature=0, top_p=0.9, top_k=5, seed=42,
                      stop=["\n", "."], ignore_eos=True, n=1, presence_penalty=0, frequency_penalty=0.0,
                      user="u-1", stream=True, stream_options={"include_usage": True}, logprobs=0, best_of=1)
    assert call.params == SamplingParams(max_tokens=7, temperature=0.0, top_p=0.9, top_k=5, seed=42,
                                         stop=("\n", "."), ignore_eos=True)
    assert call.stream and call.include_usage and call.logprobs
    assert completion(model, prompt="hi", stop="END", top_k=-1).params.stop == ("END",)
    assert completion(model, prompt="hi", top_k=-1).params.top_k == 0  # vLLM clients' "off"


def test_completion_prompt_forms(model):
    ids = model.tokenizer.encode("hello world")
    assert completion(model, prompt=["hello world"]).prompt_ids == ids
    assert completion(model, prompt=ids).prompt_ids == ids
    assert completion(model, prompt=[ids]).prompt_ids == ids
    assert completion(model, prompt=[5, 6], echo=True).echo_text == model.tokenizer.decode([5, 6])
    assert completion(model, prompt="hello", echo=True).echo_text == "hello"


def test_completion_max_tokens_default_is_capped_by_context(model):
    prompt = [5] * (MAX_MODEL_LEN - 3)
    assert completion(model, prompt=prompt).params.max_tokens == 3
    assert completion(model, prompt=prompt, max_tokens=3).params.max_tokens == 3


def test_null_means_not_sent(model):
    call = completion(model, prompt="hi", stream=None, echo=None, logprobs=None, max_tokens=None, temperature=None,
                      top_p=None, top_k=None, stop=None, n=None, seed=None, ignore_eos=None, user=None)
    assert call.params == SamplingParams(temperature=1.0) and not call.stream and call.echo_text == ""
    call = chat(model, messages=user("hi"), logprobs=None, stream=True, stream_options={"include_usage": None})
    assert not call.logprobs and not call.include_usage and call.stream


def test_unknown_fields_are_accepted_and_listed(model):
    request = parse_request(CompletionRequest, {"prompt": "hi", "metadata": {"a": "b"}, "store": False, "x_vendor": 1})
    assert request.ignored_fields == ["metadata", "store", "x_vendor"]
    assert convert_completion(request, model).params == SamplingParams(temperature=1.0)
    nested = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi", "refusal": None}],
                                                   "stream": True, "stream_options": {"include_obfuscation": False}})
    assert nested.messages[0].ignored_fields == ["refusal"]
    assert nested.stream_options.ignored_fields == ["include_obfuscation"]


def test_chat_request_with_builtin_template(model):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": None}, {"role": "user", "content": [
                    {"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    request = parse_request(ChatCompletionRequest, {"model": NAME, "messages": messages})
    text = model.chat_template.render(chat_messages(request))
    assert text == "system: Be terse.\nuser: Hi\nassistant: \nuser: first\nsecond\nassistant:"
    call = convert_chat(request, model)
    assert call.prompt_ids == model.tokenizer.encode(text) and call.prompt_ids[:2] != [1, 1]
    assert call.kind == "chat" and call.request_id.startswith("chatcmpl-")
    assert call.params.max_tokens == MAX_MODEL_LEN - len(call.prompt_ids)  # chat default: all the room left


def test_chat_max_completion_tokens_wins_and_logprobs(model):
    call = chat(model, messages=user("Hi"), max_tokens=5, max_completion_tokens=3, logprobs=True, top_logprobs=0)
    assert call.params.max_tokens == 3 and call.logprobs
    assert chat(model, messages=user("Hi"), max_tokens=5).params.max_tokens == 5
    assert chat(model, messages=user("Hi"), tool_choice="none", response_format={"type": "text"}, tools=[]).prompt_ids


# ---------------------------------------------------------------- chat templates from the checkpoint


def test_chat_template_from_tokenizer_config(tmp_path):
    path = checkpoint_with(tmp_path, chat_template=CHATML, bos_token="<s>", eos_token="</s>")
    served = ServedModel.load(path, "chatml", MAX_MODEL_LEN)
    call = chat(served, messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    text = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert call.prompt_ids == served.tokenizer.encode(text)
    assert served.vocab_size == served.tokenizer.vocab_size


def test_chat_template_writing_bos_keeps_one(tmp_path):
    path = checkpoint_with(tmp_path, chat_template=INST, bos_token={"content": "<s>", "special": True},
                           eos_token="</s>")
    served = ServedModel.load(path, "inst", MAX_MODEL_LEN)
    assert served.chat_template.render(user("Hi")) == "<s>[INST] Hi [/INST]"
    ids = chat(served, messages=user("Hi")).prompt_ids
    assert ids[0] == 1 and ids[1] != 1 and ids == served.tokenizer.encode("[INST] Hi [/INST]")


def test_chat_template_refusal_is_a_400_on_messages(tmp_path):
    served = ServedModel.load(checkpoint_with(tmp_path, chat_template=INST, bos_token="<s>"), "inst", MAX_MODEL_LEN)
    with pytest.raises(OpenAIError) as caught:
        chat(served, messages=[{"role": "assistant", "content": "A"}])
    err = caught.value
    assert (err.status_code, err.type, err.param) == (400, "invalid_request_error", "messages")
    assert "roles must alternate" in err.message


def test_chat_template_sources(tmp_path):
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    assert ChatTemplate.from_folder(checkpoint_with(tmp_path, chat_template=named)).render([]) == "DEFAULT"
    (tmp_path / "chat_template.jinja").write_text("FILE {{ messages | length }}")
    assert ChatTemplate.from_folder(tmp_path).render(user("x")) == "FILE 1"
    assert ChatTemplate.from_folder(DEFAULT_MODEL_DIR).origin == "built-in"  # no tokenizer_config.json


def test_chat_template_runs_sandboxed(tmp_path):
    served = ServedModel.load(checkpoint_with(tmp_path, chat_template="{% set _ = messages.append(1) %}x"), "s", 64)
    with pytest.raises(OpenAIError) as caught:
        chat(served, messages=user("Hi"))
    assert caught.value.param == "messages" and "refused" in caught.value.message
    with pytest.raises(TemplateRejected, match="unsafe"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(user("x"))


# What GPT-OSS's harmony template leans on (written here, not its text): a macro with a default argument, a
# namespace assigned inside a loop, kwargs it may not get (`reasoning_effort`, `tools`), dict methods,
# rejectattr, tojson, strftime_now, loop.last and whitespace control, and raise_exception on a bad role.
HARMONY_LIKE = """
{%- macro header(role, channel=none) -%}
<|start|>{{ role }}{% if channel %}<|channel|>{{ channel }}{% endif %}<|message|>
{%- endmacro -%}
{%- set ns = namespace(developer="", seen=0) -%}
{%- for message in messages if message.role in ("system", "developer") -%}
  {%- set ns.developer = ns.developer + message.content -%}
  {%- set ns.seen = ns.seen + 1 -%}
{%- endfor -%}
{{- header("system") }}Current date: {{ strftime_now("%Y") | length }} digits
Reasoning: {{ reasoning_effort if reasoning_effort is defined else "medium" }}<|end|>
{%- if ns.developer or tools is defined -%}
{{- header("developer") }}{{ ns.developer }}<|end|>
{%- endif -%}
{%- for message in messages | rejectattr("role", "in", ["system", "developer"]) -%}
  {%- if message.role == "user" -%}
{{- header("user") }}{{ message.content }}<|end|>
  {%- elif message.role == "assistant" -%}
{{- header("assistant", message.get("channel", "final")) }}{{ message.content }}
{%- if not loop.last %}<|end|>{% endif -%}
  {%- elif message.role == "tool" -%}
{{- header("functions." ~ message.get("name", "tool")) }}{{ {"result": message.content} | tojson }}<|end|>
  {%- else -%}
{{- raise_exception("unknown role " ~ message.role) }}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|start|>assistant{% endif -%}
"""


def test_harmony_like_chat_template_renders_in_the_sandbox():
    template = ChatTemplate(HARMONY_LIKE)
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello", "name": None}, {"role": "tool", "content": "é", "name": "f"},
                {"role": "developer", "content": "Use f."}]
    assert template.render(messages) == (
        "<|start|>system<|message|>Current date: 4 digits\nReasoning: medium<|end|>"
        "<|start|>developer<|message|>Be brief. Use f.<|end|>"
        "<|start|>user<|message|>Hi<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello<|end|>"
        '<|start|>functions.f<|message|>{"result": "é"}<|end|>'
        "<|start|>assistant")
    with pytest.raises(TemplateRejected, match="unknown role robot"):
        template.render([{"role": "robot", "content": "x"}])


@pytest.mark.parametrize("config, message", [
    ({"chat_template": "{% for m in messages %}"}, "chat template line"),
    ({"chat_template": 5}, "chat_template must be a string"),
])
def test_broken_chat_template_fails_at_load(tmp_path, config, message):
    with pytest.raises(CheckpointError, match=message):
        ServedModel.load(checkpoint_with(tmp_path, **config), "bad", MAX_MODEL_LEN)


# ---------------------------------------------------------------- every refusal


LONG = [5] * MAX_MODEL_LEN
C, CHAT = "completion", "chat"
ERRORS = [
    # endpoint, body, status, param, code, fragment of the message
    (C, {"prompt": ""}, 400, "prompt", None, "prompt is empty"),
    (C, {"prompt": []}, 400, "prompt", None, "prompt is empty"),
    (C, {}, 400, "prompt", None, "prompt: Field required"),
    (C, {"prompt": ["a", "b"]}, 400, "prompt", None, "holds 2 prompts"),
    (C, {"prompt": 5}, 400, "prompt", None, "prompt=5 must be"),
    (C, {"prompt": [1, True]}, 400, "prompt", None, "prompt=[1, True]"),
    (C, {"prompt": [1, 5000]}, 400, "prompt", None, "prompt[1]=5000 is not a token id"),
    (C, {"prompt": LONG}, 400, "prompt", "context_length_exceeded", f"prompt is {MAX_MODEL_LEN} tokens long"),
    (C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None, "max_tokens=0 must be an integer >= 1"),
    (C, {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens", None, "max_tokens=-3"),
    (C, {"prompt": "hi", "max_tokens": 100}, 400, "max_tokens", "context_length_exceeded",
     "max_tokens=100 is too large"),
    (C, {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", None, "(got '5')"),
    (C, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", None, "(got 2.5)"),
    (C, {"prompt": "hi", "temperature": -1}, 400, "temperature", None, "temperature=-1.0 must be >= 0"),
    (C, {"prompt": "hi", "temperature": "hot"}, 400, "temperature", None, "(got 'hot')"),
    (C, {"prompt": "hi", "top_p": 0}, 400, "top_p", None, "top_p=0.0 must be in (0, 1]"),
    (C, {"prompt": "hi", "top_p": 1.5}, 400, "top_p", None, "top_p=1.5"),
    (C, {"prompt": "hi", "top_k": -2}, 400, "top_k", None, "top_k=-2 must be an integer >= 0"),
    (C, {"prompt": "hi", "seed": -1}, 400, "seed", None, "seed=-1"),
    (C, {"prompt": "hi", "stop": [""]}, 400, "stop", None, "stop=('',) must be a tuple of non-empty strings"),
    (C, {"prompt": "hi", "stop": 5}, 400, "stop", None, "(got 5)"),
    (C, {"prompt": "hi", "ignore_eos": "yes"}, 400, "ignore_eos", None, "(got 'yes')"),
    (C, {"prompt": "hi", "n": 2}, 400, "n", "unsupported_value", "n=2 is not supported"),
    (C, {"prompt": "hi", "n": 0}, 400, "n", "unsupported_value", "n=0"),
    (C, {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_value", "=0.5"),
    (C, {"prompt": "hi", "frequency_penalty": -1}, 400, "frequency_penalty", "unsupported_value", "=-1.0"),
    (C, {"prompt": "hi", "logit_bias": {"50": 10}}, 400, "logit_bias", "unsupported_value", "{'50': 10.0}"),
    (C, {"prompt": "hi", "logprobs": 1}, 400, "logprobs", "unsupported_value", "logprobs=1 is not supported"),
    (C, {"prompt": "hi", "logprobs": -1}, 400, "logprobs", None, "logprobs=-1 must be >= 0"),
    (C, {"prompt": "hi", "echo": True, "logprobs": 0}, 400, "echo", "unsupported_value", "prompt's logprobs"),
    (C, {"prompt": "hi", "suffix": "!"}, 400, "suffix", "unsupported_value", "suffix='!'"),
    (C, {"prompt": "hi", "best_of": 2}, 400, "best_of", "unsupported_value", "best_of=2"),
    (C, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", None, "only allowed"),
    (C, {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found", "'gpt-4' does not exist"),
    (CHAT, {"messages": []}, 400, "messages", None, "messages is empty"),
    (CHAT, {}, 400, "messages", None, "messages: Field required"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", None, "(got 'robot')"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role", None, "Field required"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None, "(got 5)"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]},
     400, "messages[0].content[1].type", "unsupported_value", "'image_url' is not supported"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400, "messages[0].content[0].text", None, "is missing"),
    (CHAT, {"messages": user("x" * 200)}, 400, "messages", "context_length_exceeded",
     "the prompt rendered from messages is 112 tokens long"),
    (CHAT, {"messages": user("hi"), "max_completion_tokens": 0}, 400, "max_completion_tokens", None,
     "max_completion_tokens=0 must be an integer >= 1"),
    (CHAT, {"messages": user("hi"), "max_completion_tokens": 60}, 400, "max_completion_tokens",
     "context_length_exceeded", "max_completion_tokens=60 is too large"),
    (CHAT, {"messages": user("hi"), "max_tokens": 60}, 400, "max_tokens", "context_length_exceeded", "max_tokens=60"),
    (CHAT, {"messages": user("hi"), "temperature": 1e400}, 400, "temperature", None, "temperature=inf"),
    (CHAT, {"messages": user("hi"), "logprobs": "yes"}, 400, "logprobs", None, "(got 'yes')"),
    (CHAT, {"messages": user("hi"), "top_logprobs": 2}, 400, "top_logprobs", "unsupported_value", "top_logprobs=2"),
    (CHAT, {"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools", "unsupported_value", "tools are not supported (1 given)"),
    (CHAT, {"messages": user("hi"), "tool_choice": "required"}, 400, "tool_choice", "unsupported_value", "'required'"),
    (CHAT, {"messages": user("hi"), "functions": [{"name": "f"}]}, 400, "functions", "unsupported_value", "tools"),
    (CHAT, {"messages": user("hi"), "response_format": {"type": "json_object"}}, 400, "response_format.type",
     "unsupported_value", "'json_object'"),
    (CHAT, {"messages": user("hi"), "n": 3}, 400, "n", "unsupported_value", "n=3"),
    (CHAT, {"messages": user("hi"), "model": "other"}, 404, "model", "model_not_found", "'other'"),
]


@pytest.mark.parametrize("endpoint, body, status, param, code, fragment", ERRORS,
                         ids=[f"{e[0]}-{e[3]}-{i}" for i, e in enumerate(ERRORS)])
def test_refusals(model, endpoint, body, status, param, code, fragment):
    with pytest.raises(OpenAIError) as caught:
        (completion if endpoint == C else chat)(model, **body)
    err = caught.value
    assert (err.status_code, err.param, err.code) == (status, param, code), err.message
    assert err.type == "invalid_request_error" and fragment in err.message, err.message
    sdk = SDKErrorObject.model_validate(json.loads(err.to_json())["error"])
    assert (sdk.param, sdk.code, sdk.message) == (param, code, err.message)


def test_invalid_json_body():
    for body in (b"{not json", b'{"prompt": "hi",}'):
        with pytest.raises(OpenAIError) as caught:
            parse_request(CompletionRequest, body)
        assert caught.value.status_code == 400 and caught.value.param is None
        assert caught.value.message.startswith("the request body is not valid JSON")
    with pytest.raises(OpenAIError, match="Input should be an object") as caught:
        parse_request(CompletionRequest, b'["hi"]')


def test_fastapi_validation_errors_drop_the_body_prefix():
    err = from_validation_error([{"type": "missing", "loc": ("body", "messages"), "msg": "Field required"}])
    assert (err.status_code, err.param, err.message) == (400, "messages", "messages: Field required")


# ---------------------------------------------------------------- exceptions from the router -> status


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic warnings on import
def test_router_errors_map_to_statuses():
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError

    from moeray.actors.router_actor import OverloadedError

    engine = ValueError("prompt has 70 tokens; max_model_len is 64 (the prompt and one generated token must fit)")
    assert (from_exception(engine).status_code, from_exception(engine).param) == (400, "prompt")
    renamed = from_exception(engine, {"prompt": "messages"})
    assert renamed.param == "messages" and renamed.message.startswith("messages has 70 tokens")
    remote = RayTaskError("RouterActor.submit", "Traceback (most recent call last): ...", engine)
    remote = remote.as_instanceof_cause()
    assert from_exception(remote).message == str(engine)  # the actor's message, not Ray's traceback
    for refusal in (OverloadedError("server overloaded: 256 requests are already waiting"),
                    RayTaskError("generate", "tb", OverloadedError("full")).as_instanceof_cause(),
                    BackPressureError(num_queued_requests=3, max_queued_requests=2)):
        err = from_exception(refusal)
        assert (err.status_code, err.type, err.code) == (429, "rate_limit_error", "server_overloaded")
    crash = from_exception(RuntimeError("world timed out"))
    assert (crash.status_code, crash.type, crash.param) == (500, "server_error", None)
    assert "RuntimeError" in crash.message and "world timed out" in crash.message
    mine = OpenAIError(404, "m", "invalid_request_error")
    assert from_exception(mine) is mine


# ---------------------------------------------------------------- responses, read by the SDK's types


def test_completion_response(model):
    call = completion(model, prompt="hi", max_tokens=8)
    items = router_items(model.tokenizer, " there, how are you", finish_reason="length", per_item=2)
    body = json.loads(completion_response(call, items, model.tokenizer).model_dump_json())
    sdk = SDKCompletion.model_validate(body)
    assert sdk.id == call.request_id and sdk.object == "text_completion" and sdk.model == NAME
    assert sdk.choices[0].text == " there, how are you" and sdk.choices[0].finish_reason == "length"
    assert sdk.choices[0].logprobs is None
    num_out = sum(len(i["token_ids"]) for i in items)
    assert (sdk.usage.prompt_tokens, sdk.usage.completion_tokens, sdk.usage.total_tokens) == \
        (len(call.prompt_ids), num_out, len(call.prompt_ids) + num_out)


def test_completion_response_echo_and_logprobs(model):
    items = router_items(model.tokenizer, " world")
    echoed = completion_response(completion(model, prompt="hello", echo=True), items, model.tokenizer)
    assert echoed.choices[0].text == "hello world"
    call = completion(model, prompt="hello", logprobs=0)
    sdk = SDKCompletion.model_validate_json(completion_response(call, items, model.tokenizer).model_dump_json())
    logprobs = sdk.choices[0].logprobs
    ids = [t for i in items for t in i["token_ids"]]
    assert logprobs.tokens == [model.tokenizer.decode([t]) for t in ids]
    assert logprobs.token_logprobs == pytest.approx([-0.5 - 0.1 * t for t in ids])
    assert logprobs.top_logprobs == [{t: lp} for t, lp in zip(logprobs.tokens, logprobs.token_logprobs)]
    assert logprobs.text_offset[0] == 0 and "".join(logprobs.tokens) == " world"


def test_chat_response(model):
    call = chat(model, messages=user("Hi"), logprobs=True)
    items = router_items(model.tokenizer, "Hello! é")  # "é" is two byte-level tokens
    sdk = SDKChatCompletion.model_validate_json(chat_response(call, items, model.tokenizer).model_dump_json())
    assert sdk.id == call.request_id and sdk.object == "chat.completion"
    assert sdk.choices[0].message.role == "assistant" and sdk.choices[0].message.content == "Hello! é"
    assert sdk.choices[0].finish_reason == "stop"
    content = sdk.choices[0].logprobs.content
    assert len(content) == sdk.usage.completion_tokens == sum(len(i["token_ids"]) for i in items)
    assert content[0].bytes == list(content[0].token.encode()) and content[0].top_logprobs == []
    assert content[-1].token == "\ufffd" and content[-1].bytes is None  # half of "é"


def test_unfinished_router_stream_is_an_error(model):
    items = router_items(model.tokenizer, "Hello there")[:-1]
    with pytest.raises(RuntimeError, match="ended before the request finished"):
        chat_response(chat(model, messages=user("Hi")), items, model.tokenizer)


def test_aborted_request_still_parses(model):
    items = [{"token_ids": [], "text": "", "logprobs": [], "finished": True, "finish_reason": "abort"}]
    body = chat_response(chat(model, messages=user("Hi")), items, model.tokenizer).model_dump_json()
    assert SDKChatCompletion.model_validate_json(body).choices[0].finish_reason == "stop"


def test_model_list(model):
    body = json.loads(model_list(model).model_dump_json())
    assert body["object"] == "list"
    card = SDKModel.model_validate(body["data"][0])
    assert (card.id, card.object, card.owned_by) == (NAME, "model", "moeray")
    assert body["data"][0]["max_model_len"] == MAX_MODEL_LEN


# ---------------------------------------------------------------- SSE streams


def test_chat_stream_with_usage(model):
    call = chat(model, messages=user("Hi"), stream=True, stream_options={"include_usage": True})
    items = router_items(model.tokenizer, "Hello there, é!")
    payloads = events("".join(sse_events(call, items, model.tokenizer)))
    assert payloads[-1] == "[DONE]"
    chunks = [SDKChatCompletionChunk.model_validate(p) for p in payloads[:-1]]
    assert {c.id for c in chunks} == {call.request_id} and {c.created for c in chunks} == {call.created}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "Hello there, é!"
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == sum(len(i["token_ids"]) for i in items)
    assert usage_chunk.usage.prompt_tokens == len(call.prompt_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert len(chunks) - 1 < len(items)  # the item holding half of "é" sends nothing


def test_completion_stream_echo_logprobs_offsets(model):
    call = completion(model, prompt="hello", stream=True, echo=True)
    items = router_items(model.tokenizer, " big world", per_item=1)
    payloads = events("".join(sse_events(call, items, model.tokenizer)))
    assert payloads[-1] == "[DONE]" and all(p["usage"] is None for p in payloads[:-1])  # no include_usage
    texts = [p["choices"][0]["text"] for p in payloads[:-1]]
    assert texts[0].startswith("hello") and "".join(texts) == "hello big world"
    SDKCompletion.model_validate(payloads[-2])  # the last chunk carries a finish_reason, as the SDK type wants
    call = completion(model, prompt="hello", stream=True, logprobs=0)
    chunks = events("".join(sse_events(call, items, model.tokenizer)))[:-1]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]  # across chunks


def test_sse_stream_pushed_item_by_item(model):
    call = chat(model, messages=user("Hi"), stream=True)
    stream = SSEStream(call, model.tokenizer)
    held = {"token_ids": [200], "text": "", "logprobs": [-1.0], "finished": False, "finish_reason": None}
    assert stream.push(held) == ""  # nothing to show yet
    first = stream.push({"token_ids": [201], "text": "ab", "logprobs": [-1.0], "finished": True,
                         "finish_reason": "length"})
    chunk = SDKChatCompletionChunk.model_validate_json(first.removeprefix("data: "))
    assert chunk.choices[0].delta.role == "assistant" and chunk.choices[0].finish_reason == "length"
    assert stream.close() == "data: [DONE]\n\n" and stream.num_tokens == 2


# ---------------------------------------------------------------- the real SDK client, in process


def sdk_client(model, reply: str, fail_after_first_event: bool = False) -> openai.OpenAI:
    """An `openai.OpenAI` whose HTTP transport is this layer with a scripted router: what an
    ingress does, without a server. The router 'generates' `reply` for every request."""

    def handle(request: httpx.Request) -> httpx.Response:
        try:
            if request.url.path == "/v1/models":
                return httpx.Response(200, json=model_list(model).model_dump())
            cls, convert = ((ChatCompletionRequest, convert_chat) if request.url.path == "/v1/chat/completions"
                            else (CompletionRequest, convert_completion))
            call = convert(parse_request(cls, request.content), model)
            items = router_items(model.tokenizer, reply)
            if call.stream:
                stream = list(sse_events(call, items, model.tokenizer))
                if fail_after_first_event:
                    stream = stream[:1] + [sse_error(from_exception(RuntimeError("expert group 1 died")))]
                return httpx.Response(200, headers={"content-type": "text/event-stream"}, text="".join(stream))
            respond = chat_response if call.kind == "chat" else completion_response
            return httpx.Response(200, json=respond(call, items, model.tokenizer).model_dump())
        except Exception as err:  # noqa: BLE001 — every error becomes its OpenAI body, as in the ingress
            error = from_exception(err)
            return httpx.Response(error.status_code, json=error.body().model_dump())

    return openai.OpenAI(api_key="unused", base_url="http://moeray.test/v1", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handle)))


def test_sdk_client_round_trip(model):
    client = sdk_client(model, " and good day")
    answer = client.chat.completions.create(model=NAME, messages=user("Hi"), max_completion_tokens=20, seed=1,
                                            temperature=0.2, stop=["\n"], user="u", metadata={"k": "v"})
    assert answer.choices[0].message.content == " and good day" and answer.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=NAME, messages=user("Hi"), stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == " and good day"
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    text = client.completions.create(model=NAME, prompt="Well", max_tokens=10, extra_body={"top_k": 5})
    assert text.choices[0].text == " and good day"
    streamed = list(client.completions.create(model=NAME, prompt="Well", stream=True))
    assert "".join(c.choices[0].text for c in streamed) == " and good day"
    assert [m.id for m in client.models.list()] == [NAME]


def test_sdk_client_raises_our_errors(model):
    client = sdk_client(model, "x")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=NAME, messages=user("Hi"), n=2)
    assert (caught.value.param, caught.value.code) == ("n", "unsupported_value") and "n=2" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.APIError, match="expert group 1 died"):
        list(sdk_client(model, "abc def", fail_after_first_event=True).chat.completions.create(
            model=NAME, messages=user("Hi"), stream=True))
