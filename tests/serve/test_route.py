"""The edge/cloud cascade (`serve --upstream URL --route POLICY`): two real servers on 127.0.0.1, the edge
forwarding to the "cloud" (another trainfer with its own key), and the policy on its own."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.serve.conftest import ServerProcess, free_port
from tests.serve.test_app import LONG, wait_for
from trainfer.data.from_logs import Filters, dataset_from_logs
from trainfer.errors import TrainferError
from trainfer.serve.route import Router, Upstream, predicted_ttft_s

SECRET = "cloud-key-7f3a9"
CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def cloud(tiny_chat_dir):
    server = ServerProcess(str(tiny_chat_dir), "--served-model-name", "cloud", "--api-key", SECRET)
    yield server
    server.stop()


def edge(model_dir, cloud: ServerProcess | str, *flags: str, env: dict | None = None) -> ServerProcess:
    url = cloud if isinstance(cloud, str) else cloud.url
    return ServerProcess(str(model_dir), "--served-model-name", "edge", "--upstream", url, *flags, env=env)


def answer(server: ServerProcess, body: dict, path: str = "/v1/chat/completions") -> tuple[httpx.Response, dict]:
    """(response, JSON answer or the streamed events' usage chunk); streamed answers must end with [DONE]."""
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        return r, r.json()
    lines = [x for x in r.text.splitlines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert not any("error" in c for c in chunks), chunks
    return r, next((c for c in chunks if c.get("usage")), {})


def test_upstream_first_forwards_and_answers_locally_when_the_upstream_is_gone(tiny_chat_dir, cloud, tmp_path):
    env = {**os.environ, "TRAINFER_UPSTREAM_API_KEY": SECRET}
    logs = tmp_path / "logs"
    server = edge(tiny_chat_dir, cloud, "--route", "upstream-first", "--log-requests", str(logs), env=env)
    try:
        direct = httpx.post(cloud.url + "/v1/chat/completions", json=CHAT, timeout=60,
                            headers={"authorization": f"Bearer {SECRET}"}).json()  # fmt: skip
        r, body = answer(server, CHAT)
        assert (r.headers["x-trainfer-route"], r.headers["x-trainfer-route-reason"]) == ("upstream", "policy")
        assert body["usage"]["route"] == "upstream" and body["model"] == "cloud"
        assert body["choices"][0]["message"] == direct["choices"][0]["message"]  # the cloud's own answer
        streamed = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        r, usage_chunk = answer(server, streamed)
        assert r.headers["x-trainfer-route"] == "upstream" and usage_chunk["usage"]["route"] == "upstream"
        r, body = answer(server, {"prompt": "hi", "max_tokens": 4}, "/v1/completions")
        assert r.headers["x-trainfer-route"] == "upstream" and body["object"] == "text_completion"
        hits = cloud.metric("trainfer_response_cache_hits_total")  # the cloud has this question cached by now
        for control, more in (("no-cache", 0), (None, 1)):  # the client's Cache-Control holds upstream too
            headers = {"cache-control": control} if control else {}
            assert httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=60).is_success
            assert cloud.metric("trainfer_response_cache_hits_total") == hits + more

        server.stop()
        output = server.proc.stderr.read() + server.proc.stdout.read()
        gone = f"http://127.0.0.1:{free_port()}"  # the same edge, its upstream now unreachable
        server = edge(tiny_chat_dir, gone, "--route", "upstream-first", "--log-requests", str(logs), env=env)
        for body, why in ((CHAT, "upstream unavailable"), (streamed, "response cache")):  # the same question again
            r, got = answer(server, body)
            assert (r.headers["x-trainfer-route"], r.headers["x-trainfer-route-reason"]) == ("local", why)
            assert got["usage"]["route"] == "local"
        assert server.metric("trainfer_upstream_errors_total") == 1
        vitals = httpx.get(server.url + "/vitals", timeout=10).json()["route"]
        assert vitals == {
            "policy": "upstream-first",
            "local": {"upstream unavailable": 1, "response cache": 1},
            "upstream": {},
        }
    finally:
        server.stop()
    # the key went to the upstream only: not into the edge's output, its request log or its metrics
    log_text = "".join(p.read_text() for p in sorted(logs.glob("*.jsonl")))
    output += server.proc.stderr.read() + server.proc.stdout.read()
    assert "routing upstream-first" in output and SECRET not in output + log_text
    records = [json.loads(line) for line in log_text.splitlines()]
    assert [r["route"] for r in records] == ["upstream"] * 5 + ["local"] * 2
    assert records[0]["choices"][0]["text"] == direct["choices"][0]["message"]["content"]
    # synced back: only what the cloud answered becomes training data
    out = tmp_path / "routed.jsonl"
    report = dataset_from_logs(logs, out, Filters(finish_reasons=("stop", "length"), routed=True))
    assert report.dropped["answered locally"] == 2 and report.kept >= 1
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept[0]["messages"][-1]["content"] == direct["choices"][0]["message"]["content"]


def test_local_first_forwards_unsure_answers_and_keeps_sure_ones(tiny_chat_dir, cloud):
    env = {**os.environ, "TRAINFER_UPSTREAM_API_KEY": SECRET}
    # the tiny random model is never sure (mean log-probability ~ -5.5): a bar of 0 forwards everything
    server = edge(tiny_chat_dir, cloud, "--route", "local-first", "--route-min-logprob", "0", env=env)
    try:
        for body in (CHAT, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}):
            r, got = answer(server, body)
            assert (r.headers["x-trainfer-route"], r.headers["x-trainfer-route-reason"]) == (
                "upstream",
                "low confidence",
            )
            assert got["usage"]["route"] == "upstream"
    finally:
        server.stop()
    server = edge(tiny_chat_dir, cloud, "--route", "local-first", "--route-min-logprob", "-100", env=env)
    try:
        r, got = answer(server, CHAT)
        assert r.headers["x-trainfer-route"] == "local" and r.headers["x-trainfer-route-reason"] == "confident"
        assert got["choices"][0]["logprobs"] is None  # asked of the engine for the check, not shown unasked
        r, got = answer(server, {**CHAT, "logprobs": True})
        assert got["choices"][0]["logprobs"]["content"]  # shown when asked
        r, got = answer(server, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert r.headers["x-trainfer-route"] == "local" and got["usage"]["route"] == "local"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 0, "echo": True}, timeout=30)
        assert r.status_code == 200 and "x-trainfer-route" not in r.headers  # scoring is never routed
    finally:
        server.stop()


