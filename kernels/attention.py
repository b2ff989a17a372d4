"""Causal attention, with and without a paged KV cache, on top of torch's SDPA.

The paged cache stores keys and values per layer as `[num_slots, n_kv, D]` where a slot is one
token position of one block (`slot = block * block_size + offset`). A step's tokens are flat
(`[N, ...]`, the new tokens of every sequence one after the other); `PagedAttentionMetadata`,
built once per step by `build_metadata`, says where each sequence's new tokens sit and which
slots hold its whole context. Decode sequences (one new token) are attended together in one
padded SDPA call; prefill chunks one by one (they are compute bound anyway).

Sliding windows follow transformers: query at position p sees keys j with p - window < j <= p.

Attention sinks (GPT-OSS): one learnt logit per query head joins each softmax as a key with no
value, so a head can attend to nothing. Decode on the CPU takes them in the native kernel (the sink
counted in the softmax's sum); everything else takes `attend_with_sinks`, transformers' eager op order
(scores, sink column, max-subtracted softmax in the scores' dtype, sink dropped).
"""

import itertools
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from moeray.kernels import native


@dataclass
class PagedAttentionMetadata:
    """Where one step's tokens come from and go to; shared by every layer of the step.

    slot_mapping: [N] slot each new token's K/V is written to.
    query_starts: B+1 offsets of each sequence's new tokens in the flat [N] layout.
    positions: B ints, position of each sequence's first new token.
    context_lens: B ints, tokens in each sequence's context after this step.
    decode_seqs: indices of sequences with one new token after cached ones; decode_rows [Bd] their
        flat rows, None when they are all of the step (rows 0..N-1: no gather, no scatter).
    decode_slots: [Bd, Lmax] slots of each decode sequence's context, padded with slots of block 0.
    prefill_seqs: indices of sequences with more than one new token (or a first token).
    context_slots: per prefill sequence with cached tokens (a later chunk), its [context_len] slots.
    """

    slot_mapping: Tensor
    query_starts: list[int]
    positions: list[int]
    context_lens: list[int]
    decode_seqs: list[int]
    decode_rows: Tensor | None
    decode_slots: Tensor
    prefill_seqs: list[int]
    context_slots: dict[int, Tensor]
    _decode_masks: dict[int | None, Tensor | None] = field(default_factory=dict)

    @cached_property
    def decode_lens(self) -> Tensor:
        """[Bd] int64 context length of each decode sequence (made once, for all of the step's layers)."""
        return torch.tensor([self.context_lens[i] for i in self.decode_seqs], dtype=torch.long)

    def decode_mask(self, window: int | None) -> Tensor | None:
        """[Bd, 1, 1, Lmax] bool, True where a decode query may attend, or None where every decode
        query sees all Lmax keys (equal lengths, no window in reach); cached per window size."""
        if window not in self._decode_masks:
            lens = [self.context_lens[i] for i in self.decode_seqs]
            max_len = self.decode_slots.shape[1]
            if min(lens) == max_len and (not window or window >= max_len):
                self._decode_masks[window] = None
            else:
                lens = torch.tensor(lens)[:, None]  # [Bd, 1]
                key_pos = torch.arange(max_len)  # [Lmax]
                mask = key_pos < lens
                if window:
                    mask &= key_pos > (lens - 1 - window)
                self._decode_masks[window] = mask[:, None, None, :]
        return self._decode_masks[window]


