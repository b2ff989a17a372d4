"""Incremental text for one request: new text per step, and stop strings.

Each step decodes only a window of the newest ids, not the whole output: the ids after the
last complete text (`read`) together with the ids of the piece before them (`prefix`), and
takes what the window adds to the piece alone. The piece gives the new ids their context (a
SentencePiece "▁" becomes a space only after a word, a word-level decoder puts a space between
words), so the pieces concatenate to the text of the whole output, while a step costs the
same at token 1000 as at token 10 (decoding everything each step made the router's step
O(output length) per request: 17% of its time at 128 tokens a request, bench/cluster_step.py).

A token may end in the middle of a UTF-8 character: its text ends in U+FFFD and is held until
the character completes (the window then grows). Text that could still turn into a stop string
is held back too, so no stop string is ever streamed.
"""

from moeray.models.tokenizer import Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), emitted: str = ""):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = emitted  # all text emitted so far (by this stream, or before a resume)
        self.stopped = False
        self.decoded = ""  # the text of output_ids[:read] (after a resume it starts with the emitted text)
        self.prefix = self.read = 0  # output_ids[prefix:read]: the last complete piece, the next window's context

    def push(self, output_ids: list[int], finished: bool) -> str:
        """All generated ids so far -> the new text to emit. Sets `stopped` on a stop string."""
        self._advance(output_ids, finished)
        full = self.decoded
        start = max(0, len(self.text) - self.hold)  # a stop string found before now would have stopped us
        cut = min((i for i in (full.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            full, finished, self.stopped = full[:cut], True, True
        if not finished:
            full = full[: max(len(self.text), len(full) - self.hold)]
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta

    def _advance(self, output_ids: list[int], finished: bool) -> None:
        """Decode the ids after `read` in the context of the piece before them; move on if the text is
        complete. The first push decodes every id (after a resume: the ids of the text already sent too)."""
        context = self.tokenizer.decode(output_ids[self.prefix:self.read]) if self.read > self.prefix else ""
        window = self.tokenizer.decode(output_ids[self.prefix:])
        if len(window) > len(context) and (finished or not window.endswith("\ufffd")):
            self.decoded += window[len(context):]
            self.prefix, self.read = self.read, len(output_ids)
