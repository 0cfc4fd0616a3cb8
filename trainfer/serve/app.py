"""The OpenAI-compatible HTTP server: FastAPI over the AsyncEngine, with metrics, a response cache,
limits and auth. `trainfer serve MODEL` runs it under uvicorn.

A request's path, in reading order: `Gate` (auth, body cap, one count per answer) -> route -> `prepare`
(tokenize in a worker thread, sampling params, bounds) -> response cache -> `Server.start` (capacity in
sequences, the engine's context check) -> a `Run` read to the end, as JSON or as server-sent events ->
`Run.close` (abort what is left, give the capacity back) exactly once, whatever happened to the client
-> with `--log-requests`, the finished answer handed to the request log (`Server.log_request`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from trainfer import web
from trainfer.errors import TrainferError
from trainfer.infer.engine import AsyncEngine, ContextLengthError, TokenEvent
from trainfer.infer.sampling import MAX_STOP_CHARS, MAX_STOPS, SamplingParams
from trainfer.llm import LLM
from trainfer.serve import reasoning
from trainfer.serve.cache import ResponseCache, cache_key, model_fingerprint
from trainfer.serve.metrics import Metrics
from trainfer.serve.request_log import DEFAULT_MAX_BYTES, RequestLog, feedback_record, request_record
from trainfer.serve.responses import CHAT, TEXT, Choice, Format, Prompt, error_body, replay, sse, usage
from trainfer.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FeedbackRequest,
    SamplingRequest,
    TokenizeRequest,
)

log = logging.getLogger("trainfer.serve")

TOKENIZER_ROUTES = {"/tokenize", "/detokenize", "/tokenizer_info"}  # vLLM's, as lm-evaluation-harness probes them

ROUTES = {"/health", "/metrics", "/vitals", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/feedback"}
ROUTES |= TOKENIZER_ROUTES | web.ROUTES
# With an API key, these need it too: the page, /health, /metrics and /vitals do not (as vLLM's /metrics),
# but a run's records hold its training samples.
PROTECTED = TOKENIZER_ROUTES | {"/ui/runs", "/ui/run"}
CACHE_HEADER = "x-trainfer-response-cache"  # hit, miss or off: a streamed answer has no timings object to say it
MAX_LOGPROB_ENTRIES = 1 << 20  # per answer: n x (prompt if echoed + completion) x (1 + top logprobs)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> Response:
        # json.dumps escapes non-ASCII, so a lone surrogate echoed from a request cannot break the encoding.
        body = json.dumps(error_body(self.message, self.kind, self.param, self.code))
        return Response(body, self.status, self.headers, media_type="application/json")


class BodyTooLarge(Exception):
    pass


class Server:
    def __init__(
        self,
        llm: LLM,
        model_id: str,
        api_key: str | None = None,
        max_queue: int = 256,
        cache: ResponseCache | None = None,
        max_body_bytes: int = 4 << 20,
        log_requests: Path | None = None,
        log_max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.llm, self.model_id, self.api_key, self.cache = llm, model_id, api_key, cache
        self.tokenizer = llm.tokenizer
        self.engine = AsyncEngine(llm.engine)
        self.max_model_len = llm.engine.max_model_len
        self.capacity = llm.engine.scheduler.max_num_seqs + max_queue  # in sequences (n counts n times)
        self.max_body_bytes = max_body_bytes
        self.fingerprint = model_fingerprint(llm.model)
        self.adapters = llm.engine.runner.adapters  # LoRA adapters served by name next to the base
        self.metrics = Metrics()
        self.inflight = 0  # sequences admitted and not yet closed
        self.created = int(time.time())
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
                messages = chat_messages(req)
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
        return APIError(
            400,
            f"the prompt is far longer than this model's maximum context length of {self.max_model_len} tokens",
            param=fmt.prompt_param,
            code="context_length_exceeded",
        )

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
    def check_capacity(self, seqs: int, param: str) -> None:
        """400 if `seqs` sequences could never fit, 429 if they do not fit now (the caller then admits them)."""
        if seqs > self.capacity:
            raise APIError(
                400, f"{seqs} sequences (prompts x n) exceed this server's capacity of {self.capacity}", param=param
            )
        if self.inflight + seqs > self.capacity:
            raise APIError(
                429, "the server is at capacity; retry shortly", kind="rate_limit_error", headers={"Retry-After": "1"}
            )

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
        seqs = len(prompts) * params.n
        self.check_capacity(seqs, "n")
        run = Run(self, prompts, params, generate)
        try:
            for rid, p in zip(run.rids, prompts, strict=True):
                self.engine.add(rid, p.ids, params, run.queue, adapter)
        except ContextLengthError as e:
            run.close()
            raise APIError(400, str(e), param=fmt.prompt_param, code="context_length_exceeded") from None
        self.inflight += seqs
        run.admitted = seqs
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
        self, fmt: Format, rid: str, req: SamplingRequest, choices: list[Choice], used: dict, timings: dict
    ) -> None:
        """Hand a finished answer to the request log, if on (the writer thread does the disk I/O)."""
        if self.request_log is not None:
            self.request_log.append(request_record(fmt.object, rid, self.model_id, req, choices, used, timings))


class Run:
    """An admitted request on the engine: its prompts' samples, read from one queue, closed exactly once."""

    def __init__(self, server: Server, prompts: list[Prompt], params: SamplingParams, generate: bool) -> None:
        self.server, self.prompts, self.generate = server, prompts, generate
        self.n = params.n
        self.rids = [uuid.uuid4().hex for _ in prompts]
        self.index = {rid: i for i, rid in enumerate(self.rids)}
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice() for _ in range(len(prompts) * self.n)]
        self.start = time.perf_counter()
        self.times: dict[int, list[float]] = {}
        self.first: float | None = None
        self.cached_prompt_tokens = 0
        self.admitted = 0
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
        for rid in self.rids:
            s.engine.abort(rid)
        if not self.admitted:
            return  # refused while queuing its prompts (context length): nothing to give back or record
        s.inflight -= self.admitted
        for token_times in self.times.values():
            s.metrics.observe_sequence(token_times, self.start)
        s.metrics.prompt_tokens.inc(sum(len(p.ids) for p in self.prompts))
        s.metrics.generation_tokens.inc(sum(len(c.token_ids) for c in self.choices))


