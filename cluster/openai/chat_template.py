"""Chat messages -> prompt text, by the checkpoint's own Jinja chat template.

Where the template comes from (first found, in the checkpoint folder):
1. `chat_template.jinja` (what recent transformers versions save),
2. `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates: "default"),
3. otherwise `BUILTIN_TEMPLATE`, for checkpoints without one such as the built-in default model:

       system: You are terse.
       user: Hello
       assistant:

   one "role: content" line per message, ending with "assistant:" for the model to go on from.

Templates are the checkpoint author's code, so they run in Jinja's immutable sandbox (no
attribute access to Python internals, no mutation of the messages), with what Hugging Face
templates expect: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
`raise_exception(message)`, `strftime_now(format)`, a `tojson` that keeps non-ASCII text, and
loop controls. A template that calls `raise_exception` (say, roles that do not alternate)
refuses the request: `TemplateRejected`, which `convert` turns into a 400 on `messages`.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moeray.models.checkpoint import CheckpointError

BUILTIN_TEMPLATE = ("{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")


class TemplateRejected(ValueError):
    """The chat template refused these messages; the message says why."""


class ChatTemplate:
    def __init__(self, source: str = BUILTIN_TEMPLATE, bos_token: str = "", eos_token: str = "",
                 origin: str = "built-in"):
        self.source, self.bos_token, self.eos_token, self.origin = source, bos_token, eos_token, origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as err:  # a broken checkpoint fails at startup, not per request
            raise CheckpointError(f"{origin}: chat template line {err.lineno}: {err.message}") from None

    @classmethod
    def from_folder(cls, path: str | Path) -> "ChatTemplate":
        """The checkpoint's template (see the module docstring for the order), or the built-in one."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
        if (path / "chat_template.jinja").is_file():
            return cls((path / "chat_template.jinja").read_text(), origin=str(path / "chat_template.jinja"), **tokens)
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if source is None:
            return cls(**tokens)
        if not isinstance(source, str):
            raise CheckpointError(f"{path / 'tokenizer_config.json'}: chat_template must be a string, "
                                  f"not {type(source).__name__}")
        return cls(source, origin=f"{path / 'tokenizer_config.json'}", **tokens)

    def render(self, messages: list[dict]) -> str:
        """[{"role", "content": str, "name"?}, ...] -> the prompt text, ready for the next assistant turn."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as err:
            raise TemplateRejected(f"the chat template ({self.origin}) refused these messages: {err}") from None


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: must hold a JSON object")
    return data


def _token_text(token: str | dict | None) -> str:
    """`"<s>"` or the saved AddedToken form `{"content": "<s>", ...}` -> "<s>"."""
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token or ""
