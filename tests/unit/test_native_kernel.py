"""kernels/native.py (csrc/cpu_kernels.cpp) against a per-row float64 reference, and its place in expert_ffn."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeray.kernels import moe, native


def test_native_kernel_builds_here():
    """CI runs on machines with a C++ compiler: the kernel must build there, not fall back quietly."""
    assert native.available(), native._failure


def swiglu_reference(x, w13, w2, bf16_roundings=False):
    """x [n, H] -> [n, H] for one expert, float64 dot products; with `bf16_roundings` the matmul outputs,
    the activation and the product are rounded to bf16 where transformers rounds them."""
    inter = w2.shape[-1]
    round_ = (lambda t: t.to(torch.bfloat16).double()) if bf16_roundings else (lambda t: t)
    gate_up = x.double() @ w13.double().t()  # [n, 2I]
    gate, up = round_(gate_up[:, :inter]), round_(gate_up[:, inter:])
    act = round_(round_(F.silu(gate)) * up)
    return act @ w2.double().t()  # [n, H]


def make(num_experts, hidden, inter, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5 * 2).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5 * 2).to(dtype)
    return w13, w2


def run_groups(x, groups, w13, w2, rows=None, panel_rows=native.PANEL_ROWS, extras=None):
    """extras: GPT-OSS's (biases, activation), see `make_extras`."""
    num_rows = max(first + count for _, first, count in groups)
    out = torch.full((num_rows, x.shape[1]), float("nan"), dtype=x.dtype)
    biases, activation = extras or (None, moe.SWIGLU)
    return native.expert_ffn(x, torch.tensor(groups), w13, w2, out, rows, panel_rows, biases, activation.limit,
                             activation.alpha)


def make_extras(kind, num_experts, hidden, inter, dtype, seed=5):
    """GPT-OSS-like (biases, activation): biases of the outputs' size, and a limit that clamps part of
    gate and up."""
    gen = torch.Generator().manual_seed(seed)
    biases = None if kind == "clamp" else moe.ExpertBiases(torch.randn(num_experts, 2 * inter, generator=gen).to(dtype),
                                                           torch.randn(num_experts, hidden, generator=gen).to(dtype))
    return biases, moe.SWIGLU if kind == "biases" else moe.Activation(1.5, 1.702)


def extras_reference(x, w13, w2, expert, extras, bf16_roundings=False):
    """One expert of GPT-OSS's form, [n, H]: float64 matmuls; with `bf16_roundings` each matmul rounded to
    bf16 and everything else in torch's bf16 ops, as transformers computes it."""
    inter = w2.shape[-1]
    matmul = (lambda a, b: (a.double() @ b.double().t()).to(torch.bfloat16)) if bf16_roundings else \
        (lambda a, b: a.double() @ b.double().t())
    cast = (lambda t: t) if bf16_roundings else (lambda t: t.double())
    biases, activation = extras
    gate_up = matmul(x, w13[expert])
    if biases is not None:
        gate_up = gate_up + cast(biases.b13[expert])
    y = matmul(activation(gate_up[:, :inter], gate_up[:, inter:]), w2[expert])
    return (y + cast(biases.b2[expert]) if biases is not None else y).double()


# sizes with and without tails: H, I multiples of 16, of 8 only, and odd; (200, 130): the last group's act
# and output rows cut into single tiles; (1024, 512): groups of several work items (`blocks` and `item_rows`
# in cpu_kernels.cpp)
@pytest.mark.parametrize("hidden,inter", [(64, 32), (48, 40), (37, 21), (200, 130), (1024, 512)])
@pytest.mark.parametrize("dtype,panel_rows", [(torch.float32, native.PANEL_ROWS), (torch.float32, 1),
                                              (torch.bfloat16, 1 << 30), (torch.bfloat16, 1)])
