"""The served model's state and a request's life on it: `Server` (the LLM, its AsyncEngine, the admission,
the caches, the metrics, the request log) turns a request into prompt ids and sampling parameters and admits
it; `Run` is one admitted request on the engine, read from one queue and closed exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from trainfer.errors import TrainferError
from trainfer.infer.async_engine import AsyncEngine
from trainfer.infer.engine import ContextLengthError, TokenEvent
from trainfer.infer.sampling import SamplingParams
from trainfer.llm import LLM
from trainfer.serve.admission import Admission, Ticket
from trainfer.serve.cache import ResponseCache, model_fingerprint
from trainfer.serve.errors import APIError, context_length
from trainfer.serve.limits import MAX_BODY_BYTES, MAX_QUEUE
from trainfer.serve.metrics import Metrics
from trainfer.serve.request_log import DEFAULT_MAX_BYTES, RequestLog, request_record
from trainfer.serve.responses import Choice, Format, Prompt
from trainfer.serve.route import Router
from trainfer.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest

log = logging.getLogger("trainfer.serve")

MAX_LOGPROB_ENTRIES = 1 << 20  # per answer: n x (prompt if echoed + completion) x (1 + top logprobs)


class Server:
    """Owns what every request shares: the LLM and its AsyncEngine, the admission (capacity in sequences),
    the response cache, the metrics and the request log. It does not answer HTTP (routes.py does) and never
    changes the model."""

    def __init__(
        self,
        llm: LLM,
        model_id: str,
        api_key: str | None = None,
        max_queue: int = MAX_QUEUE,
        cache: ResponseCache | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        log_requests: Path | None = None,
        log_max_bytes: int = DEFAULT_MAX_BYTES,
        router: Router | None = None,
    ) -> None:
        self.llm, self.model_id, self.api_key, self.cache = llm, model_id, api_key, cache
        self.router = router  # --upstream: the edge/cloud cascade (route.py)
        self.tokenizer = llm.tokenizer
        self.engine = AsyncEngine(llm.engine)
        self.max_model_len = llm.engine.max_model_len
        self.admission = Admission(llm.engine.scheduler.max_num_seqs + max_queue)
        self.max_body_bytes = max_body_bytes
        self.fingerprint = model_fingerprint(llm.model)
        self.adapters = llm.engine.runner.adapters  # LoRA adapters served by name next to the base
        self.metrics = Metrics()
        self.created = int(time.time())
        self.runs: set[Run] = set()  # admitted and not yet closed (for queue_age)
        self.finished: deque[float] = deque(maxlen=4096)  # when recent sequences ended (for finish_rate)
        self.draining = False  # set on SIGTERM (app.serve_forever): /health says so while in-flight work finishes
        # A token covers at most this many bytes, so a text longer than max_model_len * this cannot fit:
        # such prompts are refused before they cost any tokenization.
        self.max_token_bytes = max(len(self.tokenizer.decode([i]).encode()) for i in range(self.tokenizer.vocab_size))
        self._cache_failed = False
        self.request_log: RequestLog | None = None  # opt-in: prompts and answers on disk (see request_log.py)
        if log_requests is not None:
            self.request_log = RequestLog(log_requests, log_max_bytes, lambda e: self.metrics.request_log_errors.inc())

    # ---- request -> prompts and sampling ----
    def tokenize(self, fmt: Format, req: SamplingRequest) -> list[Prompt]:
        """Prompt ids (and echo text); CPU work, so the routes run it in a worker thread."""
        limit = self.max_model_len * max(1, self.max_token_bytes)
        try:
            if isinstance(req, ChatCompletionRequest):
                messages = req.chat()
                if sum(len(m["content"].encode()) for m in messages) > limit:
                    raise self.too_long(fmt)
                try:
                    return [Prompt(self.llm.chat_prompt(messages))]
                except TrainferError as e:
                    raise APIError(400, str(e), param="messages") from None
            assert isinstance(req, CompletionRequest)
            prompts = []
            for p in req.prompt_list():
                if isinstance(p, str):
                    if len(p.encode()) > limit:
                        raise self.too_long(fmt)
                    prompts.append(Prompt(self.tokenizer.encode(p), p, req.echo))
                else:
                    bad = [t for t in p if t >= self.tokenizer.vocab_size]
                    if bad:
                        raise APIError(
                            400,
                            f"prompt token ids out of range [0, {self.tokenizer.vocab_size}): {bad[:5]}",
                            param="prompt",
                        )
                    prompts.append(Prompt(list(p), self.tokenizer.decode(list(p)) if req.echo else "", req.echo))
            return prompts
        except UnicodeEncodeError:
            raise APIError(400, "the prompt is not valid Unicode (a lone surrogate?)", param=fmt.prompt_param) from None

    def too_long(self, fmt: Format) -> APIError:
        message = f"the prompt is far longer than this model's maximum context length of {self.max_model_len} tokens"
        return context_length(message, fmt.prompt_param)

    def sampling(self, fmt: Format, req: SamplingRequest, prompts: list[Prompt]) -> tuple[SamplingParams, bool]:
        """The engine's parameters, and whether to generate at all (max_tokens=0 with echo only scores)."""
        echo = isinstance(req, CompletionRequest) and req.echo
        wanted = req.requested_max_tokens
        if wanted == 0 and not echo:
            raise APIError(400, "max_tokens must be >= 1 (0 is allowed with echo=true)", param="max_tokens")
        if isinstance(req, ChatCompletionRequest):
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        try:  # max_tokens=0: the engine still samples one token (the prompt's last row is computed anyway)
            params = req.sampling(1 if wanted == 0 else wanted, logprobs, logprobs if echo else None)
        except TrainferError as e:
            raise APIError(400, str(e)) from None
        if logprobs is not None:
            room = [params.max_tokens or self.max_model_len - len(p.ids) for p in prompts]
            tokens = sum((len(p.ids) if echo else 0) + r for p, r in zip(prompts, room, strict=True))
            entries = req.n * tokens * (1 + logprobs)
            if entries > MAX_LOGPROB_ENTRIES:
                raise APIError(
                    400,
                    f"the answer would hold {entries:,} log-probabilities (limit "
                    f"{MAX_LOGPROB_ENTRIES:,}): lower n, max_tokens or the number of top logprobs",
                    param="logprobs",
                )
        return params, wanted != 0

    # ---- admission ----
    def adapter_for(self, model: str | None) -> str | None:
        """The request's `model`: the base (None), one of the LoRA adapters served next to it, or a 404."""
        if not model or model == self.model_id:
            return None
        if model in self.adapters:
            return model
        served = ", ".join(repr(m) for m in [self.model_id, *sorted(self.adapters)])
        raise APIError(404, f"model {model!r} is not served here; use one of {served}", param="model",
                       code="model_not_found")  # fmt: skip

    def start(
        self, fmt: Format, prompts: list[Prompt], params: SamplingParams, generate: bool, adapter: str | None = None
    ) -> Run:
        """Admit a request (429 when full) and queue its prompts on the engine, all or none."""
        run = Run(self, prompts, params, generate, self.admission.admit(len(prompts) * params.n, "n"))
        self.runs.add(run)
        try:
            for rid, p in zip(run.rids, prompts, strict=True):
                self.engine.add(rid, p.ids, params, run.queue, adapter)
        except ContextLengthError as e:
            run.close()
            raise context_length(str(e), fmt.prompt_param) from None
        run.queued = True
        return run

    # ---- the response cache: a failure is a miss, counted and logged once ----
    async def cache_get(self, key: str) -> dict[str, Any] | None:
        try:
            return await self.cache.get(key)  # type: ignore[union-attr]
        except Exception as e:
            self.cache_failed(e)
            return None

    async def cache_put(self, key: str, value: dict[str, Any]) -> None:
        try:
            await self.cache.put(key, value)  # type: ignore[union-attr]
        except Exception as e:
            self.cache_failed(e)

    def cache_failed(self, e: Exception) -> None:
        self.metrics.cache_errors.inc()
        if not self._cache_failed:
            self._cache_failed = True
            log.warning(
                "response cache failed (%s: %s); such requests are served as misses (logged once)", type(e).__name__, e
            )

    def log_request(
        self,
        fmt: Format,
        rid: str,
        req: SamplingRequest,
        choices: list[Choice],
        used: dict,
        timings: dict,
        route: str | None = None,
    ) -> None:
        """Hand a finished answer to the request log, if on (the writer thread does the disk I/O). `route` (with
        --upstream) says who answered: `dataset from-logs --routed` keeps the upstream's answers."""
        if self.request_log is not None:
            record = request_record(fmt.object, rid, self.model_id, req, choices, used, timings)
            if route is not None:
                record["route"] = route
            self.request_log.append(record)

    def queue_age(self) -> float:
        """How long the oldest admitted request still without its first token has waited, in seconds: what a
        new request that has to queue will wait at least."""
        now = time.perf_counter()
        return max((now - r.start for r in self.runs if r.first is None), default=0.0)

    def finish_rate(self, window_s: float = 30.0) -> float | None:
        """Sequences finished per second over the last `window_s` (None with fewer than two): how fast slots free up."""
        now = time.perf_counter()
        while self.finished and self.finished[0] < now - window_s:
            self.finished.popleft()
        if len(self.finished) < 2:
            return None
        return (len(self.finished) - 1) / max(now - self.finished[0], 1e-3)