def build_metadata(block_tables: list[list[int]], positions: list[int], num_new: list[int],
                   block_size: int) -> PagedAttentionMetadata:
    """Per-step metadata from each sequence's block table, first new position and new-token count.

    A handful of tensor ops whatever the batch size (it runs every step, and per-sequence ops
    were a large part of a decode step): slot numbers of new tokens are Python ints, context
    slots come from one padded `[B, blocks]` table."""
    query_starts = list(itertools.accumulate(num_new, initial=0))
    context_lens = [p + n for p, n in zip(positions, num_new)]
    slot_mapping = torch.tensor([table[p // block_size] * block_size + p % block_size
                                 for table, start, n in zip(block_tables, positions, num_new)
                                 for p in range(start, start + n)], dtype=torch.long)  # [N]
    decode_seqs = [i for i, n in enumerate(num_new) if n == 1 and positions[i] > 0]
    prefill_seqs = [i for i, n in enumerate(num_new) if not (n == 1 and positions[i] > 0)]
    chunked = [i for i in prefill_seqs if positions[i] > 0]  # prefill chunks that read cached K/V
    readers = decode_seqs + chunked
    slots = _context_slots([block_tables[i] for i in readers], block_size)  # [len(readers), W*bs]
    max_len = max((context_lens[i] for i in decode_seqs), default=0)
    all_decode = len(decode_seqs) == len(num_new)
    return PagedAttentionMetadata(
        slot_mapping=slot_mapping,
        query_starts=query_starts,
        positions=list(positions),
        context_lens=context_lens,
        decode_seqs=decode_seqs,
        decode_rows=None if all_decode else torch.tensor([query_starts[i] for i in decode_seqs], dtype=torch.long),
        decode_slots=slots[:len(decode_seqs), :max_len].contiguous(),
        prefill_seqs=prefill_seqs,
        context_slots={i: slots[len(decode_seqs) + j, :context_lens[i]] for j, i in enumerate(chunked)},
    )


def _context_slots(block_tables: list[list[int]], block_size: int) -> Tensor:
    """[n, W * block_size]: row i holds the slot of every position of sequence i's blocks (W = the
    longest table; shorter ones are padded with block 0)."""
    num, width = len(block_tables), max((len(t) for t in block_tables), default=0)
    table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long).view(num, width)
    return (table[:, :, None] * block_size + torch.arange(block_size)).view(num, width * block_size)


def paged_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                    meta: PagedAttentionMetadata, scale: float, window: int | None, sinks: Tensor | None = None) -> Tensor:
    """Write the step's K/V into the cache, then attend each sequence over its whole context.

    q [N, nh, Dk]; k [N, nkv, Dk], v [N, nkv, Dv]; k_cache [num_slots, nkv, Dk], v_cache
    [num_slots, nkv, Dv]; sinks [nh] or None -> [N, nh, Dv]. A v_cache that is a view of k_cache's
    first Dv numbers (MLA, whose value is the first Dv numbers of its key) is written with the keys.
    """
    if meta.decode_rows is None and _native_decode(q, k_cache, v_cache):  # every row a decode query, in order:
        return native.decode_attention(q, k_cache, v_cache, meta.decode_slots, meta.decode_lens, scale, window,
                                       new=(k, v, meta.slot_mapping), sinks=sinks)  # writes the K/V too, one call a layer
    k_cache.index_copy_(0, meta.slot_mapping, k)  # index_copy_ / index_select: a third of the cost of
    if not native.shares_keys(v_cache, k_cache):  # `cache[slots] = k` / `cache[slots]` at these sizes
        v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.decode_rows is None:  # a pure decode step: every row is a decode query, in order
        return _attend_decode(q, k_cache, v_cache, meta, scale, window, sinks)
    out = q.new_empty(*q.shape[:2], v.shape[-1])  # [N, nh, Dv]
    if meta.decode_seqs:
        out[meta.decode_rows] = _attend_decode(q[meta.decode_rows], k_cache, v_cache, meta, scale, window, sinks)
    for i in meta.prefill_seqs:
        rows = slice(meta.query_starts[i], meta.query_starts[i + 1])
        if meta.positions[i] == 0:  # the whole context is this step's: no need to read it back
            out[rows] = _attend_chunk(q[rows], k[rows], v[rows], 0, scale, window, sinks)
        else:
            slots = meta.context_slots[i]
            out[rows] = _attend_chunk(q[rows], k_cache.index_select(0, slots), v_cache.index_select(0, slots),
                                      meta.positions[i], scale, window, sinks)
    return out


