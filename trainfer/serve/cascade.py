"""The cascade's side of a request (`serve --upstream`): forwarding to the upstream, relaying its answer to
the client marked with who answered, and logging it for `dataset from-logs --routed`. The policy and the
upstream client are route.py's; the local side stays in routes.py."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from trainfer.serve.responses import Choice, Format, error_body, sse
from trainfer.serve.route import REASON_HEADER, ROUTE_HEADER, UpstreamError, chunk_texts, with_route
from trainfer.serve.schemas import SamplingRequest
from trainfer.serve.server import Server
from trainfer.serve.streaming import EventStream, unless_disconnected

log = logging.getLogger("trainfer.serve")


async def forward(server: Server, fmt: Format, req: SamplingRequest, request: Request, reason: str) -> Response | str:
    """The upstream's answer to the client's request (as the client sent it, with the upstream's model name),
    marked and logged; or, when the upstream does not answer, why not (the caller answers locally)."""
    upstream = server.router.upstream  # type: ignore[union-attr]
    body, path, start = req.model_dump(exclude_unset=True), request.url.path, time.perf_counter()
    control = request.headers.get("cache-control")  # a client's no-cache holds for the upstream's cache too
    headers = {"cache-control": control} if control else None
    try:
        if req.stream:
            answer: dict[str, Any] | AsyncIterator[str] = await upstream.stream(path, body, headers)
        else:  # a client that leaves stops the wait (a stream notices in EventStream)
            finished, answer = await unless_disconnected(upstream.complete(path, body, headers), request.receive)
            if not finished:
                return Response(status_code=499)
    except UpstreamError as e:
        server.metrics.upstream_errors.inc()
        log.warning("upstream: %s; the local model answers (reason for forwarding: %s)", e, reason)
        return str(e)
    server.router.upstream_answered(time.perf_counter() - start)  # type: ignore[union-attr]
    server.metrics.routed.labels("upstream", reason).inc()
    headers = route_headers(("upstream", reason))  # to the client
    if isinstance(answer, dict):
        with_route(answer, "upstream")
        choices = upstream_choices(answer.get("choices"), {}, {})
        timings = {"total_ms": round(1000 * (time.perf_counter() - start), 2)}
        server.log_request(fmt, str(answer.get("id") or fmt.new_id()), req, choices, answer.get("usage") or {},
                           timings, "upstream")  # fmt: skip
        return Response(json.dumps(answer), headers=headers, media_type="application/json")
    return EventStream(relay(server, fmt, req, answer, start), headers=headers)


async def relay(
    server: Server, fmt: Format, req: SamplingRequest, lines: AsyncIterator[str], start: float
) -> AsyncIterator[str]:
    """The upstream's events to the client as they come (usage marked), its answer logged once complete; a
    stream that breaks off ends with an error event."""
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    used, rid, done = {}, None, False
    try:
        async for line in lines:
            data, pieces, ends = chunk_texts(line)
            done = done or line == "data: [DONE]"
            if data is not None:
                rid = rid or data.get("id")
                for i, piece in pieces.items():
                    texts[i] = texts.get(i, "") + piece
                finishes.update(ends)
                if isinstance(data.get("usage"), dict):
                    used = with_route(data, "upstream")["usage"]
                    line = "data: " + json.dumps(data)
            yield line + "\n"
    finally:
        await lines.aclose()  # type: ignore[attr-defined]  # a client gone mid-stream: the upstream is released now
    if not done:
        yield sse(error_body("the upstream's answer broke off", "server_error"))
        return
    timings = {"total_ms": round(1000 * (time.perf_counter() - start), 2)}
    choices = upstream_choices(None, texts, finishes)
    server.log_request(fmt, str(rid or fmt.new_id()), req, choices, used, timings, "upstream")


def upstream_choices(raw: Any, texts: dict[int, str], finishes: dict[int, str]) -> list[Choice]:
    """The upstream's answer as choices for the request log: from a JSON answer's `choices`, or from the texts
    a stream delivered per index."""
    if isinstance(raw, list):
        for c in raw:
            if isinstance(c, dict) and isinstance(c.get("index"), int):
                message = c.get("message") if isinstance(c.get("message"), dict) else {}
                text = c.get("text", message.get("content"))
                texts[c["index"]] = text if isinstance(text, str) else ""
                finishes[c["index"]] = str(c.get("finish_reason"))
    return [Choice(text=texts.get(i, ""), finish_reason=finishes.get(i)) for i in sorted(texts)]


def route_headers(route: tuple[str, str] | None) -> dict[str, str]:
    return {ROUTE_HEADER: route[0], REASON_HEADER: route[1]} if route else {}
