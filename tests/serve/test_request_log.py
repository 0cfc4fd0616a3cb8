"""The request log (`serve --log-requests DIR`): what a real server writes per finished answer and per
rating, and the writer's rotation and disk errors at the library level."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import openai

from tests.serve.conftest import ServerProcess
from trainfer.data.from_logs import Filters, dataset_from_logs
from trainfer.serve.request_log import RequestLog

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
NAME = re.compile(r"requests-\d{8}-\d{6}-\d+\.jsonl")


def read_lines(directory: Path) -> list[dict]:
    files = sorted(directory.iterdir())
    assert files and all(NAME.fullmatch(f.name) for f in files)
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def test_finished_answers_and_ratings_are_logged(tiny_chat_dir, tmp_path):
    logs = tmp_path / "logs"
    server = ServerProcess(str(tiny_chat_dir), "--log-requests", str(logs))
    model = str(tiny_chat_dir)
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    try:
        chat = c.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=6)
        chunks = list(
            c.chat.completions.create(
                model=model, messages=CHAT, max_tokens=5, seed=3, stream=True, stream_options={"include_usage": True}
            )
        )
        text = c.completions.create(model=model, prompt=["one", "two"], n=2, max_tokens=4, seed=1)
        streamed = list(c.completions.create(model=model, prompt="Once", max_tokens=3, temperature=0, stream=True))
        cached = c.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=6)
        bad = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "logit_bias": {}})
        assert bad.status_code == 400  # refused requests are not logged
        up = httpx.post(server.url + "/v1/feedback", json={"id": chat.id, "rating": "up"})
        assert up.status_code == 200 and up.json()["rating"] == "up"
        one = {"id": text.id, "rating": "down", "index": 1, "comment": "off topic"}
        assert httpx.post(server.url + "/v1/feedback", json=one).status_code == 200
        for wrong in [{"id": "nope", "rating": "up"}, {"id": chat.id, "rating": "meh"}, {"id": chat.id}]:
            assert httpx.post(server.url + "/v1/feedback", json=wrong).status_code == 400
        tt = {"messages": CHAT, "max_tokens": 4, "seed": 1, "test_time": {"n": 2, "kind": "line"}}
        voted = httpx.post(server.url + "/v1/chat/completions", json=tt, timeout=60).json()
        events = httpx.post(server.url + "/v1/chat/completions", json={**tt, "stream": True}, timeout=60).text
        streamed_ids = {json.loads(e[6:])["id"] for e in events.split("\n\n") if e.startswith("data: {")}
        assert server.metric("trainfer_request_log_errors_total") == 0
    finally:
        server.stop()  # SIGTERM: the server writes what is queued before it exits
    lines = read_lines(logs)
    kinds = ["chat.completion"] * 2 + ["text_completion"] * 2 + ["chat.completion"] + ["feedback"] * 2
    assert [x["object"] for x in lines] == [*kinds, "chat.completion", "chat.completion"]

    first = lines[0]
    assert first["id"] == chat.id and first["model"] == model and first["messages"] == CHAT
    assert first["params"] == {"temperature": 0, "max_tokens": 6} and first["stream"] is False
    assert first["choices"] == [{"index": 0, "text": chat.choices[0].message.content, "finish_reason": "length"}]
    assert first["usage"] == chat.usage.model_dump(exclude_none=True)
    assert first["timings"]["ttft_ms"] <= first["timings"]["total_ms"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])

    second = lines[1]
    assert second["id"] == chunks[0].id and second["stream"] is True
    assert second["choices"][0]["text"] == "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert second["usage"]["completion_tokens"] == chunks[-1].usage.completion_tokens == 5
    assert second["params"] == {"max_tokens": 5, "seed": 3}

    third = lines[2]
    assert third["prompt"] == ["one", "two"] and third["params"]["n"] == 2
    assert [ch["text"] for ch in third["choices"]] == [ch.text for ch in text.choices]
    assert lines[3]["id"] == streamed[0].id and lines[3]["choices"][0]["text"] == "".join(
        ch.choices[0].text for ch in streamed
    )
    assert lines[4]["id"] == cached.id and lines[4]["timings"] == {"response_cache": "hit"}
    assert lines[5] == {**lines[5], "id": chat.id, "rating": "up", "index": None}
    assert lines[6] == {**lines[6], "id": text.id, "rating": "down", "index": 1, "comment": "off topic"}

    assert lines[7]["id"] == voted["id"] and lines[7]["usage"] == voted["usage"]  # every token the vote spent
    assert lines[7]["choices"][0]["text"] == voted["choices"][0]["message"]["content"]
    assert lines[7]["params"]["test_time"] == {"n": 2, "kind": "line"}
    assert streamed_ids == {lines[8]["id"]}  # one id on every chunk, the logged one

    # ... and the logs make a data set: the random model never ends a turn, so keep "length" answers here.
    report = dataset_from_logs(logs, tmp_path / "set.jsonl", Filters(finish_reasons=("length",), min_chars=0))
    assert report.answers == 10 and report.invalid_lines == 0
    # the cached chat answer; text choice 1; the test_time answers (a vote ends with "stop")
    assert report.dropped == {"duplicate": 1, "rated down": 1, "finish_reason stop": 2}
    examples = [json.loads(line) for line in (tmp_path / "set.jsonl").read_text().splitlines()]
    assert examples[0] == {"messages": [*CHAT, {"role": "assistant", "content": chat.choices[0].message.content}]}
    assert examples[2] == {"prompt": "one", "completion": text.choices[0].text}
    assert examples[3] == {"prompt": "two", "completion": text.choices[2].text}  # choice 2 answers prompt 2 // n


def test_no_log_unless_asked(tiny_chat_dir, tmp_path):
    server = ServerProcess(str(tiny_chat_dir))
    try:
        r = httpx.post(server.url + "/v1/feedback", json={"id": "chatcmpl-" + "0" * 32, "rating": "up"})
        assert r.status_code == 400 and "--log-requests" in r.json()["error"]["message"]
    finally:
        server.stop()


def record(i: int) -> dict:
    return {"object": "feedback", "id": f"r{i}", "comment": "x" * 60}


def test_rotation_by_size(tmp_path):
    log = RequestLog(tmp_path, max_bytes=300)
    for i in range(10):
        log.append(record(i))
    log.append({"object": "feedback", "id": "big", "comment": "y" * 1000})  # over the bound: a file of its own
    log.append(record(10))
    log.close()
    files = sorted(tmp_path.iterdir(), key=lambda f: log.files.index(f))
    assert files == log.files and all(NAME.fullmatch(f.name) for f in files)
    assert all(f.stat().st_size <= 300 for f in files if "big" not in f.read_text())
    assert [len(f.read_text().splitlines()) for f in files] == [2, 2, 2, 2, 2, 1, 1]  # 109-byte lines
    assert [x["id"] for f in files for x in map(json.loads, f.read_text().splitlines())] == [
        *(f"r{i}" for i in range(10)),
        "big",
        "r10",
    ]
    again = RequestLog(tmp_path, max_bytes=300)  # a restart begins a new file, never appends to an old one
    again.append(record(11))
    again.close()
    assert len(set(tmp_path.iterdir())) == len(files) + 1


def test_a_disk_error_is_counted_not_raised(tmp_path):
    errors: list[Exception] = []
    directory = tmp_path / "logs"
    log = RequestLog(directory, on_error=errors.append)
    shutil.rmtree(directory)
    directory.write_text("a file where the directory was")  # opening a log file there fails
    log.append(record(0))
    log.append(record(1))
    log.close()
    assert len(errors) == 2 and all(isinstance(e, OSError) for e in errors)
