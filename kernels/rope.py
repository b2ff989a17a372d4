"""Rotary position embeddings, numerically the same as transformers 5.

Three steps, split so that the expensive parts run once per step and not once per layer:

1. `rope_inv_freq(config)` -> the inverse frequencies `[D/2]` and the attention scaling that
   multiplies cos/sin (1.0 except for yarn). Static for every type but "dynamic".
2. `rope_cos_sin(positions, inv_freq, scaling)` -> cos, sin `[T, D]` for the tokens of a step;
   `rotary_tables(cos, sin, dtype)` shapes them once per step for step 3.
3. `rotate(x, tables)` on q and k of every layer, both at once (`apply_rope(x, cos, sin)` is
   the same rotation for callers with plain cos/sin).

The formulas copy `transformers.modeling_rope_utils` op for op (same dtypes, same order),
because a different but "equivalent" expression gives different float32 bits and the model
is tested for equal logits. Layout is transformers' `rotate_half` one (Llama, Mixtral,
Qwen): the two halves of the head are the real and imaginary parts, and cos/sin hold the
`D/2` frequencies concatenated twice.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from moeray.kernels import native

DEFAULT_THETA = 10000.0
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

# Keys each scaled type cannot do without (transformers raises a KeyError for them too).
_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


def _hashable(value: object) -> object:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        raise ValueError(f"nested rope parameters are not supported, got {value!r}")
    return value


@dataclass(frozen=True)
class RopeConfig:
    """What rope needs from a checkpoint's config.

    `scaling` is the checkpoint's `rope_scaling` / `rope_parameters` dict minus `rope_theta`,
    as sorted items so that the config stays hashable; its "rope_type" (or legacy "type")
    selects the kind, absent means "default".
    """

    head_dim: int  # rotary dim (= head_dim for the families we serve)
    theta: float  # rope_theta
    max_position_embeddings: int
    scaling: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"rope head_dim must be a positive even number, got {self.head_dim}")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        missing = [key for key in _REQUIRED_KEYS[rope_type] if key not in self.params]
        if missing:
            raise ValueError(f"rope type {rope_type!r} needs {missing} in its rope parameters")

    @property
    def params(self) -> dict[str, object]:
        return dict(self.scaling)

    @property
    def rope_type(self) -> str:
        params = self.params
        return str(params.get("rope_type", params.get("type", "default")))

    @classmethod
    def from_hf(cls, config: dict, head_dim: int, default_theta: float = DEFAULT_THETA) -> "RopeConfig":
        """Read a config.json dict of either style.

        Legacy: `rope_theta` at the top and `rope_scaling` a dict or null. Transformers 5:
        `rope_parameters` holding `rope_theta` and `rope_type`. Where both are present
        `rope_scaling` wins, as in transformers. A missing theta is `default_theta` (10000;
        model families fill in their own first, see `moeray.models.family.Family.defaults`).
        """
        params = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        theta = params.pop("rope_theta", None)
        if theta is None:
            theta = config.get("rope_theta")
        if theta is None:
            theta = default_theta
        if "max_position_embeddings" not in config:
            raise ValueError("config has no max_position_embeddings, which rope needs")
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor"))
        if partial is not None and partial != 1.0:
            raise ValueError(f"partial rotary embeddings are not supported, got partial_rotary_factor={partial}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type in ("llama3", "yarn") and config.get("original_max_position_embeddings") is not None:
            # Phi3-style configs keep the pretraining length at the top; transformers prefers it.
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        if rope_type == "default":  # {"rope_type": "default"} and {} are the same rope: one config
            params = {k: v for k, v in params.items() if k not in ("rope_type", "type")}
        scaling = tuple(sorted((key, _hashable(value)) for key, value in params.items()))
        return cls(
            head_dim=head_dim,
            theta=float(theta),
            max_position_embeddings=int(config["max_position_embeddings"]),
            scaling=scaling,
        )


def _base_inv_freq(base: float | Tensor, dim: int) -> Tensor:
    # [D/2] float32; transformers' expression: int64 arange cast to float, divided by dim.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _default(config: RopeConfig, seq_len: int | None) -> tuple[Tensor, float]:
    return _base_inv_freq(config.theta, config.head_dim), 1.0


def _linear(config: RopeConfig, seq_len: int | None) -> tuple[Tensor, float]:
    inv_freq = _base_inv_freq(config.theta, config.head_dim)
    inv_freq /= config.params["factor"]
    return inv_freq, 1.0


def _dynamic(config: RopeConfig, seq_len: int | None) -> tuple[Tensor, float]:
    """NTK-aware scaling: the base grows with the sequence length once it passes the trained one.

    transformers computes the initial frequencies with `seq_len = max_position_embeddings`
    (a Python number) and, in `dynamic_rope_update`, recomputes them with
    `seq_len = max(position_ids) + 1` *as a tensor* when that exceeds the cached length; the
    tensor path computes the new base in float32. Both paths are reproduced here.
    """
    dim = config.head_dim
    factor = config.params["factor"]
    max_len = config.max_position_embeddings
    exponent = dim / (dim - 2)
    if seq_len is None or seq_len <= max_len:
        base = config.theta * ((factor * max_len / max_len) - (factor - 1)) ** exponent
    else:
        seq = torch.tensor(seq_len, dtype=torch.int64)
        base = config.theta * ((factor * seq / max_len) - (factor - 1)) ** exponent  # float32 0-d
    return _base_inv_freq(base, dim), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn(config: RopeConfig, seq_len: int | None) -> tuple[Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp in between; scale attention."""
    params = config.params
    dim = config.head_dim
    base = config.theta
    original_max_len = params.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = params.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original_max_len
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    truncate = params.get("truncate", True)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)  # [D/2]
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp  # [D/2], 1 = keep the original frequency
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq, attention_factor


