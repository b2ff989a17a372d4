"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Every step, running sequences go first (oldest first): a decoding one computes its one new
token, one still in prefill computes the next chunk of its prompt. Then waiting sequences are
admitted in arrival order while the step's token budget, the sequence cap and the KV cache
allow. When the cache cannot hold a running sequence's next token, the newest running sequence
is preempted: its blocks are freed and it waits at the front of the queue to be recomputed
(prompt + what it has generated so far), so no request is ever dropped.
"""

from collections import deque
from dataclasses import dataclass, field

from moeray.actors.kv_cache import BlockAllocator
from moeray.actors.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work: num_new[i] tokens of seqs[i] are computed; samples[i] when that reaches
    the sequence's last token (a prompt chunk that does not samples nothing)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)


class Batcher:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator = allocator
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # sequences sent back to recompute since start (a metric)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_pending, budget)
            while not self.allocator.can_grow(seq.block_table, seq.num_computed + n) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
                preempted = True
            if not self.allocator.can_grow(seq.block_table, seq.num_computed + n):
                self._preempt(seq)  # alone and still too big: wait for memory
                preempted = True
                break
            self._take(batch, seq, n)
            budget -= n
            i += 1
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_pending, budget)
            if not self.allocator.can_grow(seq.block_table, seq.num_computed + n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._take(batch, seq, n)
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        """Release a finished (or aborted) sequence's blocks and forget it."""
        self.allocator.free(seq.block_table)
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _take(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        self.allocator.grow(seq.block_table, seq.num_computed + n)
        batch.seqs.append(seq)
        batch.num_new.append(n)
        batch.samples.append(n == seq.num_pending)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
