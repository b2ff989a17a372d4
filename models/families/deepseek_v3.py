"""DeepSeek-V3: multi-head latent attention, sigmoid routing with a correction bias over groups of
experts (`n_group`, `topk_group`, `routed_scaling_factor`), shared experts, and dense MLPs in the
first `first_k_dense_replace` layers. The multi-token-prediction layers after the last decoder
layer (`num_nextn_predict_layers`) are not used for generation and are not read."""

import math

from moeray.kernels.rope import RopeConfig
from moeray.kernels.routing import RoutingConfig
from moeray.models.config import ConfigError, MLAConfig, ModelConfig
from moeray.models.families.common import check_top_k, common_fields, field, num_experts_field
from moeray.models.family import Family, register


class DeepseekV3(Family):
    name = "deepseek_v3"
    architectures = ("DeepseekV3ForCausalLM",)
    defaults = dict(rms_norm_eps=1e-6, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                    intermediate_size=18432, moe_intermediate_size=2048, n_shared_experts=1,
                    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                    v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, first_k_dense_replace=3,
                    norm_topk_prob=True, rope_interleave=True, attention_bias=False)

    def read(self, raw: dict) -> ModelConfig:
        if field(raw, "mlp_bias", bool, False):
            raise ConfigError("config.json: mlp_bias=True is not supported (expert and MLP biases)")
        mla = MLAConfig(
            q_lora_rank=field(raw, "q_lora_rank", int, None, minimum=1),
            kv_lora_rank=field(raw, "kv_lora_rank", int, minimum=1),
            qk_nope_head_dim=field(raw, "qk_nope_head_dim", int, minimum=1),
            qk_rope_head_dim=field(raw, "qk_rope_head_dim", int, minimum=2),
            v_head_dim=field(raw, "v_head_dim", int, minimum=1),
            rope_interleave=self.rope_interleave(raw),
            attention_bias=field(raw, "attention_bias", bool),
        )
        # Rope turns the dr dims only; MLA has no kv heads of its own (transformers' default of 128
        # key/value heads means nothing to it), so num_key_value_heads is not read.
        base = common_fields({**raw, "head_dim": mla.qk_rope_head_dim,
                              "num_key_value_heads": raw.get("num_attention_heads")})
        num_layers = base["num_layers"]
        num_experts = num_experts_field(raw, *self.num_experts_keys)
        top_k = field(raw, "num_experts_per_tok", int, minimum=1)
        check_top_k(num_experts, top_k)
        inter = field(raw, "moe_intermediate_size", int, minimum=1)
        first_dense = field(raw, "first_k_dense_replace", int, 0, minimum=0) or 0
        return ModelConfig(
            family=self.name,
            **base,
            mla=mla,
            rope_in_float32=self.rope_in_float32,
            attention_scale=_attention_scale(base["rope"], mla),
            num_experts=num_experts,
            moe_intermediate_size=inter,
            routing=self.routing(raw, num_experts, top_k),
            routing_bias=self.routing_bias,
            router_in_float32=True,
            moe_layers=tuple(layer >= first_dense for layer in range(num_layers)),
            dense_intermediate_size=field(raw, "intermediate_size", int, minimum=1),
            shared_expert_intermediate_size=inter * (field(raw, "n_shared_experts", int, 0, minimum=0) or 0),
        )

    # What DeepSeek-V2 (a subclass) reads differently.
    num_experts_keys = ("n_routed_experts", "num_local_experts")
    routing_bias = True  # the gate's e_score_correction_bias
    rope_in_float32 = False  # V2 rotates as float32 complex numbers

    def rope_interleave(self, raw: dict) -> bool:
        return bool(field(raw, "rope_interleave", bool, None))  # null: halves, as transformers reads it

    def routing(self, raw: dict, num_experts: int, top_k: int) -> RoutingConfig:
        """Sigmoid scores; the best `topk_group` of `n_group` groups by their two best biased scores."""
        num_groups, topk_group = groups(raw, num_experts, top_k)
        if num_experts // num_groups < 2:
            raise ConfigError(f"config.json: n_group={num_groups} leaves groups of {num_experts // num_groups} expert; "
                              "DeepSeek-V3 scores a group by its two best experts")
        return RoutingConfig(kind="sigmoid_group_topk", top_k=top_k,
                             renormalize=bool(field(raw, "norm_topk_prob", bool, None)),
                             num_groups=num_groups, topk_group=topk_group,
                             scaling_factor=field(raw, "routed_scaling_factor", float))

    def shared_expert_prefix(self, moe_prefix: str) -> str:
        return f"{moe_prefix}.shared_experts"


def groups(raw: dict, num_experts: int, top_k: int) -> tuple[int, int]:
    """(n_group, topk_group), None read as 1, checked against the experts and top-k."""
    num_groups = field(raw, "n_group", int, None, minimum=1) or 1
    if num_experts % num_groups:
        raise ConfigError(f"config.json: n_routed_experts={num_experts} is not a multiple of n_group={num_groups}")
    topk_group = field(raw, "topk_group", int, None, minimum=1) or 1
    if topk_group > num_groups:
        raise ConfigError(f"config.json: topk_group={topk_group} must be <= n_group={num_groups}")
    if top_k > topk_group * (num_experts // num_groups):
        raise ConfigError(f"config.json: num_experts_per_tok={top_k} is more than the {topk_group} kept groups "
                          f"hold ({topk_group} x {num_experts // num_groups} experts)")
    return num_groups, topk_group


def _attention_scale(rope: RopeConfig, mla: MLAConfig) -> float:
    """(dn + dr) ** -0.5, times mscale(factor, mscale_all_dim) squared when the rope is scaled (yarn)."""
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    params = rope.params
    if rope.rope_type != "default" and params.get("mscale_all_dim"):
        factor = float(params["factor"])
        mscale = 0.1 * float(params["mscale_all_dim"]) * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale = scale * mscale * mscale
    return scale


register(DeepseekV3())