def _llama3(config: RopeConfig, seq_len: int | None) -> tuple[Tensor, float]:
    """Llama 3.1: divide low frequencies by `factor`, keep high ones, interpolate smoothly between."""
    params = config.params
    inv_freq = _base_inv_freq(config.theta, config.head_dim)
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params.get("original_max_position_embeddings") or config.max_position_embeddings

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0


_INIT_FUNCTIONS: dict[str, Callable[[RopeConfig, int | None], tuple[Tensor, float]]] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
}


def rope_inv_freq(config: RopeConfig, seq_len: int | None = None) -> tuple[Tensor, float]:
    """-> (inv_freq [D/2] float32 on CPU, attention_scaling).

    `seq_len` only matters for "dynamic": pass `max(position) + 1` over the tokens of the
    forward (transformers uses the max over the whole batch). Up to
    `max_position_embeddings` the original frequencies come back. This is a pure function
    of `seq_len`; transformers' module instead remembers the longest length seen and keeps
    those frequencies until a sequence shorter than `max_position_embeddings` resets them,
    so for identical results across calls pass the same length it would have cached.
    """
    init = _INIT_FUNCTIONS.get(config.rope_type)
    if init is None:  # RopeConfig validates already; kept for configs built around it
        raise ValueError(
            f"unsupported rope type {config.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return init(config, seq_len)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, attention_scaling: float) -> tuple[Tensor, Tensor]:
    """positions [T] int64 -> cos, sin [T, D] float32 (frequencies concatenated twice).

    Same ops as transformers' rotary embedding forward: an elementwise product (not a
    matmul), cos/sin in float32, then the attention scaling.
    """
    if inv_freq.device != positions.device or inv_freq.dtype != torch.float32:
        inv_freq = inv_freq.to(device=positions.device, dtype=torch.float32)
    freqs = positions[:, None].float() * inv_freq  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    if attention_scaling == 1.0:  # x * 1.0 is x, bit for bit: skip two ops per step
        return emb.cos(), emb.sin()
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


@dataclass(frozen=True)
class RotaryTables:
    """cos, sin of one step, laid out for `rotate`: cos [T, 1, D]; signed_sin [T, 1, D] is sin with
    its first half negated, so that `rotate_half(x) * sin == swap_halves(x) * signed_sin` (a sign
    flip is exact: the same bits, one op fewer per layer)."""

    cos: Tensor
    signed_sin: Tensor


def rotary_tables(cos: Tensor, sin: Tensor, dtype: torch.dtype) -> RotaryTables:
    """cos, sin [T, D] float32 -> tables in `dtype`: transformers casts cos/sin to the activation
    dtype before rotating, so in bf16 the products are bf16 x bf16; cast here, once per step."""
    cos, sin = cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]  # [T, 1, D]
    half = sin.shape[-1] // 2
    return RotaryTables(cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1))


class RotaryCache:
    """`rotary_tables` of positions 0 .. capacity - 1, computed once and looked up per step: two
    index_selects instead of ~10 small ops. The same bits as computing a step's own positions: each
    element is the same elementwise ops on the same inputs (and a table, like transformers' [B, T, D]
    batches, is a whole number of vectors, never a scalar tail). Not for "dynamic" rope, whose
    frequencies depend on the batch. Grows by doubling, so long contexts cost memory only once used."""

    def __init__(self, inv_freq: Tensor, attention_scaling: float, dtype: torch.dtype, min_capacity: int = 1024):
        self.inv_freq, self.attention_scaling, self.dtype = inv_freq, attention_scaling, dtype
        self.min_capacity = min_capacity
        self.tables: RotaryTables | None = None

    def lookup(self, positions: Tensor) -> RotaryTables:
        """positions [N] int64 -> tables [N, 1, D] (on positions' device)."""
        needed = int(positions.max()) + 1 if positions.numel() else 1
        tables = self.tables
        if tables is None or tables.cos.shape[0] < needed or tables.cos.device != positions.device:
            capacity = max(self.min_capacity, 1 << (needed - 1).bit_length())
            every = torch.arange(capacity, device=positions.device)
            tables = self.tables = rotary_tables(*rope_cos_sin(every, self.inv_freq, self.attention_scaling), self.dtype)
        return RotaryTables(tables.cos[positions], tables.signed_sin[positions])


def rotate(x: Tensor, tables: RotaryTables) -> Tensor:
    """x [T, n_heads, D] (any strides, e.g. the q and k heads of a fused projection) -> rotated,
    contiguous, same dtype. Op for op transformers' `x * cos + rotate_half(x) * sin`; float32 on the
    CPU in one native pass (the same ops, the same bits) instead of four torch ops and their buffers."""
    if x.dtype == torch.float32 and x.is_cpu and x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] and native.available() \
            and tables.cos.dtype == torch.float32 and tables.cos.is_contiguous() and tables.signed_sin.is_contiguous():
        return native.rope(x, tables.cos, tables.signed_sin)
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)  # [x2, x1]
    return (x * tables.cos).add_(swapped.mul_(tables.signed_sin))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, n_heads, D] (any float dtype); cos/sin [T, D] -> rotated x, same dtype.

    The rotation for one tensor with plain cos/sin (float32 ones are cast to `x.dtype`, as
    transformers does); the model builds `rotary_tables` once per step and calls `rotate`.
    """
    return rotate(x, rotary_tables(cos, sin, x.dtype))
