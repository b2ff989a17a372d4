"""Parsing shared by the Llama-style MoE families: read, check and default config.json fields."""

from moeray.kernels.rope import RopeConfig
from moeray.models.config import ConfigError
from moeray.models.quant import Fp8Weights

_MISSING = object()


def field(raw: dict, key: str, kind: type, default=_MISSING, minimum=None):
    """raw[key] checked for type and lower bound; the error names the key and the value."""
    value = raw.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"config.json: required field {key!r} is missing")
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config.json: {key}={value!r} must be of type {kind.__name__}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config.json: {key}={value!r} must be >= {minimum}")
    return value


def common_fields(raw: dict) -> dict:
    """The fields every Llama-style family shares, as ModelConfig keyword arguments."""
    fp8 = quantization(raw)
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act={act!r} is not supported (supported: 'silu')")
    hidden = field(raw, "hidden_size", int, minimum=1)
    heads = field(raw, "num_attention_heads", int, minimum=1)
    kv_heads = field(raw, "num_key_value_heads", int, heads, minimum=1)
    if heads % kv_heads:
        raise ConfigError(f"config.json: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = field(raw, "head_dim", int, None) or hidden // heads
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    num_layers = field(raw, "num_hidden_layers", int, minimum=1)
    return dict(
        vocab_size=field(raw, "vocab_size", int, minimum=1),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=field(raw, "rms_norm_eps", float),  # families default it (Family.defaults)
        rope=_rope(raw, head_dim),
        max_position_embeddings=field(raw, "max_position_embeddings", int, minimum=1),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        sliding_windows=(None,) * num_layers,
        fp8=fp8,
    )


def quantization(raw: dict) -> Fp8Weights | None:
    """config.json's `quantization_config` -> what the loader dequantizes (None: not quantized).
    Anything but block-wise FP8 weights is refused by name: read as plain weights it would be garbage."""
    quant = raw.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"config.json: quantization_config={quant!r} must be an object with a quant_method")
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config.json: quantization_config (quant_method={method!r}) is not supported; "
                          "supported: 'fp8' (block-wise float8 weights), 'mxfp4' (GPT-OSS's experts), "
                          "or a bf16 or float32 checkpoint")
    for key, allowed in (("expert_dtype", ("fp8",)), ("scale_fmt", ("float", "ue8m0")),
                         ("activation_scheme", ("dynamic", "static"))):  # (transformers' defaults first)
        value = quant.get(key, allowed[0])
        if value not in allowed:
            raise ConfigError(f"config.json: quantization_config.{key}={value!r} is not supported "
                              f"(supported: {', '.join(map(repr, allowed))})")
    block = quant.get("weight_block_size", [128, 128])  # transformers' FineGrainedFP8Config default
    if block is None:
        return Fp8Weights(None)
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"config.json: quantization_config.weight_block_size={block!r} must be two positive integers")
    return Fp8Weights((block[0], block[1]))


def _rope(raw: dict, head_dim: int) -> RopeConfig:
    try:
        return RopeConfig.from_hf(raw, head_dim)
    except ValueError as err:
        raise ConfigError(f"config.json: {err}") from err


def sparse_layers(raw: dict, num_layers: int) -> tuple[bool, ...]:
    """Qwen-style choice of MoE layers: not in `mlp_only_layers` and (l+1) % `decoder_sparse_step` == 0."""
    step = field(raw, "decoder_sparse_step", int, 1, minimum=1)
    dense = set(raw.get("mlp_only_layers") or [])
    return tuple(l not in dense and (l + 1) % step == 0 for l in range(num_layers))


def num_experts_field(raw: dict, *keys: str) -> int:
    """Routed experts per layer under the first of `keys` present. transformers' `attribute_map` makes
    `num_experts` and `num_local_experts` aliases in some families, and its `save_pretrained` writes
    the canonical one (Qwen3-MoE: `num_local_experts`, while Hub checkpoints say `num_experts`)."""
    present = [k for k in keys if k in raw]
    if not present:
        raise ConfigError(f"config.json: required field {' or '.join(map(repr, keys))} is missing")
    values = {raw[k] for k in present if isinstance(raw[k], int)}
    if len(values) > 1:
        raise ConfigError("config.json: " + ", ".join(f"{k}={raw[k]!r}" for k in present) + " disagree")
    return field(raw, present[0], int, minimum=1)


def check_top_k(num_experts: int, top_k: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"config.json: num_experts_per_tok={top_k} must be between 1 and the number of experts ({num_experts})")
