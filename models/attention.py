"""Llama-style attention (Mixtral, Qwen-MoE, OLMoE): q, k and v heads, grouped-query."""

import torch
from torch import Tensor, nn

from moeray.kernels.linear import linear
from moeray.kernels.norm import rms_norm
from moeray.kernels.rope import RotaryTables, rotate
from moeray.models.config import ModelConfig
from moeray.models.layers import AttentionContext, WeightNames, param, whole


class Attention(nn.Module):
    """q, k and v come out of one fused projection `qkv_proj [(nh + 2 nkv) * D, H]` (q rows, then
    k, then v; the loader concatenates the checkpoint's three): one matmul instead of three, the
    same bits per output (each is the same dot product), and q and k are rotated in one call."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.layer, self.config = layer, c
        self.window = c.sliding_windows[layer]
        self.scale = c.attention_scale or c.head_dim**-0.5
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.sizes = (q_dim, kv_dim, kv_dim)  # rows of q, k, v in qkv_proj
        self.qkv_proj = param(q_dim + 2 * kv_dim, c.hidden_size)
        self.o_proj = param(c.hidden_size, q_dim)
        self.qkv_bias = param(q_dim + 2 * kv_dim) if c.qkv_bias else None
        self.o_bias = param(c.hidden_size) if c.o_bias else None
        norm_dims = {"none": (0, 0), "head": (c.head_dim, c.head_dim), "full": (q_dim, kv_dim)}[c.qk_norm]
        self.q_norm = param(norm_dims[0]) if norm_dims[0] else None
        self.k_norm = param(norm_dims[1]) if norm_dims[1] else None
        self.sinks = param(c.num_heads) if c.attention_sinks else None  # [nh] (GPT-OSS)

    def forward(self, x: Tensor, rope: RotaryTables, ctx: AttentionContext) -> Tensor:
        c = self.config
        n, heads, kv_heads, dim = x.shape[0], c.num_heads, c.num_kv_heads, c.head_dim
        qkv = linear(x, self.qkv_proj, self.qkv_bias)  # [N, (nh + 2nkv) * D]
        if c.qk_norm == "none":  # q and k heads side by side already: views, no copy
            if c.clip_qkv is not None:
                qkv = qkv.clamp(-c.clip_qkv, c.clip_qkv)
            qk, v = qkv[:, :(heads + kv_heads) * dim], qkv[:, (heads + kv_heads) * dim:]
            qk, v = qk.view(n, heads + kv_heads, dim), v.view(n, kv_heads, dim)  # [N, nh + nkv, D], [N, nkv, D]
        else:  # transformers' order: "full" norm, clip, split into heads, "head" norm
            q, k, v = qkv.split(self.sizes, dim=-1)  # [N, nh*D], [N, nkv*D] x 2
            if c.qk_norm == "full":
                q, k = rms_norm(q, self.q_norm, c.rms_norm_eps), rms_norm(k, self.k_norm, c.rms_norm_eps)
            if c.clip_qkv is not None:
                q, k, v = (t.clamp(-c.clip_qkv, c.clip_qkv) for t in (q, k, v))
            q, k, v = q.reshape(n, heads, dim), k.reshape(n, kv_heads, dim), v.reshape(n, kv_heads, dim)
            if c.qk_norm == "head":
                q, k = rms_norm(q, self.q_norm, c.rms_norm_eps), rms_norm(k, self.k_norm, c.rms_norm_eps)
            qk = torch.cat((q, k), dim=1)  # [N, nh + nkv, D]
        qk = rotate(qk, rope)  # [N, nh + nkv, D]
        out = ctx.attend(self.layer, qk[:, :heads], qk[:, heads:], v, self.scale, self.window, self.sinks)  # [N, nh, D]
        return linear(out.reshape(n, -1), self.o_proj, self.o_bias)

    def weight_names(self, prefix: str) -> WeightNames:
        """q_proj, k_proj, v_proj -> the fused qkv_proj (and their biases -> qkv_bias)."""
        names = {self.qkv_proj: [(f"{prefix}.{p}_proj.weight", rows) for p, rows in zip("qkv", self.sizes)],
                 self.o_proj: whole(self.o_proj, f"{prefix}.o_proj.weight")}
        if self.qkv_bias is not None:
            names[self.qkv_bias] = [(f"{prefix}.{p}_proj.bias", rows) for p, rows in zip("qkv", self.sizes)]
        if self.o_bias is not None:
            names[self.o_bias] = whole(self.o_bias, f"{prefix}.o_proj.bias")
        if self.sinks is not None:
            names[self.sinks] = whole(self.sinks, f"{prefix}.sinks")
        if self.q_norm is not None:
            names[self.q_norm] = whole(self.q_norm, f"{prefix}.q_norm.weight")
            names[self.k_norm] = whole(self.k_norm, f"{prefix}.k_norm.weight")
        return names
