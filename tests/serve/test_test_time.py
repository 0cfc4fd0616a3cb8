"""The `test_time` extension of /v1/chat/completions against a real server: the same answer as LLM.reason with
the same seed, usage counting every token, streaming the decided answer, and 400s for bad settings."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.conftest import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_chat_dir):
    s = ServerProcess(str(tiny_chat_dir), "--max-num-seqs", "8")
    yield s
    s.stop()


MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


def test_same_answer_as_the_library(server, tiny_chat_dir):
    from trainfer import LLM
    from trainfer.reason import reason

    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "seed": 3,
            "test_time": {"strategy": "self_consistency", "n": 4, "kind": "line"}}  # fmt: skip
    got = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    llm = LLM.load(tiny_chat_dir, num_blocks=128)
    want = reason(llm, MESSAGES, "self-consistency", n=4, kind="line", max_tokens=12, temperature=1.0, seed=3)
    tt = got["test_time"]
    assert tt["answer"] == want.answer and tt["answers"] == want.answers and tt["votes"] == want.votes
    assert got["choices"][0]["message"]["role"] == "assistant" and got["object"] == "chat.completion"
    c = want.compute
    assert got["usage"]["completion_tokens"] == c.generated_tokens == tt["compute"]["generated_tokens"]
    assert got["usage"]["prompt_tokens"] == c.prompt_tokens and tt["compute"]["samples"] == 4


def test_best_of_n_judged_by_the_model_matches_the_library(server, tiny_chat_dir):
    from trainfer import LLM
    from trainfer.reason import reason

    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 5,
            "test_time": {"strategy": "best_of_n", "n": 3, "kind": "line", "scorer": "judge"}}  # fmt: skip
    got = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
    llm = LLM.load(tiny_chat_dir, num_blocks=128)
    want = reason(llm, MESSAGES, "best-of-n", n=3, kind="line", max_tokens=6, temperature=1.0, seed=5, scorer="judge")
    tt = got["test_time"]
    assert tt["answer"] == want.answer and tt["scores"] == pytest.approx(want.scores)
    judged = len({a for a in want.answers if a is not None})  # one one-token judge draw per distinct answer
    assert tt["compute"]["samples"] == 3 + judged and got["usage"]["prompt_tokens"] == want.compute.prompt_tokens


def test_stream_sends_the_decided_answer(server):
    body = {"messages": MESSAGES, "max_tokens": 8, "stream": True, "test_time": {"strategy": "cot", "kind": "line"}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["test_time"]["strategy"] == "cot" and chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    "extra,param",
    [({"test_time": {"strategy": "telepathy"}}, "strategy"), ({"test_time": {"n": 99}}, "n"),
     ({"test_time": {"n": 2, "wave": 3}}, "wave"), ({"n": 2, "test_time": {}}, "n"),
     ({"test_time": {"unknown": 1}}, "unknown"), ({"test_time": {"scorer": "verifier"}}, "scorer")],
)  # fmt: skip
def test_bad_settings_are_400s(server, extra, param):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES, **extra}, timeout=60)
    assert r.status_code == 400 and param in r.text


def test_test_time_samples_count_against_capacity(tiny_chat_dir):
    small = ServerProcess(str(tiny_chat_dir), "--max-num-seqs", "2", "--max-queue", "1")  # capacity 3 sequences
    try:
        body = {"messages": MESSAGES, "max_tokens": 4, "test_time": {"n": 4, "kind": "line"}}
        r = httpx.post(small.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and "capacity" in r.text and "test_time.n" in r.text
        body["test_time"]["n"] = 3
        assert httpx.post(small.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        small.stop()
