"""The engine: continuous batching, chunked prefill and preemption never change greedy tokens;
requests end for the right reason; seeded sampling repeats; bad requests are refused cleanly."""

import copy
import dataclasses
import math
import re

import pytest
import torch
from checkpoints import EOS, VOCAB

from moeray.actors.engine import Engine, EngineConfig
from moeray.actors.kv_cache import kv_bytes_per_token
from moeray.actors.sequence import SamplingParams
from moeray.models import load_model

BLOCK = 4
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
PROMPTS = [  # lengths 3, 17, 9, 30, 1
    [5, 17, 200],
    [3, 44, 91, 150, 7, 7, 12, 190, 33, 58, 101, 5, 66, 87, 140, 9, 20],
    [120, 8, 16, 32, 64, 128, 4, 99, 10],
    [(7 * i + 3) % VOCAB for i in range(30)],
    [42],
]


@pytest.fixture(scope="module", params=["qwen2_moe_swa", "deepseek_v3_lora"])
def model(make_checkpoint, request):
    """Qwen2-MoE with a sliding window (6) on layer 0, a dense layer and shared experts; and
    DeepSeek-V3, whose KV cache holds MLA's latents (keys and values of different widths, values a
    view of the keys)."""
    return load_model(make_checkpoint(request.param))


def engine(model, tokenizer=None, **config):
    return Engine(model, tokenizer, EngineConfig(**{"block_size": BLOCK, "kv_cache_bytes": 1 << 20, **config}))


@pytest.fixture(scope="module")
def alone(model):
    """Greedy tokens of each prompt run by itself on a fresh engine."""
    return [engine(model).generate([p], GREEDY)[0].token_ids for p in PROMPTS]


def run(eng, ids, max_steps=500):
    """Step until the requests `ids` finish -> {id: (token_ids, text, finish_reason)}."""
    out = {i: ([], "", None) for i in ids}
    for _ in range(max_steps):
        if not eng.has_unfinished:
            break
        for o in eng.step():
            tokens, text, _ = out.get(o.seq_id, ([], "", None))
            out[o.seq_id] = (tokens + o.new_token_ids, text + o.new_text, o.finish_reason)
    assert not eng.has_unfinished, "engine did not finish"
    return out


def test_alone_is_distinct_and_full_length(alone):
    assert all(len(t) == 16 for t in alone)
    assert len({tuple(t) for t in alone}) == len(alone)


def test_batch_of_different_lengths_matches_each_alone(model, alone):
    eng = engine(model)
    done = eng.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in done] == alone
    assert all(c.finish_reason == "length" for c in done)
    assert eng.cache.allocator.num_free == eng.cache.allocator.num_blocks  # every block came back


def test_request_joining_a_running_batch(model, alone):
    eng = engine(model)
    first = [eng.add_request(p, GREEDY) for p in PROMPTS[:2]]
    out = {}
    for step in range(40):
        if step == 5:  # the first two are decoding by now
            assert all(eng._seqs[i].output_ids for i in first)
            late = eng.add_request(PROMPTS[3], GREEDY)
        for o in eng.step():
            out.setdefault(o.seq_id, []).extend(o.new_token_ids)
    assert not eng.has_unfinished
    assert [out[first[0]], out[first[1]], out[late]] == [alone[0], alone[1], alone[3]]


def test_chunked_prefill_gives_the_same_tokens(model, alone):
    eng = engine(model, max_num_batched_tokens=7)
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    first = eng.step()
    assert [o.seq_id for o in first] == [ids[0]]  # 3 prompt tokens + the first 4 of the 17-token prompt
    assert eng._seqs[ids[1]].num_computed == 4 and eng._seqs[ids[3]].num_computed == 0
    out = run(eng, ids)
    assert [first[0].new_token_ids + out[ids[0]][0]] + [out[i][0] for i in ids[1:]] == alone


def test_chunked_prefill_chunks_one_prompt(model, alone):
    """max_num_batched_tokens smaller than the prompt: 30 tokens prefilled in chunks of 8 (the last of 6)."""
    eng = engine(model, max_num_batched_tokens=8)
    seq_id = eng.add_request(PROMPTS[3], GREEDY)
    computed, tokens = [], []
    while eng.has_unfinished:
        tokens += [t for o in eng.step() for t in o.new_token_ids]
        if seq_id in eng._seqs:
            computed.append(eng._seqs[seq_id].num_computed)
    assert computed[:5] == [8, 16, 24, 30, 31]  # four prefill chunks, then decode
    assert tokens == alone[3]


