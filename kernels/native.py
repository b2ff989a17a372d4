"""CPU kernels in C++ (`csrc/cpu_kernels.cpp`), compiled once per machine and called through ctypes.

Entry points, each tested against a plain-torch reference (tests/unit/test_native_kernel.py,
test_norm.py, test_rope.py, test_linear.py):
- `expert_ffn`: the grouped SwiGLU. Experts with few rows (decode, small prefill): torch's matmuls
  pack or re-read an expert's weight per call at those sizes; the kernel reads each weight block
  once and multiplies all of its expert's rows by it while it sits in L1: memory bandwidth for a
  row or two, close to the FMA rate for tens (float32 and bf16). Float32 experts with PANEL_ROWS
  rows or more: GEMMs at 80-90% of the FMA peak, where MKL's sgemm reaches ~65% on AMD Zen 2 (and runs
  256-bit code on AMD Zen 5, where these are 512-bit); bf16 experts where the CPU has AVX512-BF16
  (`bf16_panels`) on its bf16 dot-product instruction, as dot products and GEMMs alike.
- `fused_moe`: a batch's whole MoE block (sort, experts, top-k sum) in one call, the bits of the
  three torch-level steps without their ~0.2 ms of Python and small ops per layer, nor, at prefill
  sizes, the gathered copy of x and the separate passes of the top-k sum (float32; bf16 too).
- `decode_attention`: one query row per sequence over the paged KV cache, read in place through
  the slots instead of gathered into a padded copy.
- `logits`: the float32 lm_head for the few rows a step samples from; MKL reads the [V, H] weight
  at a fraction of the memory bandwidth at those sizes (1.3-3.8x, see LOGITS_MAX_ROWS).
- `rms_norm` and `rope`: float32 RMSNorm (optionally after a residual add) and rotary embedding in
  one pass each, with torch's bits.
`kernels.moe`, `kernels.attention`, `kernels.linear`, `kernels.norm`, `kernels.rope` and
`MoEModel.compute_logits` choose them (CPU, float32/bf16, contiguous); everything else, and every
machine where the source cannot be built, takes the torch paths.

Build: `$CXX` (default `c++`) with `-O3 -march=native -ffp-contract=off -fopenmp`, into
`$MOERAY_CACHE_DIR` (default `~/.cache/moeray`), named by a hash of the source, the flags, the
compiler and the CPU, so a shared home directory serves machines of different kinds; a few
seconds, once, logged. The library links the OpenMP runtime torch has already loaded (same
soname), so it shares torch's threads. `MOERAY_NATIVE_KERNELS=0` (read at import) turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # (kernels.moe imports this module)
    from moeray.kernels.moe import ExpertBiases

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_I, _P, _D = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double  # int64_t, data_ptr()s or None, double
SIGNATURES = {  # as declared in csrc/cpu_kernels.cpp; every function returns an int status
    "moeray_expert_ffn": [_I, _I, _P, _I, _P, _P, _I, _P, _P, _I, _I, _I, _P, _P, _D, _D, _P, _P, _I, _I],
    "moeray_fused_moe": [_I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _I, _I, _P, _P, _D, _D, _P, _I, _I],
    "moeray_decode_attention": [_I, _I, _I, _I, _I, _I, _I, _I, _P, _I, _P, _P, _I, _P, _I, _P, _I, _P, _P, _I, _P,
                                ctypes.c_double, _I, _P, _P, _I],
    "moeray_logits": [_I, _I, _I, _P, _P, _P, _I],
    "moeray_rms_norm": [_I, _I, _P, _P, _P, ctypes.c_double, _I, _P, _P, _I],
    "moeray_rope": [_I, _I, _I, _P, _I, _P, _P, _P],
    "moeray_bf16_panels": [],
}


class NativeUnavailable(RuntimeError):
    """The kernel could not be built or loaded here; the message says why."""


# Read once: `supports` runs on every layer, and reading the environment there cost 1.4 us a call.
ENABLED = os.environ.get("MOERAY_NATIVE_KERNELS") != "0"


def available() -> bool:
    """True if the kernel is switched on and builds here (built on the first call)."""
    return ENABLED and _load() is not None


def library() -> ctypes.CDLL:
    """The loaded kernel; `NativeUnavailable` says why not."""
    lib = _load()
    if lib is None:
        raise NativeUnavailable(_failure[0])
    return lib


_failure: list[str] = []


@cache
def _load() -> ctypes.CDLL | None:
    """Build and load once per process; a failure is logged once and remembered."""
    try:
        lib = ctypes.CDLL(str(build()))
    except Exception as error:  # whatever stops the build, the torch paths still work
        logger.warning("native CPU kernels unavailable, running on torch ops (slower at decode sizes): %s", error)
        _failure.append(str(error))
        return None
    for name, argtypes in SIGNATURES.items():  # without them ctypes would pass ints as 32 bits
        function = getattr(lib, name)
        function.restype, function.argtypes = ctypes.c_int, argtypes
    return lib


def supports(x: Tensor, *weights: Tensor) -> bool:
    """The kernels take CPU float32 / bf16 tensors of one dtype, contiguous (called on every layer: kept cheap)."""
    if not x.is_cpu or x.dtype not in DTYPES or not x.is_contiguous():
        return False
    dtype = x.dtype
    for w in weights:
        if w.dtype != dtype or not w.is_contiguous():
            return False
    return available()


# float32 experts with at least this many rows in a call are multiplied as GEMMs (x and the activation
# laid out as panels of 8 rows, 16 on AVX-512, one chain of fused multiply-adds over k per output), fewer as dot
# products (8 lanes along k, summed pairwise). Either way a row's result depends only on its own values
# and on which side of this line its expert's row count falls: below it, a row gets the same bits alone
# or in any batch (so decode batches of up to 15 sequences are batch-invariant). Measured (2-core AVX2
# VM, 2 threads, experts with n rows each, GEMM vs dot products, GFLOP/s): Mixtral-sized (H=1024, I=2048)
# n=6 74/65, 8 96/77, 16 153/102, 32 174/122, 48 181/129; OLMoE-sized (H=1024, I=512) n=8 82/66,
# 16 125/88, 32 156/112; built-in model's (H=128, I=256) n=8 101/76, 16 147/83; the dot products win
# below 5-6 rows (memory-bound: they read each weight once for all rows). 16 keeps decode batch-invariant
# up to 15 sequences and takes the GEMMs from there, where they are 1.4x faster or more.
# The same line holds for bf16 where the build has AVX512-BF16 (`bf16_panels`): GEMMs and dot products
# both on vdpbf16ps. Measured (AMD Zen 5 VM, 2 threads, expert FFN alone, GFLOP/s with the line at 16 vs
# at 2, i.e. GEMMs padded to panels of 16 rows from 2 rows up): Mixtral-sized T=16 (~4 rows an expert)
# 123/90, T=128 482/482; OLMoE-sized T=16 (~2 rows) 69/54, T=64 (~8) 174/139.
PANEL_ROWS = 16


def bf16_panels() -> bool:
    """True if bf16 experts run on vdpbf16ps here (AVX512-BF16), GEMMs from PANEL_ROWS rows. (Whether the
    build has them is asked once; whether the kernels are on, on every call, as `supports` asks.)"""
    return available() and _build_has_bf16_panels()


@cache
def _build_has_bf16_panels() -> bool:
    return bool(library().moeray_bf16_panels())


def expert_ffn(x: Tensor, groups: Tensor, w13: Tensor, w2: Tensor, out: Tensor, rows: Tensor | None = None,
               panel_rows: int = PANEL_ROWS, biases: ExpertBiases | None = None, limit: float | None = None,
               alpha: float = 1.0) -> Tensor:
    """Grouped SwiGLU on the native kernel (check `supports` first), written into `out`.

    x [M, H]; groups [G, 3] int64: (expert, first sorted row, number of rows) of each group, any
    order, experts may repeat; rows [N] int64: the row of x of each sorted row (None: x is sorted);
    w13 [E, 2I, H]; w2 [E, H, I]; out [N, H], x's dtype: the groups' rows are written, nothing else.
    Groups with at least `panel_rows` rows are multiplied as GEMMs (see PANEL_ROWS): float32 always,
    bf16 where `bf16_panels` and H and I are even. GPT-OSS's experts: `biases` (kernels.moe.ExpertBiases,
    x's dtype; either may be None), each added to its matmul's rounded output, and `limit` (None: plain
    SwiGLU) and `alpha` of the clamped activation (kernels.moe.Activation).
    """
    num_rows, hidden, inter = out.shape[0], x.shape[1], w2.shape[2]
    if groups.numel() == 0:
        return out
    _check_raw(x, (w13, w2, out), (groups, rows))
    b13, b2 = _bias_pointers(biases, x, w13, limit)
    widened = hidden if x.dtype != torch.float32 else 0  # bf16: the rows of x widened to float32
    scratch = torch.empty(num_rows * (inter + widened), dtype=torch.float32)
    status = library().moeray_expert_ffn(
        DTYPES[x.dtype], groups.shape[0], groups.data_ptr(), num_rows, None if rows is None else rows.data_ptr(),
        x.data_ptr(), x.shape[0], w13.data_ptr(), w2.data_ptr(), w13.shape[0], hidden, inter, b13, b2, limit or 0.0, alpha,
        scratch.data_ptr(), out.data_ptr(), panel_rows, torch.get_num_threads())
    if status == 2:
        raise ValueError(f"expert groups out of bounds (experts 0..{w13.shape[0] - 1}, {num_rows} output rows, "
                         f"{x.shape[0]} rows of x): {groups.tolist()}")
    if status:
        raise RuntimeError(f"moeray_expert_ffn failed with status {status}")
    return out


def fused_moe(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor,
              panel_rows: int = PANEL_ROWS, biases: ExpertBiases | None = None, limit: float | None = None,
              alpha: float = 1.0) -> Tensor:
    """x [T, H], topk_weights [T, K], int64 topk_ids [T, K], w13 [E, 2I, H], w2 [E, H, I] -> [T, H]:
    sort, experts and the top-k sum in one call (check `supports`), the bits of kernels.moe's
    sort_pairs -> expert_ffn -> unpermute on the kernel. x float32 with float32 top-k weights, or bf16
    with float32 (Mixtral) or bf16 (Qwen-MoE, OLMoE) ones. `biases`, `limit` and `alpha` as in `expert_ffn`."""
    if (x.dtype, topk_weights.dtype) not in _FUSED_DTYPES or topk_ids.dtype != torch.int64:
        raise TypeError(f"fused_moe takes float32 x with float32 topk_weights, or bf16 x with float32 or bf16 "
                        f"topk_weights, and int64 topk_ids, not {x.dtype}, {topk_weights.dtype}, {topk_ids.dtype}")
    _check_raw(x, (w13, w2), (topk_ids,))
    if not topk_weights.is_contiguous() or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must be contiguous and of topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"not {tuple(topk_weights.shape)}")
    b13, b2 = _bias_pointers(biases, x, w13, limit)
    out = torch.empty_like(x)  # [T, H]
    status = library().moeray_fused_moe(
        DTYPES[x.dtype], DTYPES[topk_weights.dtype], topk_ids.shape[0], topk_ids.shape[1], topk_ids.data_ptr(),
        topk_weights.data_ptr(), x.data_ptr(), w13.data_ptr(), w2.data_ptr(), w13.shape[0], x.shape[1], w2.shape[2],
        b13, b2, limit or 0.0, alpha, out.data_ptr(), panel_rows, torch.get_num_threads())
    if status == 2:
        raise ValueError(f"topk_ids out of range 0..{w13.shape[0] - 1}: {topk_ids.min().item()}..{topk_ids.max().item()}")
    if status:
        raise RuntimeError(f"moeray_fused_moe failed with status {status}")
    return out


def _bias_pointers(biases: ExpertBiases | None, x: Tensor, w13: Tensor, limit: float | None) -> tuple:
    """(b13, b2) as the kernel takes them, checked against x and w13 [E, 2I, H]; and the limit checked."""
    if limit is not None and not limit > 0:
        raise ValueError(f"the clamped activation's limit must be > 0, not {limit}")
    if biases is None:
        return None, None
    num_experts, two_inter, hidden = w13.shape
    expected = {"b13": (num_experts, two_inter), "b2": (num_experts, hidden)}
    pointers = []
    for name in ("b13", "b2"):
        bias = getattr(biases, name)
        if bias is not None:
            _check_raw(x, (bias,), ())
            if tuple(bias.shape) != expected[name]:
                raise ValueError(f"expert bias {name} must be {expected[name]} for w13 {tuple(w13.shape)}, "
                                 f"not {tuple(bias.shape)}")
        pointers.append(None if bias is None else bias.data_ptr())
    return tuple(pointers)


_FUSED_DTYPES = {(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)}


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, lens: Tensor, scale: float,
                     window: int | None, new: tuple[Tensor, Tensor, Tensor] | None = None,
                     sinks: Tensor | None = None) -> Tensor:
    """q [B, nh, D] (one new token per sequence) over paged caches k_cache [num_slots, nkv, D], v_cache
    [num_slots, nkv, Dv]: slots [B, L] int64 the slot of each context position (padded), lens [B] int64
    context lengths -> [B, nh, Dv]. A query sees the last `window` positions of its context (None: all);
    sinks [nh] (GPT-OSS) join each head's softmax as one more logit without a value.
    With new = (k [B, nkv, D], v [B, nkv, Dv], new_slots [B] int64), this step's keys and values are
    written to their slots first. q, k and v may be row-strided views (heads of a fused projection).
    v_cache is contiguous, or the first Dv numbers of k_cache's rows (MLA; see `shares_keys`), whose
    values are then written with the keys. Check `supports` on k_cache."""
    batch, heads, dim = q.shape
    in_keys = shares_keys(v_cache, k_cache)
    _check_raw(k_cache, () if in_keys else (v_cache,), (slots, lens) if new is None else (slots, lens, new[2]))
    num_slots, kv_heads, v_dim = k_cache.shape[0], k_cache.shape[1], v_cache.shape[2]
    q = _contiguous_rows(q)
    if new is not None:  # (values that live in the keys are not written: no copy of them)
        new = (_contiguous_rows(new[0]), new[1] if in_keys else _contiguous_rows(new[1]), new[2])
    if (v_cache.shape[:2] != k_cache.shape[:2] or k_cache.shape[2] != dim or len(lens) != batch or len(slots) != batch
            or q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype
            or (new is not None and not (new[0].shape == (batch, kv_heads, dim) and new[1].shape == (batch, kv_heads, v_dim)
                                         and len(new[2]) == batch and new[0].dtype == new[1].dtype == q.dtype))):
        raise ValueError(f"decode_attention shapes disagree: q {tuple(q.shape)} {q.dtype}, caches {tuple(k_cache.shape)} "
                         f"{tuple(v_cache.shape)} {k_cache.dtype}, slots {tuple(slots.shape)}, lens {tuple(lens.shape)}"
                         + ("" if new is None else f", new k {tuple(new[0].shape)}, v {tuple(new[1].shape)}, "
                                                   f"slots {tuple(new[2].shape)}"))
    if sinks is not None:
        if sinks.shape != (heads,):
            raise ValueError(f"decode_attention: sinks {tuple(sinks.shape)} must be [nh] = ({heads},)")
        sinks = sinks.float().contiguous()
    out = q.new_empty(batch, heads, v_dim)
    new_k, new_v, new_slots = (None, None, None) if new is None else (t.data_ptr() for t in new)
    if in_keys:
        new_v = None  # written with the keys
    status = library().moeray_decode_attention(
        DTYPES[q.dtype], batch, heads, kv_heads, dim, v_dim, v_cache.stride(0), v_cache.stride(1), q.data_ptr(),
        q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), num_slots, new_k, new[0].stride(0) if new else 0, new_v,
        new[1].stride(0) if new else 0, new_slots, slots.data_ptr(), slots.shape[1], lens.data_ptr(), scale, window or 0,
        None if sinks is None else sinks.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if status == 3:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    if status == 4:
        raise ValueError(f"context lengths outside 0..{slots.shape[1]}: {lens.tolist()}")
    if status == 5:
        raise ValueError(f"slots outside the cache's 0..{num_slots - 1}")
    if status:
        raise RuntimeError(f"moeray_decode_attention failed with status {status}")
    return out


def shares_keys(v_cache: Tensor, k_cache: Tensor) -> bool:
    """v_cache [slots, nkv, Dv] is k_cache [slots, nkv, D]'s first Dv numbers of every row (a view)."""
    return (v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride()
            and v_cache.shape[:2] == k_cache.shape[:2] and v_cache.shape[2] <= k_cache.shape[2])


