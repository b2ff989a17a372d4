"""sample(): greedy, top-k, top-p, temperature, and per-row seeded reproducibility."""

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from moeray.kernels.sampling import greedy, sample, sample_reference

VOCAB = 50


def _params(rows, temperature=1.0, top_k=0, top_p=1.0):
    return (
        torch.full((rows,), float(temperature)),
        torch.full((rows,), int(top_k), dtype=torch.int64),
        torch.full((rows,), float(top_p)),
    )


def _logits(rows, vocab=VOCAB, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3  # [B, V]


def _gens(*seeds):
    return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = _logits(6)
    logits[2, 7] = logits[2, 30] = logits[2].max() + 1  # tie: the lower id wins
    tokens = sample(logits, *_params(6, temperature=0.0), _gens(*[None] * 6))
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert tokens[2] == 7


def test_greedy_rows_inside_a_sampled_batch():
    logits = _logits(4)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7])
    top_k, top_p = torch.zeros(4, dtype=torch.int64), torch.ones(4)
    gens = _gens(1, 2, 3, 4)
    tokens = sample(logits, temperature, top_k, top_p, gens)
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    # Greedy rows draw nothing from their generators.
    assert torch.equal(gens[0].get_state(), torch.Generator().manual_seed(1).get_state())


def test_seeded_stream_is_independent_of_batch_composition():
    vocab = 30
    alone, in_batch = [], []
    gen_alone = _gens(1234)
    gens_batch = _gens(7, None, 1234, 99, None)
    temperature = torch.tensor([1.0, 0.8, 1.3, 0.0, 1.0])
    top_k = torch.tensor([0, 5, 10, 0, 3])
    top_p = torch.tensor([0.9, 1.0, 0.95, 1.0, 0.5])
    for step in range(20):
        row = _logits(1, vocab, seed=step)  # [1, V]: the seeded request's logits this step
        alone.append(int(sample(row, temperature[2:3], top_k[2:3], top_p[2:3], gen_alone)[0]))
        batch = _logits(5, vocab, seed=1000 + step)
        batch[2] = row[0]
        in_batch.append(int(sample(batch, temperature, top_k, top_p, gens_batch)[2]))
    assert alone == in_batch
    assert len(set(alone)) > 1  # really sampled, not a constant


def test_vectorised_equals_reference_with_same_seeds():
    rows = 8
    gen = torch.Generator().manual_seed(5)
    for step in range(30):
        logits = _logits(rows, seed=step)
        temperature = torch.rand(rows, generator=gen) * 1.5
        temperature[torch.rand(rows, generator=gen) < 0.2] = 0.0
        top_k = torch.randint(0, 12, (rows,), generator=gen) * (torch.rand(rows, generator=gen) < 0.6)
        top_p = torch.where(torch.rand(rows, generator=gen) < 0.6, torch.rand(rows, generator=gen) * 0.9 + 0.05, 1.0)
        seeds = [step * rows + i for i in range(rows)]
        fast = sample(logits, temperature, top_k, top_p, _gens(*seeds))
        slow = sample_reference(logits, temperature, top_k, top_p, _gens(*seeds))
        assert torch.equal(fast, slow), (step, fast, slow)


def test_top_k_1_is_greedy():
    logits = _logits(16)
    tokens = sample(logits, *_params(16, temperature=2.0, top_k=1), _gens(*range(16)))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def _draw_many(logits, num_draws, seed, temperature=1.0, top_k=0, top_p=1.0):
    """logits [V] -> num_draws tokens in one call: unseeded rows share one draw from the
    default RNG, seeded here in a forked RNG so that no other test sees it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        batch = logits.expand(num_draws, -1).contiguous()  # [N, V]
        return sample(batch, *_params(num_draws, temperature, top_k, top_p), [None] * num_draws)


def test_top_k_stays_within_the_k_largest():
    k = 5
    logits = _logits(3)
    for row in logits:
        tokens = _draw_many(row, 1000, seed=1, temperature=5.0, top_k=k)  # hot: spreads the mass
        allowed = set(row.topk(k).indices.tolist())
        assert set(tokens.tolist()) == allowed  # never outside, and all k are reachable


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: 1 (.4), 3 (.3), 4 (.15), 2 (.1), 0 (.05)
    logits = probs.log()  # [5]
    cases = [(0.35, {1}), (0.4, {1}), (0.6, {1, 3}), (0.7, {1, 3}), (0.8, {1, 3, 4}), (0.96, {0, 1, 2, 3, 4})]
    for top_p, expected in cases:
        drawn = set(_draw_many(logits, 1000, seed=2, top_p=top_p).tolist())
        assert drawn == expected, (top_p, drawn)
        # The same convention as transformers' warper.
        kept = TopPLogitsWarper(top_p)(None, logits[None].clone())[0].isfinite().nonzero().flatten()
        assert set(kept.tolist()) == expected


def test_top_p_mass_matches_renormalised_nucleus():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    tokens = _draw_many(probs.log(), 20_000, seed=3, top_p=0.8)  # nucleus {1, 3, 4}, mass 0.85
    share = torch.bincount(tokens, minlength=5).float() / len(tokens)
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85
    torch.testing.assert_close(share, expected, atol=0.015, rtol=0)


def test_temperature_one_matches_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    draws = 20_000
    counts = torch.bincount(_draw_many(logits, draws, seed=42), minlength=5).float()
    expected_counts = logits.softmax(dim=-1) * draws
    chi2 = float(((counts - expected_counts) ** 2 / expected_counts).sum())
    assert chi2 < 20.0, (chi2, counts, expected_counts)  # 4 dof: P(chi2 > 20) < 0.001


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0])

    def top_share(temperature):
        return float((_draw_many(logits, 4000, seed=4, temperature=temperature) == 0).float().mean())

    # softmax shares of token 0: T=0.25 -> 0.98, T=1 -> 0.67, T=10 -> 0.37
    assert top_share(0.25) > 0.96 and 0.63 < top_share(1.0) < 0.71 and top_share(10.0) < 0.40


@pytest.mark.parametrize("fn", [sample, sample_reference])
def test_unseeded_rows_use_the_default_rng(fn):
    logits = _logits(3)
    torch.manual_seed(11)
    first = fn(logits, *_params(3), _gens(None, None, None))
    torch.manual_seed(11)
    assert torch.equal(fn(logits, *_params(3), _gens(None, None, None)), first)


def test_greedy_gives_argmax_ids_on_ties_anywhere_in_the_row():
    """max(dim).indices stands in for argmax: ties at every pair of places (vector lanes, chunk edges)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 211, generator=gen)
    places = torch.randint(0, 211, (64, 3), generator=gen)
    for row, cols in enumerate(places.tolist()):
        logits[row, cols] = logits[row].max() + 1
    logits[0] = 0.0  # all equal: id 0
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))
    assert greedy(logits)[0] == 0