def test_a_silent_upstream_times_out_into_a_local_answer(tiny_chat_dir):
    """An upstream that accepts the connection and never answers (a hung server) costs --upstream-timeout, then
    the edge answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepted by the kernel, never read: a hung server
    server = edge(tiny_chat_dir, f"http://127.0.0.1:{listener.getsockname()[1]}", "--route", "upstream-first",
                  "--upstream-model", "cloud", "--upstream-timeout", "1")  # fmt: skip
    try:
        start = time.perf_counter()
        r, got = answer(server, CHAT)
        assert (r.headers["x-trainfer-route"], r.headers["x-trainfer-route-reason"]) == (
            "local",
            "upstream unavailable",
        )
        assert 1.0 <= time.perf_counter() - start < 10
    finally:
        server.stop()
        listener.close()
    assert "the upstream timed out" in server.proc.stderr.read()


def test_a_wrong_upstream_key_is_not_the_clients_error(tiny_chat_dir, cloud):
    server = edge(tiny_chat_dir, cloud, "--route", "upstream-first", "--upstream-api-key", "wrong")
    try:
        r, got = answer(server, CHAT)
        assert r.headers["x-trainfer-route"] == "local" and got["choices"][0]["message"]["content"] is not None
    finally:
        server.stop()
    assert "wrong" not in server.proc.stderr.read()


def test_load_policy_forwards_only_when_the_queue_would_break_the_objective(long_chat_dir, tiny_chat_dir):
    cloud = ServerProcess(str(tiny_chat_dir), "--served-model-name", "cloud")
    server = edge(long_chat_dir, cloud, "--route", "load", "--route-slo-ttft-ms", "0.001", "--max-num-seqs", "1")
    try:
        r, _ = answer(server, CHAT)  # idle: starts at once, whatever the objective
        assert (r.headers["x-trainfer-route"], r.headers["x-trainfer-route-reason"]) == ("local", "within slo")
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=httpx.post(
            server.url + "/v1/completions", json={**LONG, "max_tokens": 3000}, timeout=120)))  # fmt: skip
        worker.start()
        assert wait_for(lambda: server.metric("trainfer_num_requests_running") == 1)
        r, _ = answer(server, {**CHAT, "max_tokens": 7})  # the one slot is taken: the queue would break 1 us
        assert (r.headers["x-trainfer-route"], r.headers["x-trainfer-route-reason"]) == ("upstream", "queue")
        worker.join(timeout=120)
        assert result["r"].headers["x-trainfer-route"] == "local"
    finally:
        server.stop()
        cloud.stop()


def test_predicted_wait_follows_the_rate_slots_free_up():
    assert predicted_ttft_s({"running": 3, "waiting": 0}, 4, 2.0) == 0  # a free slot: starts at once
    assert predicted_ttft_s({"running": 4, "waiting": 0}, 4, None) == math.inf  # must queue, nothing known
    assert predicted_ttft_s({"running": 4, "waiting": 5}, 4, 2.0) == pytest.approx(3.0)  # 6th in line, 2 free a second
    assert predicted_ttft_s({"running": 4, "waiting": 0}, 4, 2.0, queue_age=1.5) == 1.5  # someone waits longer already
    router = Router(Upstream("http://127.0.0.1:9"), "load", slo_ttft_ms=1000)
    assert router.forward_first({"running": 4, "waiting": 4}, 4, 2.0) == "queue"  # 2.5 s > 1 s
    assert router.forward_first({"running": 4, "waiting": 0}, 4, 2.0) is None  # 0.5 s <= 1 s
    for _ in range(3):
        router.upstream_answered(3.0)  # the upstream now takes 3 s to start an answer
    assert router.forward_first({"running": 4, "waiting": 4}, 4, 2.0) is None  # 2.5 s locally beats it
    assert router.forward_first({"running": 4, "waiting": 9}, 4, 2.0) == "queue"  # 5 s does not
    sure = Router(Upstream("http://127.0.0.1:9"), "local-first", min_logprob=-1.0)
    assert sure.confident([-0.5, -1.4]) and not sure.confident([-0.5, -1.6]) and sure.confident([])


@pytest.mark.parametrize(
    "url,words",
    [("ftp://x", "http(s) URL"), ("http://user:pw@host:1", "credentials"), ("localhost:8000", "http(s) URL")],
)
def test_bad_upstream_settings_are_clear_errors(url, words):
    with pytest.raises(TrainferError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Upstream(url)
    with pytest.raises(TrainferError, match="--route must be one of"):
        Router(Upstream("http://127.0.0.1:9"), "cloud-first")


def test_kill_9_of_the_upstream_mid_stream_ends_the_relayed_stream_with_an_error(long_chat_dir, tiny_chat_dir):
    cloud = ServerProcess(str(long_chat_dir), "--served-model-name", "cloud")
    server = edge(tiny_chat_dir, cloud, "--route", "upstream-first")
    try:
        body = {**LONG, "max_tokens": 6000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert r.headers["x-trainfer-route"] == "upstream" and next(lines).startswith("data: ")
            os.kill(cloud.proc.pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        assert "the upstream's answer broke off" in rest[-1] and "[DONE]" not in rest[-1]
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # the edge is unharmed
    finally:
        server.stop()
        cloud.stop()
