"""What every layer module of the decoder shares: uninitialised parameters, the names they load
from, and the seam through which attention reaches keys and values.

Each module says which checkpoint tensors fill its parameters (`weight_names(prefix)`), so the
loader needs no table of names and a new kind of layer (MLA) brings its own.
"""

from typing import Protocol

import torch
from torch import Tensor, nn

from moeray.kernels.attention import causal_attention

# Checkpoint tensors that make one parameter, concatenated along dim 0, each with its length there.
Parts = list[tuple[str, int]]
WeightNames = dict[nn.Parameter, Parts]


def param(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    """Uninitialised, in torch's default dtype unless given: build the model under `default_dtype(...)`."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def whole(p: nn.Parameter, name: str) -> Parts:
    """`p` is the checkpoint tensor `name`, not a concatenation."""
    return [(name, p.shape[0])]


class AttentionContext(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None,
               sinks: Tensor | None = None) -> Tensor:
        """q [N, nh, Dk], k [N, nkv, Dk], v [N, nkv, Dv] of this step's tokens; sinks [nh] (GPT-OSS's
        per-head sink logits, `kernels.attention`) or None -> [N, nh, Dv]."""


class CausalContext:
    """No cache: B sequences of equal length T laid out flat as [B*T]."""

    def __init__(self, batch: int, seq_len: int):
        self.batch, self.seq_len = batch, seq_len

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None,
               sinks: Tensor | None = None) -> Tensor:
        shape = (self.batch, self.seq_len)
        out = causal_attention(q.view(*shape, *q.shape[1:]), k.view(*shape, *k.shape[1:]),
                               v.view(*shape, *v.shape[1:]), scale, window, sinks)  # [B, T, nh, Dv]
        return out.reshape(*q.shape[:2], v.shape[-1])
