"""`ModelConfig`: everything moeray needs from a checkpoint's config.json, as one frozen dataclass.

A family (`models/families/*`) parses the raw JSON into this; the model code reads only this.
"""

from dataclasses import dataclass

from moeray.kernels.rope import RopeConfig
from moeray.kernels.routing import RoutingConfig


class ConfigError(ValueError):
    """config.json holds something moeray cannot serve; the message names the field and value."""


@dataclass(frozen=True)
class ModelConfig:
    family: str  # registry name, e.g. "mixtral"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    # attention details
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (RMSNorm over D, Qwen3) | "full" (over nh*D, OLMoE)
    clip_qkv: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    # MoE
    num_experts: int = 0  # E, routed experts per MoE layer
    moe_intermediate_size: int = 0  # I
    routing: RoutingConfig | None = None
    routing_weights_in_model_dtype: bool = False  # Qwen-MoE, OLMoE round top-k weights to bf16 before scaling; Mixtral keeps f32
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE block (True) or dense MLP (False)
    dense_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ g) scales the shared expert
    # head
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def moe_layer_ids(self) -> list[int]:
        """Indices of the layers that have routed experts (the `L` of placement plans)."""
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]
