"""The paged KV cache: a fixed pool of blocks, handed out to sequences a block at a time.

`BlockAllocator` is the bookkeeping (pure Python, unit-tested alone); `KVCache` owns the tensors,
one `[num_blocks * block_size, n_kv, D]` pair per layer, sized from a byte budget; `PagedContext`
is the model's `AttentionContext` for one step over it. With MLA a layer holds one tensor
`[slots, 1, r + dr]` and the values are a view of its first r numbers (`ModelConfig.kv_cache_dims`).
"""

import torch
from torch import Tensor

from moeray.kernels.attention import PagedAttentionMetadata, paged_attention
from moeray.models.config import ModelConfig


class BlockAllocator:
    """Free list of block ids. A sequence of n tokens holds ceil(n / block_size) blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(table) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` until it holds `num_tokens`; the caller checked can_grow."""
        while len(table) < self.blocks_for(num_tokens):
            table.append(self._free.pop())

    def free(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    heads, key_dim, value_dim = config.kv_cache_dims
    per_layer = heads * (key_dim if config.values_in_keys else key_dim + value_dim)
    return config.num_layers * per_layer * torch.finfo(dtype).bits // 8


class KVCache:
    """Key and value tensors for every layer, sized to `budget_bytes`."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, budget_bytes: int, block_size: int = 16):
        num_blocks = budget_bytes // (kv_bytes_per_token(config, dtype) * block_size)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={budget_bytes} is too small for one block of {block_size} tokens "
                             f"({kv_bytes_per_token(config, dtype) * block_size} bytes)")
        slots = num_blocks * block_size
        heads, key_dim, value_dim = config.kv_cache_dims
        self.keys = [torch.zeros(slots, heads, key_dim, dtype=dtype) for _ in range(config.num_layers)]  # L x [slots, nkv, Dk]
        if config.values_in_keys:
            self.values = [k[..., :value_dim] for k in self.keys]  # views: written with the keys
        else:
            self.values = [torch.zeros(slots, heads, value_dim, dtype=dtype) for _ in range(config.num_layers)]
        self.allocator = BlockAllocator(num_blocks, block_size)

    def context(self, meta: PagedAttentionMetadata) -> "PagedContext":
        return PagedContext(self, meta)


class PagedContext:
    """`AttentionContext` for one step: write this step's K/V, attend over each sequence's blocks."""

    def __init__(self, cache: KVCache, meta: PagedAttentionMetadata):
        self.cache, self.meta = cache, meta

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None,
               sinks: Tensor | None = None) -> Tensor:
        return paged_attention(q, k, v, self.cache.keys[layer], self.cache.values[layer], self.meta, scale, window,
                               sinks)
