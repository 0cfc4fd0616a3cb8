"""The continuous-batching engine: requests in, token events out, one model forward per step.

    engine = Engine(model, tokenizer, kv_cache_gb=1.0)
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=32))
    while engine.has_unfinished(): events = engine.step()

`AsyncEngine` runs the same loop in a background thread for the HTTP server (docs/engine.md).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch

from trainfer.errors import TrainferError
from trainfer.infer.kv_cache import BlockPool, bytes_per_block
from trainfer.infer.runner import ModelRunner
from trainfer.infer.sampling import SamplingParams, apply_penalties, sample, top_logprobs
from trainfer.infer.scheduler import Scheduler, Sequence, Status
from trainfer.infer.text import Detokenizer, StopMatcher
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.transformer import Transformer


@dataclass
class TokenEvent:
    """One generated token of one sample, the text it released, and the finish reason on the last one."""

    request_id: str
    index: int  # which of the request's n samples
    token_id: int
    text: str
    finish_reason: str | None = None  # "stop", "length" (or "abort") on a sample's last event
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the prefix cache


@dataclass
class _Output:
    detok: Detokenizer
    stops: StopMatcher
    max_tokens: int
    stop_ids: set[int]  # stop token ids plus, unless ignore_eos, the tokenizer's end-of-turn ids


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        kv_cache_gb: float = 1.0,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        dtype, device = model.embed_tokens.weight.dtype, model.embed_tokens.weight.device
        if num_blocks is None:
            num_blocks = int(kv_cache_gb * (1 << 30)) // bytes_per_block(model.cfg, block_size, dtype)
        self.pool = BlockPool(model.cfg, num_blocks, block_size, dtype, device)
        self.scheduler = Scheduler(self.pool, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, self.pool)
        self.requests: dict[str, list[Sequence]] = {}
        self.outputs: dict[int, _Output] = {}
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return min(self.model.cfg.max_seq_len, self.pool.num_blocks * self.pool.block_size)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise TrainferError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise TrainferError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise TrainferError(f"prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len}")
        seq = self._new_sequence(request_id, list(prompt_ids), len(prompt_ids), params, 0)
        self.requests[request_id] = [seq]
        self.scheduler.add(seq)

    def _new_sequence(self, request_id: str, ids: list[int], prompt_len: int, params: SamplingParams, index: int):
        seq = Sequence(next(self._ids), request_id, ids, prompt_len, params, params.generator(index), index=index)
        budget = min(params.max_tokens, self.max_model_len - prompt_len)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.tokenizer.stop_token_ids)
        self.outputs[seq.seq_id] = _Output(Detokenizer(self.tokenizer), StopMatcher(params.stop), budget, stop_ids)
        return seq

    def abort(self, request_id: str) -> None:
        for seq in self.requests.pop(request_id, []):
            if seq.status != Status.FINISHED:
                self.scheduler.finish(seq, "abort")
            self.outputs.pop(seq.seq_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[TokenEvent]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        rows, to_sample, row = [], [], 0
        for seq, n in batch:
            row += n
            if seq.num_computed + n == seq.num_tokens:  # the chunk reaches the end: sample after it
                rows.append(row - 1)
                to_sample.append(seq)
        logits = self.runner.run(batch, rows)
        for seq, n in batch:
            self.scheduler.computed(seq, n)
        events = []
        for seq, row_logits in zip(to_sample, logits, strict=True):
            family = [seq]
            if seq.params.n > 1 and not seq.forked and not seq.output_ids:
                family += self._fork(seq)
            for s in family:
                events.append(self._sample(s, row_logits))
        return events

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The other n-1 samples share the parent's computed prompt blocks; the partial one is copied."""
        parent.forked = True
        b, children = self.pool.block_size, []
        full = parent.num_computed // b
        for i in range(1, parent.params.n):
            child = self._new_sequence(parent.request_id, list(parent.token_ids), parent.prompt_len, parent.params, i)
            child.forked = True
            self.requests[parent.request_id].append(child)
            if len(parent.block_table) > full and self.pool.num_free == 0:
                self.scheduler.add(child)  # no block for the copy: it recomputes later (prefix cache helps)
                continue
            for block_id in parent.block_table[:full]:
                self.pool.acquire(block_id)
            child.block_table = parent.block_table[:full]
            if len(parent.block_table) > full:
                copy = self.pool.allocate()
                self.pool.copy(parent.block_table[full], copy)
                child.block_table.append(copy)
            child.block_hashes = list(parent.block_hashes)
            child.num_computed = parent.num_computed
            child.cached_prompt_tokens = parent.cached_prompt_tokens
            child.status = Status.RUNNING
            self.scheduler.running.append(child)
            children.append(child)
        return children

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> TokenEvent:
        p, out = seq.params, self.outputs[seq.seq_id]
        processed = logits
        if p.uses_penalties:
            processed = apply_penalties(logits, p, torch.tensor(seq.token_ids), torch.tensor(seq.output_ids))
        token = sample(processed, p, seq.generator)
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
        seq.token_ids.append(token)
        if token in out.stop_ids:
            event.text, event.finish_reason = out.stops.flush(), "stop"
        else:
            event.text, hit = out.stops.push(out.detok.add(token))
            if hit:
                event.finish_reason = "stop"
            elif len(seq.output_ids) >= out.max_tokens:
                event.text += out.stops.flush()
                event.finish_reason = "length"
        if event.finish_reason:
            self.scheduler.finish(seq, event.finish_reason)
            del self.outputs[seq.seq_id]
            if all(s.status == Status.FINISHED for s in self.requests[seq.request_id]):
                del self.requests[seq.request_id]
        return event

    # ---- synchronous helpers ----
    def run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[list[TokenEvent]]]:
        """Run prompts together to completion: per prompt, per sample, its events."""
        ids = [f"batch-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params, strict=True):
            self.add_request(rid, prompt, p)
        results = {rid: [[] for _ in range(p.n)] for rid, p in zip(ids, params, strict=True)}
        while any(rid in self.requests for rid in ids):
            for e in self.step():
                results[e.request_id][e.index].append(e)
        return [results[rid] for rid in ids]

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        rid = f"stream-{next(self._ids)}"
        self.add_request(rid, prompt, params)
        try:
            while rid in self.requests:
                yield from (e for e in self.step() if e.request_id == rid)
        finally:
            self.abort(rid)

    def stats(self) -> dict[str, float]:
        pool = self.pool
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_cache_usage": pool.usage,
            "kv_cache_blocks": pool.num_blocks,
            "kv_cache_bytes": pool.nbytes,
            "prefix_cache_hit_rate": pool.prefix_hits / pool.prefix_queries if pool.prefix_queries else 0.0,
            "preemptions": self.scheduler.num_preemptions,
            "computed_tokens": self.scheduler.num_computed_tokens,
        }