class EventStream(Response):
    """A server-sent-events answer that stops as soon as the client leaves and runs its cleanup however
    it ends: finished, client gone, or never started.

    Why not Starlette's StreamingResponse: under ASGI spec 2.4 it learns of a disconnect only when a
    send fails, and uvicorn drops sends to a closed connection silently, so an abandoned stream went on
    generating to its last token. Here a watcher reads `http.disconnect` and cancels the pump.
    """

    media_type = "text/event-stream"

    def __init__(
        self, lines: AsyncIterator[str], on_close: Callable[[], None], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(headers={"cache-control": "no-cache", **(headers or {})})
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]  # streamed: chunked
        self.lines, self.on_close = lines, on_close

    async def __call__(self, scope, receive, send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for line in self.lines:
                await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(until_disconnected(receive))
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            await self.lines.aclose()  # type: ignore[attr-defined]
            self.on_close()
        if not pumping.cancelled() and pumping.exception() is not None:
            raise pumping.exception()  # type: ignore[misc]


async def until_disconnected(receive) -> None:
    """Return when the client has gone (uvicorn also says so once the answer is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class Gate:
    """Outermost ASGI layer: API key, request body cap (413), and one count per answer by status.

    Pure ASGI rather than FastAPI's `@app.middleware`: it sees the status of every answer (errors included),
    passes client disconnects through untouched, and adds nothing to streamed responses.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, over, seen = 0, False, 0

        async def counted_send(message: dict) -> None:
            nonlocal status
            if over:  # the app answers a body it could not read in full; the answer is 413, sent below
                return
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def capped_receive() -> dict:
            """Count body bytes as they arrive: a chunked body without Content-Length is capped too."""
            nonlocal over, seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.server.max_body_bytes and not status:
                    over = True
                    raise BodyTooLarge
            return message

        path = scope["path"]
        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                return await refusal.response()(scope, receive, counted_send)
            with suppress(BodyTooLarge):  # FastAPI may also turn it into its own 400, which is dropped
                await self.app(scope, capped_receive, counted_send)
            if over:
                over = False
                await self.too_large().response()(scope, receive, counted_send)
        finally:
            endpoint = path if path in ROUTES else "other"  # raw paths would let clients mint label series
            self.server.metrics.requests.labels(endpoint, str(status or 499)).inc()

    def refusal(self, scope) -> APIError | None:
        s = self.server
        headers = dict(scope["headers"])
        if s.api_key and (scope["path"].startswith("/v1/") or scope["path"] in PROTECTED):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {s.api_key}".encode()):
                return APIError(401, "missing or invalid API key", kind="authentication_error", code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > s.max_body_bytes:
            return self.too_large()
        return None

    def too_large(self) -> APIError:
        return APIError(413, f"request body over {self.server.max_body_bytes} bytes", code="request_too_large")


# ---- the app -----------------------------------------------------------------------------------------


VITALS_INTERVAL_S = 1.0


def create_app(server: Server, runs: list[Path] | None = None) -> Gate:
    """The API, plus the web page at / (chat, vitals, and the loss curves of `runs`, training run directories)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sampler = asyncio.ensure_future(sample_vitals(server))
        yield
        sampler.cancel()
        server.engine.shutdown()
        if server.request_log is not None:
            await asyncio.to_thread(server.request_log.close)  # what is queued reaches the disk

    app = FastAPI(title="trainfer", lifespan=lifespan)
    app.state.server = server
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    app.get("/health")(health)
    app.get("/metrics")(metrics)
    app.get("/v1/models")(models)
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/tokenize")(tokenize)
    app.post("/detokenize")(detokenize)
    app.get("/tokenizer_info")(tokenizer_info)
    app.post("/v1/feedback")(feedback)
    app.get("/vitals")(vitals)
    web.add_routes(app, runs or [], {"model": server.model_id, "auth": bool(server.api_key)})
    return Gate(app, server)


async def sample_vitals(server: Server) -> None:
    """One point of the vitals history a second, whether or not a page is watching (the history is the point)."""
    while True:
        server.metrics.vitals.sample(time.perf_counter(), server.engine.stats(), server.metrics.registry)
        await asyncio.sleep(VITALS_INTERVAL_S)


async def api_error(request: Request, exc: APIError) -> Response:
    return exc.response()


# What a field accepts, for fields whose type is a union (pydantic would report each member separately).
UNION_HELP = {
    "prompt": "a non-empty string, a list of token ids, or a list of either (a batch)",
    "stop": f"a string or a list of at most {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters",
}


async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    """One 400 naming the first bad field, in words a client can act on."""
    errors = exc.errors()
    first = errors[0]
    loc = [p for p in first["loc"] if p != "body"]
    field = str(loc[0]) if loc else None
    where = ".".join(str(p) for p in loc) or "body"
    part = next((e for e in errors if e["loc"][-1:] == ("type",) and "content" in e["loc"]), None)
    if first["type"] == "json_invalid":
        message, field = f"invalid JSON body: {first.get('ctx', {}).get('error', first['msg'])} (at {where})", None
    elif first["type"] == "extra_forbidden":
        message = f"unsupported field '{where}': trainfer does not implement it"
    elif part is not None and part.get("input") != "text":
        message = f"unsupported content part type {part.get('input')!r} in '{field}': trainfer serves text only"
    elif field in UNION_HELP and sum(1 for e in errors if e["loc"][1:2] == (field,)) > 1:
        message = f"invalid field '{field}': must be {UNION_HELP[field]}"
    else:
        message = f"invalid field '{where}': {first['msg']}"
    return APIError(400, message, param=field).response()


async def http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return APIError(exc.status_code, str(exc.detail), kind=kind).response()


async def health() -> dict[str, str]:
    return {"status": "ok"}


async def metrics(request: Request) -> Response:
    server: Server = request.app.state.server
    server.metrics.observe_engine(server.engine.stats())
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def vitals(request: Request, since: float = 0.0) -> dict[str, Any]:
    """Extension: a JSON twin of /metrics for the web page: the history's points newer than `since` (a
    time.time() stamp), rates and percentiles already computed (see serve/metrics.Vitals)."""
    server: Server = request.app.state.server
    v = server.metrics.vitals
    stats = server.engine.stats()
    return {
        "model": server.model_id,
        "interval_s": VITALS_INTERVAL_S,
        "window_s": v.window_s,
        "kv_cache_blocks": stats["kv_cache_blocks"],
        "max_num_seqs": server.llm.engine.scheduler.max_num_seqs,
        "inflight": server.inflight,
        "capacity": server.capacity,
        "history": [p for p in v.samples if p["t"] > since],
    }


async def models(request: Request) -> dict[str, Any]:
    server: Server = request.app.state.server
    card = {
        "id": server.model_id,
        "object": "model",
        "created": server.created,
        "owned_by": "trainfer",
        "max_model_len": server.max_model_len,
    }
    # vLLM's convention: an adapter is a model whose parent is the base
    cards = [{**card, "id": name, "parent": server.model_id} for name in sorted(server.adapters)]
    return {"object": "list", "data": [card, *cards]}


def check_model(server: Server, model: str | None) -> None:
    server.adapter_for(model)  # the adapters share the base's tokenizer


async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
    server: Server = request.app.state.server
    check_model(server, req.model)
    try:
        ids = await asyncio.to_thread(server.tokenizer.encode, req.prompt, None if req.add_special_tokens else False)
    except UnicodeEncodeError:
        raise APIError(400, "the prompt is not valid Unicode (a lone surrogate?)", param="prompt") from None
    return {"count": len(ids), "max_model_len": server.max_model_len, "tokens": ids}


async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
    server: Server = request.app.state.server
    check_model(server, req.model)
    bad = [t for t in req.tokens if t >= server.tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"token ids out of range [0, {server.tokenizer.vocab_size}): {bad[:5]}", param="tokens")
    return {"prompt": await asyncio.to_thread(server.tokenizer.decode, req.tokens)}


async def tokenizer_info(request: Request) -> dict[str, Any]:
    server: Server = request.app.state.server
    tok = server.tokenizer
    return {
        "tokenizer_class": "trainfer",
        "bos_token": tok.token(tok.bos_token_id) if tok.bos_token_id is not None else None,
        "eos_token": tok.token(tok.eos_token_id) if tok.eos_token_id is not None else None,
        "chat_template": tok.chat_template,
        "model_max_length": server.max_model_len,
    }


async def feedback(req: FeedbackRequest, request: Request) -> dict[str, Any]:
    """Extension: a rating of an earlier answer, appended to the request log (see FeedbackRequest)."""
    server: Server = request.app.state.server
    if server.request_log is None:
        raise APIError(400, "this server keeps no request log (start it with --log-requests DIR)", code="log_off")
    server.request_log.append(feedback_record(req.id, req.rating, req.index, req.comment))
    return {"id": req.id, "object": "feedback", "rating": req.rating}


async def completions(req: CompletionRequest, request: Request) -> Response:
    return await serve(TEXT, req, request)


async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    return await serve(CHAT, req, request)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]


async def serve(fmt: Format, req: SamplingRequest, request: Request) -> Response:
    server: Server = request.app.state.server
    adapter = server.adapter_for(req.model)
    prompts = await asyncio.to_thread(server.tokenize, fmt, req)
    if isinstance(req, ChatCompletionRequest) and req.test_time is not None:
        return await reasoning.answer(server, req, request, chat_messages(req))  # extension: test-time compute
    params, generate = server.sampling(fmt, req, prompts)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    key = None
    control = request.headers.get("cache-control", "")
    if server.cache is not None and req.deterministic and "no-cache" not in control and "no-store" not in control:
        key = cache_key(f"{server.fingerprint}:{adapter or ''}", request.url.path, req.cache_fields())
        hit = await server.cache_get(key)
        if hit is not None:
            server.metrics.cache_hits.inc()
            return cached_answer(server, fmt, req, prompts, hit, include_usage)
        server.metrics.cache_misses.inc()
    run = server.start(fmt, prompts, params, generate, adapter)
    cache_header = {CACHE_HEADER: "miss" if key else "off"}
    if req.stream:
        return EventStream(stream(server, fmt, req, run, key, include_usage), run.close, cache_header)
    try:
        if not await finished_unless_disconnected(run, request):
            return Response(status_code=499)  # nobody is listening; the finally below frees the engine
    finally:
        run.close()
    if run.error:
        raise APIError(500, f"generation failed: {run.error}", kind="server_error")
    if key is not None:
        await remember(server, key, run)
    timings = {
        "response_cache": "miss" if key else "off",
        "ttft_ms": round(1000 * ((run.first or run.start) - run.start), 2),
        "total_ms": round(1000 * (time.perf_counter() - run.start), 2),
        "cached_prompt_tokens": run.cached_prompt_tokens,
    }
    rid = fmt.new_id()
    server.log_request(fmt, rid, req, run.choices, usage(run.prompts, run.choices), timings)
    body = await asyncio.to_thread(
        fmt.body, server.tokenizer, server.model_id, run.prompts, run.choices, run.n, timings, rid
    )
    return Response(body, headers=cache_header, media_type="application/json")


async def finished_unless_disconnected(run: Run, request: Request) -> bool:
    """Read the run to its end, unless the client leaves first (then False): a non-streamed request
    whose client is gone must not keep generating."""

    done_task, gone_task = (
        asyncio.ensure_future(run.collect()),
        asyncio.ensure_future(until_disconnected(request.receive)),
    )
    try:
        done, _ = await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (done_task, gone_task):
            task.cancel()
    if done_task in done:
        done_task.result()
        return True
    return False


async def stream(
    server: Server, fmt: Format, req: SamplingRequest, run: Run, key: str | None, include_usage: bool
) -> AsyncIterator[str]:
    rid, model, tok = fmt.new_id(), server.model_id, server.tokenizer
    started: set[int] = set()
    async for i, e in run.events():
        c, first = run.choices[i], i not in started
        if e.error:
            yield sse(error_body(f"generation failed: {e.error}", "server_error"))
        prompt = run.echo(i)
        echo = prompt if first else None  # an echoed prompt goes in front of a sample's first chunk
        text, lp = (e.text if run.generate else ""), None
        counted = run.generate and e.logprob is not None and c.token_ids[-1:] == [e.token_id]
        if counted or (echo is not None and echo.logprobs is not None):
            one = Choice(token_ids=c.token_ids[-1:] if counted else [], logprobs=c.logprobs[-1:] if counted else [])
            offset = len(prompt.text if prompt else "") + len(c.text) - len(text)  # from the answer's start
            lp = fmt.logprobs(tok, one, 0 if echo else offset, echo)
        if echo is not None:
            text = echo.text + text
        if text or e.finish_reason or lp or first:
            yield fmt.chunk(rid, model, fmt.delta(i, text, c.finish_reason if e.finish_reason else None, lp, first))
            started.add(i)
    run.close()
    if key is not None:
        await remember(server, key, run)
    if not run.error:  # a client gone mid-stream never gets here: only finished answers are logged
        timings = {
            "response_cache": "miss" if key else "off",
            "ttft_ms": round(1000 * ((run.first or run.start) - run.start), 2),
            "total_ms": round(1000 * (time.perf_counter() - run.start), 2),
        }
        server.log_request(fmt, rid, req, run.choices, usage(run.prompts, run.choices), timings)
    if include_usage:
        yield fmt.usage_chunk(rid, model, run.prompts, run.choices, run.cached_prompt_tokens)
    yield "data: [DONE]\n\n"


async def remember(server: Server, key: str, run: Run) -> None:
    """Store a finished answer (not an aborted or failed one) for the next identical request."""
    if all(c.finish_reason in ("stop", "length") for c in run.choices):
        value = {"choices": [c.to_json() for c in run.choices], "prompt_logprobs": [p.logprobs for p in run.prompts]}
        await server.cache_put(key, value)


async def aiter_of(lines: list[str]) -> AsyncIterator[str]:
    for line in lines:
        yield line


def cached_answer(
    server: Server, fmt: Format, req: SamplingRequest, prompts: list[Prompt], hit: dict[str, Any], include_usage: bool
) -> Response:
    choices = [Choice.from_json(c) for c in hit["choices"]]
    for p, lps in zip(prompts, hit["prompt_logprobs"], strict=True):
        p.logprobs = None if lps is None else [(lp, [tuple(t) for t in top]) for lp, top in lps]
    rid, timings = fmt.new_id(), {"response_cache": "hit"}
    server.log_request(fmt, rid, req, choices, usage(prompts, choices), timings)
    if req.stream:
        lines = replay(fmt, server.tokenizer, server.model_id, prompts, choices, req.n, include_usage, rid)
        return EventStream(aiter_of(lines), lambda: None, {CACHE_HEADER: "hit"})
    body = fmt.body(server.tokenizer, server.model_id, prompts, choices, req.n, timings, rid)
    return Response(body, headers={CACHE_HEADER: "hit"}, media_type="application/json")
