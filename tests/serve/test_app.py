"""The HTTP server as clients see it: the official `openai` client against a real uvicorn process."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.serve.conftest import ServerProcess

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def client(server: ServerProcess, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


# ---- the real model -------------------------------------------------------------------------


@pytest.mark.real
def test_models_and_greedy_chat_equal_the_engine(smollm2_server, smollm2):
    c = client(smollm2_server)
    assert [m.id for m in c.models.list().data] == ["smollm2-135m-instruct"]
    r = c.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, temperature=0, max_tokens=40)
    want = smollm2.chat(CHAT, temperature=0, max_tokens=40)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason == "stop"
    assert r.usage.prompt_tokens == len(smollm2.chat_prompt(CHAT))
    assert r.usage.completion_tokens == len(want.token_ids) + 1  # the end-of-turn token counts, as in vLLM


@pytest.mark.real
def test_streamed_chat_matches_the_whole_answer(smollm2_server):
    c = client(smollm2_server)
    whole = c.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, temperature=0, max_tokens=40)
    chunks = list(
        c.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=CHAT,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"Cache-Control": "no-cache"},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.real
def test_completions_usage_matches_the_tokenizer(smollm2_server, smollm2):
    c = client(smollm2_server)
    prompt = "The first five prime numbers are"
    r = c.completions.create(model="smollm2-135m-instruct", prompt=prompt, temperature=0, max_tokens=16)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(smollm2.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 16
    assert r.choices[0].text == smollm2.generate(prompt, temperature=0, max_tokens=16).text


@pytest.mark.real
def test_n_seed_stop_and_logprobs(smollm2_server):
    c = client(smollm2_server)
    kw = dict(model="smollm2-135m-instruct", prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=42)
    a = c.completions.create(n=3, **kw, extra_headers={"Cache-Control": "no-cache"})
    b = c.completions.create(n=3, **kw, extra_headers={"Cache-Control": "no-cache"})
    assert len(a.choices) == 3 and [x.text for x in a.choices] == [x.text for x in b.choices]
    assert len({x.text for x in a.choices}) > 1  # n samples are distinct draws, not one repeated
    stop = c.completions.create(
        model="smollm2-135m-instruct", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"]
    )
    assert stop.choices[0].finish_reason == "stop" and " 7" not in stop.choices[0].text and "6" in stop.choices[0].text
    lp = c.completions.create(model="smollm2-135m-instruct", prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    got = lp.choices[0].logprobs
    assert len(got.tokens) == len(got.token_logprobs) == 5 and all(len(t) == 2 for t in got.top_logprobs)
    assert "".join(got.tokens) == lp.choices[0].text
    assert all(v <= 0 for v in got.token_logprobs)
    chat = c.chat.completions.create(
        model="smollm2-135m-instruct", messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)


@pytest.mark.real
def test_response_cache_hits_only_deterministic_requests(smollm2_server):
    c = client(smollm2_server)
    before = smollm2_server.metric("trainfer_response_cache_hits_total")
    kw = dict(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Name a color."}], max_tokens=10)
    first = c.chat.completions.with_raw_response.create(temperature=0, **kw)
    second = c.chat.completions.with_raw_response.create(temperature=0, **kw)
    one, two = json.loads(first.text), json.loads(second.text)
    assert one["timings"]["response_cache"] == "miss" and two["timings"]["response_cache"] == "hit"
    assert [r.headers["x-trainfer-response-cache"] for r in (first, second)] == ["miss", "hit"]
    assert one["choices"] == two["choices"]
    assert smollm2_server.metric("trainfer_response_cache_hits_total") == before + 1
    sampled = [json.loads(c.chat.completions.with_raw_response.create(temperature=0.8, **kw).text) for _ in range(2)]
    assert all(s["timings"]["response_cache"] == "off" for s in sampled)
    bypass = c.chat.completions.with_raw_response.create(
        temperature=0, **kw, extra_headers={"Cache-Control": "no-cache"}
    )
    assert json.loads(bypass.text)["timings"]["response_cache"] == "off"
    streamed = c.chat.completions.create(temperature=0, stream=True, **kw)  # a hit replayed as a stream
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
        == one["choices"][0]["message"]["content"]
    )


@pytest.mark.real
def test_errors_have_openai_shapes(smollm2_server):
    c = client(smollm2_server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="smollm2-135m-instruct", messages=CHAT, temperature=5)
    assert e.value.status_code == 400 and "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smollm2-135m-instruct", prompt="hi " * 9000, max_tokens=10)
    assert e.value.code == "context_length_exceeded" and "8192" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smollm2-135m-instruct", prompt="hi", max_tokens=9000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-9", prompt="hi", max_tokens=3)
    r = httpx.post(
        smollm2_server.url + "/v1/chat/completions",
        content=b"{not json",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(smollm2_server.url + "/v1/chat/completions", json={"messages": []}, timeout=10)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(smollm2_server.url + "/v1/completions", json={"prompt": [1, 99999999]}, timeout=10)
    assert r.status_code == 400 and "out of range" in r.json()["error"]["message"]


# ---- the tiny model: auth, limits, disconnects, draining, soak ------------------------------------


def test_auth_on(tiny_chat_dir):
    server = ServerProcess(str(tiny_chat_dir), "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").completions.create(model=str(tiny_chat_dir), prompt="hi", max_tokens=2)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = client(server, "s3cret").completions.create(model=str(tiny_chat_dir), prompt="hi", max_tokens=2)
        assert ok.usage.completion_tokens == 2
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # probes need no key
        assert httpx.get(server.url + "/", timeout=5).status_code == 200  # the page loads, then asks for the key
        assert httpx.get(server.url + "/ui/runs", timeout=5).status_code == 401  # runs hold training samples
        auth = {"authorization": "Bearer s3cret"}
        assert httpx.get(server.url + "/ui/runs", headers=auth, timeout=5).json() == {"runs": []}
    finally:
        server.stop()


LONG = {"prompt": "x", "max_tokens": 8000, "ignore_eos": True, "temperature": 0.5}  # many seconds of decoding


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def long_server(long_chat_dir):
    """The tiny model with an 8k context: a generation can be made to run for seconds, so a test can act
    while it is provably still running."""
    server = ServerProcess(str(long_chat_dir), "--max-num-seqs", "8")
    yield server
    server.stop()


def idle(server: ServerProcess) -> bool:
    return (
        server.metric("trainfer_num_requests_running") == 0
        and server.metric("trainfer_num_requests_waiting") == 0
        and server.metric("trainfer_kv_cache_usage_ratio") == 0
    )


def test_streamed_disconnect_frees_the_sequence_long_before_its_end(long_server):
    before = long_server.metric("trainfer_generation_tokens_total")
    with httpx.stream("POST", long_server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(6)][0].startswith("data: ")
        assert long_server.metric("trainfer_num_requests_running") == 1  # still generating as the client leaves
    assert wait_for(lambda: idle(long_server), 3)
    generated = long_server.metric("trainfer_generation_tokens_total") - before
    assert 0 < generated < 4000, generated  # aborted, not run to its 8,000 tokens


def test_non_streamed_disconnect_stops_the_generation(long_server):
    before = long_server.metric("trainfer_generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(long_server.url + "/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.5))
    assert wait_for(lambda: idle(long_server), 3)
    generated = long_server.metric("trainfer_generation_tokens_total") - before
    assert 0 < generated < 4000, generated


def test_metric_labels_stay_bounded_whatever_the_path(long_server):
    for i in range(20):
        assert httpx.get(f"{long_server.url}/probe-{i}", timeout=5).status_code == 404
    text = httpx.get(long_server.url + "/metrics", timeout=5).text
    assert "probe-" not in text
    assert 'trainfer_requests_total{endpoint="other",status="404"} 20.0' in text


def test_sigterm_drains_a_generation_that_is_still_running(long_chat_dir):
    server = ServerProcess(str(long_chat_dir))
    result = {}
    body = {**LONG, "max_tokens": 3000, "temperature": 0}

    def long_request():
        result["r"] = httpx.post(server.url + "/v1/completions", json=body, timeout=120)

    worker = threading.Thread(target=long_request)
    worker.start()
    assert wait_for(lambda: server.metric("trainfer_num_requests_running") == 1)
    os.kill(server.proc.pid, signal.SIGTERM)
    worker.join(timeout=120)
    if result["r"].status_code != 200:
        server.stop()
        pytest.fail(f"{result['r'].text}\nserver log: {server.proc.stderr.read()[-3000:]}")
    assert result["r"].json()["usage"]["completion_tokens"] == 3000
    # uvicorn re-raises SIGTERM once drained, so the exit status is the signal (or 0 on older versions)
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)


def test_capacity_counts_sequences_and_holds_for_streamed_bursts(long_chat_dir):
    server = ServerProcess(str(long_chat_dir), "--max-num-seqs", "1", "--max-queue", "1")  # room for 2 sequences
    try:
        body = {**LONG, "max_tokens": 1500, "stream": True}

        def post(_):
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
                r.read()
                return r

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(post, range(6)))  # six streams at once, each running for seconds
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 200, 429, 429, 429, 429], codes
        rejected = next(r for r in results if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1" and json.loads(rejected.content)["error"]["type"] == (
            "rate_limit_error"
        )
        r = httpx.post(server.url + "/v1/completions", json={**LONG, "n": 3}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # 3 sequences can never fit in 2
        assert wait_for(lambda: idle(server), 5)  # the burst's two streams have closed (just after their last byte)
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the response, and the server aborts it
            assert running.status_code == 200 and next(lines).startswith("data: ")
            r = httpx.post(server.url + "/v1/completions", json={**LONG, "n": 2}, timeout=10)
            assert r.status_code == 429  # one sequence runs, n=2 needs two more
            health = httpx.get(server.url + "/health", timeout=10)
            assert health.status_code == 200 and health.json() == {"status": "ok", "inflight": 1, "capacity": 2}
            second = threading.Thread(target=post, args=(0,))  # queued behind the running one: now full
            second.start()
            assert wait_for(lambda: httpx.get(server.url + "/health", timeout=10).status_code == 503, 5)
            assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "overloaded"
        second.join(timeout=60)
        assert wait_for(lambda: idle(server), 5)
    finally:
        server.stop()


def test_extreme_sampling_values_do_not_touch_other_requests(tiny_chat_dir):
    """These used to raise inside the engine step and fail every request in flight."""
    server = ServerProcess(str(tiny_chat_dir))
    try:
        normal = [{"prompt": f"hello {i}", "max_tokens": 40, "temperature": 0, "ignore_eos": True} for i in range(4)]
        alone = [httpx.post(server.url + "/v1/completions", json=b, timeout=60).json() for b in normal]
        extreme = [
            {"prompt": "a", "max_tokens": 40, "temperature": 1e-40},
            {"prompt": "b", "max_tokens": 40, "repetition_penalty": 1e-40, "temperature": 0.9},
            {"prompt": "c", "max_tokens": 40, "seed": 2**64 - 1, "n": 2, "temperature": 1.0},
            {"prompt": "d", "max_tokens": 40, "seed": -(2**63), "temperature": 1.0, "frequency_penalty": 2},
        ]
        bodies = [{**b, "stream": i % 2 == 1} for i, b in enumerate(extreme + normal)]

        def post(b):
            return httpx.post(server.url + "/v1/completions", json=b, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(post, bodies))
        assert [r.status_code for r in results] == [200] * 8
        for i, (r, want) in enumerate(zip(results[4:], alone, strict=True)):
            if i % 2 == 1:  # streamed
                chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
                text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            else:
                text = r.json()["choices"][0]["text"]
            assert text == want["choices"][0]["text"]
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "seed": 2**64}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    finally:
        server.stop()


def test_penalties_over_http_equal_the_engine(tiny_chat_dir):
    from trainfer import LLM

    server = ServerProcess(str(tiny_chat_dir))
    try:
        kw = dict(max_tokens=30, temperature=0, presence_penalty=1.2, frequency_penalty=0.5, repetition_penalty=1.7)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "abcabc", **kw}, timeout=60).json()
    finally:
        server.stop()
    llm = LLM.load(tiny_chat_dir)
    assert r["choices"][0]["text"] == llm.generate("abcabc", **kw).text
    assert r["choices"][0]["text"] != llm.generate("abcabc", max_tokens=30, temperature=0).text


def test_echo_scores_the_prompt_like_the_model(tiny_chat_dir):
    """What lm-evaluation-harness needs: echo=true with logprobs returns every prompt token's logprob."""
    import torch

    from trainfer.io.loader import load_model

    server = ServerProcess(str(tiny_chat_dir))
    try:
        prompt = [10, 20, 30, 40, 50, 60]
        body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
        whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        scored = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 0}, timeout=60).json()
        streamed = httpx.post(server.url + "/v1/completions", json={**body, "stream": True}, timeout=60).text
        batch = httpx.post(server.url + "/v1/completions", json={**body, "prompt": [prompt, prompt[:3]]}, timeout=60)
    finally:
        server.stop()
    model, _ = load_model(tiny_chat_dir)
    with torch.no_grad():
        logp = model(torch.tensor([prompt]))[0].log_softmax(-1)
    want = [None] + [float(logp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    lp = whole["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 7 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:6] == pytest.approx(want[1:], abs=1e-4)
    assert lp["token_logprobs"][6] == pytest.approx(float(logp[-1].max()), abs=1e-4)  # greedy next token
    assert whole["usage"] == {"prompt_tokens": 6, "completion_tokens": 1, "total_tokens": 7}
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:6]
    assert scored["usage"]["completion_tokens"] == 0
    assert scored["choices"][0]["text"] == whole["choices"][0]["text"][: len(scored["choices"][0]["text"])]
    chunks = [json.loads(x[6:]) for x in streamed.splitlines() if x.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    streamed_lps = [
        v
        for c in chunks
        if c["choices"] and c["choices"][0]["logprobs"]
        for v in c["choices"][0]["logprobs"]["token_logprobs"]
    ]
    assert streamed_lps == lp["token_logprobs"]
    choices = batch.json()["choices"]
    assert batch.status_code == 200 and len(choices) == 2
    assert choices[0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]
    assert choices[1]["logprobs"]["token_logprobs"][1:3] == pytest.approx(want[1:3], abs=1e-4)


def test_bounded_soak_with_disconnects_mid_generation(long_chat_dir):
    """300 requests at concurrency 32; every fifth asks for 8,000 tokens and is abandoned after 3 lines, so
    it is provably mid-generation when its client leaves. No 5xx, no leaked blocks, RSS flat."""
    import asyncio
    import random

    import psutil

    server = ServerProcess(str(long_chat_dir), "--max-num-seqs", "32")
    proc = psutil.Process(server.proc.pid)
    rng = random.Random(0)
    statuses: list[int] = []

    async def one(http: httpx.AsyncClient, i: int) -> None:
        abandon = i % 5 == 0
        body = {
            "prompt": "soak " * rng.randrange(1, 20),
            "max_tokens": 8000 if abandon else rng.randrange(4, 40),
            "ignore_eos": abandon,
            "temperature": 0.7,
            "stream": abandon or i % 2 == 0,
        }
        async with http.stream("POST", "/v1/completions", json=body) as r:
            statuses.append(r.status_code)
            n = 0
            async for _ in r.aiter_lines():
                n += 1
                if abandon and n >= 3:
                    break  # the client walks away

    async def main() -> None:
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:

            async def guarded(i: int) -> None:
                async with sem:
                    await one(http, i)

            await asyncio.gather(*(guarded(i) for i in range(300)))

    try:
        asyncio.run(main())  # warm-up pass so the allocator reaches its working set
        rss_before = proc.memory_info().rss
        statuses.clear()
        start = time.time()
        asyncio.run(main())
        rss_after = proc.memory_info().rss
        assert len(statuses) == 300 and all(s == 200 for s in statuses), sorted(set(statuses))
        assert wait_for(lambda: idle(server), 3)
        # 60 abandoned generations of 8,000 tokens could not have finished in this time: they were aborted
        assert time.time() - start < 60
        assert rss_after < rss_before * 1.05, (rss_before, rss_after)
    finally:
        server.stop()


def test_a_failing_redis_is_a_cache_miss(tiny_chat_dir):
    from tests.serve.conftest import start_redis

    proc, url = start_redis()
    server = ServerProcess(str(tiny_chat_dir), "--cache-url", url)
    try:
        body = {"prompt": "cache me", "max_tokens": 8, "temperature": 0}
        first = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()
        assert first["timings"]["response_cache"] == "miss"
        proc.kill()
        proc.wait(timeout=10)
        again = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert again.status_code == 200 and again.json()["choices"] == first["choices"]
        assert server.metric("trainfer_response_cache_errors_total") >= 1
    finally:
        server.stop()
        if proc.poll() is None:
            proc.kill()


@pytest.mark.real
def test_redis_cache_is_shared_between_two_servers(smollm2_path, redis_url):
    a = ServerProcess("smollm2-135m-instruct", "--cache-url", redis_url)
    b = ServerProcess("smollm2-135m-instruct", "--cache-url", redis_url)
    try:
        kw = dict(model="smollm2-135m-instruct", prompt="The ocean is", max_tokens=8, temperature=0)
        first = json.loads(client(a).completions.with_raw_response.create(**kw).text)
        second = json.loads(client(b).completions.with_raw_response.create(**kw).text)
        assert first["timings"]["response_cache"] == "miss" and second["timings"]["response_cache"] == "hit"
        assert first["choices"] == second["choices"]
        assert b.metric("trainfer_response_cache_hits_total") == 1
    finally:
        a.stop()
        b.stop()
