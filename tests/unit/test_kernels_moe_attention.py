"""kernels/moe.py and kernels/attention.py against their plain-torch references."""

import pytest
import torch

from moeray.kernels import moe, native
from moeray.kernels.attention import attention_reference, build_metadata, causal_attention, paged_attention
from moeray.kernels.moe import Activation, ExpertBiases, fused_moe, fused_moe_reference, permute, unpermute

H, I = 48, 40


def moe_inputs(num_tokens, num_experts, top_k, seed=0, experts=None):
    """x [T, H], weights [T, K] (softmax), distinct ids [T, K] drawn from `experts` (default all), w13, w2."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor(experts if experts is not None else range(num_experts))
    choice = torch.rand(num_tokens, len(pool), generator=gen).argsort(dim=-1)[:, :top_k]
    ids = pool[choice]  # [T, K]
    weights = torch.randn(num_tokens, top_k, generator=gen).softmax(-1)
    x = torch.randn(num_tokens, H, generator=gen)
    w13 = torch.randn(num_experts, 2 * I, H, generator=gen) * 0.3
    w2 = torch.randn(num_experts, H, I, generator=gen) * 0.3
    return x, weights, ids, w13, w2


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("num_experts,top_k", [(6, 3), (64, 8)])
def test_fused_moe_float32(num_tokens, num_experts, top_k):
    x, weights, ids, w13, w2 = moe_inputs(num_tokens, num_experts, top_k)
    out = fused_moe(x, weights, ids, w13, w2)
    ref = fused_moe_reference(x, weights, ids, w13, w2)
    assert out.shape == (num_tokens, H) and out.dtype == torch.float32
    assert ref.abs().max() > 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("num_experts,top_k", [(6, 3), (64, 8)])
def test_fused_moe_bfloat16(num_tokens, num_experts, top_k):
    """bf16 inputs: intermediate roundings to bf16 (gate_up, activation, down) cost ~3 bf16 ulps (2**-8
    relative each), so the tolerance is 2% of the output's scale; a wrong expert or weight is O(1)."""
    x, weights, ids, w13, w2 = (t.to(torch.bfloat16) if t.is_floating_point() and i != 1 else t
                                for i, t in enumerate(moe_inputs(num_tokens, num_experts, top_k, seed=1)))
    out = fused_moe(x, weights, ids, w13, w2)
    ref = fused_moe_reference(x.float(), weights, ids, w13.float(), w2.float())
    assert out.dtype == torch.bfloat16
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("num_experts,top_k", [(6, 3), (64, 8)])
def test_fused_moe_float32_on_torch_ops(monkeypatch, num_tokens, num_experts, top_k):
    """Without the native kernel (MOERAY_NATIVE_KERNELS=0, or no C++ compiler) float32 runs sort ->
    expert_ffn on torch ops -> unpermute, a path the float32 tests above never take where it builds."""
    monkeypatch.setattr(native, "ENABLED", False)
    x, weights, ids, w13, w2 = moe_inputs(num_tokens, num_experts, top_k)
    torch.testing.assert_close(fused_moe(x, weights, ids, w13, w2), fused_moe_reference(x, weights, ids, w13, w2),
                               rtol=1e-5, atol=1e-5)


GPT_OSS_ACTIVATION = Activation(limit=1.5, alpha=1.702)  # a limit the test's gate/up values cross


