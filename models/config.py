"""`ModelConfig`: everything moeray needs from a checkpoint's config.json, as one frozen dataclass.

A family (`models/families/*`) parses the raw JSON into this; the model code reads only this.
"""

from dataclasses import dataclass

from moeray.kernels.moe import SWIGLU, Activation
from moeray.kernels.rope import RopeConfig
from moeray.kernels.routing import RoutingConfig
from moeray.models.quant import Fp8Weights


class ConfigError(ValueError):
    """config.json holds something moeray cannot serve; the message names the field and value."""


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-head latent attention (HF's names). A token caches one latent of
    `kv_lora_rank + qk_rope_head_dim` values per layer instead of keys and values per head."""

    q_lora_rank: int | None  # None: one q_proj [nh * (dn + dr), H]; else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int  # r: the compressed key/value latent
    qk_nope_head_dim: int  # dn: the part of each query/key head without rope
    qk_rope_head_dim: int  # dr: the rotated part, one key head shared by all query heads
    v_head_dim: int  # dv
    rope_interleave: bool = True  # rope pairs (x0, x1), (x2, x3)... instead of halves
    attention_bias: bool = False  # biases on q_a_proj (or q_proj), kv_a_proj_with_mqa and o_proj


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
    rope: RopeConfig  # over head_dim dims (MLA: the qk_rope_head_dim part)
    max_position_embeddings: int
    rope_in_float32: bool = False  # DeepSeek-V2 rotates bf16 q and k as float32 complex numbers
    # attention details
    mla: MLAConfig | None = None  # None: Llama-style q/k/v heads
    attention_scale: float | None = None  # softmax scale; None = head_dim ** -0.5
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (RMSNorm over D, Qwen3) | "full" (over nh*D, OLMoE)
    clip_qkv: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    attention_sinks: bool = False  # GPT-OSS: a learnt sink logit per query head (`sinks [nh]`)
    norm_rounds_once: bool = False  # GPT-OSS's RMSNorm: weight * normalised in float32, then one rounding
    # MoE
    num_experts: int = 0  # E, routed experts per MoE layer
    moe_intermediate_size: int = 0  # I
    routing: RoutingConfig | None = None
    routing_weights_in_model_dtype: bool = False  # Qwen-MoE, OLMoE round top-k weights to bf16 before scaling; Mixtral keeps f32
    routing_bias: bool = False  # DeepSeek-V3: the gate's e_score_correction_bias [E] (float32) steers selection
    router_in_float32: bool = False  # DeepSeek: the gate matmul in float32 whatever the model dtype
    router_bias: bool = False  # GPT-OSS: the gate (its `router`) has a bias [E]
    expert_bias: bool = False  # GPT-OSS: each expert's projections have biases (`kernels.moe.ExpertBiases`)
    expert_activation: Activation = SWIGLU  # GPT-OSS: its clamped gated activation
    # How the checkpoint stores routed experts (`models.checkpoint`): "by_name" (schemes 1-3, told apart by
    # their names), "gpt_oss" (scheme 4) or "gpt_oss_mxfp4" (scheme 4 as MXFP4 blocks and scales, `models.quant`).
    expert_layout: str = "by_name"
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE block (True) or dense MLP (False)
    dense_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ g) scales the shared expert
    # head
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # checkpoint
    fp8: Fp8Weights | None = None  # float8 weights with block scales, widened on load (models.quant)

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def kv_cache_dims(self) -> tuple[int, int, int]:
        """(heads, key dim, value dim) a token caches per layer. MLA caches one head [r + dr], the
        latent then its rotated key, and reads the value as the latent: the first r of the same numbers."""
        if self.mla is not None:
            return 1, self.mla.kv_lora_rank + self.mla.qk_rope_head_dim, self.mla.kv_lora_rank
        return self.num_kv_heads, self.head_dim, self.head_dim

    @property
    def values_in_keys(self) -> bool:
        """The cached value is the first `kv_cache_dims[2]` numbers of the cached key (MLA)."""
        return self.mla is not None

    @property
    def moe_layer_ids(self) -> list[int]:
        """Indices of the layers that have routed experts (the `L` of placement plans)."""
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]
