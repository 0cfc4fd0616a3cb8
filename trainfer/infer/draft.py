"""Draft-model speculation: a small model with the target's tokenizer guesses the next few tokens.

Each step, for the few sequences decoding (Engine.speculate_max_seqs), the draft first catches up on the tokens
the target checked since its last guesses (the whole context the first time, then 1 or 2 tokens), then makes
its guesses one forward at a time, every such sequence in the same forward; the target checks them all in one
forward of its own (engine.py, `_verify`). The draft keeps its K/V in its own block pool, in a mirror Sequence
per target sequence. A rejected guess's K/V is rolled back by moving the mirror's `num_computed` back to the
tokens both sides agree on; its blocks stay and are overwritten.

Guesses are drawn with the request's own settings (penalties, temperature, top-k/p/min-p) from the draft's
logits, so that its distribution q is close to the target's p, and q is kept for the rejection rule
(sampling.sample): sampled output is distributed as without speculation. A greedy request takes the draft's
argmax and keeps no q; its output is the target's argmax at every position, the same tokens as without.

How many guesses adapts per sequence (the heuristic of Hugging Face's assisted generation, by one step either
way): one more after a check that kept every guess, one fewer after one that rejected a guess, within
[1, num_draft_tokens]. It settles where about half the checks keep everything: long guesses where the draft
agrees with the target, short ones where it does not.

A draft that is wrong too often costs more than it saves: a check of one guess costs a draft forward (about the
draft's share `cost` of the target's matmul parameters, decode being memory-bound) and an extra row in the
target's forward (ROW_COST), and gains a token only when the guess is kept. So each mirror keeps a running
acceptance rate, and below `cost + ROW_COST` the sequence decodes without guesses for PAUSE steps, then tries one
guess again; each pause is twice as long as the one before (to MAX_PAUSE) until the rate is well above the bar
(measured: a draft keeping about a quarter of its guesses ran chat at 0.75x plain decoding without pauses,
docs/LOG.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainfer.infer.kv_cache import BlockPool
from trainfer.infer.runner import ModelRunner
from trainfer.infer.sampling import apply_penalties, probabilities
from trainfer.infer.sequence import Sequence
from trainfer.model.transformer import Transformer

DRAFT_SEED_SALT = 0x5EED_D4AF7  # the draft's draws use a generator apart from the target's acceptance coins
ROW_COST = 0.15  # one more row in an int8 SmolLM2 decode step, as a share of the step (docs/LOG.md)
PAUSE, MAX_PAUSE = 32, 512  # decode steps without guesses after the running acceptance falls below break-even
RATE_WEIGHT = 0.3  # the newest check's share of the running acceptance rate


@dataclass
class Mirror:
    """The draft's copy of one target sequence: its tokens (the target's, then the draft's guesses), its
    blocks in the draft pool, its own generator, and how many guesses to make next."""

    seq: Sequence
    generator: torch.Generator
    k: int
    checked: int = 0  # the target's token count when the last guesses were made: before it both agree
    rate: float = 1.0  # running share of guesses kept (new mirrors start trusting the draft)
    pause: int = 0  # steps left without guesses
    backoff: int = PAUSE  # the next pause's length


class DraftModel:
    """Owns a draft Transformer, its block pool and runner, and one Mirror per target sequence it has guessed
    for. The engine calls `propose` before scheduling, `checked` after each verification, and `forget` when a
    sequence ends."""

    def __init__(
        self,
        model: Transformer,
        num_draft_tokens: int,
        max_seqs: int,
        max_len: int,
        block_size: int,
        dtype,
        cost: float = 0.0,
    ) -> None:
        """cost: a draft forward's time as a share of the target's (Engine passes the ratio of their matmul
        parameters); with ROW_COST it sets the acceptance rate below which guessing pauses."""
        self.model, self.num_draft_tokens = model, num_draft_tokens
        self.min_rate = min(0.9, cost + ROW_COST)
        self.max_len = min(max_len, model.cfg.max_seq_len)  # the draft guesses while the context fits its own
        per_seq = -(-(self.max_len + num_draft_tokens) // block_size)
        device = model.embed_tokens.weight.device
        self.pool = BlockPool(model.cfg, max(2, max_seqs * per_seq), block_size, dtype, device)
        self.runner = ModelRunner(model, self.pool)
        self.mirrors: dict[int, Mirror] = {}
        self.failures = 0  # draft forwards that raised: those steps went on without guesses

    def propose(self, items: list[tuple[Sequence, int]]) -> None:
        """Append guesses to each sequence (token_ids, drafts, draft_probs), at most `room` for each; a sequence
        the draft cannot serve (context past the draft's, no blocks) gets none. A draft that fails costs its
        guesses, never the target's request."""
        work = []
        wanted = {seq.seq_id for seq, _ in items}
        for seq, room in items:
            mirror = self._sync(seq)
            if mirror.pause > 0:
                mirror.pause -= 1
                continue
            k = min(room, mirror.k)
            if k < 1 or seq.num_tokens + k > self.max_len or not self._grow(mirror.seq, k, wanted):
                continue
            mirror.checked = seq.num_tokens
            work.append((seq, mirror, k))
        try:
            self._guess(work)
        except Exception:  # a broken draft: drop what it guessed this step and go on without it
            self.failures += 1
            for seq, _, _ in work:
                seq.drop_drafts()
                self.forget(seq.seq_id)

    def _guess(self, work: list[tuple[Sequence, Mirror, int]]) -> None:
        """One draft forward per guess, the sequences still guessing batched together."""
        while work:
            batch = [(m.seq, m.seq.remaining) for _, m, _ in work]
            rows, row = [], 0
            for s, n in batch:
                row += n
                rows.append(row - 1)
                s.drafts = n - 1  # a short tail takes the native step, as a target's guesses do (causal rows)
            try:
                logits = self.runner.run(batch, rows)
            finally:
                for s, _ in batch:
                    s.drafts = 0
            for (seq, mirror, _), (s, n), row_logits in zip(work, batch, logits, strict=True):
                s.num_computed += n
                token, q = self._draw(seq, mirror, row_logits)
                s.token_ids.append(token)
                seq.token_ids.append(token)
                seq.drafts += 1
                if q is not None:
                    seq.draft_probs.append(q)
            work = [w for w in work if w[0].drafts < w[2]]

    @staticmethod
    def _draw(seq: Sequence, mirror: Mirror, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """The draft's guess with the request's settings, and q for the rejection rule (None when greedy)."""
        p = seq.params
        if p.uses_penalties:  # the guesses so far are in token_ids, as the target will see them
            logits = apply_penalties(logits, p, torch.tensor(seq.token_ids), torch.tensor(seq.output_ids))
        if p.greedy:
            return int(logits.argmax()), None
        q = probabilities(logits, p)
        return int(torch.multinomial(q, 1, generator=mirror.generator)), q

    def _sync(self, seq: Sequence) -> Mirror:
        """The sequence's mirror, its tokens made the target's: the guesses the target kept stay computed, the
        K/V after the first rejected one is dropped (num_computed moves back)."""
        mirror = self.mirrors.get(seq.seq_id)
        if mirror is None:
            ids = list(seq.token_ids)
            copy = Sequence(seq.seq_id, seq.request_id, ids, seq.prompt_len, seq.params, seq.generator, 1)
            gen = torch.Generator().manual_seed(seq.generator.initial_seed() ^ DRAFT_SEED_SALT)
            mirror = self.mirrors[seq.seq_id] = Mirror(copy, gen, self.num_draft_tokens)
            return mirror
        mine, theirs = mirror.seq.token_ids, seq.token_ids
        same, end = mirror.checked, min(len(mine), len(theirs))
        while same < end and mine[same] == theirs[same]:
            same += 1
        del mine[same:]
        mine += theirs[same:]
        mirror.seq.num_computed = min(mirror.seq.num_computed, same)
        return mirror

    def _grow(self, s: Sequence, k: int, wanted: set[int]) -> bool:
        """Blocks for the catch-up and k - 1 guesses (the last guess is not run through the draft); when the
        pool is short, mirrors of sequences not guessing this step give theirs back first."""
        n = s.remaining + k - 1
        if self.pool.grow(s, n):
            return True
        for seq_id in [i for i in self.mirrors if i not in wanted]:
            self.forget(seq_id)
        return self.pool.grow(s, n)

    def checked(self, seq: Sequence, kept: int, guessed: int) -> None:
        """After the target's check: adapt the sequence's next number of guesses, or pause them."""
        mirror = self.mirrors.get(seq.seq_id)
        if mirror is None or not guessed:
            return
        mirror.k = min(self.num_draft_tokens, mirror.k + 1) if kept == guessed else max(1, mirror.k - 1)
        mirror.rate += RATE_WEIGHT * (kept / guessed - mirror.rate)
        if mirror.rate >= (1 + self.min_rate) / 2:  # doing well again (a lucky probe alone does not reset it)
            mirror.backoff = PAUSE
        elif mirror.rate < self.min_rate:  # one guess after the pause; kept, it lifts the rate past the bar again
            mirror.pause, mirror.k, mirror.rate = mirror.backoff, 1, self.min_rate
            mirror.backoff = min(MAX_PAUSE, 2 * mirror.backoff)

    def forget(self, seq_id: int) -> None:
        mirror = self.mirrors.pop(seq_id, None)
        if mirror is not None:
            self.pool.release_blocks(mirror.seq)

    def retain(self, seq_ids: set[int]) -> None:
        """Free the mirrors of sequences that no longer run (finished, aborted or preempted)."""
        for seq_id in [i for i in self.mirrors if i not in seq_ids]:
            self.forget(seq_id)
