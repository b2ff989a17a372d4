"""Runs one scheduled batch through the model over the paged KV cache; returns logits to sample."""

import torch
from torch import Tensor

from moeray.actors.batcher import ScheduledBatch
from moeray.actors.kv_cache import KVCache
from moeray.kernels.attention import build_metadata
from moeray.models.model import MoEModel


class ModelRunner:
    def __init__(self, model: MoEModel, cache: KVCache):
        self.model, self.cache = model, cache

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> Tensor:
        """-> float32 logits [S, V] of the last token of each sequence that samples (in batch order).

        Marks the computed tokens as cached (`num_computed`)."""
        starts = [seq.num_computed for seq in batch.seqs]
        ids = [t for seq, s, n in zip(batch.seqs, starts, batch.num_new) for t in seq.token_ids[s:s + n]]
        positions = [p for s, n in zip(starts, batch.num_new) for p in range(s, s + n)]
        meta = build_metadata([seq.block_table for seq in batch.seqs], starts, batch.num_new,
                              self.cache.allocator.block_size)
        hidden = self.model.forward_tokens(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                                           self.cache.context(meta))  # [N, H]
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
        if len(hidden) != len(batch):  # some sequence computed more than one token, or one does not sample
            last_rows = [meta.query_starts[i + 1] - 1 for i in range(len(batch)) if batch.samples[i]]
            hidden = hidden[last_rows]
        elif not all(batch.samples):
            hidden = hidden[[i for i in range(len(batch)) if batch.samples[i]]]
        return self.model.compute_logits(hidden)  # [S, V]
