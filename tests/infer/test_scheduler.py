"""The scheduler's contracts without a model: decodes before prompt chunks under a token budget, the
sequence cap, preemption of the newest, and a prompt that can never fit failing alone."""

from __future__ import annotations

import torch

from trainfer.infer.kv_cache import BlockPool
from trainfer.infer.sampling import SamplingParams
from trainfer.infer.scheduler import Scheduler
from trainfer.infer.sequence import Sequence, Status
from trainfer.model.config import ModelConfig

B = 4
CFG = ModelConfig(vocab_size=64, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_seq_len=512)


def scheduler(blocks: int = 32, max_num_seqs: int = 8, budget: int = 16) -> Scheduler:
    return Scheduler(BlockPool(CFG, blocks, B, torch.float32, torch.device("cpu")), max_num_seqs, budget)


def seq(sid: int, prompt_len: int) -> Sequence:
    ids = [1 + (sid * 7 + i) % 60 for i in range(prompt_len)]  # distinct per sequence: no prefix sharing
    return Sequence(sid, f"r{sid}", ids, prompt_len, SamplingParams(), torch.Generator(), 64)


def step(s: Scheduler) -> list[tuple[int, int]]:
    """Schedule, then do what the engine does after the forward: mark computed and sample one token for
    each sequence whose chunk reached its end."""
    batch = s.schedule()
    for q, n in batch:
        s.computed(q, n)
        if q.remaining == 0:
            q.token_ids.append(5)
    return [(q.seq_id, n) for q, n in batch]


def test_prompts_are_chunked_under_the_budget_and_decodes_go_first():
    s = scheduler(budget=16)
    for i, n in enumerate([10, 20]):
        s.add(seq(i, n))
    assert step(s) == [(0, 10), (1, 6)]  # the second prompt gets what the budget leaves
    assert step(s) == [(0, 1), (1, 14)]  # the first now decodes, ahead of the rest of the second's prompt
    assert step(s) == [(0, 1), (1, 1)]


def test_no_more_than_max_num_seqs_run():
    s = scheduler(max_num_seqs=2, budget=64)
    for i in range(3):
        s.add(seq(i, 5))
    assert [sid for sid, _ in step(s)] == [0, 1] and [q.seq_id for q in s.waiting] == [2]
    s.finish(s.running[0], "stop")
    assert [sid for sid, _ in step(s)] == [1, 2]


def test_the_newest_is_preempted_when_a_decode_needs_a_block_and_resumes_later():
    s = scheduler(blocks=4, budget=64)  # 16 slots
    old, new = seq(0, 8), seq(1, 7)
    s.add(old)
    s.add(new)
    step(s)  # old: 8 prompt + 1 sampled = 9 tokens, 2 blocks computed; new: 7 + 1 = 8 tokens in 2 blocks
    assert s.pool.num_free == 0
    assert step(s) == [(0, 1)]  # old needs a third block for its 9th token: new, the newest, gives back its two
    assert s.num_preemptions == 1 and new.status == Status.WAITING and new.block_table == []
    assert new.num_computed == 0 and s.waiting[0] is new  # it recomputes prompt and output from the front
    s.finish(old, "stop")
    # its first block is still in the prefix cache (freed with its hash): only the rest is computed again
    assert step(s) == [(1, 4)] and new.cached_prompt_tokens == 4 and s.pool.num_free == 2


def test_a_prompt_that_can_never_fit_fails_alone():
    s = scheduler(blocks=2, budget=64)  # 8 slots
    s.add(seq(0, 12))
    assert s.schedule() == []
    assert [q.seq_id for q in s.failed] == [0] and s.failed[0].finish_reason == "error" and not s.has_work()
    s.pool.check_idle()
