"""The model runner: one forward over a flattened batch of prompt chunks and decode tokens.

The attention context writes each new token's K/V into its slot of the paged pool, then attends:
all decoding sequences in one batched call, each prompt chunk on its own (docs/engine.md).
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainfer.infer import native_decode
from trainfer.infer.kv_cache import BlockPool, dequantize_kv, quantize_kv
from trainfer.infer.sequence import Sequence
from trainfer.model import lora
from trainfer.model.transformer import Transformer
from trainfer.quant.blocks import bf16_products


def slots(seq: Sequence, start: int, end: int, block_size: int) -> list[int]:
    """Pool slots of token positions [start, end) of a sequence."""
    table = seq.block_table
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


@dataclass
class PrefillChunk:
    rows: slice  # rows of the flattened batch
    blocks: Tensor  # (nb,) the sequence's blocks covering positions [0, end)
    end: int  # keys attended: positions [0, end)
    start: int  # tokens already cached before this chunk


class PagedAttention:
    """AttentionContext for the engine (see model.transformer.AttentionContext)."""

    def __init__(
        self,
        pool: BlockPool,
        write_slots: Tensor,
        decode_rows: Tensor,
        decode_blocks: Tensor,
        decode_mask: Tensor,
        chunks: list[PrefillChunk],
    ) -> None:
        self.pool = pool
        self.write_slots = write_slots  # (T,)
        self.decode_rows = decode_rows  # (D,)
        self.decode_blocks = decode_blocks  # (D, nb) block tables padded with block 0
        self.decode_mask = decode_mask  # (D, 1, 1, nb * block_size) True where a real key
        self.chunks = chunks

    def _gather(self, pool: tuple[Tensor, Tensor | None], blocks: Tensor, dtype: torch.dtype) -> Tensor:
        """Keys or values (with an int8 pool's scales) of whole blocks, (..., nb) -> (..., nb * block_size, KV, hd)
        in `dtype` (the queries'): block-sized copies."""
        b = self.pool.block_size
        values, scales = pool
        out = values.view(-1, b, *values.shape[1:]).index_select(0, blocks.reshape(-1))  # (N * nb, b, KV, hd)
        if scales is None:
            out = out.to(dtype)
        else:
            out = dequantize_kv(out, scales.view(-1, b, scales.shape[-1]).index_select(0, blocks.reshape(-1)), dtype)
        return out.view(*blocks.shape[:-1], blocks.shape[-1] * b, *values.shape[1:])

    def _write(self, values: Tensor, scales: Tensor | None, new: Tensor) -> None:
        """New K or V rows (T, KV, hd) into their slots, rounded to the pool's type (fp16, or int8 with scales)."""
        if scales is None:
            values.index_copy_(0, self.write_slots, new.to(values.dtype))
            return
        q, s = quantize_kv(new)
        values.index_copy_(0, self.write_slots, q)
        scales.index_copy_(0, self.write_slots, s)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        p = self.pool
        kp = (p.k[layer], None if p.k_scale is None else p.k_scale[layer])  # (slots, KV, hd), (slots, KV)
        vp = (p.v[layer], None if p.v_scale is None else p.v_scale[layer])
        self._write(*kp, k[0])
        self._write(*vp, v[0])
        q = q[0]  # (T, H, hd)
        out = torch.empty_like(q)
        if self.decode_rows.numel():
            qd = q[self.decode_rows].unsqueeze(2)  # (D, H, 1, hd)
            kd = self._gather(kp, self.decode_blocks, q.dtype).transpose(1, 2)  # (D, KV, S, hd)
            vd = self._gather(vp, self.decode_blocks, q.dtype).transpose(1, 2)
            y = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode_mask, enable_gqa=True)
            out[self.decode_rows] = y.squeeze(2)
        for c in self.chunks:
            qc = q[c.rows].transpose(0, 1).unsqueeze(0)  # (1, H, n, hd)
            kc = self._gather(kp, c.blocks, q.dtype)[: c.end].transpose(0, 1).unsqueeze(0)  # (1, KV, end, hd)
            vc = self._gather(vp, c.blocks, q.dtype)[: c.end].transpose(0, 1).unsqueeze(0)
            n, end = qc.shape[2], c.end
            mask = None
            if c.start > 0:  # query i sees keys up to start + i
                mask = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(diagonal=c.start)
            y = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, is_causal=c.start == 0, enable_gqa=True)
            out[c.rows] = y[0].transpose(0, 1)
        return out.unsqueeze(0)


