"""TextStream decodes a window of ids per step: its text must be the whole output's text, whatever
the tokenizer (byte-level BPE with characters split across tokens, SentencePiece-style "▁"
spaces, word-level), after a resume, and with stop strings."""

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moeray.actors.detokenizer import TextStream
from moeray.models.tokenizer import Tokenizer

CORPUS = ["the café serves crème brûlée", "北京 上海 広州 東京", "emoji 🙂 🚀 ok", "plain words and more words",
          "naïve façade — déjà vu"] * 20
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "default"


def _trained(tmp_path: Path, name: str, tok: HFTokenizer, trainer) -> Tokenizer:
    tok.train_from_iterator(CORPUS, trainer)
    folder = tmp_path / name
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


@pytest.fixture(scope="module", params=["default-model", "byte-bpe", "metaspace", "word-level"])
def tokenizer(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    if request.param == "default-model":
        return Tokenizer(DEFAULT_MODEL)
    if request.param == "byte-bpe":  # few merges: multi-byte characters end up split across tokens
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        return _trained(tmp, "bpe", tok, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if request.param == "metaspace":
        tok = HFTokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        return _trained(tmp, "meta", tok, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    tok = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece()
    return _trained(tmp, "word", tok, trainers.WordLevelTrainer(special_tokens=["<unk>"]))


def _id_sequences(tokenizer: Tokenizer) -> list[list[int]]:
    """Encoded text (characters really split across tokens) and random ids (any byte soup)."""
    rng = random.Random(0)
    texts = [tokenizer.encode(line) for line in CORPUS[:5]]
    return texts + [[rng.randrange(tokenizer.vocab_size) for _ in range(40)] for _ in range(5)]


def _stream(tokenizer: Tokenizer, ids: list[int], emitted: str = "", start: int = 0, stop=()) -> TextStream:
    stream = TextStream(tokenizer, stop, emitted=emitted)
    for n in range(start + 1, len(ids) + 1):
        stream.push(ids[:n], finished=n == len(ids))
        if stream.stopped:
            break
    return stream


def test_streamed_text_is_the_whole_outputs_text(tokenizer):
    for ids in _id_sequences(tokenizer):
        stream, expected = TextStream(tokenizer), tokenizer.decode(ids)
        pieces = [stream.push(ids[:n], finished=n == len(ids)) for n in range(1, len(ids) + 1)]
        assert "".join(pieces) == stream.text == expected


def test_resume_continues_the_text(tokenizer):
    for ids in _id_sequences(tokenizer):
        for cut in (1, len(ids) // 2, len(ids) - 1):
            before = TextStream(tokenizer)  # the stream that was cut: what it had sent
            for n in range(1, cut + 1):
                before.push(ids[:n], finished=False)
            resumed = _stream(tokenizer, ids, emitted=before.text, start=cut)
            assert resumed.text == tokenizer.decode(ids), cut


def test_stop_string_ends_the_text_before_it():
    tok = Tokenizer(DEFAULT_MODEL)
    ids = tok.encode("the value of x is returned by the function")
    stream = _stream(tok, ids, stop=("returned",))
    assert stream.stopped and stream.text == tok.decode(ids).split("returned")[0]
