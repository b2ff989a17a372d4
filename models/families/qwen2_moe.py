"""Qwen2-MoE: q/k/v biases, a shared expert scaled by sigmoid(shared_expert_gate(x)), optional
dense layers (`mlp_only_layers`, `decoder_sparse_step`), `norm_topk_prob` either way, and sliding
windows on the layers transformers assigns them to."""

from moeray.kernels.routing import RoutingConfig
from moeray.models.config import ModelConfig
from moeray.models.families.common import check_top_k, common_fields, field, sparse_layers
from moeray.models.family import Family, register


class Qwen2Moe(Family):
    name = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)
    defaults = dict(rms_norm_eps=1e-6, max_position_embeddings=32768, num_key_value_heads=16,
                    intermediate_size=5632, shared_expert_intermediate_size=5632)

    def read(self, raw: dict) -> ModelConfig:
        base = common_fields(raw)
        num_layers = base["num_layers"]
        num_experts = field(raw, "num_experts", int, minimum=1)
        top_k = field(raw, "num_experts_per_tok", int, minimum=1)
        check_top_k(num_experts, top_k)
        return ModelConfig(
            family=self.name,
            **{**base, "sliding_windows": _sliding_windows(raw, num_layers)},
            qkv_bias=bool(raw.get("qkv_bias", True)),
            num_experts=num_experts,
            moe_intermediate_size=field(raw, "moe_intermediate_size", int, minimum=1),
            routing=RoutingConfig(kind="softmax_topk", top_k=top_k, renormalize=bool(raw.get("norm_topk_prob", False))),
            routing_weights_in_model_dtype=True,
            moe_layers=sparse_layers(raw, num_layers),
            dense_intermediate_size=field(raw, "intermediate_size", int, 0, minimum=0),
            shared_expert_intermediate_size=field(raw, "shared_expert_intermediate_size", int, 0, minimum=0),
            shared_expert_gate=True,
        )


def _sliding_windows(raw: dict, num_layers: int) -> tuple[int | None, ...]:
    """transformers' Qwen2-MoE rule: explicit `layer_types`, else odd-numbered (1-based) layers below
    `max_window_layers` when `use_sliding_window` is set."""
    if not raw.get("use_sliding_window", False):
        return (None,) * num_layers
    window = field(raw, "sliding_window", int, minimum=1)
    types = raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 and i < raw.get("max_window_layers", 28) else "full_attention"
        for i in range(num_layers)
    ]
    return tuple(window if t == "sliding_attention" else None for t in types)


register(Qwen2Moe())
