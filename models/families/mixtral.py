"""Mixtral: softmax top-k routing, always renormalised; every layer is MoE; optional sliding window."""

from moeray.kernels.routing import RoutingConfig
from moeray.models.config import ModelConfig
from moeray.models.families.common import check_top_k, common_fields, field, num_experts_field
from moeray.models.family import Family, register


class Mixtral(Family):
    name = "mixtral"
    architectures = ("MixtralForCausalLM",)
    defaults = dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072, num_key_value_heads=8,
                    bos_token_id=1, eos_token_id=2)

    def read(self, raw: dict) -> ModelConfig:
        base = common_fields(raw)
        num_experts = num_experts_field(raw, "num_local_experts", "num_experts")
        top_k = field(raw, "num_experts_per_tok", int, minimum=1)
        check_top_k(num_experts, top_k)
        window = field(raw, "sliding_window", int, None, minimum=1)
        return ModelConfig(
            family=self.name,
            **{**base, "sliding_windows": (window,) * base["num_layers"]},
            num_experts=num_experts,
            moe_intermediate_size=field(raw, "intermediate_size", int, minimum=1),
            routing=RoutingConfig(kind="softmax_topk", top_k=top_k, renormalize=True),
            moe_layers=(True,) * base["num_layers"],
        )

    def moe_prefixes(self, layer: int) -> list[str]:
        # Hub checkpoints say block_sparse_moe; transformers 5's in-memory layout says mlp.
        return [f"{self.layer_prefix(layer)}.block_sparse_moe", f"{self.layer_prefix(layer)}.mlp"]


register(Mixtral())