def test_preemption_recomputes_to_the_same_tokens(model, alone):
    """A KV cache of 12 blocks of 4 tokens holds any one request (<= 46 tokens) but not all at once."""
    kv_bytes = kv_bytes_per_token(model.config, model.dtype) * BLOCK * 12
    eng = engine(model, kv_cache_bytes=kv_bytes)
    assert eng.cache.allocator.num_blocks == 12 and eng.max_model_len == 48
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    out = run(eng, ids)
    assert eng.batcher.num_preemptions > 0
    assert [out[i][0] for i in ids] == alone
    assert eng.cache.allocator.num_free == 12


def test_request_longer_than_the_kv_cache_ends_with_length(model):
    """A request that would outgrow the whole cache ends at its capacity instead of waiting forever."""
    kv_bytes = kv_bytes_per_token(model.config, model.dtype) * BLOCK * 4  # 16 tokens
    eng = engine(model, kv_cache_bytes=kv_bytes)
    seq_id = eng.add_request(PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True))
    tokens, _, reason = run(eng, [seq_id], max_steps=100)[seq_id]
    assert reason == "length" and len(tokens) == 16 - len(PROMPTS[2])
    full = engine(model).generate([PROMPTS[2]], SamplingParams(max_tokens=7, ignore_eos=True))[0].token_ids
    assert tokens == full


def test_max_model_len_bounds_the_sequence(model, alone):
    eng = engine(model, max_model_len=20)
    [done] = eng.generate([PROMPTS[2]], SamplingParams(max_tokens=50, ignore_eos=True))
    assert done.finish_reason == "length" and done.token_ids == alone[2][:11]


def test_max_tokens(model, alone):
    done = engine(model).generate(PROMPTS[:2], SamplingParams(max_tokens=5, ignore_eos=True))
    assert [c.token_ids for c in done] == [alone[0][:5], alone[1][:5]]
    assert [c.finish_reason for c in done] == ["length", "length"]


