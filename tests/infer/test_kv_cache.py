"""The block pool's contracts without a model (as vLLM tests its prefix caching): ref counts, the free list's
order, the prefix cache's hash chain, forks and leaks. Sequences here are bare token lists."""

from __future__ import annotations

import pytest
import torch

from trainfer.errors import TrainferError
from trainfer.infer.kv_cache import BlockPool, block_hash
from trainfer.infer.sampling import SamplingParams
from trainfer.infer.sequence import Sequence
from trainfer.model.config import ModelConfig

B = 4
CFG = ModelConfig(vocab_size=64, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_seq_len=256)


def pool(blocks: int = 8) -> BlockPool:
    return BlockPool(CFG, blocks, B, torch.float32, torch.device("cpu"))


def seq(tokens: list[int], adapter: str | None = None, sid: int = 0) -> Sequence:
    s = Sequence(sid, f"r{sid}", list(tokens), len(tokens), SamplingParams(), torch.Generator(), 8)
    s.adapter = adapter
    return s


def computed(p: BlockPool, s: Sequence) -> None:
    """What a forward does for the pool: room for every token, all computed, full blocks published."""
    assert p.grow(s, s.remaining)
    s.num_computed = s.num_tokens
    p.publish(s)


def test_a_freed_block_with_a_hash_stays_findable_and_an_empty_one_is_reused_first():
    p = pool(4)
    a = seq(list(range(1, 9)))  # two full blocks
    computed(p, a)
    table = list(a.block_table)
    scratch = p.allocate()  # a block that never held a full, computed prefix
    assert p.num_free == 1
    p.release(scratch)
    p.release_blocks(a)
    assert p.num_free == 4 and p.usage == 0
    assert p.allocate() == scratch  # the empty block first: the cached prefixes survive longer
    h0 = block_hash(None, list(range(1, 5)))
    assert p.lookup(h0) == table[0] and p.lookup(block_hash(h0, list(range(5, 9)))) == table[1]


def test_evicting_a_cached_block_drops_its_hash():
    p = pool(2)
    a = seq(list(range(1, 9)))
    computed(p, a)
    first = block_hash(None, list(range(1, 5)))
    p.release_blocks(a)
    assert p.lookup(first) is not None
    p.allocate()
    p.allocate()  # both reused for something else
    assert p.lookup(first) is None and p.cached == {}
    with pytest.raises(TrainferError, match="full"):
        p.allocate()


def test_a_prompt_reuses_the_cached_blocks_of_its_prefix_but_recomputes_its_last_token():
    p = pool(8)
    a = seq(list(range(1, 13)))  # three full blocks
    computed(p, a)
    same = seq(list(range(1, 13)), sid=1)
    p.reuse_prefix(same)
    assert same.block_table == a.block_table[:2]  # (12 - 1) // 4: the last token's block is computed again
    assert same.num_computed == 8 and same.cached_prompt_tokens == 8
    assert [p.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    longer = seq([*range(1, 13), 50, 51], sid=2)
    p.reuse_prefix(longer)
    assert longer.block_table == a.block_table and longer.num_computed == 12
    diverged = seq([1, 2, 3, 4, 9, 9, 9, 9, 9], sid=3)
    p.reuse_prefix(diverged)
    assert diverged.block_table == a.block_table[:1]  # the chain breaks at the first different block
    assert (p.prefix_queries, p.prefix_hits) == (2 + 3 + 2, 2 + 3 + 1)


def test_an_adapter_shares_blocks_only_with_its_own_sequences():
    p = pool(8)
    computed(p, seq(list(range(1, 10)), adapter="faq"))
    base, other, same = (
        seq(list(range(1, 10)), sid=1),
        seq(list(range(1, 10)), "legal", 2),
        seq(list(range(1, 10)), "faq", 3),
    )
    for s in (base, other, same):
        p.reuse_prefix(s)
    assert (len(base.block_table), len(other.block_table), len(same.block_table)) == (0, 0, 2)


def test_a_fork_shares_full_blocks_and_copies_the_partial_one():
    p = pool(4)
    parent = seq(list(range(1, 7)))  # one full block, one partial
    computed(p, parent)
    p.k[:, B : 2 * B] = 7.0  # the partial block's K, as a forward would have written it
    child = seq(list(range(1, 7)), sid=1)
    assert p.share(parent, child)
    assert child.block_table[0] == parent.block_table[0] and child.block_table[1] != parent.block_table[1]
    copy = child.block_table[1]
    assert torch.equal(
        p.k[:, copy * B : (copy + 1) * B], p.k[:, parent.block_table[1] * B : (parent.block_table[1] + 1) * B]
    )
    assert p.blocks[parent.block_table[0]].ref_count == 2 and child.num_computed == 6
    p.allocate()
    full = seq(list(range(1, 7)), sid=2)
    assert not p.share(parent, full) and full.block_table == []  # no block for its copy: no change at all
    assert p.blocks[parent.block_table[0]].ref_count == 2


def test_every_block_comes_back_and_a_leak_is_caught():
    p = pool(6)
    seqs = [seq(list(range(i, i + 7)), sid=i) for i in range(3)]
    for s in seqs:
        computed(p, s)
    for s in seqs:
        p.release_blocks(s)
    p.check_idle()
    p.allocate()
    with pytest.raises(AssertionError, match="leaked"):
        p.check_idle()
