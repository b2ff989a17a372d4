"""DeepSeek-V2 (and V2-Lite): DeepSeek-V3's layout (MLA, shared experts, dense first layers) with
softmax routing, `greedy` over all experts or `group_limited_greedy` (the best `topk_group` of
`n_group` groups by their best expert), no correction bias, and rope always on interleaved pairs,
rotated in float32 whatever the model dtype."""

from moeray.kernels.routing import RoutingConfig
from moeray.models.config import ConfigError
from moeray.models.families.common import field
from moeray.models.families.deepseek_v3 import DeepseekV3, groups
from moeray.models.family import register

TOPK_METHODS = ("greedy", "group_limited_greedy")


class DeepseekV2(DeepseekV3):
    name = "deepseek_v2"
    architectures = ("DeepseekV2ForCausalLM",)
    defaults = dict(rms_norm_eps=1e-6, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                    intermediate_size=11008, moe_intermediate_size=1407, n_shared_experts=2,
                    routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                    v_head_dim=128, qk_nope_head_dim=128, first_k_dense_replace=0, topk_method="greedy",
                    attention_bias=False, mlp_bias=False)
    num_experts_keys = ("n_routed_experts", "num_experts")
    routing_bias = False
    rope_in_float32 = True

    def rope_interleave(self, raw: dict) -> bool:
        return True  # transformers rotates (x0, x1), (x2, x3)... as complex numbers

    def routing(self, raw: dict, num_experts: int, top_k: int) -> RoutingConfig:
        """transformers 5.23 does not renormalise DeepSeek-V2's top-k weights whatever norm_topk_prob says."""
        method = raw.get("topk_method")
        if method not in TOPK_METHODS:
            raise ConfigError(f"config.json: topk_method={method!r} is not supported (supported: {', '.join(TOPK_METHODS)})")
        num_groups, topk_group = groups(raw, num_experts, top_k) if method == "group_limited_greedy" else (1, 1)
        return RoutingConfig(kind="softmax_group_limited_greedy", top_k=top_k, num_groups=num_groups,
                             topk_group=topk_group, scaling_factor=field(raw, "routed_scaling_factor", float))


register(DeepseekV2())
