"""A request resumed on a fresh engine (its router died) goes on exactly where it stopped: the
same remaining tokens and text, greedy or seeded, with a stop string completing across the cut."""

import pytest
from checkpoints import VOCAB

from moeray.actors.engine import Engine, EngineConfig, Resume
from moeray.actors.sequence import SamplingParams
from moeray.models import load_model

PROMPT = [(7 * i + 3) % VOCAB for i in range(30)]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return load_model(make_checkpoint("mixtral_swa"))


def engine(model, tokenizer):
    return Engine(model, tokenizer, EngineConfig(block_size=4, kv_cache_bytes=1 << 20))


def stream(eng, prompt, params, resume=None):
    """-> the per-step items (token_ids, text, finish_reason) of one request, run to its end."""
    seq_id = eng.add_request(prompt, params, resume)
    items = []
    while eng.has_unfinished:
        items += [(o.new_token_ids, o.new_text, o.finish_reason) for o in eng.step() if o.seq_id == seq_id]
    return items


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("cut", [1, 6, 15])
def test_resumed_request_continues_with_the_same_tokens_and_text(model, tokenizer, params, cut):
    whole = stream(engine(model, tokenizer), PROMPT, params)
    assert len(whole) == 16
    done_ids = [t for ids, _, _ in whole[:cut] for t in ids]
    done_text = "".join(text for _, text, _ in whole[:cut])
    rest = stream(engine(model, tokenizer), PROMPT, params, Resume(done_ids, done_text))
    assert rest == whole[cut:]


def test_seeded_request_really_samples(model, tokenizer):
    greedy = [ids for ids, _, _ in stream(engine(model, tokenizer), PROMPT, GREEDY)]
    seeded = [ids for ids, _, _ in stream(engine(model, tokenizer), PROMPT, SEEDED)]
    assert greedy != seeded


def test_stop_string_across_the_cut(model, tokenizer):
    whole = stream(engine(model, tokenizer), PROMPT, GREEDY)
    text = "".join(text for _, text, _ in whole)
    words = text.split(" ")
    # the end of token k's word, the space, the start of token k+1's: the first k >= 3 where that is new
    stop = next(stop for k in range(3, 15) if text.find(stop := words[k][-2:] + " " + words[k + 1][:3])
                == len(" ".join(words[:k + 1])) - 2)
    params = SamplingParams(max_tokens=16, ignore_eos=True, stop=(stop,))
    items = stream(engine(model, tokenizer), PROMPT, params)
    assert items[-1][2] == "stop" and len(items) >= 3
    cut = len(items) - 1  # the stop string's first part is out (held back), its last token comes after the resume
    done_ids = [t for ids, _, _ in items[:cut] for t in ids]
    rest = stream(engine(model, tokenizer), PROMPT, params, Resume(done_ids, "".join(t for _, t, _ in items[:cut])))
    assert rest == items[cut:]
    assert rest[-1][2] == "stop"


@pytest.mark.parametrize("resume,message", [
    (Resume([VOCAB]), f"resume token id {VOCAB} is out of range"),
    (Resume(["x"]), "resume token id 'x' is not an integer"),
    (Resume(list(range(3, 19))), "resume has 16 tokens; max_tokens=16 leaves none"),
])
def test_bad_resume_is_refused(model, tokenizer, resume, message):
    eng = engine(model, tokenizer)
    with pytest.raises(ValueError, match=message):
        eng.add_request(PROMPT, GREEDY, resume)
    assert not eng.has_unfinished
