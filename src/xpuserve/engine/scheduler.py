"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step, running sequences go first (decodes and unfinished chunked prefills, oldest
first), then waiting ones in arrival order, until the token budget or the sequence limit is
reached. A prompt longer than the remaining budget is split across steps (chunked prefill).
When the cache runs out of blocks, the most recently started sequence is preempted: its
blocks are freed and it waits again at the front of the queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from xpuserve.engine.block_manager import BlockManager
from xpuserve.engine.sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """True when this step computes the sequence's last uncomputed token, so it samples."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_uncomputed, budget)
            while not self.block_manager.grow(seq, seq.num_computed_tokens + num_new):
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append(ScheduledSeq(seq, num_new))
                budget -= num_new
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            num_new = self.block_manager.allocate_prompt(seq, budget)
            if num_new == 0:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence wherever it is (running, waiting) and frees its blocks."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.block_manager.free_sequence(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
