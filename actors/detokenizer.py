"""Incremental text for one request: new text per step, and stop strings.

Decoding the whole output each time is simple and exact for byte-level BPE (a token may end in
the middle of a UTF-8 character: such text is held back until the character completes). Text
that could still turn into a stop string is held back too, so no stop string is ever streamed.
"""

from moeray.models.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), emitted: str = ""):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = emitted  # all text emitted so far (by this stream, or before a resume)
        self.stopped = False

    def push(self, output_ids: list[int], finished: bool) -> str:
        """All generated ids so far -> the new text to emit. Sets `stopped` on a stop string."""
        full = self.tokenizer.decode(output_ids)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            full, finished, self.stopped = full[:cut], True, True
        if not finished:
            full = full.rstrip("\ufffd")
            full = full[: max(len(self.text), len(full) - self.hold)]
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta
