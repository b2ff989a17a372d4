"""Qwen3-MoE: RMSNorm on q and k per head, explicit head_dim, no biases, `norm_topk_prob`,
dense layers via `mlp_only_layers` / `decoder_sparse_step`, optional sliding window."""

from moeray.kernels.routing import RoutingConfig
from moeray.models.config import ModelConfig
from moeray.models.families.common import check_top_k, common_fields, field, num_experts_field, sparse_layers
from moeray.models.family import Family, register


class Qwen3Moe(Family):
    name = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)
    defaults = dict(rms_norm_eps=1e-6, max_position_embeddings=32768, num_key_value_heads=4,
                    intermediate_size=6144)

    def read(self, raw: dict) -> ModelConfig:
        base = common_fields(raw)
        num_layers = base["num_layers"]
        num_experts = num_experts_field(raw, "num_experts", "num_local_experts")
        top_k = field(raw, "num_experts_per_tok", int, minimum=1)
        check_top_k(num_experts, top_k)
        window = field(raw, "sliding_window", int, None, minimum=1) if raw.get("use_sliding_window") else None
        return ModelConfig(
            family=self.name,
            **{**base, "sliding_windows": (window,) * num_layers},
            qkv_bias=bool(raw.get("attention_bias", False)),
            o_bias=bool(raw.get("attention_bias", False)),
            qk_norm="head",
            num_experts=num_experts,
            moe_intermediate_size=field(raw, "moe_intermediate_size", int, minimum=1),
            routing=RoutingConfig(kind="softmax_topk", top_k=top_k, renormalize=bool(raw.get("norm_topk_prob", False))),
            routing_weights_in_model_dtype=True,
            moe_layers=sparse_layers(raw, num_layers),
            dense_intermediate_size=field(raw, "intermediate_size", int, 0, minimum=0),
        )


register(Qwen3Moe())
