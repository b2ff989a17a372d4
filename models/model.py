"""The decoder of every supported family, built from `ModelConfig` and the kernels.

Tokens are flat: a step's hidden states are `[N, H]` (the new tokens of all sequences one after
the other). Attention is `models.attention.Attention` (q/k/v heads) or `models.mla.MLAttention`
(DeepSeek's latent attention), chosen by the config. Two seams keep this one module usable everywhere:
- `AttentionContext` (`models.layers`) decides where keys and values come from: `CausalContext` (no cache, the
  `forward(input_ids)` API) or the engine's paged KV cache (`actors.kv_cache.PagedContext`).
- `MoEBlock.experts` computes the routed experts: `LocalExperts` holds all of them in-process;
  the distributed router swaps in one that dispatches tokens to expert groups.
Parameters are created empty (`torch.empty`) and filled by `models.loader`.
"""

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moeray.kernels import native
from moeray.kernels.linear import linear
from moeray.kernels.moe import ExpertBiases, fused_moe
from moeray.kernels.norm import add_rms_norm, rms_norm
from moeray.kernels.rope import RotaryCache, RotaryTables, rope_cos_sin, rope_inv_freq, rotary_tables
from moeray.kernels.routing import route
from moeray.models.attention import Attention
from moeray.models.config import ModelConfig
from moeray.models.layers import AttentionContext, CausalContext, WeightNames, param, whole
from moeray.models.mla import MLAttention


MakeExperts = Callable[[int], nn.Module]


def make_attention(config: ModelConfig, layer: int) -> nn.Module:
    """The family's attention: Llama-style heads, or DeepSeek's latent attention."""
    return MLAttention(config, layer) if config.mla is not None else Attention(config, layer)


class DenseMLP(nn.Module):
    """SwiGLU MLP: dense layers and shared experts. gate_up [2I, H] (gate rows, then up), down [H, I]."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_up, self.down = param(2 * inter, hidden), param(hidden, inter)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linear(x, self.gate_up).chunk(2, dim=-1)  # [N, I] each
        return linear(F.silu(gate) * up, self.down)

    def weight_names(self, prefix: str) -> WeightNames:
        inter = self.down.shape[1]
        return {self.gate_up: [(f"{prefix}.gate_proj.weight", inter), (f"{prefix}.up_proj.weight", inter)],
                self.down: whole(self.down, f"{prefix}.down_proj.weight")}


class LocalExperts(nn.Module):
    """All E routed experts of one layer in this process. w13 [E, 2I, H], w2 [E, H, I]; with
    `config.expert_bias` (GPT-OSS) also b13 [E, 2I], b2 [E, H]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        num_experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.w13, self.w2 = param(num_experts, 2 * inter, hidden), param(num_experts, hidden, inter)
        self.b13 = param(num_experts, 2 * inter) if config.expert_bias else None
        self.b2 = param(num_experts, hidden) if config.expert_bias else None
        self.activation = config.expert_activation

    @property
    def biases(self) -> ExpertBiases | None:
        return ExpertBiases(self.b13, self.b2) if self.b13 is not None else None

    def dispatch(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor) -> Tensor:
        """Local experts compute at once; `combine` just hands the result back."""
        return fused_moe(x, topk_weights, topk_ids, self.w13, self.w2, self.biases, self.activation)

    def combine(self, pending: Tensor) -> Tensor:
        return pending


class MoEBlock(nn.Module):
    """Gate -> route -> experts (local or dispatched) [+ shared expert, gated for Qwen2-MoE].

    DeepSeek-V3's gate has a correction bias [E] that steers which experts are chosen (kept in
    float32, as transformers keeps it), and DeepSeek takes the gate matmul in float32. GPT-OSS's
    gate has a plain bias, added to its logits."""

    def __init__(self, config: ModelConfig, layer: int, experts: nn.Module | None = None):
        super().__init__()
        c = config
        self.layer, self.routing = layer, c.routing
        self.weights_in_model_dtype = c.routing_weights_in_model_dtype
        self.gate = param(c.num_experts, c.hidden_size)  # [E, H]
        self.gate_bias = param(c.num_experts) if c.router_bias else None  # [E]
        self.score_bias = param(c.num_experts, dtype=torch.float32) if c.routing_bias else None  # [E]
        self.router_in_float32 = c.router_in_float32
        # Anything with dispatch(x, topk_weights, topk_ids) -> pending and combine(pending) -> [N, H].
        self.experts = experts if experts is not None else LocalExperts(c)
        self.shared = DenseMLP(c.hidden_size, c.shared_expert_intermediate_size) if c.shared_expert_intermediate_size else None
        self.shared_gate = param(1, c.hidden_size) if c.shared_expert_gate and self.shared else None

    def forward(self, x: Tensor) -> Tensor:
        if self.router_in_float32 and x.dtype != torch.float32:
            logits = F.linear(x.float(), self.gate.float())  # [N, E]
        else:
            logits = linear(x, self.gate, self.gate_bias)  # [N, E]
        topk_weights, topk_ids = route(logits, self.routing, self.score_bias)  # [N, K] float32, [N, K] int64
        if self.weights_in_model_dtype:
            topk_weights = topk_weights.to(x.dtype)  # as transformers' Qwen-MoE / OLMoE routers do
        pending = self.experts.dispatch(x, topk_weights, topk_ids)
        shared = self.shared(x) if self.shared is not None else None  # overlaps a remote dispatch
        out = self.experts.combine(pending)
        if shared is not None:
            if self.shared_gate is not None:
                shared = torch.sigmoid(F.linear(x, self.shared_gate)) * shared
            out = out + shared
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, make_experts: "MakeExperts | None" = None):
        super().__init__()
        self.eps, self.round_once = config.rms_norm_eps, config.norm_rounds_once
        self.input_norm, self.post_attention_norm = param(config.hidden_size), param(config.hidden_size)
        self.attn = make_attention(config, layer)
        if config.moe_layers[layer]:
            self.mlp = MoEBlock(config, layer, make_experts(layer) if make_experts else None)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.dense_intermediate_size)

    def forward(self, x: Tensor, rope: RotaryTables, ctx: AttentionContext) -> Tensor:
        attn = self.attn(rms_norm(x, self.input_norm, self.eps, self.round_once), rope, ctx)
        x, h = add_rms_norm(x, attn, self.post_attention_norm, self.eps, self.round_once)  # x + attn, and its norm
        return x + self.mlp(h)


