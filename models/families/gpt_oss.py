"""GPT-OSS: attention sinks and biases, sliding windows on alternate layers, yarn rope; a biased
router whose softmax runs over the top-k logits only; experts with biases and a clamped gated
activation, stored fused and transposed with gate and up columns interleaved, or as MXFP4 blocks
(`models.checkpoint`, scheme 4); an RMSNorm that rounds once."""

from moeray.kernels.moe import Activation
from moeray.kernels.routing import RoutingConfig
from moeray.models.config import ConfigError, ModelConfig
from moeray.models.families.common import check_top_k, common_fields, field, num_experts_field
from moeray.models.family import Family, register

# transformers' GptOssConfig when config.json has no rope_parameters (nor rope_scaling).
DEFAULT_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=4096)


class GptOss(Family):
    name = "gpt_oss"
    architectures = ("GptOssForCausalLM",)
    defaults = dict(rms_norm_eps=1e-5, rope_theta=150000.0, max_position_embeddings=131072, num_key_value_heads=8,
                    head_dim=64, sliding_window=128, attention_bias=True, swiglu_alpha=1.702, swiglu_limit=7.0)
    gate_name = "router"

    def parse(self, raw: dict) -> ModelConfig:
        if not (raw.get("rope_parameters") or raw.get("rope_scaling")):
            raw = {**raw, "rope_parameters": DEFAULT_ROPE}
        return super().parse(raw)

    def read(self, raw: dict) -> ModelConfig:
        layout = "gpt_oss"
        quant = raw.get("quantization_config")
        if isinstance(quant, dict) and quant.get("quant_method") == "mxfp4":  # the Hub's releases: experts only
            layout, raw = "gpt_oss_mxfp4", {k: v for k, v in raw.items() if k != "quantization_config"}
        base = common_fields(raw)
        num_layers = base["num_layers"]
        num_experts = num_experts_field(raw, "num_local_experts", "num_experts")
        top_k = field(raw, "num_experts_per_tok", int, minimum=1)
        check_top_k(num_experts, top_k)
        bias = field(raw, "attention_bias", bool)
        return ModelConfig(
            family=self.name,
            **{**base, "sliding_windows": _sliding_windows(raw, num_layers)},
            qkv_bias=bias,
            o_bias=bias,
            attention_sinks=True,
            norm_rounds_once=True,
            num_experts=num_experts,
            moe_intermediate_size=field(raw, "intermediate_size", int, minimum=1),
            routing=RoutingConfig(kind="topk_softmax", top_k=top_k),
            routing_weights_in_model_dtype=True,
            router_bias=True,
            expert_bias=True,
            expert_activation=Activation(limit=field(raw, "swiglu_limit", float, minimum=0.0),
                                         alpha=field(raw, "swiglu_alpha", float)),
            expert_layout=layout,
            moe_layers=(True,) * num_layers,
        )


def _sliding_windows(raw: dict, num_layers: int) -> tuple[int | None, ...]:
    """transformers' rule: `layer_types`, else sliding attention on even-numbered (0-based) layers."""
    types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(f"config.json: layer_types={types!r} must give 'sliding_attention' or 'full_attention' "
                          f"for each of the {num_layers} layers")
    window = field(raw, "sliding_window", int, minimum=1) if "sliding_attention" in types else None
    return tuple(window if t == "sliding_attention" else None for t in types)


register(GptOss())
