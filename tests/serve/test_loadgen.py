"""The load generator against a real (tiny) server: its counts and latencies must add up."""

from __future__ import annotations

import json

import pytest

from tests.serve.conftest import ServerProcess
from trainfer.serve.loadgen import RequestResult, bench_serve, percentiles, summarize


def test_summary_follows_vllm_definitions():
    a = RequestResult(True, 200, ttft=0.1, e2e=1.1, output_tokens=11, itl=[0.1] * 10)
    b = RequestResult(True, 200, ttft=0.3, e2e=0.8, output_tokens=6, itl=[0.1] * 5)
    failed = RequestResult(False, 429, error="429")
    s = summarize([a, b, failed], wall=2.0, slo_ttft_s=0.2, slo_tpot_s=1.0)
    assert a.tpot == 0.1 and b.tpot == 0.1  # (E2E - TTFT) / (tokens - 1)
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["output_token_throughput"] == 17 / 2.0 and s["request_throughput"] == 1.0
    assert s["goodput_rps"] == 0.5  # only `a` meets the 200 ms TTFT target
    assert percentiles([1, 2, 3, 4, 5])["p50"] == 3


def test_bench_serve_against_a_live_server(long_chat_dir, tmp_path):
    server = ServerProcess(str(long_chat_dir), "--max-num-seqs", "8")
    try:
        report = bench_serve(
            server.url,
            str(long_chat_dir),
            concurrency=[1, 4],
            input_len=16,
            output_len=12,
            out_json=tmp_path / "r.json",
            out_png=tmp_path / "r.png",
            label="tiny",
        )
        plain = bench_serve(server.url, str(long_chat_dir), concurrency=[2], input_len=16, output_len=12, stream=False)
        chats = bench_serve(server.url, str(long_chat_dir), conversations=3, turns=3, input_len=10, output_len=8)
    finally:
        server.stop()
    (lv,) = plain["levels"]
    assert lv["failed"] == 0 and lv["completed"] == 4
    assert lv["output_token_throughput"] * lv["wall_s"] == pytest.approx(48)  # a rate times a time: not exact
    (lv,) = chats["levels"]
    assert lv["completed"] == 9 and lv["failed"] == 0
    # each turn resends the chat so far: the prompts grow, and from the second turn on the history is cached
    assert lv["prompt_tokens"] > 9 * 10 and lv["cached_prompt_tokens"] > 0.35 * lv["prompt_tokens"]
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        assert lv["failed"] == 0 and lv["completed"] == lv["requests"] >= 4
        # ignore_eos makes every request produce exactly output_len tokens
        assert abs(lv["output_token_throughput"] * lv["wall_s"] - 12 * lv["completed"]) < 1e-6
        assert 0 < lv["ttft_s"]["p50"] <= lv["e2e_s"]["p50"]
    assert json.loads((tmp_path / "r.json").read_text())["label"] == "tiny"
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dataset_prompts_are_drawn_from_the_file(tmp_path):
    from trainfer.serve.loadgen import dataset_prompts

    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n\n')
    got = dataset_prompts(tmp_path / "p.jsonl", 20, seed=1)
    assert set(got) == {"a", "b"} and got == dataset_prompts(tmp_path / "p.jsonl", 20, seed=1)


def test_poisson_arrivals_against_a_live_server(tiny_chat_dir):
    """--request-rate: requests arrive at seeded exponential gaps instead of at a fixed concurrency."""
    import random

    server = ServerProcess(str(tiny_chat_dir))
    try:
        report = bench_serve(server.url, str(tiny_chat_dir), request_rate=20, num_prompts=10, input_len=8, output_len=6)
    finally:
        server.stop()
    (level,) = report["levels"]
    assert level["level"] == "rate 20/s" and level["request_rate"] == 20 and level["concurrency"] is None
    assert level["completed"] == 10 and level["failed"] == 0
    rng = random.Random(0)  # run_level's default seed: the last request starts after the sum of 9 gaps
    last_arrival = sum(rng.expovariate(20) for _ in range(9))
    assert level["wall_s"] >= last_arrival > 0.1


def test_a_server_that_drops_reused_connections_fails_no_request():
    """llama-server closes kept-alive connections on its own schedule; a client that reuses them then fails
    requests the server never saw. Here the server answers one request per connection and drops any
    further one without a response, so reuse would fail every request after the first."""
    import asyncio

    from trainfer.serve.loadgen import run_level

    chunk = json.dumps({"choices": [{"text": "hi"}], "usage": {"completion_tokens": 1}})
    body = f"data: {chunk}\n\ndata: [DONE]\n\n".encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        await reader.read(1)  # a second request on this connection: drop it unanswered
        writer.close()

    async def main() -> list:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            results, _ = await run_level(f"http://127.0.0.1:{port}", "m", ["a"] * 6, 1, 1, None, None, 10)
        return results

    results = asyncio.run(main())
    assert [r.ok for r in results] == [True] * 6, [r.error for r in results]
