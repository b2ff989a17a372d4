"""DeepSeek's multi-head latent attention (MLA), computed in its absorbed form.

transformers expands the cached latent into per-head keys and values every step
(`kv_b_proj(latent)` -> k_nope [T, nh, dn], v [T, nh, dv]). Here `kv_b_proj` is split into
W_UK [nh, dn, r] and W_UV [nh, dv, r] and moved to the query and output side instead:

    q_nope . (W_UK c)  ==  (q_nope W_UK) . c        softmax(...) (W_UV c)  ==  W_UV (softmax(...) c)

so attention runs over one shared head per token, `[c ; k_pe]` of r + dr numbers, with the value
being its first r numbers: the KV cache holds exactly that (`ModelConfig.kv_cache_dims`), not
nh * (dn + dr + dv) per token (DeepSeek-V3: 576 instead of 40,960). The sums are the same
products added in another order, so float32 logits agree with transformers to a few 1e-6 of their
size (measured up to 1.5e-4 on the tests' logits of +-15; they allow 3e-4), not bit for bit.
"""

import torch
from torch import Tensor, nn

from moeray.kernels.linear import linear
from moeray.kernels.norm import rms_norm
from moeray.kernels.rope import RotaryTables, rotate
from moeray.models.config import ModelConfig
from moeray.models.layers import AttentionContext, WeightNames, param, whole

# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """Shapes: nh heads; dn, dr = qk_nope/qk_rope head dims; dv = v_head_dim; r = kv_lora_rank."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c, m = config, config.mla
        self.layer, self.mla, self.num_heads = layer, m, c.num_heads
        qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        self.scale = c.attention_scale or qk_dim**-0.5
        bias = m.attention_bias
        if m.q_lora_rank is None:
            self.q_proj = param(c.num_heads * qk_dim, c.hidden_size)  # (no bias in transformers either)
            self.q_a_proj = self.q_a_bias = self.q_a_norm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = param(m.q_lora_rank, c.hidden_size)
            self.q_a_bias = param(m.q_lora_rank) if bias else None
            self.q_a_norm = param(m.q_lora_rank)
            self.q_b_proj = param(c.num_heads * qk_dim, m.q_lora_rank)
        self.kv_a_proj = param(m.kv_lora_rank + m.qk_rope_head_dim, c.hidden_size)  # [r + dr, H]
        self.kv_a_bias = param(m.kv_lora_rank + m.qk_rope_head_dim) if bias else None
        self.kv_a_norm = param(m.kv_lora_rank)
        self.kv_b_proj = param(c.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)  # [nh (dn + dv), r]
        self.o_proj = param(c.hidden_size, c.num_heads * m.v_head_dim)
        self.o_bias = param(c.hidden_size) if bias else None
        # Interleaved rope pairs (x0, x1), (x2, x3)...: transformers rotates them into [evens, odds],
        # which is rotating the halves of x[..., evens + odds] (the same ops on the same numbers).
        dr = m.qk_rope_head_dim
        order = torch.cat((torch.arange(0, dr, 2), torch.arange(1, dr, 2)))
        self.register_buffer("rope_order", order if m.rope_interleave else None, persistent=False)

    def forward(self, x: Tensor, rope: RotaryTables, ctx: AttentionContext) -> Tensor:
        m, n, heads = self.mla, x.shape[0], self.num_heads
        dn, dr, r = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
        if self.q_proj is not None:
            q = linear(x, self.q_proj)
        else:
            q = linear(rms_norm(linear(x, self.q_a_proj, self.q_a_bias), self.q_a_norm, LATENT_NORM_EPS), self.q_b_proj)
        q_nope, q_pe = q.view(n, heads, dn + dr).split((dn, dr), dim=-1)  # [N, nh, dn], [N, nh, dr]
        latent, k_pe = linear(x, self.kv_a_proj, self.kv_a_bias).split((r, dr), dim=-1)  # [N, r], [N, dr]
        latent = rms_norm(latent, self.kv_a_norm, LATENT_NORM_EPS)
        pe = torch.cat((q_pe, k_pe[:, None]), dim=1)  # [N, nh + 1, dr]
        if self.rope_order is not None:
            pe = pe[..., self.rope_order]
        pe = rotate(pe.to(rope.cos.dtype), rope).to(x.dtype)  # float32 tables: rotated in float32 (DeepSeek-V2)
        w_uk, w_uv = self.kv_b_proj.view(heads, dn + m.v_head_dim, r).split((dn, m.v_head_dim), dim=1)  # [nh, dn | dv, r]
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [N, nh, r]
        query = torch.cat((q_latent, pe[:, :heads]), dim=-1)  # [N, nh, r + dr]
        key = torch.cat((latent, pe[:, heads]), dim=-1)[:, None]  # [N, 1, r + dr]
        out = ctx.attend(self.layer, query, key, key[..., :r], self.scale, None)  # [N, nh, r]
        out = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [N, nh, dv]
        return linear(out.reshape(n, heads * m.v_head_dim), self.o_proj, self.o_bias)

    def weight_names(self, prefix: str) -> WeightNames:
        names = {self.kv_a_proj: whole(self.kv_a_proj, f"{prefix}.kv_a_proj_with_mqa.weight"),
                 self.kv_a_norm: whole(self.kv_a_norm, f"{prefix}.kv_a_layernorm.weight"),
                 self.kv_b_proj: whole(self.kv_b_proj, f"{prefix}.kv_b_proj.weight"),
                 self.o_proj: whole(self.o_proj, f"{prefix}.o_proj.weight")}
        if self.q_proj is not None:
            names[self.q_proj] = whole(self.q_proj, f"{prefix}.q_proj.weight")
        else:
            names[self.q_a_proj] = whole(self.q_a_proj, f"{prefix}.q_a_proj.weight")
            names[self.q_a_norm] = whole(self.q_a_norm, f"{prefix}.q_a_layernorm.weight")
            names[self.q_b_proj] = whole(self.q_b_proj, f"{prefix}.q_b_proj.weight")
        for p, name in ((self.q_a_bias, "q_a_proj"), (self.kv_a_bias, "kv_a_proj_with_mqa"), (self.o_bias, "o_proj")):
            if p is not None:
                names[p] = whole(p, f"{prefix}.{name}.bias")
        return names
