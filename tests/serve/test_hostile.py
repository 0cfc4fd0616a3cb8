"""Hostile clients: a property-based fuzz of the OpenAPI schema (schemathesis) and a table of hand-written
malicious or malformed requests, alone and in a storm beside well-behaved ones.

The rules every answer must keep (one real uvicorn process serving the tiny model, its context capped at 64
tokens so that every valid request, whatever its max_tokens, n or logprobs, finishes in well under a second):
  * a 2xx that is a real answer (no sample that finished with "error"), or a 4xx whose JSON body is
    OpenAI's error shape {"error": {"message": str, "type": str, "param": str|null, "code": str|null}};
  * never a 5xx, a hang, or a dead server; after the storm no request is running and no KV block is held;
  * fields the server does not implement (tools, functions, logit_bias, response_format, image parts, ...)
    are refused with a 400 that names them, never silently ignored (`user` is accepted);
  * bounds: n <= 16, at most a few short stop strings, temperature in [0, 2], bodies over the cap get 413.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.serve.conftest import ServerProcess

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
TIMEOUT = 60.0  # seconds for one request: anything slower counts as a hang
USER = {"role": "user", "content": "hi"}
NO_CACHE = {"Cache-Control": "no-cache"}
CONTEXT = 64  # tokens (--max-model-len): any valid request (any max_tokens, n <= 16, 20 logprobs) stays short
FLAGS = ("--max-model-len", str(CONTEXT))
# One compute thread: the tiny model needs no more, and two threads on a shared, busy machine can make each
# decode step wait on a descheduled thread (a 100x slowdown seen with a second test run beside this one).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---- the hostile table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunked:
    """A body sent with Transfer-Encoding: chunked (no Content-Length), so a size cap cannot trust a header."""

    data: bytes

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), 1 << 16):
            yield self.data[i : i + (1 << 16)]


@dataclass(frozen=True)
class Hostile:
    name: str
    method: str
    path: str
    body: Any  # None: no body; bytes or Chunked: sent as they are; anything else: json.dumps (NaN allowed)
    headers: dict[str, Any] | None
    expect: int | frozenset[int]
    names: str | tuple[str, ...] | None = None  # a 400 must name one of these (in its message or param)
    code: str | None = None  # the error's code must be this
    protocol: bool = False  # refused by the HTTP layer before the app: any 4xx body, or a reset connection

    @property
    def allowed(self) -> set[int]:
        return {self.expect} if isinstance(self.expect, int) else set(self.expect)


def H(name: str, method: str, path: str, body: Any, headers: dict | None, expect: Any, **kw: Any) -> Hostile:
    return Hostile(name, method, path, body, headers, expect if isinstance(expect, int) else frozenset(expect), **kw)


def comp(**kw: Any) -> dict[str, Any]:
    return {"prompt": "hi", "max_tokens": 4, **kw}


def chat(*messages: Any, **kw: Any) -> dict[str, Any]:
    return {"messages": list(messages) or [USER], "max_tokens": 4, **kw}


def raw(path: str, extra: str) -> bytes:
    """A small valid body for `path` plus `extra` spliced in as raw JSON text (for NaN and friends)."""
    base = '"prompt": "hi"' if path == COMPLETIONS else '"messages": [{"role": "user", "content": "hi"}]'
    return ("{" + base + ', "max_tokens": 4, ' + extra + "}").encode()


OK_OR_400 = (200, 400)
TEN_MB = 10 * 1024 * 1024
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
TEXT_CT = {"content-type": "text/plain"}
FORM_CT = {"content-type": "application/x-www-form-urlencoded"}

# fmt: off
HOSTILE: list[Hostile] = [
    # name, method, path, body (JSON-able, or raw bytes), headers, expected status (or set), [what a 400 names]
    # -- not JSON, or not an object --
    H("bad JSON", "POST", CHAT, b"{not json", None, 400),
    H("truncated JSON", "POST", COMPLETIONS, b'{"prompt": "hi", "max_tok', None, 400),
    H("empty body", "POST", COMPLETIONS, b"", None, 400),
    H("JSON array", "POST", COMPLETIONS, b'[{"prompt": "hi"}]', None, 400),
    H("JSON number", "POST", CHAT, b"42", None, 400),
    H("JSON null", "POST", CHAT, b"null", None, 400),
    H("JSON string", "POST", COMPLETIONS, b'"hi"', None, 400),
    H("invalid UTF-8 bytes", "POST", COMPLETIONS, b'{"prompt": "\xff\xfe\xc0\xaf", "max_tokens": 2}', None, 400),
    H("lone surrogate in prompt", "POST", COMPLETIONS, b'{"prompt": "a\\ud800b", "max_tokens": 2}', None, OK_OR_400),
    H("lone surrogate in chat content", "POST", CHAT,
      b'{"messages": [{"role": "user", "content": "a\\udfffb"}], "max_tokens": 2}', None, OK_OR_400),
    H("JSON nested 50000 deep", "POST", COMPLETIONS, b'{"prompt": ' + b"[" * 50000 + b"]" * 50000 + b"}", None, 400),
    H("integer literal with 5000 digits", "POST", COMPLETIONS, raw(COMPLETIONS, '"seed": ' + "9" * 5000), None, 400),
    H("10 MB body", "POST", COMPLETIONS, comp(prompt="x" * TEN_MB), None, 413),
    H("10 MB chunked body, no Content-Length", "POST", CHAT, Chunked(json.dumps(chat(user="u" * TEN_MB)).encode()),
      None, 413),
    # -- NaN / Infinity literals --
    H("NaN temperature", "POST", COMPLETIONS, raw(COMPLETIONS, '"temperature": NaN'), None, 400, names="temperature"),
    H("Infinity top_p", "POST", CHAT, raw(CHAT, '"top_p": Infinity'), None, 400, names="top_p"),
    H("-Infinity presence_penalty", "POST", COMPLETIONS, raw(COMPLETIONS, '"presence_penalty": -Infinity'), None, 400,
      names="presence_penalty"),
    H("Infinity repetition_penalty", "POST", COMPLETIONS, raw(COMPLETIONS, '"repetition_penalty": Infinity'), None,
      OK_OR_400, names="repetition_penalty"),
    H("NaN max_tokens", "POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}', None,
      400, names="max_tokens"),
    H("1e400 (inf) frequency_penalty", "POST", CHAT, raw(CHAT, '"frequency_penalty": 1e400'), None, 400,
      names="frequency_penalty"),
    H("NaN seed", "POST", COMPLETIONS, raw(COMPLETIONS, '"seed": NaN'), None, 400, names="seed"),
    H("NaN min_p", "POST", COMPLETIONS, raw(COMPLETIONS, '"min_p": NaN'), None, 400, names="min_p"),
    # -- wrong types for the main fields --
    H("prompt: number", "POST", COMPLETIONS, comp(prompt=123), None, 400, names="prompt"),
    H("prompt: object", "POST", COMPLETIONS, comp(prompt={"text": "hi"}), None, 400, names="prompt"),
    H("messages: string", "POST", CHAT, {"messages": "hi"}, None, 400, names="messages"),
    H("messages: object", "POST", CHAT, {"messages": USER}, None, 400, names="messages"),
    H("model: number", "POST", COMPLETIONS, comp(model=123), None, 400, names="model"),
    H("max_tokens: string", "POST", CHAT, chat(max_tokens="ten"), None, 400, names="max_tokens"),
    H("max_tokens: 2.5", "POST", COMPLETIONS, comp(max_tokens=2.5), None, 400, names="max_tokens"),
    H("temperature: string", "POST", COMPLETIONS, comp(temperature="hot"), None, 400, names="temperature"),
    H("top_p: list", "POST", CHAT, chat(top_p=[0.5]), None, 400, names="top_p"),
    H("n: string", "POST", COMPLETIONS, comp(n="two"), None, 400, names="n"),
    H("stop: number", "POST", COMPLETIONS, comp(stop=5), None, 400, names="stop"),
    H("stop: list of numbers", "POST", CHAT, chat(stop=[1, 2]), None, 400, names="stop"),
    H("stream: string", "POST", COMPLETIONS, comp(stream="maybe"), None, 400, names="stream"),
    H("seed: string", "POST", CHAT, chat(seed="abc"), None, 400, names="seed"),
    H("logprobs (chat): string", "POST", CHAT, chat(logprobs="yes please"), None, 400, names="logprobs"),
    H("echo: object", "POST", COMPLETIONS, comp(echo={}), None, 400, names="echo"),
    H("stream_options: string", "POST", CHAT, chat(stream_options="usage"), None, 400, names="stream_options"),
    H("user: number", "POST", CHAT, chat(user=5), None, 400, names="user"),
    # -- negative, zero and huge numbers --
    H("max_tokens 10**30", "POST", COMPLETIONS, comp(max_tokens=10**30), None, 400, names="max_tokens"),
    H("max_tokens 0", "POST", CHAT, chat(max_tokens=0), None, 400, names="max_tokens"),
    H("max_tokens -1", "POST", COMPLETIONS, comp(max_tokens=-1), None, 400, names="max_tokens"),
    H("max_completion_tokens -5", "POST", CHAT, chat(max_completion_tokens=-5), None, 400,
      names="max_completion_tokens"),
    H("n 10**9", "POST", COMPLETIONS, comp(n=10**9), None, 400, names="n"),
    H("n 0", "POST", CHAT, chat(n=0), None, 400, names="n"),
    H("n 17", "POST", CHAT, chat(n=17), None, 400, names="n"),
    H("top_logprobs 10**6", "POST", CHAT, chat(logprobs=True, top_logprobs=10**6), None, 400, names="top_logprobs"),
    H("logprobs -1", "POST", COMPLETIONS, comp(logprobs=-1), None, 400, names="logprobs"),
    H("logprobs 21", "POST", COMPLETIONS, comp(logprobs=21), None, 400, names="logprobs"),
    H("n 10**6 x top_logprobs 10**6", "POST", CHAT, chat(n=10**6, logprobs=True, top_logprobs=10**6), None, 400),
    H("n 16 x top_logprobs 20 x whole context", "POST", CHAT,
      {"messages": [USER], "n": 16, "logprobs": True, "top_logprobs": 20}, None, 200),
    H("top_k 10**30", "POST", COMPLETIONS, comp(top_k=10**30, temperature=0.7), None, OK_OR_400, names="top_k"),
    H("seed 2**64 - 1 with n=2", "POST", COMPLETIONS, comp(seed=2**64 - 1, n=2), None, OK_OR_400, names="seed"),
    H("seed -1", "POST", CHAT, chat(seed=-1, temperature=0.7), None, OK_OR_400, names="seed"),
    H("seed -2**70", "POST", COMPLETIONS, comp(seed=-(2**70)), None, OK_OR_400, names="seed"),
    H("seed 10**30", "POST", CHAT, chat(seed=10**30), None, OK_OR_400, names="seed"),
    H("temperature 1e-40 (acts greedy)", "POST", COMPLETIONS, comp(temperature=1e-40, max_tokens=8), None, 200),
    H("temperature 2.5", "POST", CHAT, chat(temperature=2.5), None, 400, names="temperature"),
    H("temperature -0.1", "POST", COMPLETIONS, comp(temperature=-0.1), None, 400, names="temperature"),
    H("repetition_penalty 1e-40", "POST", COMPLETIONS, comp(repetition_penalty=1e-40, prompt="abcabc", max_tokens=8),
      None, OK_OR_400, names="repetition_penalty"),
    H("repetition_penalty 0", "POST", CHAT, chat(repetition_penalty=0), None, 400, names="repetition_penalty"),
    H("top_p 1e-300", "POST", COMPLETIONS, comp(top_p=1e-300), None, 200),
    H("penalties at their bounds", "POST", CHAT, chat(presence_penalty=2, frequency_penalty=-2, min_p=1), None, 200),
    # -- stop strings --
    H("100 stop strings", "POST", COMPLETIONS, comp(stop=[f"s{i}" for i in range(100)]), None, 400, names="stop"),
    H("one 200000-char stop string", "POST", CHAT, chat(stop=["z" * 200_000]), None, 400, names="stop"),
    H("stop: empty string", "POST", COMPLETIONS, comp(stop=""), None, 400, names="stop"),
    H("stop: list with an empty string", "POST", CHAT, chat(stop=["ok", ""]), None, 400, names="stop"),
    H("4 short stop strings", "POST", COMPLETIONS, comp(stop=["a", "bb", "\n", "zz"]), None, 200),
    # -- messages --
    H("empty messages", "POST", CHAT, {"messages": []}, None, 400, names="messages"),
    H("unknown role", "POST", CHAT, chat({"role": "wizard", "content": "hi"}), None, 400, names="role"),
    H("role tool", "POST", CHAT, chat({"role": "tool", "content": "42", "tool_call_id": "c1"}), None, 400,
      names=("role", "tool")),
    H("message missing content", "POST", CHAT, chat({"role": "user"}), None, 400, names="content"),
    H("message content null", "POST", CHAT, chat({"role": "user", "content": None}), None, 400, names="content"),
    H("message missing role", "POST", CHAT, chat({"content": "hi"}), None, 400, names="role"),
    H("content: image part", "POST", CHAT,
      chat({"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}),
      None, 400, names="image"),
    H("content: audio part", "POST", CHAT,
      chat({"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}),
      None, 400, names="audio"),
    H("assistant message with tool_calls", "POST", CHAT,
      chat(USER, {"role": "assistant", "content": "",
                  "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
      None, 400, names="tool_calls"),
    H("tools", "POST", CHAT, chat(tools=[TOOL]), None, 400, names="tools"),
    H("tool_choice", "POST", CHAT, chat(tool_choice="auto"), None, 400, names="tool_choice"),
    H("functions", "POST", CHAT, chat(functions=[TOOL["function"]]), None, 400, names="functions"),
    H("function_call", "POST", CHAT, chat(function_call="auto"), None, 400, names="function_call"),
    H("logit_bias", "POST", COMPLETIONS, comp(logit_bias={"50": 100}), None, 400, names="logit_bias"),
    H("response_format", "POST", CHAT, chat(response_format={"type": "json_object"}), None, 400,
      names="response_format"),
    H("made-up field", "POST", COMPLETIONS, comp(frobnicate=True), None, 400, names="frobnicate"),
    H("suffix (completions)", "POST", COMPLETIONS, comp(suffix="end"), None, 400, names="suffix"),
    H("best_of (completions)", "POST", COMPLETIONS, comp(best_of=3), None, 400, names="best_of"),
    H("user is accepted", "POST", CHAT, chat(user="user-1234"), None, 200),
    H("10000 messages (context)", "POST", CHAT, chat(*[USER] * 10_000), None, 400, code="context_length_exceeded"),
    H("chat content over the context", "POST", CHAT, chat({"role": "user", "content": "y" * 2000}), None, 400,
      code="context_length_exceeded"),
    # -- prompts --
    H("prompt: empty string", "POST", COMPLETIONS, comp(prompt=""), None, 400, names="prompt"),
    H("prompt: empty list", "POST", COMPLETIONS, comp(prompt=[]), None, 400, names="prompt"),
    H("prompt: token id 300 (vocab 256)", "POST", COMPLETIONS, comp(prompt=[1, 300]), None, 400, names="prompt"),
    H("prompt: token id -1", "POST", COMPLETIONS, comp(prompt=[-1]), None, 400, names="prompt"),
    H("prompt: token id 2**70", "POST", COMPLETIONS, comp(prompt=[2**70]), None, 400, names="prompt"),
    H("prompt: batch of id lists", "POST", COMPLETIONS, comp(prompt=[[1, 2], [3]]), None, 200),
    H("prompt: batch of strings", "POST", COMPLETIONS, comp(prompt=["a", "b"]), None, 200),
    H("prompt: batch with an empty list", "POST", COMPLETIONS, comp(prompt=[[1, 2], []]), None, 400, names="prompt"),
    H("prompt: batch with an empty string", "POST", COMPLETIONS, comp(prompt=["a", ""]), None, 400, names="prompt"),
    H("prompt: batch with id 300", "POST", COMPLETIONS, comp(prompt=[[1], [300]]), None, 400, names="prompt"),
    H("prompt: three levels of lists", "POST", COMPLETIONS, comp(prompt=[[[1]]]), None, 400, names="prompt"),
    H("prompt: strings and ids mixed", "POST", COMPLETIONS, comp(prompt=["a", [1]]), None, 400, names="prompt"),
    H("prompt: batch of 1000 x n 16", "POST", COMPLETIONS, comp(prompt=["a"] * 1000, n=16), None, 400,
      names=("n", "prompt")),
    H("prompt: list of floats", "POST", COMPLETIONS, comp(prompt=[1.5, 2.5]), None, 400, names="prompt"),
    H("prompt over the context", "POST", COMPLETIONS, comp(prompt="x" * 300), None, 400,
      code="context_length_exceeded"),
    H("prompt ids over the context", "POST", COMPLETIONS, comp(prompt=[65] * 300), None, 400,
      code="context_length_exceeded"),
    # the first prompt is queued before the second is refused: it must be aborted, not leaked (storm checks)
    H("batch: second prompt + max_tokens over the context", "POST", COMPLETIONS,
      comp(prompt=["a", "x" * 60], max_tokens=10), None, 400, code="context_length_exceeded"),
    H("unknown model", "POST", COMPLETIONS, comp(model="gpt-9"), None, 404, code="model_not_found"),
    # -- transport: content types, methods, paths, headers --
    H("content-type text/plain", "POST", COMPLETIONS, json.dumps(comp()).encode(), TEXT_CT, (400, 415)),
    H("content-type form-urlencoded", "POST", CHAT, b"messages=hi&max_tokens=4", FORM_CT, (400, 415)),
    H("GET /v1/completions", "GET", COMPLETIONS, None, None, 405),
    H("GET /v1/chat/completions", "GET", CHAT, None, None, 405),
    H("PUT /v1/chat/completions", "PUT", CHAT, chat(), None, 405),
    H("DELETE /v1/models", "DELETE", "/v1/models", None, None, 405),
    H("POST /health", "POST", "/health", {}, None, 405),
    H("unknown path", "POST", "/v1/engines/davinci/completions", comp(), None, 404),
    H("unknown sub-path", "GET", CHAT + "/extra", None, None, 404),
    H("encoded path traversal", "GET", "/%2e%2e/%2e%2e/etc/passwd", None, None, 404),
    # uvicorn answers 431 past its header limit and closes; a client still sending its body may then read a
    # TCP reset instead (seen once in a fresh-clone run): a refusal either way, as long as the server lives on.
    H("64 KiB header", "POST", COMPLETIONS, comp(), {"X-Junk": "a" * 65536}, (200, 431), protocol=True),
    H("1 MiB header", "POST", COMPLETIONS, comp(), {"X-Junk": "a" * (1 << 20)}, (400, 431), protocol=True),
    H("non-ASCII header bytes", "POST", CHAT, chat(), {"X-Junk": b"\xff\xfe\x80"}, 200),
    H("bogus bearer token (no key set)", "POST", COMPLETIONS, comp(), {"Authorization": "Bearer \x01\x02"}, 200),
]
# fmt: on


def send(base_url: str, case: Hostile) -> httpx.Response:
    headers = dict(case.headers or {})
    if case.body is None:
        content = None
    elif isinstance(case.body, bytes):
        content = case.body
    elif isinstance(case.body, Chunked):
        content = iter(case.body)
    else:
        content = json.dumps(case.body).encode()
    if content is not None and not any(k.lower() == "content-type" for k in headers):
        headers["content-type"] = "application/json"
    return httpx.request(case.method, base_url + case.path, content=content, headers=headers, timeout=TIMEOUT)


def openai_error_problem(content: bytes) -> str | None:
    """None if `content` is OpenAI's error shape, else what is wrong with it."""
    try:
        body = json.loads(content)
    except ValueError:
        return f"error body is not JSON: {content[:200]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return f"error body has no 'error' object: {content[:200]!r}"
    if not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
        return f"error.message and error.type must be strings: {err}"
    for key in ("param", "code"):
        if key not in err or not (err[key] is None or isinstance(err[key], str)):
            return f"error.{key} must be present, a string or null: {err}"
    return None


