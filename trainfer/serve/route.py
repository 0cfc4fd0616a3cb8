"""The edge/cloud cascade: `trainfer serve MODEL --upstream URL --route POLICY` answers with the local model or
forwards to a larger OpenAI-compatible server (another trainfer, vLLM, llama-server, a hosted API).

Policies (`Router.policy`):
- `local-first`: answer locally; forward when the local answer's confidence, the mean log-probability of its
  tokens, is under `--route-min-logprob`. The local answer is generated whole before the choice, so a streamed
  request sees its first token only then (the price of checking before showing).
- `load`: forward when the request would have to queue locally and the predicted wait breaks the
  time-to-first-token objective `--route-slo-ttft-ms` (see predicted_ttft_s), else answer locally.
- `upstream-first`: forward; answer locally when the upstream cannot be reached, errs, or sends nothing within
  `--upstream-timeout` (offline operation).
Whichever answers, the response says so: the `x-trainfer-route` header (`local` / `upstream`), its reason in
`x-trainfer-route-reason`, and `usage.route`. An upstream failure is never the client's error: the local model
answers instead. The upstream's key goes in its Authorization header and nowhere else (not in logs, errors,
metrics or answers). Only generating requests are routed; scoring (echo) and test-time compute stay local.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx

from trainfer.errors import TrainferError

POLICIES = ("local-first", "load", "upstream-first")
ROUTE_HEADER, REASON_HEADER = "x-trainfer-route", "x-trainfer-route-reason"


class UpstreamError(Exception):
    """The upstream did not answer (unreachable, an error status, too slow); the message names no secret."""


class Upstream:
    """Owns the HTTP client to the upstream server, the model name sent to it and its API key."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise TrainferError(f"--upstream must be an http(s) URL such as http://10.0.0.2:8000, got {url!r}")
        if parsed.userinfo:
            raise TrainferError("--upstream must not hold credentials: pass the key with --upstream-api-key")
        if timeout_s <= 0:
            raise TrainferError(f"--upstream-timeout must be > 0 seconds, got {timeout_s}")
        self.url = str(parsed).rstrip("/").removesuffix("/v1")
        self.model, self.timeout_s = model, timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(timeout_s, connect=min(5.0, timeout_s))
        self.client = httpx.AsyncClient(timeout=timeout, headers=headers)

    async def model_name(self) -> str:
        """--upstream-model, else the upstream's first model (asked once)."""
        if self.model is None:
            data = as_object(await self._send("GET", "/v1/models", None))
            try:
                self.model = str(data["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise UpstreamError("the upstream's /v1/models lists no model") from None
        return self.model

    async def complete(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
        """A whole (non-streamed) answer from the upstream. `headers`: the client's that concern the upstream too
        (Cache-Control)."""
        body = {**body, "model": await self.model_name(), "stream": False}
        return as_object(await self._send("POST", path, body, headers))

    async def stream(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> AsyncIterator[str]:
        """The upstream's server-sent events, line by line ("data: ..."). Raises UpstreamError before the first
        line if the upstream fails to start the answer; a failure after that ends the lines early, and the
        caller's stream says so."""
        body = {**body, "model": await self.model_name(), "stream": True}
        request = self.client.build_request("POST", self.url + path, json=body, headers=headers)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise UpstreamError(describe(e)) from None
        if response.status_code != 200:
            await response.aclose()
            raise UpstreamError(f"the upstream answered {response.status_code}")
        lines = response.aiter_lines()
        try:
            first = await anext(lines)
        except httpx.HTTPError as e:
            await response.aclose()
            raise UpstreamError(describe(e)) from None
        except StopAsyncIteration:
            await response.aclose()
            raise UpstreamError("the upstream sent nothing") from None
        return passthrough(first, lines, response)

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        try:
            response = await self.client.request(method, self.url + path, json=body, headers=headers)
        except httpx.HTTPError as e:
            raise UpstreamError(describe(e)) from None
        if response.status_code != 200:
            raise UpstreamError(f"the upstream answered {response.status_code}")
        return response

    async def aclose(self) -> None:
        await self.client.aclose()


def as_object(response: httpx.Response) -> dict[str, Any]:
    """The upstream's answer as a JSON object, or an UpstreamError."""
    try:
        data = response.json()
    except ValueError:
        raise UpstreamError("the upstream's answer is not JSON") from None
    if not isinstance(data, dict):
        raise UpstreamError("the upstream's answer is not a JSON object")
    return data


def describe(e: Exception) -> str:
    """An httpx failure in words, without its URL or headers (the key could be in neither, but say less)."""
    if isinstance(e, httpx.TimeoutException):
        return "the upstream timed out"
    if isinstance(e, httpx.ConnectError):
        return "the upstream cannot be reached"
    return f"the upstream failed ({type(e).__name__})"


async def passthrough(first: str, lines: AsyncIterator[str], response: httpx.Response) -> AsyncIterator[str]:
    try:
        yield first
        async for line in lines:
            yield line
    except httpx.HTTPError:
        return  # the caller notices the missing [DONE]
    finally:
        await response.aclose()


class Router:
    """Owns the routing policy, its thresholds and the upstream; decides, per request, who answers."""

    def __init__(
        self, upstream: Upstream, policy: str = "local-first", min_logprob: float = -0.5, slo_ttft_ms: float = 1000.0
    ) -> None:
        if policy not in POLICIES:
            raise TrainferError(f"--route must be one of {', '.join(POLICIES)}, got {policy!r}")
        if slo_ttft_ms <= 0:
            raise TrainferError(f"--route-slo-ttft-ms must be > 0, got {slo_ttft_ms}")
        self.upstream, self.policy, self.min_logprob, self.slo_s = upstream, policy, min_logprob, slo_ttft_ms / 1000
        self.upstream_ttfts: deque[float] = deque(maxlen=32)  # seconds to the upstream's first byte, latest forwards

    def forward_first(
        self, engine: dict[str, float], max_num_seqs: int, finish_rate: float | None, queue_age: float = 0.0
    ) -> str | None:
        """Why to forward before any local work (`upstream-first`, or `load` with a queue that would break the
        objective), or None to start locally. `load` forwards only while the upstream's own recent time to first
        byte beats the local prediction: a slow upstream is no way out of a queue."""
        if self.policy == "upstream-first":
            return "policy"
        if self.policy == "load":
            local = predicted_ttft_s(engine, max_num_seqs, finish_rate, queue_age)
            upstream = statistics.median(self.upstream_ttfts) if self.upstream_ttfts else 0.0
            if local > self.slo_s and upstream < local:
                return "queue"
        return None

    def upstream_answered(self, ttft_s: float) -> None:
        """The time to the first byte of a forwarded answer (streamed: its first event; plain: the whole answer)."""
        self.upstream_ttfts.append(ttft_s)

    def confident(self, logprobs: list[float]) -> bool:
        """`local-first`: is the local answer sure enough to keep? (An empty answer is.)"""
        return not logprobs or statistics.fmean(logprobs) >= self.min_logprob


def predicted_ttft_s(
    engine: dict[str, float], max_num_seqs: int, finish_rate: float | None, queue_age: float = 0.0
) -> float:
    """A new request's wait for a slot (0 when one is free: it starts at once, and forwarding could not make the
    wait shorter). Slots free up at `finish_rate` sequences a second (measured over the last seconds), so the
    request, with `waiting` sequences ahead of it, waits about (waiting + 1) / finish_rate (Little's law); and at
    least `queue_age`, how long the oldest request still without its first token has waited already. With no
    rate yet (a fresh server, or nothing finished lately), infinity: a request that would queue blind is forwarded."""
    if engine["running"] + engine["waiting"] < max_num_seqs:
        return 0.0
    if not finish_rate:
        return math.inf
    return max((engine["waiting"] + 1) / finish_rate, queue_age)


def with_route(data: dict[str, Any], route: str) -> dict[str, Any]:
    """An upstream answer (or usage chunk) marked with who answered."""
    if isinstance(data.get("usage"), dict):
        data["usage"]["route"] = route
    return data


def chunk_texts(line: str) -> tuple[dict[str, Any] | None, dict[int, str], dict[int, str]]:
    """One upstream SSE line: its JSON (None if not a data line), and per choice index its text and finish."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None, {}, {}
    try:
        data = json.loads(line[6:])
    except ValueError:
        return None, {}, {}
    texts, finishes = {}, {}
    for c in data.get("choices") or []:
        if isinstance(c, dict) and isinstance(c.get("index"), int):
            piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
            texts[c["index"]] = piece if isinstance(piece, str) else ""
            if c.get("finish_reason"):
                finishes[c["index"]] = str(c["finish_reason"])
    return data, texts, finishes
