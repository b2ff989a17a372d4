"""OLMoE: RMSNorm over the whole q and k projections, optional `clip_qkv`, every layer MoE."""

from moeray.kernels.routing import RoutingConfig
from moeray.models.config import ConfigError, ModelConfig
from moeray.models.families.common import check_top_k, common_fields, field, num_experts_field
from moeray.models.family import Family, register


class Olmoe(Family):
    name = "olmoe"
    architectures = ("OlmoeForCausalLM",)
    defaults = dict(rms_norm_eps=1e-5, max_position_embeddings=4096, eos_token_id=50279)

    def read(self, raw: dict) -> ModelConfig:
        base = common_fields(raw)
        if base["head_dim"] * base["num_heads"] != base["hidden_size"]:
            raise ConfigError(f"config.json: OLMoE needs head_dim * num_attention_heads == hidden_size, got head_dim={base['head_dim']}")
        num_experts = num_experts_field(raw, "num_experts", "num_local_experts")
        top_k = field(raw, "num_experts_per_tok", int, minimum=1)
        check_top_k(num_experts, top_k)
        return ModelConfig(
            family=self.name,
            **base,
            qkv_bias=bool(raw.get("attention_bias", False)),
            o_bias=bool(raw.get("attention_bias", False)),
            qk_norm="full",
            clip_qkv=field(raw, "clip_qkv", float, None),
            num_experts=num_experts,
            moe_intermediate_size=field(raw, "intermediate_size", int, minimum=1),
            routing=RoutingConfig(kind="softmax_topk", top_k=top_k, renormalize=bool(raw.get("norm_topk_prob", False))),
            routing_weights_in_model_dtype=True,
            moe_layers=(True,) * base["num_layers"],
        )


register(Olmoe())