class MoEModel(nn.Module):
    """forward(input_ids [B, T]) -> logits [B, T, V]; the engine uses forward_tokens + compute_logits."""

    def __init__(self, config: ModelConfig, make_experts: "MakeExperts | None" = None):
        """make_experts(layer) builds the experts of an MoE layer (default: LocalExperts)."""
        super().__init__()
        self.config = config
        self.embed = param(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, make_experts) for i in range(config.num_layers))
        self.norm = param(config.hidden_size)
        self.lm_head = None if config.tie_word_embeddings else param(config.vocab_size, config.hidden_size)
        inv_freq, self.rope_scaling = rope_inv_freq(config.rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_cache: RotaryCache | None = None  # built on first use, in the model's dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def rope_dtype(self) -> torch.dtype:
        """The rope tables' dtype: the model's, or float32 where the family rotates in float32."""
        return torch.float32 if self.config.rope_in_float32 else self.dtype

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` must not round the rope frequencies (transformers keeps them float32;
        # bf16 inv_freq moves every angle and the logits by whole units) nor DeepSeek's routing
        # bias (which would move expert choices): they follow devices only.
        inv_freq = self.inv_freq
        biases = [(block, block.score_bias.data) for block in self.modules()
                  if isinstance(block, MoEBlock) and block.score_bias is not None]
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        for block, bias in biases:
            block.score_bias.data = bias.to(block.score_bias.device)
        self._rope_cache = None  # rebuilt from the moved frequencies
        return self

    @torch.inference_mode()
    def forward(self, input_ids: Tensor) -> Tensor:
        batch, seq_len = input_ids.shape
        positions = torch.arange(seq_len).repeat(batch)  # [B*T]
        hidden = self.forward_tokens(input_ids.reshape(-1), positions, CausalContext(batch, seq_len))
        return self.compute_logits(hidden).view(batch, seq_len, -1)

    def forward_tokens(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext) -> Tensor:
        """input_ids, positions [N] (any device: they follow the weights) -> final-norm hidden states [N, H]."""
        device = self.embed.device
        input_ids, positions = input_ids.to(device), positions.to(device)
        if self.config.rope.rope_type == "dynamic":
            inv_freq, _ = rope_inv_freq(self.config.rope, seq_len=int(positions.max()) + 1)
            rope = rotary_tables(*rope_cos_sin(positions, inv_freq, self.rope_scaling), self.rope_dtype)  # [N, 1, D] x 2
        else:
            if self._rope_cache is None:  # (a dtype or device move resets it, see _apply)
                self._rope_cache = RotaryCache(self.inv_freq, self.rope_scaling, self.rope_dtype)
            rope = self._rope_cache.lookup(positions)
        x = F.embedding(input_ids, self.embed)  # [N, H]
        for layer in self.layers:
            x = layer(x, rope, ctx)
        return rms_norm(x, self.norm, self.config.rms_norm_eps, self.config.norm_rounds_once)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [n, H] -> float32 logits [n, V]. float32 on the CPU: the native kernel up to
        native.LOGITS_MAX_ROWS rows (the last op, so its own rounding order is not amplified by
        later layers; at the built-in model's K = 128 it has MKL's bits)."""
        head = self.embed if self.lm_head is None else self.lm_head
        if hidden.dtype == torch.float32 and hidden.shape[0] <= native.LOGITS_MAX_ROWS and native.supports(hidden, head):
            return native.logits(hidden, head)
        return F.linear(hidden, head).float()