@pytest.mark.parametrize("grouped", [True, False])  # F.grouped_mm (CPU), or an expert at a time (elsewhere)
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_with_biases_and_clamped_activation(monkeypatch, num_tokens, dtype, grouped):
    """GPT-OSS's experts (biases, clamped activation) on the torch path (no native kernel: with it they take
    the kernel, see test_native_kernel.py), against the reference."""
    monkeypatch.setattr(native, "ENABLED", False)
    if not grouped:
        monkeypatch.setattr(moe, "_has_grouped_mm", lambda device_type: False)
    x, weights, ids, w13, w2 = moe_inputs(num_tokens, 6, 3, seed=5)
    gen = torch.Generator().manual_seed(6)
    biases = ExpertBiases(torch.randn(6, 2 * I, generator=gen), torch.randn(6, H, generator=gen))
    gate_up = torch.einsum("eih,th->tei", w13, x)
    assert (gate_up.abs() > GPT_OSS_ACTIVATION.limit).float().mean() > 0.2  # the clamp is live
    x, w13, w2 = x.to(dtype), w13.to(dtype), w2.to(dtype)
    biases = ExpertBiases(biases.b13.to(dtype), biases.b2.to(dtype))
    out = fused_moe(x, weights, ids, w13, w2, biases, GPT_OSS_ACTIVATION)
    ref = fused_moe_reference(x, weights, ids, w13, w2, biases, GPT_OSS_ACTIVATION)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    plain = fused_moe_reference(x, weights, ids, w13, w2)
    assert (ref.float() - plain.float()).abs().max() > 0.5  # biases and activation matter


@pytest.mark.parametrize("dtype,native_kernels", [(torch.bfloat16, True), (torch.bfloat16, False),
                                                  (torch.float32, False)])
def test_fused_moe_in_chunks_gives_the_bits_of_one_chunk(monkeypatch, dtype, native_kernels):
    """Past CHUNK_BYTES of intermediates a batch runs a few consecutive experts at a time (only the
    benchmark's sizes get there by themselves): the same bits as one chunk. Float32 on the native
    kernel is one call with its own chunking, so it is not among the cases, nor bf16 where the kernel
    has bf16 GEMMs (`bf16_panels`): bf16 here runs as on CPUs without them, small experts on the kernel."""
    monkeypatch.setattr(native, "ENABLED", native_kernels)
    monkeypatch.setattr(native, "bf16_panels", lambda: False)
    x, weights, ids, w13, w2 = (t.to(dtype) if t.is_floating_point() and i != 1 else t
                                for i, t in enumerate(moe_inputs(300, 6, 3, seed=4)))
    whole = fused_moe(x, weights, ids, w13, w2)
    chunks = []
    real = moe._expert_chunks
    monkeypatch.setattr(moe, "_expert_chunks", lambda *args: chunks.extend(real(*args)) or iter(chunks))
    monkeypatch.setattr(moe, "CHUNK_BYTES", 200 * 4 * (2 * I + 2 * H))  # ~200 of the 900 sorted rows
    chunked = fused_moe(x, weights, ids, w13, w2)
    assert len(chunks) >= 4 and chunks[-1][1].stop == 900
    assert torch.equal(chunked, whole)


@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_experts_without_tokens_are_skipped(num_tokens):
    """Only experts 1, 4 and 5 of 6 get tokens; NaN weights in the others must not leak into the output."""
    x, weights, ids, w13, w2 = moe_inputs(num_tokens, 6, 3, seed=2, experts=[1, 4, 5])
    for e in (0, 2, 3):
        w13[e], w2[e] = float("nan"), float("nan")
    out = fused_moe(x, weights, ids, w13, w2)
    assert not out.isnan().any()
    torch.testing.assert_close(out, fused_moe_reference(x, weights, ids, w13, w2), rtol=1e-5, atol=1e-5)


def test_single_expert_for_every_token():
    x, weights, ids, w13, w2 = moe_inputs(9, 6, 1, seed=3, experts=[2])
    assert (ids == 2).all()
    out = fused_moe(x, weights, ids, w13, w2)
    torch.testing.assert_close(out, fused_moe_reference(x, weights, ids, w13, w2), rtol=1e-5, atol=1e-5)


