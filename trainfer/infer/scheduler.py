"""The scheduler: who decodes, who prefills a chunk, who is preempted, each step.

It moves sequences between the waiting and running queues; the pool gives and takes their blocks.
Design and invariants: docs/engine.md.
"""

from __future__ import annotations

from collections import deque

from trainfer.infer.kv_cache import BlockPool
from trainfer.infer.sequence import Sequence, Status


class Scheduler:
    """Owns the waiting and running queues and the step's plan (who decodes, who prefills which chunk, who is
    preempted) under `max_num_seqs` and a token budget. Blocks change hands only through the pool's methods;
    it never runs the model or samples."""

    def __init__(self, pool: BlockPool, max_num_seqs: int = 64, max_num_batched_tokens: int = 512) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0
        self.num_computed_tokens = 0  # tokens run through the model, prompt and output alike
        self.failed: list[Sequence] = []  # finished with "error" by the scheduler; the engine reports them

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def computed(self, seq: Sequence, n: int) -> None:
        """After a forward: n more tokens are in the cache; publish the blocks that became full."""
        seq.num_computed += n
        self.num_computed_tokens += n
        self.pool.publish(seq)

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Siblings of a sequence that just computed its prompt: each runs at once on shared blocks while
        a slot (max_num_seqs) and a block for its copy are free; the rest wait at the front of the queue
        and recompute the prompt later, mostly from the prefix cache."""
        waiting = []
        for child in children:
            if len(self.running) < self.max_num_seqs and self.pool.share(parent, child):
                child.status = Status.RUNNING
                self.running.append(child)
            else:
                waiting.append(child)
        self.waiting.extendleft(reversed(waiting))

    def _preempt(self, seq: Sequence) -> None:
        seq.drop_drafts()  # a recomputed sequence must not take guesses for its prompt
        self.running.remove(seq)
        self.pool.release_blocks(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        self.pool.release_blocks(seq)
        seq.drop_drafts()
        seq.status, seq.finish_reason = Status.FINISHED, reason

    # ---- the step ----
    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, tokens to compute)]: decodes first (with their speculative guesses, Sequence.drafts,
        where the pool and the budget have room for them), then prompt chunks under the token budget."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq.status != Status.RUNNING or seq.remaining != 1 + seq.drafts:
                continue
            if seq.drafts and (seq.remaining > budget or not self.pool.grow(seq, seq.remaining)):
                seq.drop_drafts()  # guesses only where they fit: no preemption, no token budget spent for them
            while not self.pool.grow(seq, 1):
                victim = self.running[-1]
                self._preempt(victim)  # the newest goes back to waiting, possibly seq itself
                if victim is seq:
                    break
            if seq.status == Status.RUNNING:
                batch.append((seq, seq.remaining))
                budget -= seq.remaining
        prefilling = [s for s in self.running if s.remaining > 1 and not s.drafts]
        for seq in [*prefilling, *self.waiting]:
            if budget <= 0:
                break
            if seq.status == Status.WAITING:
                if len(self.running) >= self.max_num_seqs:
                    break
                if not seq.block_table and not seq.wants_prompt_logprobs:
                    self.pool.reuse_prefix(seq)  # (prompt logprobs need every prompt position computed)
            n = min(seq.remaining, budget)
            if not self.pool.grow(seq, n):
                if seq.status == Status.WAITING:
                    self.pool.release_blocks(seq)  # give back its prefix blocks while it waits
                    if not self.running and not batch:
                        # Nothing runs and it still does not fit (the engine's context check should make
                        # this impossible): fail this sequence alone, not the server.
                        self.finish(seq, "error")
                        self.failed.append(seq)
                        continue
                break
            if seq.status == Status.WAITING:
                self.waiting.remove(seq)
                self.running.append(seq)
                seq.status = Status.RUNNING
            batch.append((seq, n))
            budget -= n
        return batch
