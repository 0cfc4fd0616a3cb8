"""Sequences and the scheduler: who decodes, who prefills a chunk, who is preempted, each step.

Design and invariants: docs/engine.md.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import torch

from trainfer.infer.kv_cache import BlockPool, block_hash
from trainfer.infer.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    token_ids: list[int]  # prompt + output so far
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator
    index: int = 0  # which of the request's n samples
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of the full, computed blocks
    num_computed: int = 0  # tokens whose K/V are in the cache
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    forked: bool = False  # n > 1: children created after the first sample

    def __post_init__(self) -> None:
        assert 0 < self.prompt_len <= len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_computed


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int = 64, max_num_batched_tokens: int = 512) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0
        self.num_computed_tokens = 0  # tokens run through the model, prompt and output alike

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- blocks ----
    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        b = self.pool.block_size
        return max(0, -(-(seq.num_computed + n) // b) - len(seq.block_table))

    def _grow(self, seq: Sequence, n: int) -> bool:
        need = self._blocks_needed(seq, n)
        if need > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate() for _ in range(need))
        return True

    def free(self, seq: Sequence) -> None:
        for block_id in seq.block_table:
            self.pool.release(block_id)
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed = 0

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Take every cached block of the sequence's prefix; the last token is always recomputed."""
        b = self.pool.block_size
        parent = None
        for i in range((seq.num_tokens - 1) // b):
            h = block_hash(parent, seq.token_ids[i * b : (i + 1) * b])
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            self.pool.acquire(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * b
        seq.cached_prompt_tokens = min(seq.num_computed, seq.prompt_len)

    def computed(self, seq: Sequence, n: int) -> None:
        """After a forward: n more tokens are in the cache; publish the blocks that became full."""
        seq.num_computed += n
        self.num_computed_tokens += n
        b = self.pool.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // b):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, seq.token_ids[i * b : (i + 1) * b])
            self.pool.register(seq.block_table[i], h)
            seq.block_hashes.append(h)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING:
            self.waiting.remove(seq)
        self.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    # ---- the step ----
    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, tokens to compute)]: decodes first, then prompt chunks under the token budget."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq.status != Status.RUNNING or seq.remaining != 1:
                continue
            while not self._grow(seq, 1):
                victim = self.running[-1]
                self._preempt(victim)  # the newest goes back to waiting, possibly seq itself
                if victim is seq:
                    break
            if seq.status == Status.RUNNING:
                batch.append((seq, 1))
                budget -= 1
        prefilling = [s for s in self.running if s.remaining > 1]
        for seq in [*prefilling, *self.waiting]:
            if budget <= 0:
                break
            if seq.status == Status.WAITING:
                if len(self.running) >= self.max_num_seqs:
                    break
                if not seq.block_table:
                    self._reuse_prefix(seq)
            n = min(seq.remaining, budget)
            if not self._grow(seq, n):
                if seq.status == Status.WAITING:
                    self.free(seq)  # give back its prefix blocks while it waits
                if seq.status == Status.WAITING and not self.running and not batch:
                    # Nothing runs and it still does not fit: the pool is too small for this prompt.
                    raise MemoryError(f"a prompt of {seq.num_tokens} tokens does not fit in the KV cache")
                break
            if seq.status == Status.WAITING:
                self.waiting.remove(seq)
                self.running.append(seq)
                seq.status = Status.RUNNING
            batch.append((seq, n))
            budget -= n
        return batch