def _attend_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: PagedAttentionMetadata,
                   scale: float, window: int | None, sinks: Tensor | None = None) -> Tensor:
    """The decode sequences' queries q [Bd, nh, D] over their cached contexts -> [Bd, nh, Dv].

    On CPU (float32, bf16) the native kernel reads keys and values in place through the slots;
    elsewhere they are gathered into [Bd, nkv, Lmax, D] for one padded SDPA call. There the query
    heads of each kv head are that head's block of queries (one token each, all seeing the same keys),
    so SDPA never copies the kv heads out to nh heads, as its math path does for `enable_gqa` (41% of
    the call in a profile at MLA's one 576-wide kv head and 16 query heads; bench/decode_attention.py)."""
    slots = meta.decode_slots  # [Bd, Lmax]
    if _native_decode(q, k_cache, v_cache):
        return native.decode_attention(q, k_cache, v_cache, slots, meta.decode_lens, scale, window, sinks=sinks)
    keys = k_cache.index_select(0, slots.view(-1)).view(*slots.shape, *k_cache.shape[1:]).transpose(1, 2)  # [Bd, nkv, Lmax, Dk]
    values = v_cache.index_select(0, slots.view(-1)).view(*slots.shape, *v_cache.shape[1:]).transpose(1, 2)  # [.., Dv]
    if sinks is not None:
        mask = meta.decode_mask(window)  # [Bd, 1, 1, Lmax] or None
        return attend_with_sinks(q[:, :, None], keys, values, mask, scale, sinks)[:, :, 0]  # [Bd, nh, Dv]
    kv_heads = keys.shape[1]
    queries = q.unflatten(1, (kv_heads, q.shape[1] // kv_heads))  # [Bd, nkv, nh / nkv, Dk]
    att = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.decode_mask(window), scale=scale)
    return att.flatten(1, 2)  # [Bd, nh, Dv]


def _native_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    if q.dtype != k_cache.dtype:
        return False
    return native.supports(k_cache) if native.shares_keys(v_cache, k_cache) else native.supports(k_cache, v_cache)


def _attend_chunk(q: Tensor, k: Tensor, v: Tensor, start: int, scale: float, window: int | None,
                  sinks: Tensor | None = None) -> Tensor:
    """One sequence: q [n, nh, D] at positions start..start+n-1; k, v [start+n, nkv, D] -> [n, nh, D]."""
    # 4-D [1, heads, len, D] like causal_attention: torch picks its SDPA kernel by rank, and in bf16
    # the 3-D and 4-D kernels round differently, which would make paged and unpaged logits disagree.
    query, keys, values = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if sinks is not None:
        mask = causal_mask(start, q.shape[0], k.shape[0], window, q.device)
        att = attend_with_sinks(query, keys, values, mask, scale, sinks)
    elif start == 0 and not window:
        att = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = causal_mask(start, q.shape[0], k.shape[0], window, q.device)
        att = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return att[0].transpose(0, 1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None,
                     sinks: Tensor | None = None) -> Tensor:
    """No cache, B equal-length sequences: q [B, T, nh, D]; k, v [B, T, nkv, D]; sinks [nh] -> [B, T, nh, D]."""
    query, keys, values = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
    seq_len = q.shape[1]
    if sinks is not None:
        att = attend_with_sinks(query, keys, values, causal_mask(0, seq_len, seq_len, window, q.device), scale, sinks)
    elif window:
        mask = causal_mask(0, seq_len, seq_len, window, q.device)
        att = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        att = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    return att.transpose(1, 2)


def causal_mask(start: int, num_queries: int, num_keys: int, window: int | None, device=None) -> Tensor:
    """[n, ctx] bool, True where query start+i may see key j: j <= start+i, and within the window."""
    q_pos = torch.arange(start, start + num_queries, device=device)[:, None]  # [n, 1]
    k_pos = torch.arange(num_keys, device=device)[None, :]  # [1, ctx]
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    return mask


def attend_with_sinks(query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scale: float,
                      sinks: Tensor) -> Tensor:
    """query [B, nh, Tq, D], keys [B, nkv, Tk, D], values [B, nkv, Tk, Dv], mask broadcast to
    [B, nh, Tq, Tk] (True: may attend; None: all), sinks [nh] -> [B, nh, Tq, Dv].

    Each head's sink logit joins its softmax as one more column, dropped after: the weights of the
    real keys sum to less than 1. Transformers' eager GPT-OSS attention, op for op."""
    reps = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(reps, dim=1), values.repeat_interleave(reps, dim=1)  # [B, nh, Tk, D]
    scores = torch.matmul(query, keys.transpose(2, 3)) * scale  # [B, nh, Tq, Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)  # [B, nh, Tq, 1]
    logits = torch.cat([scores, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = logits.softmax(dim=-1, dtype=logits.dtype)[..., :-1]  # [B, nh, Tq, Tk]
    return torch.matmul(probs.to(values.dtype), values)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None,
                        sinks: Tensor | None = None) -> Tensor:
    """Plain matmul-softmax reference for one sequence: q [T, nh, D], k, v [T, nkv, D] -> [T, nh, D].
    With sinks [nh]: each head's softmax denominator also counts exp(sink)."""
    reps = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(reps, dim=1).float(), v.repeat_interleave(reps, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [nh, T, T]
    scores = scores.masked_fill(~causal_mask(0, q.shape[0], q.shape[0], window), float("-inf"))
    if sinks is None:
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    sink = sinks.float()[:, None, None].expand(*scores.shape[:-1], 1)  # [nh, T, 1]
    weights = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]  # [nh, T, T]
    return torch.einsum("hqk,khd->qhd", weights, v).to(q.dtype)
