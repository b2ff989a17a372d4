"""The checkpoint's tokenizer (`tokenizer.json`), read with the `tokenizers` library."""

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from moeray.models.checkpoint import CheckpointError


class Tokenizer:
    def __init__(self, path: str | Path):
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: tokenizer file not found (moeray reads tokenizer.json)")
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as err:  # the tokenizers library raises plain Exception subclasses
            raise CheckpointError(f"{file}: cannot read tokenizer: {err}") from err

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids, with the special tokens (e.g. BOS) the tokenizer's post-processor adds."""
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