def native_groups(batch: list[tuple[Sequence, int]], decoding: list[int]) -> list[list[int]]:
    """The decoding sequences (indices into batch) in groups of at most MAX_ROWS rows, a sequence's guesses kept
    with it: one native step per group. At 64 int8 streams of 256 tokens, one step per 16 rows decoded 1.58x the
    tokens/s of the module path over all of them (1.25x for 64 tokens; docs/LOG.md)."""
    groups: list[list[int]] = [[]]
    rows = 0
    for i in decoding:
        n = batch[i][1]
        if groups[-1] and rows + n > native_decode.MAX_ROWS:
            groups.append([])
            rows = 0
        groups[-1].append(i)
        rows += n
    return groups


class ModelRunner:
    """Owns the forward over a flattened batch: slot mapping, attention over the paged pool, the native decode
    step and the LoRA routing of each forward (passed with the call, model/lora.routed). It never changes the
    model it is handed: a loader that owns its model prepares it beforehand (native_decode.prepare)."""

    def __init__(self, model: Transformer, pool: BlockPool) -> None:
        self.model, self.pool = model, pool
        self.device = model.embed_tokens.weight.device
        self.decoder = native_decode.build_decoder(model)
        self._rope: tuple[Tensor, Tensor] | None = None  # cos / sin rows by position, for the native step

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], sample_rows: list[int]) -> Tensor:
        """Forward the batch; return logits (len(sample_rows), vocab) in fp32 for the rows to sample.

        With the native Decoder, decoding sequences (one token each, or their last token and its speculative
        guesses) take the native step, MAX_ROWS rows per call, and the rest of the batch (prefill chunks) the
        module path: a new arrival's prefill does not move every running sequence to the slower path for that
        step. The native step writes every row's K/V before any row attends, so the rows of one sequence's
        guesses see each other causally, with the same arithmetic as decoding them one by one."""
        # the native step has no LoRA: a sequence with an adapter takes the module path; nor does a one-token
        # prompt chunk that samples nothing (the native step needs a row to sample), nor a draft's catch-up of
        # more than MAX_ROWS tokens (draft.py runs a catch-up as guesses)
        sampled, ends = set(sample_rows), list(itertools.accumulate(n for _, n in batch))
        decoding = [
            i
            for i, (seq, n) in enumerate(batch)
            if n == 1 + seq.drafts and n <= native_decode.MAX_ROWS and seq.num_computed > 0 and seq.adapter is None
            and ends[i] - 1 in sampled
        ]  # fmt: skip
        if self.decoder is None or not decoding:
            return self._module(batch, sample_rows)
        groups = native_groups(batch, decoding)
        if len(groups) == 1 and len(decoding) == len(batch):
            return self._native_decode(batch, sample_rows)
        return self._split(batch, sample_rows, groups)

    def _split(self, batch: list[tuple[Sequence, int]], sample_rows: list[int], groups: list[list[int]]) -> Tensor:
        """Each group of decoding sequences through one native step, the others through the module path,
        logits in order."""
        part_of = {i: g + 1 for g, group in enumerate(groups) for i in group}  # part 0: the module path
        where: list[tuple[int, int]] = []  # per flattened row: (its part, its row in that part)
        counts = [0] * (len(groups) + 1)
        for i, (_, n) in enumerate(batch):
            part = part_of.get(i, 0)
            where += [(part, counts[part] + j) for j in range(n)]
            counts[part] += n
        rows: list[list[int]] = [[] for _ in counts]
        for r in sample_rows:
            rows[where[r][0]].append(where[r][1])
        rest = [item for i, item in enumerate(batch) if i not in part_of]
        # the module path runs even without rows to sample: it writes K/V
        parts = [iter(self._module(rest, rows[0]) if rest else ())]
        parts += [iter(self._native_decode([batch[i] for i in group], rows[g + 1])) for g, group in enumerate(groups)]
        return torch.stack([next(parts[where[r][0]]) for r in sample_rows])

    def _module(self, batch: list[tuple[Sequence, int]], sample_rows: list[int]) -> Tensor:
        """The model's modules over the flattened batch (prefill chunks and decode tokens together)."""
        b = self.pool.block_size
        tokens, positions, write = [], [], []
        decode_rows, decode_seqs, chunks = [], [], []
        row = 0
        for seq, n in batch:
            start = seq.num_computed
            tokens.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            write.extend(slots(seq, start, start + n, b))
            if n == 1 and start > 0:
                decode_rows.append(row)
                decode_seqs.append(seq)
            else:
                end = start + n
                blocks = torch.tensor(seq.block_table[: -(-end // b)], device=self.device)
                chunks.append(PrefillChunk(slice(row, row + n), blocks, end, start))
            row += n
        nb = max((-(-(s.num_computed + 1) // b) for s in decode_seqs), default=0)
        decode_blocks = torch.zeros(len(decode_seqs), nb, dtype=torch.long)
        decode_mask = torch.zeros(len(decode_seqs), 1, 1, nb * b, dtype=torch.bool)
        for i, seq in enumerate(decode_seqs):
            length = seq.num_computed + 1
            table = seq.block_table[: -(-length // b)]
            decode_blocks[i, : len(table)] = torch.tensor(table)
            decode_mask[i, ..., :length] = True
        ctx = PagedAttention(
            self.pool,
            torch.tensor(write, device=self.device),
            torch.tensor(decode_rows, dtype=torch.long, device=self.device),
            decode_blocks.to(self.device),
            decode_mask.to(self.device),
            chunks,
        )
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        with lora.routed(self._routing(batch)) if self.adapters else contextlib.nullcontext():
            hidden = self.model.hidden_states(ids, pos, ctx)[0, sample_rows]  # (R, dim)
        return self.model.lm_head(hidden).float()

    @property
    def adapters(self) -> set[str]:
        """Names of the LoRA adapters loaded on the model (model/lora.py's LoRALinear modules), read each time:
        adapters may be added after the engine is built."""
        return {name for m in lora.lora_modules(self.model).values() for name in m.lora_A}

    def _routing(self, batch: list[tuple[Sequence, int]]) -> dict[str, Tensor]:
        """Which flattened rows run with which adapter (the rest: the base alone)."""
        rows: dict[str, list[int]] = {}
        row = 0
        for seq, n in batch:
            if seq.adapter is not None:
                rows.setdefault(seq.adapter, []).extend(range(row, row + n))
            row += n
        return {name: torch.tensor(r, device=self.device) for name, r in rows.items()}

    def _native_decode(self, items: list[tuple[Sequence, int]], sample_rows: list[int]) -> Tensor:
        """The next n tokens of each sequence, one row each, through the native Decoder (native_decode.py), same
        pool, same math.

        Everything here is per token, so it is kept to a few tensor constructions: at int8 a step is ~4 ms, and
        building its inputs from small ops took ~0.11 ms (now ~0.07; docs/LOG.md)."""
        b = self.pool.block_size
        seqs = [s for s, n in items for _ in range(n)]  # a sequence's row j holds its token num_computed + j
        lengths = [s.num_computed + 1 + j for s, n in items for j in range(n)]
        used = [-(-n // b) for n in lengths]  # blocks holding each row's keys
        nb = max(used)
        tables = torch.tensor([s.block_table[:u] + [0] * (nb - u) for s, u in zip(seqs, used, strict=True)])
        lens = torch.tensor(lengths)
        cos, sin = self._rope_rows(lens - 1)
        tokens = torch.tensor([s.token_ids[n - 1] for s, n in zip(seqs, lengths, strict=True)])
        # Guesses are checked with the products a lone decode step uses (fp32 up to 4 rows, bf16 beyond where
        # allowed): bf16 would change the arithmetic, and with it a greedy choice between two near-equal tokens.
        bf16 = bf16_products() and not any(s.drafts for s, _ in items)
        return self.decoder.step(
            tokens, cos, sin, self.pool.k, self.pool.v, self.pool.k_scale, self.pool.v_scale, tables, lens, b,
            torch.tensor(sample_rows, dtype=torch.long), bf16,
        )  # fmt: skip

    def _rope_rows(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE's cos and signed sin (D, hd) at `positions`, rows of a table grown by doubling (the model's own
        rope() over all positions so far, so the same values as computing them per step)."""
        top = int(positions.max()) + 1
        if self._rope is None or top > self._rope[0].shape[0]:
            n = max(top, 1024, 2 * (0 if self._rope is None else self._rope[0].shape[0]))
            cos, sin = self.model.rope(torch.arange(n)[None], torch.float32)  # (1, n, 1, hd)
            self._rope = cos.reshape(n, -1), sin.reshape(n, -1)
        return self._rope[0][positions], self._rope[1][positions]
