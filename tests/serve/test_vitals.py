"""/vitals, the JSON twin of /metrics for the web page: rates and exact windowed percentiles, one point a second."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from tests.serve.conftest import ServerProcess
from trainfer.serve.metrics import Vitals, percentile

IDLE = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "prefix_cache_hit_rate": 0.0}


def test_percentiles_rates_and_the_window():
    assert [percentile([1, 2, 3, 4], q) for q in (50, 90, 99)] == [2, 4, 4]
    assert percentile([5.0], 99) == 5.0
    registry = CollectorRegistry()
    hits = Counter("trainfer_response_cache_hits", "", registry=registry)
    Counter("trainfer_response_cache_misses", "", registry=registry).inc(3)
    hits.inc()
    v = Vitals(history_s=3, window_s=10)
    v.record(80.0, ttft=9.9, tpot=9.9)  # older than the window at t=100.5: dropped
    for i in range(100):
        v.record(100.0, ttft=(i + 1) / 1000, tpot=0.01 if i % 2 else None)
    first = v.sample(100.5, IDLE, registry)
    assert first["tokens_per_s"] == 0  # no rate before a second point
    assert (first["ttft_p50_ms"], first["ttft_p90_ms"], first["ttft_p99_ms"]) == (50.0, 90.0, 99.0)
    assert first["tpot_p50_ms"] == 10.0 and first["finished"] == 100
    assert first["response_cache_hit_rate"] == 0.25
    v.tokens += 30
    assert v.sample(102.5, IDLE, registry)["tokens_per_s"] == 15.0
    later = v.sample(111.0, IDLE, registry)  # the latencies have left the window
    assert later["ttft_p50_ms"] is None and later["finished"] == 0
    v.sample(112.0, IDLE, registry)
    assert len(v.samples) == 3  # the history is bounded


@pytest.fixture(scope="module")
def server(tiny_chat_dir):
    s = ServerProcess(str(tiny_chat_dir))
    yield s
    s.stop()


def test_kv_gauges_show_what_a_smaller_cache_holds(tmp_path):
    """/metrics' KV gauges from the engine's pool: the same --kv-cache-gb holds twice the tokens in fp16 and 3.2x in
    int8 (the tiny model's heads of 16 values, each with a 4-byte scale), within the same bytes."""
    from prometheus_client import generate_latest

    from tests.conftest import make_hf_model
    from trainfer.infer.engine import Engine
    from trainfer.io.loader import load_model
    from trainfer.serve.metrics import Metrics

    make_hf_model("llama").save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    seen = {}
    for kv in ("fp32", "fp16", "int8"):
        metrics = Metrics()
        metrics.observe_engine(Engine(model, kv_cache_gb=2**-8, block_size=4, kv_dtype=kv).stats())
        lines = generate_latest(metrics.registry).decode().splitlines()
        seen[kv] = {ln.split()[0]: float(ln.split()[1]) for ln in lines if ln.startswith("trainfer_kv_cache_")}
    tokens = {kv: v["trainfer_kv_cache_capacity_tokens"] for kv, v in seen.items()}
    assert tokens["fp16"] == 2 * tokens["fp32"] and tokens["int8"] == pytest.approx(3.2 * tokens["fp32"], rel=1e-3)
    assert all(0.99 * 2**22 <= v["trainfer_kv_cache_bytes"] <= 2**22 for v in seen.values()), seen


def test_vitals_follow_traffic(server):
    t0 = time.time()
    body = {"prompt": "hello", "max_tokens": 100, "temperature": 1, "ignore_eos": True}
    for _ in range(3):
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    time.sleep(2.2)  # two samples after the traffic
    v = httpx.get(server.url + "/vitals", timeout=10).json()
    points = [p for p in v["history"] if p["t"] >= t0]
    assert points and max(p["tokens_per_s"] for p in v["history"]) > 0
    last = v["history"][-1]
    assert last["finished"] >= 3 and last["ttft_p50_ms"] > 0 and last["tpot_p50_ms"] > 0
    assert last["running"] == 0 and v["inflight"] == 0
    # `since` returns only newer points: what the page polls with
    newer = httpx.get(server.url + "/vitals", params={"since": last["t"]}, timeout=10).json()["history"]
    assert all(p["t"] > last["t"] for p in newer)
    assert httpx.get(server.url + "/metrics", timeout=10).text.count('endpoint="/vitals"') >= 1


def test_streamed_usage_counts_prefix_cached_prompt_tokens(server):
    """The page shows per answer how much of the prompt the prefix cache served (OpenAI's cached_tokens)."""
    prompt = "a shared system prompt that fills several KV blocks " * 4
    body = {"prompt": prompt, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}

    def usage() -> dict:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.headers["x-trainfer-response-cache"] == "off"  # sampled without a seed: not cacheable
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        return chunks[-1]["usage"]

    first, second = usage(), usage()
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert 0 < second["prompt_tokens_details"]["cached_tokens"] < second["prompt_tokens"]
