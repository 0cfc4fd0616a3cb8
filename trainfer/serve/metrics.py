"""Prometheus metrics with vLLM's definitions: TTFT, TPOT = (E2E - TTFT) / (tokens - 1), ITL, E2E."""

from __future__ import annotations

import math
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    """One registry per server (not the global one), so tests can run several apps in one process."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "trainfer_requests",
            "HTTP requests by endpoint (a served path, or 'other') and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("trainfer_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("trainfer_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "trainfer_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY, registry=r
        )
        self.tpot = Histogram(
            "trainfer_time_per_output_token_seconds", "(E2E - TTFT) / (tokens - 1)", buckets=_TOKEN_LATENCY, registry=r
        )
        self.itl = Histogram(
            "trainfer_inter_token_latency_seconds", "Gap between streamed tokens", buckets=_TOKEN_LATENCY, registry=r
        )
        self.e2e = Histogram(
            "trainfer_e2e_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY, registry=r
        )
        self.running = Gauge("trainfer_num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("trainfer_num_requests_waiting", "Sequences waiting for a slot", registry=r)
        self.kv_usage = Gauge(
            "trainfer_kv_cache_usage_ratio", "Fraction of KV blocks held by live sequences", registry=r
        )
        self.kv_capacity = Gauge(
            "trainfer_kv_cache_capacity_tokens",
            "Tokens the KV cache holds (blocks x block size; --kv-dtype)",
            registry=r,
        )
        self.kv_bytes = Gauge("trainfer_kv_cache_bytes", "Memory of the KV cache, scales included", registry=r)
        self.prefix_hit_rate = Gauge(
            "trainfer_prefix_cache_hit_rate", "Prompt blocks found in the prefix cache", registry=r
        )
        self.draft_acceptance = Gauge(
            "trainfer_spec_decode_draft_acceptance_rate", "Speculative guesses the model kept (--draft)", registry=r
        )
        self.tokens_per_verify = Gauge(
            "trainfer_spec_decode_tokens_per_forward", "Tokens per forward that checked guesses (--draft)", registry=r
        )
        self.routed = Counter(
            "trainfer_routed_requests",
            "Generating requests by who answered (local or upstream, --route) and why",
            ["route", "reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "trainfer_upstream_errors", "Forwards the upstream did not answer (the local model did)", registry=r
        )
        self.cache_hits = Counter(
            "trainfer_response_cache_hits", "Responses served from the response cache", registry=r
        )
        self.cache_misses = Counter("trainfer_response_cache_misses", "Cacheable requests not in the cache", registry=r)
        self.cache_errors = Counter(
            "trainfer_response_cache_errors", "Response cache calls that failed (served as a miss)", registry=r
        )
        self.request_log_errors = Counter(
            "trainfer_request_log_errors", "Request log lines not written (disk error or full queue)", registry=r
        )
        self.vitals = Vitals()

    def observe_engine(self, stats: dict[str, float]) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_usage.set(stats["kv_cache_usage"])
        self.kv_capacity.set(stats["kv_cache_tokens"])
        self.kv_bytes.set(stats["kv_cache_bytes"])
        self.prefix_hit_rate.set(stats["prefix_cache_hit_rate"])
        self.draft_acceptance.set(stats["draft_acceptance"])
        self.tokens_per_verify.set(stats["tokens_per_verify_forward"])

    def observe_sequence(self, token_times: list[float], start: float) -> None:
        """Latencies of one generated sample from the times its tokens were emitted."""
        if not token_times:
            return
        ttft, e2e = token_times[0] - start, token_times[-1] - start
        self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        tpot = (e2e - ttft) / (len(token_times) - 1) if len(token_times) > 1 else None
        self.vitals.record(token_times[-1], ttft, tpot)
        if tpot is not None:
            self.tpot.observe(tpot)
            for a, b in zip(token_times, token_times[1:], strict=False):
                self.itl.observe(b - a)


class Vitals:
    """The server's recent history for the web page, one sample a second over the last minutes.

    /metrics holds cumulative counters and histograms for Prometheus to difference; a page opened now wants
    rates and latency percentiles over the last minute, and the minutes before it, without a Prometheus.
    Latencies are kept per finished sequence (bounded), so the percentiles are exact, not bucket estimates.
    """

    def __init__(self, history_s: int = 300, window_s: float = 60.0, max_latencies: int = 20_000) -> None:
        self.window_s = window_s
        self.samples: deque[dict[str, float]] = deque(maxlen=history_s)
        self.latencies: deque[tuple[float, float, float | None]] = deque(maxlen=max_latencies)  # (t, ttft, tpot)
        self.tokens = 0  # generated tokens, counted as they are emitted (the counter above counts at the end)
        self._last: tuple[float, int] | None = None

    def record(self, now: float, ttft: float, tpot: float | None) -> None:
        self.latencies.append((now, ttft, tpot))

    def sample(self, now: float, engine: dict[str, float], registry: CollectorRegistry) -> dict[str, float]:
        """One point of the history: the engine's gauges, rates since the last point, windowed percentiles."""
        while self.latencies and self.latencies[0][0] < now - self.window_s:
            self.latencies.popleft()
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (self.tokens - self._last[1]) / (now - self._last[0])
        self._last = (now, self.tokens)
        hits = registry.get_sample_value("trainfer_response_cache_hits_total") or 0.0
        misses = registry.get_sample_value("trainfer_response_cache_misses_total") or 0.0
        point = {
            "t": round(time.time(), 3),
            "running": engine["running"],
            "waiting": engine["waiting"],
            "kv_cache_usage": round(engine["kv_cache_usage"], 4),
            "prefix_cache_hit_rate": round(engine["prefix_cache_hit_rate"], 4),
            "response_cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
            "tokens_per_s": round(rate, 2),
            "finished": len(self.latencies),
        }
        ttfts = sorted(x[1] for x in self.latencies)
        tpots = sorted(x[2] for x in self.latencies if x[2] is not None)
        for name, values in (("ttft", ttfts), ("tpot", tpots)):
            for q in (50, 90, 99):
                point[f"{name}_p{q}_ms"] = round(1000 * percentile(values, q), 2) if values else None
        self.samples.append(point)
        return point


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]