def answer_problem(case: Hostile, status: int, content: bytes) -> str | None:
    """None if the answer keeps the rules for this case, else why not."""
    if status not in case.allowed:
        return f"status {status}, want {sorted(case.allowed)}: {content[:300]!r}"
    if 400 <= status < 500 and not case.protocol:
        problem = openai_error_problem(content)
        if problem:
            return f"status {status}: {problem}"
        err = json.loads(content)["error"]
        said = (err["message"] + " " + (err["param"] or "")).lower()
        names = (case.names,) if isinstance(case.names, str) else case.names
        if status == 400 and names and not any(n.lower() in said for n in names):
            return f"400 does not name {' or '.join(names)}: {err}"
        if case.code and err["code"] != case.code:
            return f"error code {err['code']!r}, want {case.code!r}: {err}"
    if 200 <= status < 300 and case.path in (COMPLETIONS, CHAT):
        reasons = finish_reasons(content)
        if not reasons or not reasons <= {"stop", "length"}:
            return f"a 200 that is not a real answer (finish reasons {reasons}): {content[:300]!r}"
    return None


def finish_reasons(content: bytes) -> set[str]:
    text = content.decode("utf-8", "replace")
    if text.startswith("data:"):
        events = [json.loads(x[5:]) for x in text.splitlines() if x.startswith("data:") and x[5:].strip() != "[DONE]"]
    else:
        events = [json.loads(text)]
    return {c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")}


def alive(server: ServerProcess) -> bool:
    if server.proc.poll() is not None:
        return False
    try:
        return httpx.get(server.url + "/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def _module_server(tiny_chat_dir):
    box = {"server": ServerProcess(str(tiny_chat_dir), *FLAGS, env=ENV)}
    yield box
    box["server"].stop()


@pytest.fixture
def server(_module_server, tiny_chat_dir) -> ServerProcess:
    """The module's server, shared by every test here; restarted if an earlier test killed it (that test has
    failed already)."""
    if not alive(_module_server["server"]):
        _module_server["server"].stop()
        _module_server["server"] = ServerProcess(str(tiny_chat_dir), *FLAGS, env=ENV)
    return _module_server["server"]


# ---- each hostile request alone ----------------------------------------------------------------------


@pytest.mark.parametrize("case", HOSTILE, ids=[c.name for c in HOSTILE])
def test_hostile_request_alone(server, case):
    try:
        r = send(server.url, case)
    except httpx.TimeoutException:
        pytest.fail(f"{case.name}: no answer in {TIMEOUT} s")
    except httpx.TransportError as e:
        if not case.protocol:
            raise
        assert alive(server), f"{case.name}: the connection was dropped ({e!r}) and the server is down"
        return  # the HTTP layer dropped the connection: a refusal, as long as the server lives on
    problem = answer_problem(case, r.status_code, r.content)
    assert alive(server), f"{case.name}: the server is dead after it (answer: {r.status_code})"
    assert problem is None, f"{case.name}: {problem}"


def test_table_is_big_enough():
    assert len(HOSTILE) >= 40 and len({c.name for c in HOSTILE}) == len(HOSTILE)


def test_tiny_temperature_acts_like_greedy(server):
    body = {"prompt": "Hello there", "max_tokens": 24}
    greedy = httpx.post(server.url + COMPLETIONS, json={**body, "temperature": 0}, headers=NO_CACHE, timeout=TIMEOUT)
    tiny = httpx.post(server.url + COMPLETIONS, json={**body, "temperature": 1e-40}, headers=NO_CACHE, timeout=TIMEOUT)
    assert greedy.status_code == 200
    assert tiny.status_code == 200, tiny.text[:300]
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


# ---- the storm: every hostile request at once, beside well-behaved ones ------------------------------


def good_request(path: str, what: Any, max_tokens: int, stream: bool = False) -> tuple[str, dict[str, Any]]:
    body = {"prompt": what} if path == COMPLETIONS else {"messages": [{"role": "user", "content": what}]}
    return path, {**body, "max_tokens": max_tokens, "temperature": 0, "stream": stream}


WELL_BEHAVED: list[tuple[str, dict[str, Any]]] = [
    good_request(COMPLETIONS, "The quick brown fox", 40),
    good_request(COMPLETIONS, "Once upon a time", 40, stream=True),
    good_request(COMPLETIONS, [72, 101, 108, 108, 111], 32),
    good_request(COMPLETIONS, "1, 2, 3,", 48, stream=True),
    good_request(CHAT, "Capital of France?", 24),
    good_request(CHAT, "Hi", 40, stream=True),
    good_request(CHAT, "Count to ten.", 32),
    good_request(CHAT, "Tell me a story.", 28, stream=True),
]


def answer_text(path: str, r: httpx.Response) -> str:
    assert r.status_code == 200, r.text[:300]
    if r.text.startswith("data:"):
        out = []
        for line in r.text.splitlines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                for c in json.loads(line[5:])["choices"]:
                    out.append((c["delta"].get("content") or "") if path == CHAT else c["text"])
        return "".join(out)
    choice = r.json()["choices"][0]
    return choice["message"]["content"] if path == CHAT else choice["text"]


def well_behaved(base_url: str, path: str, body: dict[str, Any]) -> str:
    """Its answer's text. no-cache: it really runs beside the others rather than coming from the response
    cache. A 429 (the server full of the storm's big requests) is retried after its Retry-After, as clients do."""
    for _ in range(60):
        r = httpx.post(base_url + path, json=body, headers=NO_CACHE, timeout=TIMEOUT)
        if r.status_code != 429:
            break
        time.sleep(min(float(r.headers.get("retry-after", "1")), 1.0))
    return answer_text(path, r)


def test_hostile_storm_beside_well_behaved_requests(server):
    alone = [well_behaved(server.url, path, body) for path, body in WELL_BEHAVED]
    good = [("good", i) for i in range(len(WELL_BEHAVED))]
    jobs: list[tuple[str, Any]] = [("hostile", c) for c in HOSTILE] + good + good  # each good one twice
    random.Random(0).shuffle(jobs)

    def run(job: tuple[str, Any]) -> tuple[str, Any, Any]:
        kind, what = job
        try:
            if kind == "good":
                return kind, what, well_behaved(server.url, *WELL_BEHAVED[what])
            r = send(server.url, what)
            return kind, what, (r.status_code, r.content)
        except Exception as e:  # a hang (timeout), a reset, a bad answer to a good request
            return kind, what, e

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run, jobs))
    took = time.perf_counter() - start

    problems = []
    for kind, what, got in results:
        if kind == "good":
            if got != alone[what]:
                problems.append(f"well-behaved #{what} changed in the storm: {got!r:.200} != {alone[what]!r:.200}")
        elif isinstance(got, BaseException):
            if not (what.protocol and isinstance(got, httpx.TransportError)):
                problems.append(f"{what.name}: {got!r}")
        elif got[0] >= 500:
            problems.append(f"{what.name}: status {got[0]}: {got[1][:200]!r}")
    assert alive(server), "the server is dead after the storm"
    for _ in range(100):
        if server.metric("trainfer_kv_cache_usage_ratio") == 0 and server.metric("trainfer_num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert not problems, f"{len(problems)} problems in the storm ({took:.1f} s):\n" + "\n".join(problems)
    assert server.metric("trainfer_num_requests_running") == 0
    assert server.metric("trainfer_kv_cache_usage_ratio") == 0


# ---- schemathesis: property-based requests generated from the live /openapi.json ---------------------

FUZZ_EXAMPLES = 40  # per operation and generation mode: 4 runs in all
FUZZ_BUDGET_S = 15.0  # per run: past it the remaining examples are generated but not sent (a busy machine)


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_schemathesis_fuzz(server, path, mode, tmp_path):
    """No generated request may get a 5xx, hang, or a 4xx that is not OpenAI's error shape.

    Every failure is collected (no shrinking against a live server) and reported at the end, one example
    each. Generation is derandomized so that a failure reproduces.
    """
    schemathesis = pytest.importorskip("schemathesis")
    import requests
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.configuration import set_hypothesis_home_dir
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", timeout=30)
    operation = schema[path]["POST"]
    failures: dict[str, str] = {}  # what went wrong -> a curl command that shows it
    times: list[float] = []

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def fuzz(case):
        if sum(times) > FUZZ_BUDGET_S:
            return
        start = time.perf_counter()
        try:
            response = case.call(base_url=server.url, timeout=TIMEOUT)
        except requests.Timeout:
            failures.setdefault(f"no answer in {TIMEOUT} s", case.as_curl_command())
            return
        except requests.ConnectionError as e:
            failures.setdefault(f"connection failed: {type(e).__name__}", case.as_curl_command())
            return
        finally:
            times.append(time.perf_counter() - start)
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except Exception as e:
            failures.setdefault(f"{response.status_code}: {str(e).splitlines()[0][:200]}", case.as_curl_command())
        if 400 <= response.status_code < 500:
            problem = openai_error_problem(response.content)
            if problem:
                what = f"{response.status_code} not OpenAI-shaped: {problem[:120]}"
                failures.setdefault(what, case.as_curl_command())

    set_hypothesis_home_dir(tmp_path / ".hypothesis")  # its constants cache, kept out of the checkout
    try:
        fuzz()
    finally:
        set_hypothesis_home_dir(None)
    print(f"{path} {mode}: {len(times)} requests in {sum(times):.1f} s, slowest {max(times):.2f} s")
    assert len(times) >= 5
    assert alive(server), "the server died under the fuzz"
    assert not failures, f"{len(failures)} distinct failures in {len(times)} requests:\n" + "\n".join(
        f"- {what}\n    {curl[:400]}" for what, curl in failures.items()
    )
