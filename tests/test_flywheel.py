"""The data flywheel end to end, all real processes and files: serve with --log-requests -> users ask and rate
-> `trainfer dataset from-logs --only-rated-up` -> `trainfer finetune --lora` -> the tuned model gives the
answers users rated up, for the questions they asked, and not the ones they rated down."""

from __future__ import annotations

import json

import httpx

from tests.conftest import make_chat_model_dir
from tests.serve.conftest import ServerProcess
from tests.train.test_trainer import cli
from trainfer.llm import LLM

QUESTIONS = ["Where is the Zib made?", "Who sells the Zib?", "How heavy is a Zib?"]


def test_served_answers_rated_up_become_the_tuned_model_s_answers(tmp_path):
    base = make_chat_model_dir(tmp_path / "base")
    logs = tmp_path / "logs"
    server = ServerProcess(str(base), "--log-requests", str(logs))
    liked, disliked = {}, {}
    try:
        for i, q in enumerate(QUESTIONS):
            body = {"messages": [{"role": "user", "content": q}], "max_tokens": 6, "temperature": 1.0}
            up = httpx.post(server.url + "/v1/chat/completions", json={**body, "seed": i}, timeout=60).json()
            down = httpx.post(server.url + "/v1/chat/completions", json={**body, "seed": 100 + i}, timeout=60).json()
            for answer, rating, keep in [(up, "up", liked), (down, "down", disliked)]:
                r = httpx.post(server.url + "/v1/feedback", json={"id": answer["id"], "rating": rating})
                assert r.status_code == 200
                keep[q] = answer["choices"][0]["message"]["content"]
    finally:
        server.stop()
    assert liked != disliked
    data = tmp_path / "flywheel.jsonl"
    made = cli("dataset", "from-logs", str(logs), "--out", str(data), "--only-rated-up",
               "--finish-reason", "stop", "--finish-reason", "length")  # fmt: skip
    assert made.returncode == 0, made.stderr
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert sorted(r["messages"][-1]["content"] for r in rows) == sorted(liked.values())
    settings = ["max_steps=120", "lr=1e-2", "batch_size=1", "grad_accum=1", "seq_len=128", "warmup_steps=2",
                "dtype=float32", "val_fraction=0", "lora_dropout=0", "sample_tokens=0", "eval_every=120"]  # fmt: skip
    tuned = cli("finetune", str(base), "--data", str(data), "--out", str(tmp_path / "run"), "--lora",
                *[a for s in settings for a in ("--set", s)])  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    llm = LLM.load(tmp_path / "run")
    # the answers were cut at 6 tokens; re-encoded as text they may take more (bytes of a U+FFFD), then stop
    got = {q: llm.chat([{"role": "user", "content": q}], temperature=0, max_tokens=32).text for q in QUESTIONS}
    assert got == liked
