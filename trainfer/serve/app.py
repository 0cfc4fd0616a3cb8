"""The OpenAI-compatible HTTP server: the app factory and its outermost layer. `trainfer serve MODEL` runs it
under uvicorn.

A request's path, in reading order: `Gate` (auth, body cap, one count per answer) -> a route of
`routes.TABLE` -> `Server.tokenize` and `Server.sampling` (server.py) -> the response cache -> admission
(admission.py) and the engine (`Server.start`, a `Run`) -> the answer as JSON or server-sent events
(streaming.py) -> `Run.close` exactly once, whatever happened to the client. Errors: errors.py.
"""

from __future__ import annotations

import asyncio
import hmac
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from trainfer import web
from trainfer.serve import errors, routes
from trainfer.serve.errors import APIError, BodyTooLarge
from trainfer.serve.server import Server

ROUTES = {path for _, path, _ in routes.TABLE} | web.ROUTES
# With an API key, these need it too: the page, /health, /metrics and /vitals do not (as vLLM's /metrics),
# but a run's records hold its training samples.
PROTECTED = routes.TOKENIZER_ROUTES | {"/ui/runs", "/ui/run"}


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
        if server.router is not None:
            await server.router.upstream.aclose()

    app = FastAPI(title="trainfer", lifespan=lifespan)
    app.state.server = server
    errors.install(app)
    for method, path, handler in routes.TABLE:
        app.add_api_route(path, handler, methods=[method])
    web.add_routes(app, runs or [], {"model": server.model_id, "auth": bool(server.api_key)})
    return Gate(app, server)


def serve_forever(app: Gate, host: str, port: int, log_level: str, drain_grace: float, drain_timeout: float) -> None:
    """Run `app` under uvicorn until SIGINT or SIGTERM. On SIGTERM the server first drains: for `drain_grace`
    seconds /health answers 503 while requests are still taken (the balancer's checks notice and stop sending),
    then uvicorn stops listening and gives in-flight requests up to `drain_timeout` seconds to finish."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout)
    Draining(config, app.server, drain_grace).run()


class Draining(uvicorn.Server):
    """uvicorn's server with a drain before the shutdown on SIGTERM (SIGINT, or a second SIGTERM, stops at once)."""

    def __init__(self, config: uvicorn.Config, server: Server, grace: float) -> None:
        super().__init__(config)
        self.trainfer, self.grace = server, grace

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.grace <= 0 or self.trainfer.draining:
            return super().handle_exit(sig, frame)
        self.trainfer.draining = True
        timer = threading.Timer(self.grace, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()


async def sample_vitals(server: Server) -> None:
    """One point of the vitals history a second, whether or not a page is watching (the history is the point)."""
    while True:
        server.metrics.vitals.sample(time.perf_counter(), server.engine.stats(), server.metrics.registry)
        await asyncio.sleep(routes.VITALS_INTERVAL_S)


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
