"""Causal attention, with and without a paged KV cache, on top of torch's SDPA.

The paged cache stores keys and values per layer as `[num_slots, n_kv, D]` where a slot is one
token position of one block (`slot = block * block_size + offset`). A step's tokens are flat
(`[N, ...]`, the new tokens of every sequence one after the other); `PagedAttentionMetadata`,
built once per step by `build_metadata`, says where each sequence's new tokens sit and which
slots hold its whole context. Decode sequences (one new token) are attended together in one
padded SDPA call; prefill chunks one by one (they are compute bound anyway).

Sliding windows follow transformers: query at position p sees keys j with p - window < j <= p.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PagedAttentionMetadata:
    """Where one step's tokens come from and go to; shared by every layer of the step.

    slot_mapping: [N] slot each new token's K/V is written to.
    query_starts: B+1 offsets of each sequence's new tokens in the flat [N] layout.
    positions: B ints, position of each sequence's first new token.
    context_lens: B ints, tokens in each sequence's context after this step.
    decode_rows: [Bd] flat row of each decode sequence (one new token); decode_seqs their indices.
    decode_slots: [Bd, Lmax] slots of each decode sequence's context, padded with slot 0.
    prefill_seqs: indices of sequences with more than one new token (or a first token).
    context_slots: per sequence, [context_len] slots (only filled for prefill sequences).
    """

    slot_mapping: Tensor
    query_starts: list[int]
    positions: list[int]
    context_lens: list[int]
    decode_seqs: list[int]
    decode_rows: Tensor
    decode_slots: Tensor
    prefill_seqs: list[int]
    context_slots: dict[int, Tensor]
    _decode_masks: dict[int | None, Tensor] = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> Tensor:
        """[Bd, 1, 1, Lmax] bool, True where a decode query may attend; cached per window size."""
        if window not in self._decode_masks:
            lens = torch.tensor([self.context_lens[i] for i in self.decode_seqs])  # [Bd]
            key_pos = torch.arange(self.decode_slots.shape[1])  # [Lmax]
            mask = key_pos[None, :] < lens[:, None]
            if window:
                mask &= key_pos[None, :] > (lens[:, None] - 1 - window)
            self._decode_masks[window] = mask[:, None, None, :]
        return self._decode_masks[window]


def build_metadata(block_tables: list[list[int]], positions: list[int], num_new: list[int],
                   block_size: int) -> PagedAttentionMetadata:
    """Per-step metadata from each sequence's block table, first new position and new-token count."""
    query_starts = [0]
    for n in num_new:
        query_starts.append(query_starts[-1] + n)
    context_lens = [p + n for p, n in zip(positions, num_new)]
    all_slots = [_slots(table, length, block_size) for table, length in zip(block_tables, context_lens)]
    slot_mapping = torch.cat([s[p:] for s, p in zip(all_slots, positions)])  # [N]
    decode_seqs = [i for i, n in enumerate(num_new) if n == 1 and positions[i] > 0]
    prefill_seqs = [i for i in range(len(num_new)) if i not in set(decode_seqs)]
    max_len = max((context_lens[i] for i in decode_seqs), default=0)
    decode_slots = torch.zeros(len(decode_seqs), max_len, dtype=torch.long)  # [Bd, Lmax]
    for row, i in enumerate(decode_seqs):
        decode_slots[row, : context_lens[i]] = all_slots[i]
    return PagedAttentionMetadata(
        slot_mapping=slot_mapping,
        query_starts=query_starts,
        positions=list(positions),
        context_lens=context_lens,
        decode_seqs=decode_seqs,
        decode_rows=torch.tensor([query_starts[i] for i in decode_seqs], dtype=torch.long),
        decode_slots=decode_slots,
        prefill_seqs=prefill_seqs,
        context_slots={i: all_slots[i] for i in prefill_seqs},
    )


def _slots(block_table: list[int], length: int, block_size: int) -> Tensor:
    """[length] slot of each position 0..length-1 of a sequence."""
    pos = torch.arange(length)
    blocks = torch.tensor(block_table, dtype=torch.long)[pos // block_size]
    return blocks * block_size + pos % block_size


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                    meta: PagedAttentionMetadata, scale: float, window: int | None) -> Tensor:
    """Write the step's K/V into the cache, then attend each sequence over its whole context.

    q [N, nh, D]; k, v [N, nkv, D]; k_cache, v_cache [num_slots, nkv, D] -> [N, nh, D].
    """
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    out = torch.empty_like(q)
    if meta.decode_seqs:
        keys = k_cache[meta.decode_slots].transpose(1, 2)  # [Bd, nkv, Lmax, D]
        values = v_cache[meta.decode_slots].transpose(1, 2)
        query = q[meta.decode_rows].unsqueeze(2)  # [Bd, nh, 1, D]
        att = F.scaled_dot_product_attention(query, keys, values, attn_mask=meta.decode_mask(window),
                                             scale=scale, enable_gqa=True)  # [Bd, nh, 1, D]
        out[meta.decode_rows] = att.squeeze(2)
    for i in meta.prefill_seqs:
        rows = slice(meta.query_starts[i], meta.query_starts[i + 1])
        slots = meta.context_slots[i]
        out[rows] = _attend_chunk(q[rows], k_cache[slots], v_cache[slots], meta.positions[i], scale, window)
    return out


def _attend_chunk(q: Tensor, k: Tensor, v: Tensor, start: int, scale: float, window: int | None) -> Tensor:
    """One sequence: q [n, nh, D] at positions start..start+n-1; k, v [start+n, nkv, D] -> [n, nh, D]."""
    n, ctx = q.shape[0], k.shape[0]
    # 4-D [1, heads, len, D] like causal_attention: torch picks its SDPA kernel by rank, and in bf16
    # the 3-D and 4-D kernels round differently, which would make paged and unpaged logits disagree.
    query, keys, values = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if start == 0 and not window:
        att = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    else:
        q_pos = torch.arange(start, start + n)[:, None]  # [n, 1]
        k_pos = torch.arange(ctx)[None, :]  # [1, ctx]
        mask = k_pos <= q_pos
        if window:
            mask &= k_pos > q_pos - window
        att = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return att[0].transpose(0, 1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None) -> Tensor:
    """No cache, B equal-length sequences: q [B, T, nh, D]; k, v [B, T, nkv, D] -> [B, T, nh, D]."""
    query, keys, values = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
    if window:
        pos = torch.arange(q.shape[1])
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)  # [T, T]
        att = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        att = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    return att.transpose(1, 2)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None) -> Tensor:
    """Plain matmul-softmax reference for one sequence: q [T, nh, D], k, v [T, nkv, D] -> [T, nh, D]."""
    reps = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(reps, dim=1).float(), v.repeat_interleave(reps, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [nh, T, T]
    pos = torch.arange(q.shape[0])
    allowed = pos[None, :] <= pos[:, None]
    if window:
        allowed &= pos[None, :] > pos[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
