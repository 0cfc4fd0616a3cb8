"""The OpenAI-compatible HTTP server: FastAPI over the AsyncEngine, with metrics, a response cache,
limits and auth. `trainfer serve MODEL` runs it under uvicorn.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from trainfer.errors import TrainferError
from trainfer.infer.engine import AsyncEngine
from trainfer.llm import LLM
from trainfer.serve.cache import ResponseCache, cache_key, model_fingerprint
from trainfer.serve.metrics import Metrics
from trainfer.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest


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

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class Choice:
    """One finished (or cached) sample: what both the JSON and the streamed answers are built from."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None


class Server:
    def __init__(
        self,
        llm: LLM,
        model_id: str,
        api_key: str | None = None,
        max_queue: int = 256,
        cache: ResponseCache | None = None,
    ) -> None:
        self.llm, self.model_id, self.api_key, self.cache = llm, model_id, api_key, cache
        self.tokenizer = llm.tokenizer
        self.engine = AsyncEngine(llm.engine)
        self.max_model_len = llm.engine.max_model_len
        self.capacity = llm.engine.scheduler.max_num_seqs + max_queue
        self.fingerprint = model_fingerprint(llm.model)
        self.metrics = Metrics()
        self.inflight = 0
        self.created = int(time.time())

    # ---- request -> prompt ids and sampling ----
    def prompt_ids(self, req: SamplingRequest) -> list[int]:
        if isinstance(req, ChatCompletionRequest):
            messages = [
                {"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages
            ]
            try:
                return self.llm.chat_prompt(messages)
            except TrainferError as e:
                raise APIError(400, str(e), param="messages") from None
        assert isinstance(req, CompletionRequest)
        if isinstance(req.prompt, str):
            return self.tokenizer.encode(req.prompt)
        bad = [t for t in req.prompt if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise APIError(
                400, f"prompt token ids out of range [0, {self.tokenizer.vocab_size}): {bad[:5]}", param="prompt"
            )
        return list(req.prompt)

    def plan(self, req: SamplingRequest) -> tuple[list[int], Any]:
        ids = self.prompt_ids(req)
        room = self.max_model_len - len(ids)
        wanted = req.requested_max_tokens or room
        if room < 1 or wanted > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(ids) + wanted} tokens ({len(ids)} in the prompt, {wanted} in the completion). "
                "Please reduce the length of the prompt or of max_tokens.",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        if isinstance(req, ChatCompletionRequest):
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        try:
            return ids, req.sampling(wanted, logprobs)
        except TrainferError as e:
            raise APIError(400, str(e)) from None

    # ---- running ----
    async def events(self, ids: list[int], params: Any) -> AsyncIterator[Any]:
        rid = uuid.uuid4().hex
        start = time.perf_counter()
        times: dict[int, list[float]] = {}
        self.inflight += 1
        try:
            async for e in self.engine.generate(rid, ids, params):
                times.setdefault(e.index, []).append(time.perf_counter())
                yield e
        finally:
            self.inflight -= 1
            for token_times in times.values():
                self.metrics.observe_sequence(token_times, start)

    def stop_ids(self, params: Any) -> set[int]:
        return set(params.stop_token_ids) | self.tokenizer.stop_token_ids

    def add(self, choice: Choice, e: Any, params: Any) -> None:
        choice.text += e.text
        choice.finish_reason = e.finish_reason or choice.finish_reason
        if not (e.finish_reason == "stop" and e.token_id in self.stop_ids(params)):
            choice.token_ids.append(e.token_id)  # a stop token ends the text; it is not counted in it
            if e.logprob is not None:
                choice.logprobs.append((e.logprob, e.top_logprobs))

    @staticmethod
    def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
        completion = sum(len(c.token_ids) for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    def count(self, usage: dict[str, int]) -> None:
        """Token counters for work the model did (not for answers from the response cache)."""
        self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        self.metrics.generation_tokens.inc(usage["completion_tokens"])


def _logprobs_json(server: Server, choice: Choice, chat: bool, offset_text: str = "") -> dict[str, Any] | None:
    if not choice.logprobs:
        return None
    tok = server.tokenizer
    pieces = [tok.decode([t]) for t in choice.token_ids]
    if chat:
        content = []
        for piece, (lp, top) in zip(pieces, choice.logprobs, strict=False):
            alts = [{"token": tok.decode([t]), "logprob": v, "bytes": list(tok.decode([t]).encode())} for t, v in top]
            content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": alts})
        return {"content": content}
    offsets, pos = [], len(offset_text)
    for piece in pieces:
        offsets.append(pos)
        pos += len(piece)
    return {
        "tokens": pieces,
        "token_logprobs": [lp for lp, _ in choice.logprobs],
        "top_logprobs": [{tok.decode([t]): v for t, v in top} for _, top in choice.logprobs],
        "text_offset": offsets,
    }


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.engine.shutdown()

    app = FastAPI(title="trainfer", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        server.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        server.metrics.requests.labels(request.url.path, "400").inc()
        return APIError(400, f"invalid field '{where}': {first['msg']}", param=where).response()

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if server.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.api_key}".encode()):
                server.metrics.requests.labels(request.url.path, "401").inc()
                return APIError(
                    401, "missing or invalid API key", kind="authentication_error", code="invalid_api_key"
                ).response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        server.metrics.observe_engine(server.engine.stats())
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": server.model_id,
            "object": "model",
            "created": server.created,
            "owned_by": "trainfer",
            "max_model_len": server.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await serve(req, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await serve(req, request, chat=True)

    async def serve(req: SamplingRequest, request: Request, chat: bool) -> Response:
        path = request.url.path
        if req.model and req.model != server.model_id:
            raise APIError(
                404,
                f"model {req.model!r} is not served here; use {server.model_id!r}",
                param="model",
                code="model_not_found",
            )
        ids, params = server.plan(req)
        key = None
        bypass = "no-cache" in request.headers.get("cache-control", "") or "no-store" in request.headers.get(
            "cache-control", ""
        )
        if server.cache is not None and req.deterministic and not bypass:
            key = cache_key(server.fingerprint, path, req.cache_fields())
            hit = server.cache.get(key)
            if hit is not None:
                server.metrics.cache_hits.inc()
                choices = [
                    Choice(c["text"], c["token_ids"], [tuple(x) for x in c["logprobs"]], c["finish_reason"])
                    for c in hit["choices"]
                ]
                server.metrics.requests.labels(path, "200").inc()
                return respond(req, chat, server.usage(len(ids), choices), choices, {"response_cache": "hit"})
            server.metrics.cache_misses.inc()
        if server.inflight >= server.capacity:
            raise APIError(
                429, "the server is at capacity; retry shortly", kind="rate_limit_error", headers={"Retry-After": "1"}
            )
        server.metrics.requests.labels(path, "200").inc()
        if req.stream:
            return StreamingResponse(stream(req, chat, ids, params, key), media_type="text/event-stream")
        start = time.perf_counter()
        choices = [Choice() for _ in range(params.n)]
        first = None
        cached = 0
        async for e in server.events(ids, params):
            first = first or time.perf_counter()
            cached = e.cached_prompt_tokens
            server.add(choices[e.index], e, params)
        remember(key, choices)
        usage = server.usage(len(ids), choices)
        server.count(usage)
        timings = {
            "response_cache": "miss" if key else "off",
            "ttft_ms": round(1000 * ((first or start) - start), 2),
            "total_ms": round(1000 * (time.perf_counter() - start), 2),
            "cached_prompt_tokens": cached,
        }
        return respond(req, chat, usage, choices, timings)

    def remember(key: str | None, choices: list[Choice]) -> None:
        if key is not None and server.cache is not None and all(c.finish_reason for c in choices):
            server.cache.put(key, {"choices": [c.__dict__ for c in choices]})

    def respond(req: SamplingRequest, chat: bool, usage: dict, choices: list[Choice], timings: dict) -> Response:
        if req.stream:
            return StreamingResponse(replay(req, chat, choices, usage), media_type="text/event-stream")
        if chat:
            body_choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": _logprobs_json(server, c, True),
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ]
        else:
            body_choices = [
                {
                    "index": i,
                    "text": c.text,
                    "logprobs": _logprobs_json(server, c, False),
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(choices)
            ]
        return JSONResponse({**envelope(chat, False), "choices": body_choices, "usage": usage, "timings": timings})

    def envelope(chat: bool, chunk: bool, rid: str | None = None) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {
            "id": rid or ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": kind,
            "created": int(time.time()),
            "model": server.model_id,
        }

    def chunk(
        chat: bool, rid: str, index: int, text: str, finish: str | None, logprobs: Any = None, first: bool = False
    ) -> str:
        if chat:
            delta: dict[str, Any] = (
                {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            )
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return f"data: {json.dumps({**envelope(chat, True, rid), 'choices': [choice]})}\n\n"

    def usage_chunk(chat: bool, rid: str, usage: dict) -> str:
        return f"data: {json.dumps({**envelope(chat, True, rid), 'choices': [], 'usage': usage})}\n\n"

    async def stream(req: SamplingRequest, chat: bool, ids: list[int], params: Any, key: str | None):
        rid = envelope(chat, True)["id"]
        choices = [Choice() for _ in range(params.n)]
        started: set[int] = set()
        async for e in server.events(ids, params):
            c = choices[e.index]
            before = len(c.logprobs)
            server.add(c, e, params)
            lp = None
            if len(c.logprobs) > before:
                one = Choice(token_ids=c.token_ids[-1:], logprobs=c.logprobs[-1:])
                lp = _logprobs_json(server, one, chat, c.text[: len(c.text) - len(e.text)])
            if e.text or e.finish_reason or lp or e.index not in started:
                yield chunk(chat, rid, e.index, e.text, e.finish_reason, lp, first=e.index not in started)
                started.add(e.index)
        remember(key, choices)
        usage = server.usage(len(ids), choices)
        server.count(usage)
        if req.stream_options and req.stream_options.include_usage:
            yield usage_chunk(chat, rid, usage)
        yield "data: [DONE]\n\n"

    async def replay(req: SamplingRequest, chat: bool, choices: list[Choice], usage: dict):
        rid = envelope(chat, True)["id"]
        for i, c in enumerate(choices):
            yield chunk(chat, rid, i, c.text, None, _logprobs_json(server, c, chat), first=True)
            yield chunk(chat, rid, i, "", c.finish_reason)
        if req.stream_options and req.stream_options.include_usage:
            yield usage_chunk(chat, rid, usage)
        yield "data: [DONE]\n\n"

    return app