def _contiguous_rows(t: Tensor) -> Tensor:
    """t [B, n, D] whose rows ([n, D] each) are contiguous: a row-strided view as it is, else a copy."""
    return t if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] else t.contiguous()


# Rows up to which `logits` beats F.linear. Measured (2-core AVX2 VM, 2 threads; warm weights, torch
# 2.13 MKL vs kernel): K=128 N=2048 (built-in model) 1.3x at 4-64 rows, 1.2x at 128-256, 0.75x at 1
# (cold weights, as in a decode step: 1.25x at 1, 1.6x at 16); K=4096 N=32000 (Mixtral) 1.9-3.8x at 32-256.
LOGITS_MAX_ROWS = 256


def logits(x: Tensor, weight: Tensor) -> Tensor:
    """float32 x [M, K] @ weight [N, K]^T -> [M, N] on the kernel (check `supports`): the lm_head."""
    rows, inner = x.shape
    if x.dtype != torch.float32:
        raise TypeError(f"logits takes float32 tensors, not {x.dtype}")
    _check_raw(x, (weight,), ())
    if weight.dim() != 2 or weight.shape[1] != inner:
        raise ValueError(f"logits shapes disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    out = x.new_empty(rows, weight.shape[0])
    library().moeray_logits(rows, inner, weight.shape[0], x.data_ptr(), weight.data_ptr(), out.data_ptr(),
                            torch.get_num_threads())
    return out


def rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """float32 x [T, n, D] (rows may be strided, heads contiguous), cos and signed_sin [T, 1, D]
    (contiguous) -> rotated [T, n, D], contiguous: kernels.rope.rotate's ops and bits in one pass."""
    tokens, heads, dim = x.shape
    if not (x.dtype == cos.dtype == signed_sin.dtype == torch.float32):
        raise TypeError(f"rope takes float32 tensors, not {x.dtype}, {cos.dtype}, {signed_sin.dtype}")
    x = _contiguous_rows(x)
    _check_raw(cos, (signed_sin,), ())
    if cos.shape != (tokens, 1, dim) or signed_sin.shape != cos.shape or dim % 2:
        raise ValueError(f"rope shapes disagree: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(signed_sin.shape)}")
    out = torch.empty(tokens, heads, dim, dtype=x.dtype)
    library().moeray_rope(tokens, heads, dim, x.data_ptr(), x.stride(0), cos.data_ptr(), signed_sin.data_ptr(),
                          out.data_ptr())
    return out


def rms_norm(x: Tensor, weight: Tensor, eps: float, lanes: int, residual: Tensor | None = None
             ) -> tuple[Tensor, Tensor]:
    """float32 x [..., H] (contiguous), weight [H] -> (x, RMSNorm of x) in torch's order of additions for
    vectors of `lanes` (8 or 16) floats (see kernels.norm, which checks where that gives F.rms_norm's
    bits). With `residual` (x's shape), x + residual is normalised and returned in place of x."""
    hidden = x.shape[-1]
    if x.dtype != torch.float32:
        raise TypeError(f"rms_norm takes float32 tensors, not {x.dtype}")
    _check_raw(x, (weight,) if residual is None else (weight, residual), ())
    if weight.shape != (hidden,) or hidden < lanes or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm shapes disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)}, {lanes} lanes"
                         + ("" if residual is None else f", residual {tuple(residual.shape)}"))
    out = torch.empty_like(x)
    total = x if residual is None else torch.empty_like(x)
    status = library().moeray_rms_norm(x.numel() // hidden, hidden, x.data_ptr(), None if residual is None else residual.data_ptr(),
                                       weight.data_ptr(), eps, lanes, total.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if status:
        raise ValueError(f"rms_norm takes 8 or 16 lanes, not {lanes}")
    return total, out


def _check_raw(x: Tensor, alike: tuple[Tensor, ...], indices: tuple[Tensor | None, ...]) -> None:
    """The kernels read raw memory: x and `alike` one supported dtype, contiguous, indices int64.
    Plain loops: it runs on every call of every layer (generator expressions cost 4 us)."""
    dtype = x.dtype
    if dtype not in DTYPES:
        raise TypeError(f"native kernels take float32 or bf16 tensors of one dtype, not {dtype}")
    for t in (x, *alike):
        if t.dtype != dtype:
            raise TypeError(f"native kernels take float32 or bf16 tensors of one dtype, not {dtype} and {t.dtype}")
        if not t.is_contiguous():
            raise ValueError("native kernels take contiguous tensors")
    for t in indices:
        if t is not None:
            if t.dtype != torch.int64:
                raise TypeError(f"native kernels take int64 indices, not {t.dtype}")
            if not t.is_contiguous():
                raise ValueError("native kernels take contiguous tensors")


def build(source_file: Path = SOURCE) -> Path:
    """A shared library of `source_file` (default: the kernels) in the cache, compiled unless already there.
    (bench/peak.py builds its probe of the CPU's peak rate with it too: the kernels' compiler and flags.)"""
    compiler = shlex.split(os.environ.get("CXX") or "c++")
    source = source_file.read_bytes()
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except FileNotFoundError as error:
        raise NativeUnavailable(f"no C++ compiler: {compiler[0]!r} not found (set CXX)") from error
    key = hashlib.sha256(b"\0".join([source, " ".join(compiler + FLAGS).encode(), version.encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    folder = _cache_dir()
    path = folder / f"{source_file.stem}-{key}.so"
    if path.is_file():
        return path
    logger.info("compiling %s into %s (once per machine, a few seconds)", source_file.name, path)
    fd, partial = tempfile.mkstemp(dir=folder, prefix=path.stem, suffix=".partial")
    os.close(fd)
    try:
        result = subprocess.run([*compiler, *FLAGS, str(source_file), "-o", partial], capture_output=True, text=True,
                                timeout=600)
        if result.returncode:
            raise NativeUnavailable(f"{' '.join(compiler + FLAGS)} {source_file} failed:\n{result.stderr[-2000:]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o755 & ~umask)  # mkstemp made it 0600: others sharing the cache must load it too
        os.replace(partial, path)  # atomic: processes building at once each install a whole file
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return path


def _cache_dir() -> Path:
    """$MOERAY_CACHE_DIR, else $XDG_CACHE_HOME/moeray or ~/.cache/moeray; if that is not writable, a
    folder of our own under the temp dir (created 0700 and checked: another user must not plant a
    library there), else a fresh temporary folder."""
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = Path(os.environ.get("MOERAY_CACHE_DIR") or Path(base) / "moeray")
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except (OSError, RuntimeError, KeyError):  # RuntimeError: no home directory
        pass
    folder = Path(tempfile.gettempdir()) / f"moeray-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.stat()
        if info.st_uid == os.getuid() and not info.st_mode & 0o022:
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="moeray-"))


def _cpu_signature() -> str:
    """What `-march=native` compiles for: the machine and its CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}"
