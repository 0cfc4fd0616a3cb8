"""The paged KV cache: a fixed pool of blocks with ref counts and a prefix cache keyed by hash chains.

Design and invariants: docs/engine.md. The pool owns the K/V tensors; sequences own block tables.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from trainfer.errors import TrainferError
from trainfer.model.config import ModelConfig


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its K/V computed

    def __post_init__(self) -> None:
        assert self.ref_count >= 0, f"block {self.id} has a negative ref count"


def block_hash(parent: int | None, tokens: list[int]) -> int:
    """Hash of a full block given its parent's: equal hashes mean equal whole prefixes."""
    return hash((parent, tuple(tokens)))


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


class BlockPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        if num_blocks < 2:
            raise TrainferError(f"the KV cache needs at least 2 blocks, got {num_blocks}; raise --kv-cache-gb")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (cfg.n_layers, num_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)  # (L, slots, KV, hd)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently used first; hashed ones stay findable until reused.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0  # of which found in the cache

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (idle cached blocks count as free)."""
        return 1 - len(self.free) / self.num_blocks

    def allocate(self) -> int:
        if not self.free:
            raise TrainferError("KV cache is full")  # callers check num_free first; this is a bug guard
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its old contents from the prefix cache
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released more often than acquired"
        if block.ref_count == 0:
            self.free[block_id] = None
            if block.hash is None:  # nothing worth keeping: reuse it first
                self.free.move_to_end(block_id, last=False)

    def lookup(self, h: int) -> int | None:
        self.prefix_queries += 1
        block_id = self.cached.get(h)
        if block_id is not None:
            self.prefix_hits += 1
        return block_id

    def register(self, block_id: int, h: int) -> None:
        """Make a full, computed block findable by its hash (the first block with a hash keeps it)."""
        block = self.blocks[block_id]
        if block.hash is None and h not in self.cached:
            block.hash = h
            self.cached[h] = block_id

    def copy(self, src: int, dst: int) -> None:
        """Copy-on-write for a forked sequence's partial last block."""
        b = self.block_size
        self.k[:, dst * b : (dst + 1) * b] = self.k[:, src * b : (src + 1) * b]
        self.v[:, dst * b : (dst + 1) * b] = self.v[:, src * b : (src + 1) * b]

    def check_idle(self) -> None:
        """With no live sequence every block must be free: a leak check for tests and shutdown."""
        held = [b.id for b in self.blocks if b.ref_count]
        assert not held and len(self.free) == self.num_blocks, f"leaked blocks {held[:10]}"