def test_permute_worked_example():
    """The example in kernels/moe.py's docstring."""
    x = torch.tensor([[10.0], [20.0]])
    x_sorted, handle = permute(x, torch.tensor([[3, 0], [0, 1]]), num_experts=4)
    assert handle.order.tolist() == [1, 2, 3, 0]
    assert handle.counts.tolist() == [2, 1, 0, 1]
    assert x_sorted.flatten().tolist() == [10.0, 20.0, 20.0, 10.0]


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 6, 3), (50, 6, 3), (300, 64, 8)])
def test_permute_unpermute_round_trip(num_tokens, num_experts, top_k):
    x, _, ids, _, _ = moe_inputs(num_tokens, num_experts, top_k, seed=4)
    x_sorted, handle = permute(x, ids, num_experts)
    sorted_ids = ids.reshape(-1)[handle.order]
    assert (sorted_ids[1:] >= sorted_ids[:-1]).all()  # grouped by expert
    assert handle.counts.tolist() == torch.bincount(ids.reshape(-1), minlength=num_experts).tolist()
    assert torch.equal(x_sorted, x[handle.order // top_k])
    # one-hot weights pick the k-th copy back exactly; pair k of each token is at its own place
    for k in (0, top_k - 1):
        one_hot = torch.nn.functional.one_hot(torch.full((num_tokens,), k), top_k).float()
        assert torch.equal(unpermute(x_sorted, handle, one_hot), x)
    # a per-pair tag survives the round trip: row p of y_sorted carries pair order[p]
    tags = handle.order.float()[:, None].expand(-1, H)  # [T*K, H]
    back = unpermute(tags, handle, torch.ones(num_tokens, top_k))
    expected = (torch.arange(num_tokens)[:, None] * top_k + torch.arange(top_k)).sum(-1).float()
    assert torch.equal(back[:, 0], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_asks_for_scratch_only_to_gather(dtype):
    """float32 combines in one embedding_bag and needs no memory; bf16 gathers into `scratch()`,
    with the same result as into a new tensor."""
    x, weights, ids, _, _ = moe_inputs(20, 6, 3, seed=5)
    x_sorted, handle = permute(x.to(dtype), ids, 6)
    weights = weights.to(dtype)
    asked = []
    memory = torch.full_like(x_sorted, float("nan"))
    out = unpermute(x_sorted, handle, weights, scratch=lambda: asked.append(1) or memory)
    assert len(asked) == (0 if dtype == torch.float32 else 1)
    assert torch.equal(out, unpermute(x_sorted, handle, weights))


# --- attention ----------------------------------------------------------------------------------

NH, NKV, D, BLOCK = 4, 2, 8, 4


def qkv(length, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(length, NH, D, generator=gen) * 2
    k = torch.randn(length, NKV, D, generator=gen) * 2
    v = torch.randn(length, NKV, D, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# (cached positions, new tokens): decode, full prefill, chunked prefill, one-token first prefill
SEQS = [(20, 1), (0, 13), (9, 6), (0, 1), (33, 1), (5, 11)]


def sink_logits(seed=11):
    """[NH] GPT-OSS-like sinks, as large as the test's attention scores."""
    return torch.randn(NH, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("sinks", [None, "sinks"])
@pytest.mark.parametrize("window", [None, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_reference(window, dtype, sinks):
    sinks = sink_logits() if sinks else None
    gen = torch.Generator().manual_seed(7)
    num_blocks = 64
    free = torch.randperm(num_blocks, generator=gen).tolist()  # scattered, non-contiguous blocks
    k_cache = torch.randn(num_blocks * BLOCK, NKV, D, generator=gen).to(dtype)  # garbage in unused slots
    v_cache = torch.randn(num_blocks * BLOCK, NKV, D, generator=gen).to(dtype)
    tables, full, qs, ks, vs = [], [], [], [], []
    for i, (start, n) in enumerate(SEQS):
        length = start + n
        table = [free.pop() for _ in range(-(-length // BLOCK))]
        q, k, v = qkv(length, seed=i, dtype=dtype)
        for pos in range(start):  # what earlier steps wrote
            slot = table[pos // BLOCK] * BLOCK + pos % BLOCK
            k_cache[slot], v_cache[slot] = k[pos], v[pos]
        tables.append(table)
        full.append((q, k, v))
        qs.append(q[start:]), ks.append(k[start:]), vs.append(v[start:])
    meta = build_metadata(tables, [s for s, _ in SEQS], [n for _, n in SEQS], BLOCK)
    assert meta.decode_seqs == [0, 4] and meta.prefill_seqs == [1, 2, 3, 5]
    scale = D**-0.5
    out = paged_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, meta, scale, window,
                          None if sinks is None else sinks.to(dtype))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for i, ((start, n), (q, k, v)) in enumerate(zip(SEQS, full)):
        rows = slice(meta.query_starts[i], meta.query_starts[i + 1])
        ref = attention_reference(q.float(), k.float(), v.float(), scale, window, sinks)[start:]
        torch.testing.assert_close(out[rows].float(), ref, **tol, msg=f"sequence {i}")
        for pos in range(start + n):  # the step's K/V landed in the cache
            slot = tables[i][pos // BLOCK] * BLOCK + pos % BLOCK
            assert torch.equal(k_cache[slot], k[pos]) and torch.equal(v_cache[slot], v[pos])


def test_sliding_window_changes_paged_attention():
    """The window is applied in both the decode and the prefill paths (so the test above can fail)."""
    q, k, v = qkv(21, seed=0)
    for start, n in [(20, 1), (10, 11)]:
        meta = build_metadata([list(range(6))], [start], [n], BLOCK)
        caches = [torch.zeros(24, NKV, D) for _ in range(2)]
        caches[0][:start], caches[1][:start] = k[:start], v[:start]
        out = {w: paged_attention(q[start:], k[start:], v[start:], caches[0].clone(), caches[1].clone(), meta, 0.3, w)
               for w in (None, 4)}
        assert (out[None] - out[4]).abs().max() > 1e-2
        torch.testing.assert_close(out[4], attention_reference(q, k, v, 0.3, 4)[start:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sinks", [None, "sinks"])
@pytest.mark.parametrize("window", [None, 1, 4, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_matches_reference(window, dtype, sinks):
    sinks = sink_logits() if sinks else None
    batch = [qkv(13, seed=s, dtype=dtype) for s in range(3)]
    q, k, v = (torch.stack(t) for t in zip(*batch))  # [B, T, heads, D]
    out = causal_attention(q, k, v, 0.4, window, None if sinks is None else sinks.to(dtype))
    assert out.shape == q.shape and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    if sinks is not None and dtype == torch.bfloat16:  # transformers' order: probabilities rounded to bf16
        tol = dict(rtol=2e-2, atol=5e-2)
    for b, (qb, kb, vb) in enumerate(batch):
        ref = attention_reference(qb.float(), kb.float(), vb.float(), 0.4, window, sinks)
        torch.testing.assert_close(out[b].float(), ref, **tol)


def test_sinks_take_weight_from_every_key():
    """With sinks each head's weights over the keys sum to less than 1: the output shrinks towards 0,
    the more the larger the sink (so the tests above, run with and without, can tell)."""
    q, k, v = qkv(13, seed=3)
    v = torch.ones_like(v)  # the output is then the weights' sum
    plain = causal_attention(q[None], k[None], v[None], 0.4, None)[0]
    torch.testing.assert_close(plain, torch.ones_like(plain))
    sunk = causal_attention(q[None], k[None], v[None], 0.4, None, torch.full((NH,), 3.0))[0]
    assert (sunk < 1).all() and (sunk > 0).all()
    deeper = causal_attention(q[None], k[None], v[None], 0.4, None, torch.full((NH,), 6.0))[0]
    assert (deeper < sunk).all()


def test_window_of_one_attends_to_itself_only():
    q, k, v = qkv(6, seed=9)
    out = causal_attention(q[None], k[None], v[None], 0.5, 1)[0]
    torch.testing.assert_close(out, v.repeat_interleave(NH // NKV, dim=1))