def test_groups_match_reference(hidden, inter, dtype, panel_rows):
    """Groups of 1..70 rows (every tile remainder, partial and odd panel counts, past the 64-row chunk),
    experts in any order and repeated, as dot products and (panel_rows; bf16 only where `bf16_panels` and
    H, I are even) as GEMMs, against float64 dot products (float32: 1e-5; bf16: with the same roundings,
    1 bf16 ulp)."""
    w13, w2 = make(5, hidden, inter, dtype)
    sizes = [1, 2, 3, 4, 5, 7, 70, 1, 9, 16, 17, 24, 33]
    experts = [3, 0, 4, 3, 1, 2, 0, 4, 1, 2, 3, 0, 1]
    starts = [0, *itertools.accumulate(sizes)][:-1]
    x = torch.randn(sum(sizes), hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = run_groups(x, list(zip(experts, starts, sizes)), w13, w2, panel_rows=panel_rows)
    assert out.dtype == dtype and not out.isnan().any()
    for expert, first, count in zip(experts, starts, sizes):
        rows = slice(first, first + count)
        ref = swiglu_reference(x[rows], w13[expert], w2[expert], bf16_roundings=dtype == torch.bfloat16)
        if dtype == torch.float32:
            torch.testing.assert_close(out[rows].double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        else:  # the float32 sums differ from float64 in the last bits, so a rounding may land one ulp apart (and
            # one ulp of an activation moves a small output by up to ~2^-8 of the largest)
            torch.testing.assert_close(out[rows].double(), ref.to(torch.bfloat16).double(), rtol=2 ** -7,
                                       atol=2 ** -8 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["both", "biases", "clamp"])
@pytest.mark.parametrize("hidden,inter", [(64, 32), (37, 21), (200, 130)])
@pytest.mark.parametrize("dtype,panel_rows", [(torch.float32, native.PANEL_ROWS), (torch.float32, 1),
                                              (torch.bfloat16, 1 << 30), (torch.bfloat16, 1)])
def test_gpt_oss_extras_match_reference(kind, hidden, inter, dtype, panel_rows):
    """GPT-OSS's expert biases and clamped activation (limit 1.5: part of gate and up clamped), alone or
    together, on the dot products and the GEMMs, against transformers' op order (float64 matmuls; bf16:
    rounded where transformers rounds), with the tolerances of test_groups_match_reference."""
    w13, w2 = make(5, hidden, inter, dtype)
    extras = make_extras(kind, 5, hidden, inter, dtype)
    sizes, experts = [1, 3, 70, 9, 17, 33], [3, 0, 4, 1, 2, 3]
    starts = [0, *itertools.accumulate(sizes)][:-1]
    x = torch.randn(sum(sizes), hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = run_groups(x, list(zip(experts, starts, sizes)), w13, w2, panel_rows=panel_rows, extras=extras)
    assert out.dtype == dtype and not out.isnan().any()
    clamped = 0
    for expert, first, count in zip(experts, starts, sizes):
        rows = slice(first, first + count)
        ref = extras_reference(x[rows], w13, w2, expert, extras, bf16_roundings=dtype == torch.bfloat16)
        clamped += int((x[rows].double() @ w13[expert].double().t()).abs().gt(1.5).sum())
        if dtype == torch.float32:
            torch.testing.assert_close(out[rows].double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        else:
            torch.testing.assert_close(out[rows].double(), ref, rtol=2 ** -7, atol=2 ** -8 * ref.abs().max().item())
    assert clamped > 0  # the clamps are exercised
    plain = run_groups(x, list(zip(experts, starts, sizes)), w13, w2, panel_rows=panel_rows)
    assert (plain.double() - out.double()).abs().max() > 0.1  # and the extras change the result


def test_gpt_oss_experts_take_the_kernel_where_every_expert_does(monkeypatch):
    """kernels.moe sends experts with biases and the clamped activation to the kernel (its expert FFN and
    the one-call block) where every expert of the dtype goes there (float32; bf16 with `bf16_panels`), and
    to torch's matmuls (`_expert_ffn_general`) elsewhere; the two agree."""
    w13, w2 = make(6, 48, 40, torch.float32, seed=6)
    biases, activation = make_extras("both", 6, 48, 40, torch.float32)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(20, 48, generator=gen)
    ids = torch.rand(20, 6, generator=gen).argsort(-1)[:, :3].contiguous()
    weights = torch.rand(20, 3, generator=gen).softmax(-1)
    handle = moe.sort_pairs(ids, 6)
    x_sorted, counts = x.index_select(0, handle.tokens), handle.counts.tolist()
    calls = []
    for name in ("expert_ffn", "fused_moe"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, real=real, name=name, **k: calls.append((name, a[0].dtype)) or real(*a, **k))
    on_kernel = moe.expert_ffn(x_sorted, counts, w13, w2, biases, activation)
    block = moe.fused_moe(x, weights, ids, w13, w2, biases, activation)
    assert calls == [("expert_ffn", torch.float32), ("fused_moe", torch.float32)]
    general = moe._expert_ffn_general(x_sorted, [0, *itertools.accumulate(counts)][:-1], counts, w13, w2, biases,
                                      activation)
    torch.testing.assert_close(on_kernel, general, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block, moe.unpermute(general, handle, weights), rtol=1e-5, atol=1e-5)
    def bf(t):
        return t.bfloat16()

    bf_biases = moe.ExpertBiases(bf(biases.b13), bf(biases.b2))
    for panels in (False, True):
        calls.clear()
        monkeypatch.setattr(native, "bf16_panels", lambda: panels)
        moe.expert_ffn(bf(x_sorted), counts, bf(w13), bf(w2), bf_biases, activation)
        moe.fused_moe(bf(x), weights, ids, bf(w13), bf(w2), bf_biases, activation)
        assert calls == ([("expert_ffn", torch.bfloat16), ("fused_moe", torch.bfloat16)] if panels else [])


def test_gpt_oss_extras_are_checked():
    w13, w2 = make(4, 32, 16, torch.float32)
    x, out, groups = torch.randn(3, 32), torch.empty(3, 32), torch.tensor([[0, 0, 3]])
    b13, b2 = torch.zeros(4, 32), torch.zeros(4, 32)
    bad = [(moe.ExpertBiases(torch.zeros(4, 16), b2), None, ValueError, r"expert bias b13 must be \(4, 32\) for w13 \(4, 32, 32\), not \(4, 16\)"),
           (moe.ExpertBiases(b13, torch.zeros(3, 32)), None, ValueError, r"expert bias b2 must be \(4, 32\) .* not \(3, 32\)"),
           (moe.ExpertBiases(b13, b2.bfloat16()), None, TypeError, "one dtype"),
           (None, 0.0, ValueError, "limit must be > 0, not 0.0")]
    for biases, limit, error, message in bad:
        with pytest.raises(error, match=message):
            native.expert_ffn(x, groups, w13, w2, out, biases=biases, limit=limit)


@pytest.mark.parametrize("dtype,panel_rows", [(torch.float32, 1 << 30), (torch.float32, 1), (torch.bfloat16, 1 << 30),
                                              (torch.bfloat16, 1)])
def test_a_row_gets_the_same_bits_in_any_batch(dtype, panel_rows):
    """Every output is a sum in a fixed order, as dot products (1 << 30: never GEMMs) or as GEMMs
    (panel_rows 1: always; bf16 where `bf16_panels`): alone, in a group of 9 or of 40, or on 1 thread
    instead of 2, a row's result is bitwise the same."""
    w13, w2 = make(3, 64, 48, dtype, seed=2)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    batch = run_groups(x, [(1, 0, 40)], w13, w2, panel_rows=panel_rows)
    nine = run_groups(x[:9].contiguous(), [(1, 0, 9)], w13, w2, panel_rows=panel_rows)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = run_groups(x, [(1, 0, 40)], w13, w2, panel_rows=panel_rows)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch[:9], nine) and torch.equal(batch, one_thread)
    for row in (0, 5, 39):
        assert torch.equal(run_groups(x[row:row + 1].contiguous(), [(1, 0, 1)], w13, w2, panel_rows=panel_rows)[0],
                           batch[row])


def test_float32_rows_change_bits_only_where_their_expert_crosses_panel_rows():
    """At the default line: a row alone and in a group of PANEL_ROWS - 1 gets the same bits (dot products),
    in groups of PANEL_ROWS and of 40 the same bits again (GEMMs), and the two agree to float32 rounding."""
    w13, w2 = make(2, 64, 48, torch.float32, seed=10)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(11))
    below, at = native.PANEL_ROWS - 1, native.PANEL_ROWS
    alone = run_groups(x[:1].contiguous(), [(0, 0, 1)], w13, w2)[0]
    small = run_groups(x[:below].contiguous(), [(0, 0, below)], w13, w2)
    gemm = run_groups(x[:at].contiguous(), [(0, 0, at)], w13, w2)
    large = run_groups(x, [(0, 0, 40)], w13, w2)
    assert torch.equal(small[0], alone) and torch.equal(gemm, large[:at])
    torch.testing.assert_close(gemm[:below], small, rtol=1e-5, atol=1e-5)


def test_gemm_swiglu_saturates_like_silu_and_keeps_nan_in_its_row():
    """The GEMM path's SwiGLU evaluates exp on 8 or 16 lanes with clamped inputs: silu(g) for g far beyond the
    clamps (+-87) must still be g or ~0, and a NaN must stay in its own row. One expert whose gate rows,
    up rows and w2 are the identity: out = silu(x) * x, as float64 computes it."""
    eye = torch.eye(8)
    w13, w2 = torch.cat([eye, eye])[None], eye[None]  # [1, 2I, H], [1, H, I]
    gates = torch.tensor([-1e4, -100.0, -88.0, -87.0, -1.5, 0.0, 88.5, 1e4])
    x = torch.stack([gates.roll(r) for r in range(2 * native.PANEL_ROWS)])  # [32, 8]: every value in every lane
    x[5, 3] = float("nan")
    out = run_groups(x, [(0, 0, len(x))], w13, w2, panel_rows=native.PANEL_ROWS)
    ref = F.silu(x.double()) * x.double()
    keep = torch.arange(len(x)) != 5
    assert out[5].isnan().all() and not out[keep].isnan().any()
    torch.testing.assert_close(out[keep].double(), ref[keep], rtol=1e-6, atol=1e-30)


def test_rows_map_gathers_from_x():
    """rows[j] names the row of x that sorted row j reads: the same as gathering first."""
    w13, w2 = make(4, 48, 32, torch.float32, seed=4)
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(5))
    rows = torch.tensor([5, 0, 0, 3, 2, 5, 1])
    groups = [(2, 0, 3), (0, 3, 4)]
    assert torch.equal(run_groups(x, groups, w13, w2, rows), run_groups(x[rows], groups, w13, w2))


def test_only_the_groups_rows_are_written():
    w13, w2 = make(2, 32, 16, torch.float32)
    x = torch.randn(5, 32)
    out = run_groups(x, [(1, 1, 2), (0, 4, 1)], w13, w2)
    assert out[[0, 3]].isnan().all() and not out[[1, 2, 4]].isnan().any()


def test_expert_ffn_sends_small_bf16_experts_to_native_and_large_to_torch(monkeypatch):
    """bf16 experts with <= NATIVE_MAX_ROWS rows go to the kernel (one call), the rest to matmuls;
    float32 experts always go to the kernel. The result matches the reference either way, and with
    the kernel switched off."""
    w13, w2 = make(4, 48, 40, torch.bfloat16, seed=6)
    counts = [3, 0, 9, 1]
    x = torch.randn(sum(counts), 48, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    calls = []
    real = native.expert_ffn
    monkeypatch.setattr(native, "expert_ffn", lambda x, groups, *args, **kwargs: calls.append(groups.tolist()) or real(x, groups, *args, **kwargs))
    monkeypatch.setattr(moe, "NATIVE_MAX_ROWS", 4)  # (whichever applies on this CPU)
    monkeypatch.setattr(moe, "NATIVE_MAX_ROWS_BF16_MATMUL", 4)
    monkeypatch.setattr(native, "bf16_panels", lambda: False)  # a kernel without bf16 GEMMs
    out = moe.expert_ffn(x, counts, w13, w2)
    assert calls == [[[0, 0, 3], [3, 12, 1]]]  # expert 2 (9 rows) is over the limit
    starts = [0, 3, 3, 12]
    bf16_ulp = dict(rtol=2 ** -7, atol=1e-6)  # float32 sums in another order may round one ulp apart
    for expert, (start, count) in enumerate(zip(starts, counts)):
        rows = slice(start, start + count)
        ref = swiglu_reference(x[rows], w13[expert], w2[expert], bf16_roundings=True).to(torch.bfloat16)
        torch.testing.assert_close(out[rows].double(), ref.double(), **bf16_ulp)
    calls.clear()
    monkeypatch.setattr(native, "bf16_panels", lambda: True)  # with them (or dot products where the build has not)
    torch.testing.assert_close(moe.expert_ffn(x, counts, w13, w2).double(), out.double(), **bf16_ulp)
    assert calls == [[[0, 0, 3], [2, 3, 9], [3, 12, 1]]]  # every expert, one call
    calls.clear()
    w13_f, w2_f, x_f = w13.float(), w2.float(), x.float()
    out_f = moe.expert_ffn(x_f, counts, w13_f, w2_f)
    assert calls == [[[0, 0, 3], [2, 3, 9], [3, 12, 1]]]  # float32: every expert, one call
    monkeypatch.setattr(native, "ENABLED", False)  # as MOERAY_NATIVE_KERNELS=0 at start-up
    calls.clear()
    torch.testing.assert_close(moe.expert_ffn(x, counts, w13, w2).double(), out.double(), **bf16_ulp)
    torch.testing.assert_close(moe.expert_ffn(x_f, counts, w13_f, w2_f), out_f, rtol=1e-5, atol=1e-5)
    assert calls == []


def test_bf16_gemms_exactly_where_the_cpu_has_bf16_dot_products():
    """-march=native builds take vdpbf16ps where the CPU has AVX512-BF16, and only there."""
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert native.bf16_panels() == ("avx512_bf16" in flags)


@pytest.mark.parametrize("flag,bf16", [("-mno-avx512f", False), ("-mno-avx512bf16", False)])
def test_narrower_builds_pass_the_reference_tests(flag, bf16, tmp_path):
    """The kernel's other builds, made here by turning instructions off (a no-op where the CPU lacks them):
    without AVX-512 (8-lane panels, bf16 widened to float32, the AVX2 machines' path) and without AVX512-BF16
    (16-lane panels, bf16 widened). The reference, batch-invariance and saturation tests above pass on
    each, in a fresh process (a process loads one build)."""
    env = {**os.environ, "CXX": f"{os.environ.get('CXX') or 'c++'} {flag}", "MOERAY_CACHE_DIR": str(tmp_path)}
    probe = subprocess.run([sys.executable, "-c", "from moeray.kernels import native; print(native.available(), native.bf16_panels())"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert probe.stdout.split() == ["True", str(bf16)], probe.stderr[-2000:]
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                            "match_reference or same_bits_in_any_batch or saturates or sort_experts_and_combine or extras"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert tests.returncode == 0 and " passed" in tests.stdout, tests.stdout[-3000:]


def test_one_token_and_batch_paths_give_the_same_bits():
    """fused_moe's one-token path (K groups of x's one row) and its batch path (sorted rows) both run
    the kernel: a token decoded alone gets the bits it gets in a batch."""
    gen = torch.Generator().manual_seed(8)
    w13, w2 = make(6, 64, 48, torch.float32, seed=9)
    x = torch.randn(5, 64, generator=gen)
    ids = torch.rand(5, 6, generator=gen).argsort(-1)[:, :3]
    weights = torch.rand(5, 3, generator=gen).softmax(-1)
    batch = moe.fused_moe(x, weights, ids, w13, w2)
    for t in range(5):
        assert torch.equal(moe.fused_moe(x[t:t + 1], weights[t:t + 1], ids[t:t + 1], w13, w2)[0], batch[t])


def test_build_without_a_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MOERAY_CACHE_DIR", str(tmp_path))
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler: .*no-such-compiler.* not found"):
        native.build()


def test_failed_build_names_the_command_and_leaves_nothing_behind(monkeypatch, tmp_path):
    compiler = tmp_path / "broken-cxx"
    compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'error: broken on purpose' >&2; exit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("MOERAY_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(native.NativeUnavailable, match="(?s)broken-cxx -O3.*cpu_kernels.cpp failed.*broken on purpose"):
        native.build()
    assert os.listdir(tmp_path / "cache") == []


def test_build_is_cached(monkeypatch, tmp_path):
    """The first build compiles into the cache directory; the next one finds it there."""
    monkeypatch.setenv("MOERAY_CACHE_DIR", str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter", [(1, 8, 2, 128, 64), (16, 8, 2, 64, 48),
                                                                        (7, 6, 3, 48, 40), (64, 64, 8, 32, 16),
                                                                        (5, 6, 3, 37, 21), (40, 6, 3, 37, 21),
                                                                        (200, 8, 2, 48, 40)])
@pytest.mark.parametrize("dtype,weights_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("gpt_oss", [False, True])
def test_fused_moe_is_sort_experts_and_combine_in_one_call(num_tokens, num_experts, top_k, hidden, inter, dtype,
                                                           weights_dtype, gpt_oss):
    """native.fused_moe gives the bits of sort_pairs -> the kernel's expert FFN -> unpermute (whose float32
    combine is torch.embedding_bag's fused multiply-adds; bf16: products in the promoted dtype of row and
    top-k weight, as Mixtral (float32 weights) and OLMoE (bf16) take them, summed in float32), and matches
    the per-token reference."""
    gen = torch.Generator().manual_seed(num_tokens)
    w13, w2 = make(num_experts, hidden, inter, dtype, seed=num_experts)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(-1)[:, :top_k].contiguous()
    weights = torch.rand(num_tokens, top_k, generator=gen).softmax(-1).to(weights_dtype)
    extras = make_extras("both", num_experts, hidden, inter, dtype) if gpt_oss else None
    biases, activation = extras or (None, moe.SWIGLU)
    fused = native.fused_moe(x, weights, ids, w13, w2, biases=biases, limit=activation.limit, alpha=activation.alpha)
    handle = moe.sort_pairs(ids, num_experts)
    counts = handle.counts.tolist()
    groups = [(e, first, n) for e, (first, n) in enumerate(zip([0, *itertools.accumulate(counts)], counts)) if n]
    y_sorted = run_groups(x, groups, w13, w2, rows=handle.tokens, extras=extras)  # (the kernel whatever the build)
    assert torch.equal(fused, moe.unpermute(y_sorted, handle, weights))
    reference = moe.fused_moe_reference(x, weights, ids, w13, w2, biases, activation)  # (bf16: to 1% of the largest)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=1e-2 * reference.abs().max().item())
    torch.testing.assert_close(fused, reference, **tol)


def test_fused_moe_takes_bf16_blocks_exactly_where_every_bf16_expert_is_native(monkeypatch):
    """kernels.moe.fused_moe makes a bf16 block one native call where the kernel has bf16 GEMMs
    (`bf16_panels`), float32 or bf16 top-k weights alike, with the bits of the unfused steps; elsewhere
    bf16 blocks take those steps (most experts on torch's matmuls), float32 ones never do."""
    gen = torch.Generator().manual_seed(3)
    w13, w2 = make(6, 48, 40, torch.bfloat16, seed=4)
    x = torch.randn(20, 48, generator=gen).to(torch.bfloat16)
    ids = torch.rand(20, 6, generator=gen).argsort(-1)[:, :3].contiguous()
    weights = torch.rand(20, 3, generator=gen).softmax(-1)
    calls = []
    real = native.fused_moe
    monkeypatch.setattr(native, "fused_moe", lambda *args, **kwargs: calls.append(args[0].dtype) or real(*args, **kwargs))
    for panels in (True, False):
        monkeypatch.setattr(native, "bf16_panels", lambda: panels)
        for top_k_weights in (weights, weights.bfloat16()):
            calls.clear()
            out = moe.fused_moe(x, top_k_weights, ids, w13, w2)
            assert calls == ([torch.bfloat16] if panels else [])
            handle = moe.sort_pairs(ids, 6)
            unfused = moe.unpermute(moe.expert_ffn(x.index_select(0, handle.tokens), handle.counts.tolist(), w13, w2),
                                    handle, top_k_weights)
            assert torch.equal(out, unfused)  # (with bf16_panels the unfused experts are all on the kernel too)
    calls.clear()
    moe.fused_moe(x.float(), weights, ids, w13.float(), w2.float())
    assert calls == [torch.float32]


def test_fused_moe_rejects_an_expert_id_out_of_range():
    w13, w2 = make(4, 32, 16, torch.float32)
    with pytest.raises(ValueError, match=r"topk_ids out of range 0\.\.3: 0\.\.4"):
        native.fused_moe(torch.randn(2, 32), torch.full((2, 2), 0.5), torch.tensor([[0, 4], [1, 2]]), w13, w2)


@pytest.mark.parametrize("window", [None, 3, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["heads", "narrow", "latent"])
def test_decode_attention_matches_sdpa(window, dtype, layout, monkeypatch):
    """A pure decode step (contexts of 2..40 tokens in scattered blocks, 4 query heads per kv head):
    the native kernel, which reads the cache through the slots, against the gathered SDPA path.
    "narrow": values of 16 numbers in their own cache; "latent" is MLA's cache: one kv head of 28
    numbers whose first 20 are the value (a view)."""
    from moeray.kernels.attention import build_metadata, paged_attention
    gen = torch.Generator().manual_seed(11)
    block, heads, kv_heads, dim, v_dim = {"heads": (4, 8, 2, 24, 24), "narrow": (4, 8, 2, 24, 16),
                                          "latent": (4, 8, 1, 28, 20)}[layout]
    separate = layout != "latent"
    lengths = [2, 7, 40, 13, 4]
    free = torch.randperm(64, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // block))] for n in lengths]
    k_cache = torch.randn(64 * block, kv_heads, dim, generator=gen).to(dtype)
    caches = [k_cache, torch.randn(64 * block, kv_heads, v_dim, generator=gen).to(dtype) if separate else None]
    q = torch.randn(len(lengths), heads + kv_heads, dim, generator=gen).to(dtype)[:, :heads]  # a view, as the model's
    k = torch.randn(len(lengths), kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(len(lengths), kv_heads, v_dim, generator=gen).to(dtype) if separate else k[..., :v_dim]
    meta = build_metadata(tables, [n - 1 for n in lengths], [1] * len(lengths), block)
    assert meta.decode_rows is None  # every row a decode query
    calls = []
    real = native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))

    def copies():  # fresh caches; a latent cache's values are a view of its keys
        keys = caches[0].clone()
        return [keys, caches[1].clone() if separate else keys[..., :v_dim]]

    written = copies()
    out = paged_attention(q, k, v, *written, meta, 0.3, window)  # the kernel writes this step's K/V itself
    assert calls == [1]
    monkeypatch.setattr(native, "ENABLED", False)  # as MOERAY_NATIVE_KERNELS=0 at start-up
    expected_written = copies()
    expected = paged_attention(q, k, v, *expected_written, meta, 0.3, window)
    assert calls == [1] and out.dtype == dtype and out.shape == (len(lengths), heads, v_dim)
    assert all(torch.equal(a, b) for a, b in zip(written, expected_written))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), expected.float(), **tol)


@pytest.mark.parametrize("batch, kv_heads", [(1, 1), (2, 1), (1, 2)])
def test_decode_attention_split_over_query_heads_keeps_the_bits(batch, kv_heads):
    """Fewer sequences x kv heads than threads (MLA decoding one sequence) split each kv head's query
    heads into parts, one per thread: any number of threads, even parts and uneven, gives the bits
    of one thread doing all heads together."""
    gen = torch.Generator().manual_seed(5)
    heads, dim, v_dim, length = 8, 28, 20, 300
    k_cache = torch.randn(512, kv_heads, dim, generator=gen)
    v_cache = k_cache[..., :v_dim] if kv_heads == 1 else torch.randn(512, kv_heads, v_dim, generator=gen)
    q = torch.randn(batch, heads, dim, generator=gen)
    slots = torch.stack([torch.randperm(512, generator=gen)[:length] for _ in range(batch)])  # [B, L]
    lens = torch.tensor([length, length - 77][:batch])
    previous = torch.get_num_threads()
    try:
        outs = {}
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            outs[threads] = native.decode_attention(q, k_cache, v_cache, slots, lens, 0.2, None)
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(out, outs[1]) for out in outs.values())
    empty = native.decode_attention(q[:0], k_cache, v_cache, slots[:0], lens[:0], 0.2, None)  # (no batch: no work items)
    assert empty.shape == (0, heads, v_dim)
    reference = torch.softmax((q[0, 0] @ k_cache[slots[0], 0].T) * 0.2, dim=-1) @ v_cache[slots[0], 0]  # head 0 of sequence 0
    torch.testing.assert_close(outs[3][0, 0], reference, rtol=1e-5, atol=1e-6)


def test_fused_moe_refuses_other_dtypes():
    """It reads raw float32 / bf16 / int64 memory: anything else must be refused before the call, not misread."""
    w13, w2 = make(4, 32, 16, torch.float32)
    x, weights, ids = torch.randn(2, 32), torch.full((2, 2), 0.5), torch.tensor([[0, 1], [1, 2]])
    for bad in ((x, weights.bfloat16(), ids), (x, weights.half(), ids), (x, weights, ids.int()),
                (x.bfloat16(), weights.half(), ids)):
        with pytest.raises(TypeError, match="fused_moe takes float32 x with float32 topk_weights, or bf16 x"):
            native.fused_moe(*bad, w13, w2)
    with pytest.raises(TypeError, match="one dtype, not torch.bfloat16 and torch.float32"):  # x bf16, weights float32
        native.fused_moe(x.bfloat16(), weights, ids, w13, w2)
    with pytest.raises(ValueError, match=r"topk_weights must be contiguous and of topk_ids' shape \(2, 2\), not \(2, 1\)"):
        native.fused_moe(x, weights[:, :1], ids, w13, w2)


def test_expert_ffn_and_decode_attention_refuse_mismatched_inputs():
    w13, w2 = make(2, 32, 16, torch.float32)
    x = torch.randn(3, 32)
    with pytest.raises(TypeError, match="one dtype"):
        native.expert_ffn(x, torch.tensor([[0, 0, 3]]), w13.bfloat16(), w2, torch.empty(3, 32))
    with pytest.raises(TypeError, match="int64 indices"):
        native.expert_ffn(x, torch.tensor([[0, 0, 3]], dtype=torch.int32), w13, w2, torch.empty(3, 32))
    with pytest.raises(ValueError, match="contiguous"):
        native.expert_ffn(x.t().contiguous().t(), torch.tensor([[0, 0, 3]]), w13, w2, torch.empty(3, 32))
    cache = torch.randn(8, 1, 16)
    with pytest.raises(TypeError, match="int64 indices"):
        native.decode_attention(torch.randn(1, 2, 16), cache, cache, torch.zeros(1, 4, dtype=torch.int32),
                                torch.tensor([4]), 0.25, None)


def test_out_of_bounds_groups_and_lengths_are_refused_before_any_memory_is_touched():
    """Groups come over the wire to expert groups: a bad one must raise, not write past a buffer."""
    w13, w2 = make(2, 32, 16, torch.float32)
    x = torch.randn(3, 32)
    for groups in ([[2, 0, 3]], [[0, 1, 3]], [[0, -1, 2]], [[1, 0, -1]]):  # expert, past the end, negative
        with pytest.raises(ValueError, match="expert groups out of bounds"):
            native.expert_ffn(x, torch.tensor(groups), w13, w2, torch.empty(3, 32))
    with pytest.raises(ValueError, match="expert groups out of bounds"):  # a row of x that is not there
        native.expert_ffn(x, torch.tensor([[0, 0, 2]]), w13, w2, torch.empty(2, 32), rows=torch.tensor([0, 3]))
    cache = torch.randn(8, 2, 16)
    with pytest.raises(ValueError, match=r"context lengths outside 0\.\.4"):
        native.decode_attention(torch.randn(1, 2, 16), cache, cache, torch.zeros(1, 4, dtype=torch.long),
                                torch.tensor([5]), 0.25, None)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2 kv heads"):
        native.decode_attention(torch.randn(1, 3, 16), cache, cache, torch.zeros(1, 4, dtype=torch.long),
                                torch.tensor([4]), 0.25, None)
    before = cache.clone()
    new = (torch.randn(1, 2, 16), torch.randn(1, 2, 16))
    for context, new_slot in (([0, 1, 8, 0], 3), ([0, 1, 2, 0], 8), ([0, 1, 2, 0], -1)):  # 8 slots: 0..7
        with pytest.raises(ValueError, match=r"slots outside the cache's 0\.\.7"):
            native.decode_attention(torch.randn(1, 2, 16), cache, cache, torch.tensor([context]), torch.tensor([3]),
                                    0.25, None, new=(*new, torch.tensor([new_slot])))
    assert torch.equal(cache, before)  # nothing written


def test_empty_cxx_means_the_default_compiler_and_the_library_is_readable_by_others(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("MOERAY_CACHE_DIR", str(tmp_path))
    path = native.build()
    assert path.is_file() and path.stat().st_mode & 0o755 == 0o755 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("rows,inner,vocab", [(1, 48, 211), (7, 37, 100), (16, 128, 2048), (17, 64, 50), (40, 96, 13), (70, 32, 30)])
def test_logits_match_a_float64_reference_and_a_row_alone(rows, inner, vocab):
    """Every row of every 8-row panel (partial ones too), every tile size (vocab not a multiple of 6 or 12);
    a row's logits are the same bits alone as in the batch."""
    g = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, inner, generator=g), torch.randn(vocab, inner, generator=g)
    got = native.logits(x, weight)
    expected = (x.double() @ weight.double().T).float()
    assert got.shape == (rows, vocab)
    torch.testing.assert_close(got, expected, atol=1e-5 * inner**0.5, rtol=0)
    for i in (0, rows - 1):
        assert torch.equal(native.logits(x[i:i + 1], weight), got[i:i + 1])


def test_logits_refuse_what_they_cannot_read():
    x, weight = torch.randn(2, 16), torch.randn(5, 16)
    with pytest.raises(TypeError, match="float32"):
        native.logits(x.bfloat16(), weight.bfloat16())
    with pytest.raises(ValueError, match="shapes disagree"):
        native.logits(x, torch.randn(5, 8))
    with pytest.raises(ValueError, match="contiguous"):
        native.logits(x, weight.t().contiguous().t())
