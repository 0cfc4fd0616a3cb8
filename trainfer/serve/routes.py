"""The routes, in one table (`TABLE`), and what they answer. The completion and chat routes share `serve`:
prompt ids and sampling (server.py) -> response cache -> admission and the engine (a `Run`) -> the answer as
JSON or as server-sent events. Errors are raised as `APIError` and answered in errors.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from trainfer.infer.engine import Engine
from trainfer.infer.sampling import SamplingParams
from trainfer.serve import reasoning
from trainfer.serve.cache import cache_key
from trainfer.serve.cascade import forward, route_headers
from trainfer.serve.errors import APIError
from trainfer.serve.request_log import feedback_record
from trainfer.serve.responses import CHAT, TEXT, Choice, Format, Prompt, error_body, replay, sse, usage
from trainfer.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FeedbackRequest,
    SamplingRequest,
    TokenizeRequest,
)
from trainfer.serve.server import Run, Server
from trainfer.serve.streaming import EventStream, lines_of, unless_disconnected

CACHE_HEADER = "x-trainfer-response-cache"  # hit, miss or off: a streamed answer has no timings object to say it
VITALS_INTERVAL_S = 1.0


async def health(request: Request) -> Response:
    """For a load balancer's checks: 200 while the server takes work; 503 once it drains (SIGTERM) or when the
    next request would be refused with a 429, so the balancer stops sending before a client sees a refusal."""
    server: Server = request.app.state.server
    a = server.admission
    status = "draining" if server.draining else "overloaded" if a.inflight >= a.capacity else "ok"
    body = {"status": status, "inflight": a.inflight, "capacity": a.capacity}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


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
        "inflight": server.admission.inflight,
        "capacity": server.admission.capacity,
        "route": route_counts(server),
        "speculation": speculation(server.llm.engine, stats),
        "history": [p for p in v.samples if p["t"] > since],
    }


def speculation(engine: Engine, stats: dict[str, float]) -> dict[str, Any] | None:
    """With --draft: which kind guesses, how many guesses so far, the share kept overall and by position (the
    1st guess of a check, the 2nd, ...), and tokens per checking forward."""
    if engine.draft is None:
        return None
    return {
        "draft": "ngram" if isinstance(engine.draft, str) else "model",
        "guesses": stats["draft_tokens"],
        "acceptance": stats["draft_acceptance"],
        "tokens_per_forward": stats["tokens_per_verify_forward"],
        "kept_at_position": engine.kept_by_position(),
    }


def route_counts(server: Server) -> dict[str, Any] | None:
    """With --upstream: the policy and how many requests each side answered, by reason."""
    if server.router is None:
        return None
    counts: dict[str, Any] = {"policy": server.router.policy, "local": {}, "upstream": {}}
    for metric in server.metrics.routed.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                counts[sample.labels["route"]][sample.labels["reason"]] = int(sample.value)
    return counts


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


async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
    server: Server = request.app.state.server
    server.adapter_for(req.model)  # a 404 for a model not served; the adapters share the base's tokenizer
    try:
        ids = await asyncio.to_thread(server.tokenizer.encode, req.prompt, None if req.add_special_tokens else False)
    except UnicodeEncodeError:
        raise APIError(400, "the prompt is not valid Unicode (a lone surrogate?)", param="prompt") from None
    return {"count": len(ids), "max_model_len": server.max_model_len, "tokens": ids}


async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
    server: Server = request.app.state.server
    server.adapter_for(req.model)
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


async def serve(fmt: Format, req: SamplingRequest, request: Request) -> Response:
    server: Server = request.app.state.server
    adapter = server.adapter_for(req.model)
    prompts = await asyncio.to_thread(server.tokenize, fmt, req)
    if isinstance(req, ChatCompletionRequest) and req.test_time is not None:
        return await reasoning.answer(server, req, request)  # extension: test-time compute
    params, generate = server.sampling(fmt, req, prompts)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    router = server.router if generate and not (isinstance(req, CompletionRequest) and req.echo) else None
    key = None
    control = request.headers.get("cache-control", "")
    if server.cache is not None and req.deterministic and "no-cache" not in control and "no-store" not in control:
        key = cache_key(f"{server.fingerprint}:{adapter or ''}", request.url.path, req.cache_fields())
        hit = await server.cache_get(key)
        if hit is not None:
            server.metrics.cache_hits.inc()
            return cached_answer(server, fmt, req, prompts, hit, include_usage, router is not None)
        server.metrics.cache_misses.inc()
    route: tuple[str, str] | None = None  # (who answers, why) under --upstream
    if router is not None:
        # The admitted sequences, not the engine's counts: those lag behind requests a burst has just admitted
        # (the engine takes them from its queue later), and a burst then looked idle to every one of its requests.
        max_seqs, held = server.llm.engine.scheduler.max_num_seqs, server.admission.inflight
        load = {"running": min(held, max_seqs), "waiting": max(0, held - max_seqs)}
        reason = router.forward_first(load, max_seqs, server.finish_rate(), server.queue_age())
        if reason is not None:
            answer = await forward(server, fmt, req, request, reason)
            if isinstance(answer, Response):
                return answer
            route = ("local", "upstream unavailable")
        elif router.policy == "local-first":
            return await local_first(server, fmt, req, request, prompts, params, adapter, key, include_usage)
        else:
            route = ("local", "within slo")
        server.metrics.routed.labels(*route).inc()
    run = server.start(fmt, prompts, params, generate, adapter)
    headers = {CACHE_HEADER: "miss" if key else "off", **route_headers(route)}
    if req.stream:
        return EventStream(stream(server, fmt, req, run, key, include_usage, route), run.close, headers)
    if not await finish(run, request):
        return Response(status_code=499)  # nobody is listening; the engine is free already
    if key is not None:
        await remember(server, key, run)
    return await local_answer(server, fmt, req, run, key, headers, route)


async def finish(run: Run, request: Request) -> bool:
    """Collect a plain (non-streamed) run to its end, or stop it when the client leaves first (False); the run is
    closed either way. A failed generation is a 500."""
    try:
        finished, _ = await unless_disconnected(run.collect(), request.receive)
    finally:
        run.close()
    if finished and run.error:
        raise APIError(500, f"generation failed: {run.error}", kind="server_error")
    return finished


async def local_answer(
    server: Server, fmt: Format, req: SamplingRequest, run: Run, key: str | None, headers: dict, route: tuple | None
) -> Response:
    """A finished local run as the JSON answer, logged."""
    timings = {**run_timings(run, key), "cached_prompt_tokens": run.cached_prompt_tokens}
    rid, who = fmt.new_id(), route[0] if route else None
    server.log_request(fmt, rid, req, run.choices, usage(run.prompts, run.choices), timings, who)
    body = await asyncio.to_thread(
        fmt.body, server.tokenizer, server.model_id, run.prompts, run.choices, run.n, timings, rid, who
    )
    return Response(body, headers=headers, media_type="application/json")


async def local_first(
    server: Server,
    fmt: Format,
    req: SamplingRequest,
    request: Request,
    prompts: list[Prompt],
    params: SamplingParams,
    adapter: str | None,
    key: str | None,
    include_usage: bool,
) -> Response:
    """`--route local-first`: the whole local answer first, with its token log-probabilities (asked of the
    engine even when the client did not ask for them); kept if confident, else the upstream's answer. Streamed
    requests get the kept local answer replayed as events."""
    router = server.router
    assert router is not None
    asked = params.logprobs is not None
    run = server.start(fmt, prompts, params if asked else replace(params, logprobs=0), True, adapter)
    if not await finish(run, request):
        return Response(status_code=499)
    confident = router.confident([lp for c in run.choices for lp, _ in c.logprobs])
    if not asked:
        for c in run.choices:
            c.logprobs = []
    route = ("local", "confident")
    if not confident:
        answer = await forward(server, fmt, req, request, "low confidence")
        if isinstance(answer, Response):
            return answer
        route = ("local", "upstream unavailable")
    server.metrics.routed.labels(*route).inc()
    if key is not None and confident:
        await remember(server, key, run)  # an unsure answer is not kept for the next identical question
    headers = {CACHE_HEADER: "miss" if key else "off", **route_headers(route)}
    if not req.stream:
        return await local_answer(server, fmt, req, run, key, headers, route)
    rid = fmt.new_id()
    server.log_request(fmt, rid, req, run.choices, usage(run.prompts, run.choices), run_timings(run, key), "local")
    lines = replay(fmt, server.tokenizer, server.model_id, run.prompts, run.choices, run.n, include_usage, rid, "local")
    return EventStream(lines_of(lines), headers=headers)


def run_timings(run: Run, key: str | None) -> dict[str, Any]:
    return {
        "response_cache": "miss" if key else "off",
        "ttft_ms": round(1000 * ((run.first or run.start) - run.start), 2),
        "total_ms": round(1000 * (time.perf_counter() - run.start), 2),
    }


async def stream(
    server: Server,
    fmt: Format,
    req: SamplingRequest,
    run: Run,
    key: str | None,
    include_usage: bool,
    route: tuple[str, str] | None = None,
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
    who = route[0] if route else None
    if not run.error:  # a client gone mid-stream never gets here: only finished answers are logged
        server.log_request(fmt, rid, req, run.choices, usage(run.prompts, run.choices), run_timings(run, key), who)
    if include_usage:
        yield fmt.usage_chunk(rid, model, run.prompts, run.choices, run.cached_prompt_tokens, who)
    yield "data: [DONE]\n\n"


async def remember(server: Server, key: str, run: Run) -> None:
    """Store a finished answer (not an aborted or failed one) for the next identical request."""
    if all(c.finish_reason in ("stop", "length") for c in run.choices):
        value = {"choices": [c.to_json() for c in run.choices], "prompt_logprobs": [p.logprobs for p in run.prompts]}
        await server.cache_put(key, value)


def cached_answer(
    server: Server,
    fmt: Format,
    req: SamplingRequest,
    prompts: list[Prompt],
    hit: dict[str, Any],
    include_usage: bool,
    routed: bool = False,
) -> Response:
    """A response-cache hit; under --upstream it is a local answer (`routed`), marked so."""
    choices = [Choice.from_json(c) for c in hit["choices"]]
    for p, lps in zip(prompts, hit["prompt_logprobs"], strict=True):
        p.logprobs = None if lps is None else [(lp, [tuple(t) for t in top]) for lp, top in lps]
    rid, timings = fmt.new_id(), {"response_cache": "hit"}
    route = ("local", "response cache") if routed else None
    if route:
        server.metrics.routed.labels(*route).inc()
    who, headers = route[0] if route else None, {CACHE_HEADER: "hit", **route_headers(route)}
    server.log_request(fmt, rid, req, choices, usage(prompts, choices), timings, who)
    if req.stream:
        lines = replay(fmt, server.tokenizer, server.model_id, prompts, choices, req.n, include_usage, rid, who)
        return EventStream(lines_of(lines), headers=headers)
    body = fmt.body(server.tokenizer, server.model_id, prompts, choices, req.n, timings, rid, who)
    return Response(body, headers=headers, media_type="application/json")


# method, path, handler: every route the API answers (the web page adds its own, see web.ROUTES)
TABLE: list[tuple[str, str, Callable[..., Any]]] = [
    ("GET", "/health", health),
    ("GET", "/metrics", metrics),
    ("GET", "/vitals", vitals),
    ("GET", "/v1/models", models),
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat_completions),
    ("POST", "/v1/feedback", feedback),
    ("POST", "/tokenize", tokenize),  # vLLM's tokenizer routes, as lm-evaluation-harness probes them
    ("POST", "/detokenize", detokenize),
    ("GET", "/tokenizer_info", tokenizer_info),
]
TOKENIZER_ROUTES = {"/tokenize", "/detokenize", "/tokenizer_info"}