def test_eos_ends_a_request(model, alone):
    """With the model's EOS set to a token greedy decoding reaches, the request stops right after it."""
    model = copy.deepcopy(model)  # its config is edited below
    assert model.config.eos_token_ids == (EOS,)
    eos = alone[1][6]
    model.config = dataclasses.replace(model.config, eos_token_ids=(EOS, eos))
    stop_at = alone[1].index(eos) + 1
    eng = engine(model)
    ended, ignored = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=16))[0], \
        eng.generate([PROMPTS[1]], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert ended.token_ids == alone[1][:stop_at] and ended.finish_reason == "stop"
    assert ignored.token_ids == alone[1] and ignored.finish_reason == "length"


def words(ids):
    return " ".join(f"w{i:03d}" for i in ids if i > 2)


def test_tokenizer_matches_the_vocab(tokenizer, alone):
    assert tokenizer.vocab_size == VOCAB
    assert tokenizer.encode(words(alone[1])) == [i for i in alone[1] if i > 2]
    assert tokenizer.decode(alone[1]) == words(alone[1])


@pytest.mark.parametrize("which", ["one token", "across tokens"])
def test_stop_string_ends_a_request_and_is_not_in_the_text(model, tokenizer, alone, which):
    prompt, tokens = PROMPTS[3], alone[3]
    full_text = tokenizer.decode(tokens)
    if which == "one token":  # a token from the middle whose word is not in the text before it
        i = next(i for i in range(7, 12) if tokens[i] > 2 and f"w{tokens[i]:03d}" not in tokenizer.decode(tokens[:i]))
        stop = f"w{tokens[i]:03d}"
    else:  # the end of token 5's word, the space and the start of token 6's
        stop = full_text.split(" ")[5][-2:] + " " + full_text.split(" ")[6][:2]
    cut = full_text.find(stop)
    num_tokens = next(n for n in range(1, 17) if stop in tokenizer.decode(tokens[:n]))
    eng = engine(model, tokenizer)
    seq_id = eng.add_request(prompt, SamplingParams(max_tokens=16, ignore_eos=True, stop=(stop, "never seen")))
    out_tokens, text, reason = run(eng, [seq_id])[seq_id]
    assert reason == "stop"
    assert out_tokens == tokens[:num_tokens]
    assert text == full_text[:cut] and stop not in text
    assert 0 < cut < len(full_text) - len(stop)  # the stop string was really in the middle


def test_text_streams_to_the_full_text(model, tokenizer, alone):
    eng = engine(model, tokenizer)
    done = eng.generate(PROMPTS[:3], GREEDY)
    assert [c.text for c in done] == [tokenizer.decode(t) for t in alone[:3]]


def test_seeded_sampling_is_reproducible(model):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    first = engine(model).generate([PROMPTS[2]], params)[0].token_ids
    again = engine(model).generate([PROMPTS[2]], params)[0].token_ids
    others = [SamplingParams(max_tokens=16, temperature=0.7, ignore_eos=True), GREEDY,
              dataclasses.replace(params, seed=99)]
    eng = engine(model)  # the same request in a batch with unseeded, greedy and other-seed requests
    ids = [eng.add_request(PROMPTS[0], others[0]), eng.add_request(PROMPTS[2], params),
           eng.add_request(PROMPTS[1], others[1]), eng.add_request(PROMPTS[2], others[2])]
    out = run(eng, ids)
    assert first == again == out[ids[1]][0]
    assert out[ids[3]][0] != first  # another seed, another stream
    greedy = engine(model).generate([PROMPTS[2]], GREEDY)[0].token_ids
    assert first != greedy  # it really sampled


BAD_PARAMS = [
    ("max_tokens", 0), ("max_tokens", 2.5), ("temperature", -0.5), ("temperature", math.nan), ("top_p", 0.0),
    ("top_p", 1.5), ("top_k", -1), ("seed", -3), ("stop", ("",)), ("ignore_eos", "yes"),
]


@pytest.mark.parametrize("field,value", BAD_PARAMS)
def test_bad_sampling_params_name_field_and_value(field, value):
    with pytest.raises(ValueError, match="^" + re.escape(f"{field}={value!r} must be")):
        SamplingParams(**{field: value})


def test_stop_given_as_a_string_is_one_stop_string():
    assert SamplingParams(stop="w012").stop == ("w012",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


BAD_PROMPTS = [
    ([], "empty"), ([5, VOCAB, 6], f"token id {VOCAB} is out of range"), ([-1], "token id -1 is out of range"),
    ([3, 1.5], "token id 1.5 is not an integer"), (list(range(3, 23)), "prompt has 20 tokens; max_model_len is 20"),
]


def test_bad_requests_are_refused_and_the_engine_keeps_working(model, tokenizer, alone):
    eng = engine(model, max_model_len=20)
    no_text = engine(model)
    first = eng.add_request(PROMPTS[0], GREEDY)
    early = [t for _ in range(2) for o in eng.step() for t in o.new_token_ids]  # it is running
    for prompt, message in BAD_PROMPTS:
        with pytest.raises(ValueError, match=message):
            eng.add_request(prompt, GREEDY)
    with pytest.raises(ValueError, match="stop=.*needs a tokenizer"):
        no_text.add_request(PROMPTS[0], SamplingParams(stop=("w010",)))
    second = eng.add_request(PROMPTS[2], GREEDY)
    out = run(eng, [first, second])
    assert early + out[first][0] == alone[0] and out[second][0] == alone[2][:11]  # 9 + 11 = max_model_len
    assert eng.cache.allocator.num_free == eng.cache.allocator.num_blocks
    assert no_text.generate([PROMPTS[4]], GREEDY)[0].token_ids == alone[4]


@pytest.mark.parametrize("field,value", [("max_num_seqs", 0), ("block_size", -4), ("max_model_len", 0),
                                         ("max_num_batched_tokens", 1.5)])
def test_bad_engine_config(field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
        EngineConfig(**{field: value})


def test_max_model_len_beyond_the_kv_cache_is_refused(model):
    kv_bytes = kv_bytes_per_token(model.config, model.dtype) * BLOCK * 4  # 16 tokens
    with pytest.raises(ValueError, match="max_model_len=64 exceeds the 16 tokens"):
        engine(model, kv_cache_bytes=kv_bytes, max_model_len=64)


def test_abort_frees_the_request(model, alone):
    eng = engine(model)
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS[:3]]
    early = {i: [] for i in ids}
    for _ in range(3):
        for o in eng.step():
            early[o.seq_id] += o.new_token_ids
    eng.abort(ids[1])
    out = run(eng, [ids[0], ids[2]])
    assert early[ids[0]] + out[ids[0]][0] == alone[0] and early[ids[2]] + out[ids[2]][0] == alone[2]
    assert ids[1] not in out
    assert eng.cache.allocator.num_free == eng.cache.allocator.num_blocks


def test_logprobs_are_the_models_log_softmax_of_each_chosen_token(model):
    prompt = PROMPTS[1]
    done = engine(model).generate([prompt], SamplingParams(max_tokens=8, temperature=0.7, seed=3))[0]
    assert len(done.logprobs) == len(done.token_ids) == 8
    logits = model(torch.tensor([prompt + done.token_ids]))[0]  # [T, V], no cache
    expected = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(1, torch.tensor(done.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(done.logprobs), expected, atol=1e-4, rtol=0)
    assert (expected < -1e-3).any(), "sampled tokens are not all certain, so the check can fail"