class AsyncEngine:
    """The engine stepped by a task on the caller's asyncio loop; each request reads its own queue.

    Why not a background thread: measured on the 2-core dev machine, PyTorch runs this model ~1.8x
    slower from a second thread than from the main one (docs/LOG.md), and uvicorn keeps its loop on the
    main thread. A step blocks the loop for its duration (tens of ms; chunked prefill bounds it), then
    the loop serves I/O before the next step.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    def _ensure_running(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._loop, self._wake = loop, asyncio.Event()
            self._task = loop.create_task(self._run())
        assert self._wake is not None
        return self._wake

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Events of one request until every one of its n samples has finished; abort if the reader leaves."""
        wake = self._ensure_running()
        self.engine.add_request(request_id, prompt_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        wake.set()
        unfinished = params.n
        try:
            while unfinished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    unfinished -= 1
        finally:
            self._queues.pop(request_id, None)
            if unfinished:
                self.engine.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
            try:
                events = self.engine.step()
            except Exception as e:  # fail every waiting request rather than hang them
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                for queue in self._queues.values():
                    queue.put_nowait(e)
                events = []
            for ev in events:
                queue = self._queues.get(ev.request_id)
                if queue is not None:
                    queue.put_nowait(ev)
            await asyncio.sleep(0)  # let the loop read requests and write responses between steps
