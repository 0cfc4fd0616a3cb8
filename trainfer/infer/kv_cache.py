"""The paged KV cache: a fixed pool of blocks with ref counts and a prefix cache keyed by hash chains.

Design and invariants: docs/engine.md. The pool owns the K/V tensors and every block count; sequences
own block tables, which only the pool's methods change.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from trainfer.errors import TrainferError
from trainfer.infer.sequence import Sequence
from trainfer.model.config import ModelConfig


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and its K/V computed

    def __post_init__(self) -> None:
        assert self.ref_count >= 0, f"block {self.id} has a negative ref count"


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """SHA-256 of a full block chained to its parent's: equal hashes mean equal whole prefixes.

    Why not Python's 64-bit hash(): a prompt crafted to collide would be served another user's K/V
    (vLLM moved to SHA-256 for the same reason); a hit is trusted without comparing tokens.
    """
    return hashlib.sha256((parent or b"") + array("q", tokens).tobytes()).digest()


def root_hash(seq: Sequence) -> bytes | None:
    """The hash chain's start: an adapter changes every K/V, so its sequences share blocks only with its own."""
    return None if seq.adapter is None else hashlib.sha256(b"adapter\0" + seq.adapter.encode()).digest()


KV_DTYPES = ("auto", "fp32", "fp16", "int8")


def kv_cache_dtype(name: str, activations: torch.dtype) -> torch.dtype:
    """The pool's element type for a --kv-dtype: "auto" keeps the model's activations' type; fp16 halves the
    cache (twice the tokens in the same --kv-cache-gb, half the memory read per decode step at depth) for a
    rounding of K/V to 11 significant bits; int8 (llama.cpp's q8_0 in spirit) stores each head's K or V of a
    token as int8 with one fp32 scale, ~3.8x fewer bytes than fp32. Measured in BENCHMARKS.md (Long context)."""
    if name not in KV_DTYPES:
        raise TrainferError(f"unknown kv_dtype {name!r}: choose from {', '.join(KV_DTYPES)}")
    return {"auto": activations, "fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}[name]


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of one block, with an int8 pool's scales (one fp32 per token and KV head)."""
    per_head = cfg.head_dim * dtype.itemsize + (4 if dtype == torch.int8 else 0)
    return 2 * cfg.n_layers * block_size * cfg.n_kv_heads * per_head


def quantize_kv(x: Tensor) -> tuple[Tensor, Tensor]:
    """(..., hd) floats -> int8 (..., hd) and fp32 scales (...): scale = max |x| / 127, q = x / scale rounded to
    nearest even; the native step does the same IEEE operations on its rows (kernels.cpp kv_store)."""
    x = x.float()
    scale = x.abs().amax(-1) / 127.0
    q = torch.round(x / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).to(torch.int8)
    return q, scale


def dequantize_kv(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)


class BlockPool:
    """Owns the K/V tensors, every block's ref count, the free list and the prefix cache (hash -> block,
    LRU among unreferenced blocks). Sequences hold block tables that only these methods change."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        if num_blocks < 2:
            raise TrainferError(f"the KV cache needs at least 2 blocks, got {num_blocks}; raise --kv-cache-gb")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (cfg.n_layers, num_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)  # (L, slots, KV, hd)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # an int8 pool's scales, one per (layer, slot, KV head); None otherwise
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device)
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently used first; hashed ones stay findable until reused.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0  # of which found in the cache

    @property
    def nbytes(self) -> int:
        scales = 0 if self.k_scale is None else 2 * self.k_scale.numel() * 4
        return 2 * self.k.numel() * self.k.element_size() + scales

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

    def lookup(self, h: bytes) -> int | None:
        self.prefix_queries += 1
        block_id = self.cached.get(h)
        if block_id is not None:
            self.prefix_hits += 1
        return block_id

    def forget_prefixes(self) -> None:
        """Make every idle cached block unfindable (live blocks keep their hash): measurements that compare
        runs (test-time budgets) start each one from the same cold cache."""
        for block_id in self.free:
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None

    def register(self, block_id: int, h: bytes) -> None:
        """Make a full, computed block findable by its hash (the first block with a hash keeps it)."""
        block = self.blocks[block_id]
        if block.hash is None and h not in self.cached:
            block.hash = h
            self.cached[h] = block_id

    def copy(self, src: int, dst: int) -> None:
        """Copy-on-write for a forked sequence's partial last block."""
        b = self.block_size
        for t in (self.k, self.v, self.k_scale, self.v_scale):
            if t is not None:
                t[:, dst * b : (dst + 1) * b] = t[:, src * b : (src + 1) * b]

    # ---- a sequence's blocks ----
    def blocks_needed(self, seq: Sequence, n: int) -> int:
        """New blocks the sequence needs to hold n more computed tokens."""
        return max(0, -(-(seq.num_computed + n) // self.block_size) - len(seq.block_table))

    def grow(self, seq: Sequence, n: int) -> bool:
        """Give the sequence room for n more tokens, or nothing (False) if the pool lacks the blocks."""
        need = self.blocks_needed(seq, n)
        if need > self.num_free:
            return False
        seq.block_table.extend(self.allocate() for _ in range(need))
        return True

    def release_blocks(self, seq: Sequence) -> None:
        for block_id in seq.block_table:
            self.release(block_id)
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed = 0

    def reuse_prefix(self, seq: Sequence) -> None:
        """Take every cached block of the sequence's prefix; the last token is always recomputed."""
        b, parent = self.block_size, root_hash(seq)
        for i in range((seq.num_tokens - 1) // b):
            h = block_hash(parent, seq.token_ids[i * b : (i + 1) * b])
            block_id = self.lookup(h)
            if block_id is None:
                break
            self.acquire(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * b
        seq.cached_prompt_tokens = min(seq.num_computed, seq.prompt_len)

    def publish(self, seq: Sequence) -> None:
        """Register the sequence's blocks that became full and computed, so later prompts can reuse them."""
        b = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // b):
            parent = seq.block_hashes[-1] if seq.block_hashes else root_hash(seq)
            h = block_hash(parent, seq.token_ids[i * b : (i + 1) * b])
            self.register(seq.block_table[i], h)
            seq.block_hashes.append(h)

    def share(self, parent: Sequence, child: Sequence) -> bool:
        """Fork: the child shares the parent's full blocks and gets a copy of its partial last one.

        False (and no change) if the copy needs a block and none is free.
        """
        full = parent.num_computed // self.block_size
        partial = len(parent.block_table) > full
        if partial and not self.free:
            return False
        for block_id in parent.block_table[:full]:
            self.acquire(block_id)
        child.block_table = parent.block_table[:full]
        if partial:
            copy = self.allocate()
            self.copy(parent.block_table[full], copy)
            child.block_table.append(copy)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed = parent.num_computed
        child.cached_prompt_tokens = parent.cached_prompt_tokens
        return True

    def check_idle(self) -> None:
        """With no live sequence every block must be free: a leak check for tests and shutdown."""
        held = [b.id for b in self.blocks if b.ref_count]
        assert not held and len(self.free) == self.num_blocks, f"leaked blocks {held[:10]}"
