"""`ServedModel`: what the OpenAI layer needs to know about the one model behind it.

Built once when the ingress starts (`ServedModel.load`), then read by every request: the name
clients must send, the tokenizer and chat template that turn requests into token ids, and the
limits requests are checked against before they reach the router.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

from moeray.cluster.openai.chat_template import ChatTemplate
from moeray.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class ServedModel:
    name: str  # what clients put in "model"; /v1/models lists it
    tokenizer: Tokenizer
    max_model_len: int  # prompt + output tokens at most: the engine's own `Engine.max_model_len`
    vocab_size: int  # token ids in a prompt must be below it: the model's, which may exceed the tokenizer's
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)
    created: int = field(default_factory=lambda: int(time.time()))  # /v1/models "created"
    system_fingerprint: str | None = None  # echoed in every response when set

    def __post_init__(self):
        for name in ("max_model_len", "vocab_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 2):
                raise ValueError(f"{name}={value!r} must be an integer >= 2")

    @classmethod
    def load(cls, path: str | Path, name: str, max_model_len: int, vocab_size: int | None = None,
             system_fingerprint: str | None = None) -> "ServedModel":
        """Tokenizer and chat template from a checkpoint folder. `vocab_size` default: the tokenizer's."""
        tokenizer = Tokenizer(path)
        return cls(name, tokenizer, max_model_len, vocab_size or tokenizer.vocab_size,
                   ChatTemplate.from_folder(path), system_fingerprint=system_fingerprint)
