"""The continuous-batching engine: requests in, token events out, one model forward per step.

    engine = Engine(model, stop_token_ids=tokenizer.stop_token_ids, output=TextOutput(tokenizer))
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished(): events = engine.step()

The engine works on token ids. Text (incremental detokenization, stop strings) is the job of an output
processor handed to it (`infer/text.TextOutput`); without one, events carry ids only, which is all that
evaluation, the fine-tuner's replay and the benchmarks need. `run` and `stream` are the one way to drive
it synchronously; `infer/async_engine.AsyncEngine` steps the same loop on an asyncio loop for the HTTP server
(docs/engine.md).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from trainfer.errors import TrainferError
from trainfer.infer.draft import DraftModel
from trainfer.infer.kv_cache import BlockPool, bytes_per_block, kv_cache_dtype
from trainfer.infer.runner import ModelRunner
from trainfer.infer.sampling import SamplingParams, apply_penalties, batch_logprobs, sample, top_logprobs
from trainfer.infer.scheduler import Scheduler
from trainfer.infer.sequence import Sequence, Status, TopLogprobs
from trainfer.infer.speculate import DRAFTS, MAX_DRAFT_TOKENS, ngram_draft
from trainfer.model.transformer import Transformer


@dataclass
class TokenEvent:
    """One generated token of one sample, the text it released, and the finish reason on the last one."""

    request_id: str
    index: int  # which of the request's n samples
    token_id: int  # -1 on an "error" event, which carries no token
    text: str  # the text this token released; "" without an output processor
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" on a sample's last event
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the prefix cache
    error: str | None = None  # why the sample failed (finish_reason "error"); other samples go on
    prompt_logprobs: list[tuple[float, TopLogprobs]] | None = None  # on a sample's first event, if asked
    time: float = field(default_factory=time.perf_counter)  # when the step produced it


class ContextLengthError(TrainferError):
    """The prompt plus the requested completion do not fit the context (the server answers 400)."""

    def __init__(self, prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
        wanted = prompt_tokens + (max_tokens or 1)
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested {wanted} "
            f"tokens ({prompt_tokens} in the prompt, {max_tokens or 1} in the completion). "
            "Please reduce the length of the prompt or of max_tokens."
        )
        self.prompt_tokens, self.max_tokens, self.max_model_len = prompt_tokens, max_tokens, max_model_len


class ForwardError(Exception):
    """The model forward raised; no sequence state had changed yet, so the step can be retried."""


class Output(Protocol):
    """What the engine asks of an output processor (infer/text.TextOutput): per sample, keyed by its sequence
    id, the text each sampled token releases and whether a stop string ended it."""

    def start(self, key: int, params: SamplingParams) -> None: ...

    def token(self, key: int, token_id: int, finish_reason: str | None) -> tuple[str, str | None]: ...

    def end(self, key: int) -> None: ...


class Engine:
    """Owns the requests in flight and their sequences, the KV block pool, the scheduler and the runner:
    `add_request`, then `step` until nothing is unfinished, each step one forward and one token per sequence
    at its end. It knows token ids only (text is the output processor's), never blocks on I/O and knows
    nothing of HTTP.

    stop_token_ids: the model's end-of-turn ids (a tokenizer's `stop_token_ids`), unless `ignore_eos`.
    output: turns each sample's ids into text and finds stop strings; None gives events without text.
    max_model_len: a cap on prompt + completion below what the model and the pool allow (serve --max-model-len).
    kv_dtype: the KV cache's element type (kv_cache.KV_DTYPES); "auto" is the model's activations' type.
    draft: "ngram" guesses up to `num_draft_tokens` next tokens from the text so far (infer/speculate.py), a
    Transformer with the same vocabulary guesses them with a small model (infer/draft.py; fewer where it
    guessed wrong, none for a while where it is wrong too often to pay), for sequences decoding while at most
    `speculate_max_seqs` do (more streams fill the step's compute already); the model checks the guesses in
    one forward. Greedy output is the same tokens as without; sampled output keeps its distribution
    (sampling.sample's rejection rule), though not the same draws for a seed. Three guesses at most by
    default: the native step's cost grows slowly up to 4 rows, then jumps (docs/engine.md).
    """

    def __init__(
        self,
        model: Transformer,
        *,
        stop_token_ids: Iterable[int] = (),
        output: Output | None = None,
        kv_cache_gb: float = 1.0,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_model_len: int | None = None,
        kv_dtype: str = "auto",
        draft: str | Transformer | None = None,
        num_draft_tokens: int = 3,
        speculate_max_seqs: int = 2,
    ) -> None:
        if draft is not None and not isinstance(draft, Transformer) and draft not in DRAFTS:
            raise TrainferError(f"unknown draft {draft!r}: choose from {', '.join(DRAFTS)}, or a draft model")
        if isinstance(draft, Transformer) and draft.cfg.vocab_size != model.cfg.vocab_size:
            raise TrainferError(
                f"the draft model's vocabulary has {draft.cfg.vocab_size} tokens, the model's "
                f"{model.cfg.vocab_size}: a draft must share the model's tokenizer"
            )
        if not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise TrainferError(f"num_draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], got {num_draft_tokens}")
        self.draft, self.num_draft_tokens, self.speculate_max_seqs = draft, num_draft_tokens, speculate_max_seqs
        self.draft_tokens = self.accepted_tokens = self.verify_forwards = 0  # speculation's counters
        # per guess position (the 1st guess of a check, the 2nd, ...): how many were made and how many kept
        self.guessed_at, self.kept_at = [0] * num_draft_tokens, [0] * num_draft_tokens
        self.model, self.stop_token_ids, self.output = model, set(stop_token_ids), output
        self.context_limit = max_model_len  # a user's cap below the model's own context (serve --max-model-len)
        device = model.embed_tokens.weight.device
        dtype = kv_cache_dtype(kv_dtype, model.embed_tokens.weight.dtype)
        if num_blocks is None:
            num_blocks = int(kv_cache_gb * (1 << 30)) // bytes_per_block(model.cfg, block_size, dtype)
        self.pool = BlockPool(model.cfg, num_blocks, block_size, dtype, device)
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, self.pool)
        self.drafter = None
        if isinstance(draft, Transformer):
            limit = self.max_model_len
            cost = draft.cfg.matmul_params / model.cfg.matmul_params
            self.drafter = DraftModel(draft, num_draft_tokens, speculate_max_seqs, limit, block_size, dtype, cost)
        self.requests: dict[str, list[Sequence]] = {}
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        """Tokens a sequence may hold: the model's context, the pool's size and the user's cap, the least."""
        limit = min(self.model.cfg.max_seq_len, self.pool.num_blocks * self.pool.block_size)
        return limit if self.context_limit is None else min(limit, self.context_limit)

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> None:
        """Queue a request; the one place that checks it fits the context (ContextLengthError if not).

        adapter: the name of a LoRA adapter loaded next to the base (LLM.load(..., adapters=...)), or None."""
        if adapter is not None and adapter not in self.runner.adapters:
            raise TrainferError(f"no adapter {adapter!r} is loaded; loaded: {sorted(self.runner.adapters) or 'none'}")
        if request_id in self.requests:
            raise TrainferError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise TrainferError("the prompt is empty: give at least one token")
        room = self.max_model_len - len(prompt_ids)
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            raise ContextLengthError(len(prompt_ids), params.max_tokens, self.max_model_len)
        seq = self._new_sequence(request_id, list(prompt_ids), len(prompt_ids), params, 0)
        seq.adapter = adapter
        self.requests[request_id] = [seq]
        self.scheduler.add(seq)

    def _new_sequence(self, request_id: str, ids: list[int], prompt_len: int, params: SamplingParams, index: int):
        budget = params.max_tokens or self.max_model_len - prompt_len
        seq = Sequence(
            next(self._ids), request_id, ids, prompt_len, params, params.generator(index), budget, index=index
        )
        if self.output is not None:
            self.output.start(seq.seq_id, params)
        return seq

    def abort(self, request_id: str) -> None:
        for seq in self.requests.pop(request_id, []):
            if seq.status != Status.FINISHED:
                self.scheduler.finish(seq, "abort")
            if self.drafter is not None:
                self.drafter.forget(seq.seq_id)
            if self.output is not None:
                self.output.end(seq.seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[TokenEvent]:
        """One forward over what the scheduler picked, then a token for every sequence at its end.

        A failure is contained to its sequence: a sampling error fails that sample; a forward that raises
        is retried one sequence at a time, so only the sequence that cannot run fails.
        """
        if self.draft is not None:
            self._propose()
        batch = self.scheduler.schedule()
        events = [self._fail(seq, "the KV cache cannot hold this sequence") for seq in self.scheduler.failed]
        self.scheduler.failed.clear()
        if not batch:
            return events
        try:
            return events + self._forward(batch)
        except ForwardError as e:  # nothing was committed: retry each sequence alone to find the culprit
            if len(batch) == 1:
                return [*events, self._fail(batch[0][0], str(e))]
        for item in batch:
            try:
                events += self._forward([item])
            except ForwardError as e:
                events.append(self._fail(item[0], str(e)))
        return events

    def _forward(self, batch: list[tuple[Sequence, int]]) -> list[TokenEvent]:
        rows: list[int] = []  # batch rows whose logits are needed
        prompt_rows: list[tuple[Sequence, int, int]] = []  # (seq, first row, count) scored for prompt logprobs
        to_sample: list[tuple[Sequence, int]] = []  # (seq, its row in the logits)
        row = 0
        for seq, n in batch:
            start = seq.num_computed
            if seq.wants_prompt_logprobs:  # positions p predict prompt token p + 1
                first = max(start, len(seq.prompt_logprobs))
                last = min(start + n, seq.prompt_len - 1)
                if last > first:
                    prompt_rows.append((seq, len(rows), last - first))
                    rows.extend(range(row + first - start, row + last - start))
            row += n
            if start + n == seq.num_tokens:  # the chunk reaches the end: sample after it (after each guess)
                to_sample.append((seq, len(rows)))
                rows.extend(range(row - 1 - seq.drafts, row))
        try:
            logits = self.runner.run(batch, rows)
        except Exception as e:
            raise ForwardError(f"{type(e).__name__}: {e}") from e
        for seq, n in batch:
            self.scheduler.computed(seq, n - seq.drafts)  # guesses count once checked (_verify)
        for seq, at, count in prompt_rows:
            done = len(seq.prompt_logprobs)
            targets = seq.token_ids[done + 1 : done + 1 + count]
            seq.prompt_logprobs += batch_logprobs(logits[at : at + count], targets, seq.params.prompt_logprobs or 0)
        events = []
        for seq, at in to_sample:
            if seq.drafts:
                events += self._verify(seq, logits[at : at + seq.drafts + 1])
                continue
            row_logits = logits[at]
            family = [seq]
            if seq.params.n > 1 and not seq.forked and not seq.output_ids:
                children = self._fork(seq)
                family += [c for c in children if c.status == Status.RUNNING]
            for s in family:
                try:
                    events.append(self._sample(s, row_logits))
                except Exception as e:
                    events.append(self._fail(s, f"{type(e).__name__}: {e}"))
        return events

    def _propose(self) -> None:
        """Append guesses to the sequences about to decode, while few enough decode that a wider forward is
        nearly free (a decode step streams every weight once for one token a sequence)."""
        if self.drafter is not None:
            self.drafter.retain({s.seq_id for s in self.scheduler.running})
        decoding = [s for s in self.scheduler.running if s.remaining == 1 and s.output_ids]
        if len(decoding) > self.speculate_max_seqs:
            return
        # room: the model adds a token of its own after the guesses
        rooms = [(seq, min(self.num_draft_tokens, seq.max_tokens - len(seq.output_ids) - 1)) for seq in decoding]
        if self.drafter is not None:
            self.drafter.propose([(seq, room) for seq, room in rooms if room > 0])
            return
        for seq, room in rooms:
            guesses = ngram_draft(seq.token_ids, room) if room > 0 else []
            seq.token_ids += guesses
            seq.drafts = len(guesses)

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> list[TokenEvent]:
        """The model's tokens after each guess (rows of `logits`): keep guesses while the model agrees, then
        its own token; the K/V written for the guesses after the first disagreement are overwritten later."""
        probs = seq.draft_probs
        guesses = seq.drop_drafts()
        self.draft_tokens += len(guesses)
        self.verify_forwards += 1
        events, kept = [], 0
        for i, row in enumerate(logits):
            guess = guesses[i] if i < len(guesses) else None
            try:
                event = self._sample(seq, row, guess, probs[i] if i < len(probs) else None)
            except Exception as e:
                events.append(self._fail(seq, f"{type(e).__name__}: {e}"))
                break
            events.append(event)
            if guess is None or event.token_id != guess or event.finish_reason:
                break
            kept += 1
            self.scheduler.computed(seq, 1)  # the guess's K/V, written by this forward, is the right one
        self.accepted_tokens += kept
        for i in range(len(guesses)):
            self.guessed_at[i] += 1
            self.kept_at[i] += i < kept
        if self.drafter is not None:
            self.drafter.checked(seq, kept, len(guesses))
        return events

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The other n-1 samples: they share the parent's computed prompt blocks where they can."""
        parent.forked = True
        children = []
        for i in range(1, parent.params.n):
            child = self._new_sequence(parent.request_id, list(parent.token_ids), parent.prompt_len, parent.params, i)
            child.forked, child.adapter = True, parent.adapter
            child.prompt_logprobs = list(parent.prompt_logprobs)
            self.requests[parent.request_id].append(child)
            children.append(child)
        self.scheduler.fork(parent, children)
        return children

    def _sample(
        self, seq: Sequence, logits: torch.Tensor, draft: int | None = None, draft_probs: torch.Tensor | None = None
    ) -> TokenEvent:
        p = seq.params
        processed = logits
        if p.uses_penalties:
            processed = apply_penalties(logits, p, torch.tensor(seq.token_ids), torch.tensor(seq.output_ids))
        token = sample(processed, p, seq.generator, draft, draft_probs)
        event = TokenEvent(
            seq.request_id,
            seq.index,
            token,
            "",
            prompt_tokens=seq.prompt_len,
            cached_prompt_tokens=seq.cached_prompt_tokens,
        )
        if p.logprobs is not None:
            event.logprob, event.top_logprobs = top_logprobs(logits, token, p.logprobs)
        if p.prompt_logprobs is not None and not seq.output_ids:
            event.prompt_logprobs = seq.prompt_logprobs
        seq.token_ids.append(token)
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.stop_token_ids):
            event.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.max_tokens:
            event.finish_reason = "length"
        if self.output is not None:  # the text, and a stop string may end the sample here
            event.text, event.finish_reason = self.output.token(seq.seq_id, token, event.finish_reason)
        if event.finish_reason:
            self._finish(seq, event.finish_reason)
        return event

    def _fail(self, seq: Sequence, message: str) -> TokenEvent:
        """Finish one sample with an error event; the rest of the batch is untouched."""
        self._finish(seq, "error")
        return TokenEvent(seq.request_id, seq.index, -1, "", "error", prompt_tokens=seq.prompt_len, error=message)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status != Status.FINISHED:
            self.scheduler.finish(seq, reason)
        if self.drafter is not None:
            self.drafter.forget(seq.seq_id)
        if self.output is not None:
            self.output.end(seq.seq_id)
        family = self.requests.get(seq.request_id, [])
        if all(s.status == Status.FINISHED for s in family):
            self.requests.pop(seq.request_id, None)

    # ---- synchronous helpers ----
    def run(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        adapters: list[str | None] | None = None,
    ) -> list[list[list[TokenEvent]]]:
        """Run prompts together to completion: per prompt, per sample, its events. One `params` for all or
        one per prompt; `adapters`, one LoRA adapter name (or None) per prompt. What is left is aborted if
        the caller is interrupted."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"batch-{next(self._ids)}" for _ in prompts]
        results = {rid: [[] for _ in range(p.n)] for rid, p in zip(ids, per_prompt, strict=True)}
        try:
            for rid, prompt, p, adapter in zip(
                ids, prompts, per_prompt, adapters or [None] * len(prompts), strict=True
            ):
                self.add_request(rid, prompt, p, adapter)
            while any(rid in self.requests for rid in ids):
                for e in self.step():
                    results[e.request_id][e.index].append(e)
        finally:
            for rid in ids:
                self.abort(rid)
        return [results[rid] for rid in ids]

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        rid = f"stream-{next(self._ids)}"
        self.add_request(rid, prompt, params)
        try:
            while rid in self.requests:
                yield from (e for e in self.step() if e.request_id == rid)
        finally:
            self.abort(rid)

    def kept_by_position(self) -> list[float | None]:
        """The share of guesses kept at each position of a check (None where none was made yet)."""
        return [k / g if g else None for k, g in zip(self.kept_at, self.guessed_at, strict=True)]

    def stats(self) -> dict[str, float]:
        pool = self.pool
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_cache_usage": pool.usage,
            "kv_cache_blocks": pool.num_blocks,
            "kv_cache_tokens": pool.num_blocks * pool.block_size,
            "kv_cache_bytes": pool.nbytes,
            "prefix_cache_hit_rate": pool.prefix_hits / pool.prefix_queries if pool.prefix_queries else 0.0,
            "preemptions": self.scheduler.num_preemptions,
            "computed_tokens": self.scheduler.num_computed_tokens,
            "draft_tokens": self.draft_tokens,
            "draft_acceptance": self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0,
            "tokens_per_verify_forward": (
                (self.accepted_tokens + self.verify_forwards) / self.verify_forwards if self.verify_forwards else 0.0
            ),
        }