class Run:
    """An admitted request on the engine: its prompts' samples, read from one queue, closed exactly once."""

    def __init__(
        self, server: Server, prompts: list[Prompt], params: SamplingParams, generate: bool, ticket: Ticket
    ) -> None:
        self.server, self.prompts, self.generate, self.ticket = server, prompts, generate, ticket
        self.n = params.n
        self.rids = [uuid.uuid4().hex for _ in prompts]
        self.index = {rid: i for i, rid in enumerate(self.rids)}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice() for _ in range(len(prompts) * self.n)]
        self.start = time.perf_counter()
        self.times: dict[int, list[float]] = {}
        self.first: float | None = None
        self.cached_prompt_tokens = 0
        self.queued = False  # every prompt is on the engine
        self.closed = False

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) until every sample has finished; each event already added to its choice."""
        unfinished = len(self.choices)
        while unfinished:
            e = await self.queue.get()
            if isinstance(e, BaseException):
                raise e
            i = self.index[e.request_id] * self.n + e.index
            now = time.perf_counter()
            self.first = self.first or now
            if e.token_id >= 0:
                self.server.metrics.vitals.tokens += 1
            self.times.setdefault(i, []).append(now)
            self.cached_prompt_tokens = max(self.cached_prompt_tokens, e.cached_prompt_tokens)
            if e.prompt_logprobs is not None:
                self.prompts[i // self.n].logprobs = e.prompt_logprobs
            if self.generate:
                self.choices[i].add(e)
            else:  # max_tokens=0 with echo: the sampled token is not part of the answer
                self.choices[i].finish_reason = "length" if e.finish_reason != "error" else "error"
                self.choices[i].error = e.error
            unfinished -= bool(e.finish_reason)
            yield i, e

    async def collect(self) -> None:
        async for _ in self.events():
            pass

    def echo(self, i: int) -> Prompt | None:
        p = self.prompts[i // self.n]
        return p if p.echo else None

    @property
    def error(self) -> str | None:
        return next((c.error for c in self.choices if c.error), None)

    def close(self) -> None:
        """Abort what is still running, give the capacity back, record latencies and token counts."""
        if self.closed:
            return
        self.closed = True
        s = self.server
        s.runs.discard(self)
        for rid in self.rids:
            s.engine.abort(rid)
        self.ticket.release()
        if not self.queued:
            return  # refused while queuing its prompts (context length): nothing to record
        s.finished.extend([time.perf_counter()] * len(self.choices))  # sequences whose slots are free again
        for token_times in self.times.values():
            s.metrics.observe_sequence(token_times, self.start)
        s.metrics.prompt_tokens.inc(sum(len(p.ids) for p in self.prompts))
        s.metrics.generation_tokens.inc(sum(len(c.token_ids) for c in self.choices))
