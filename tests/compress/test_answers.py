"""`trainfer dataset answers`: a model's own greedy chat answers as whole transcripts, the tokens the engine
decoded, readable by distill; bad input refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import CHATML, make_tiny_model_dir
from trainfer.compress.answers import teacher_answers
from trainfer.data.sources import load_documents
from trainfer.errors import TrainferError
from trainfer.llm import LLM


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("chat"), chat_template=CHATML)


def test_transcripts_hold_the_prompt_and_the_engines_greedy_answer(chat_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": "add 2 and 3"}, {"messages": [{"role": "system", "content": "terse"},
                                                      {"role": "user", "content": "hello"}]}]  # fmt: skip
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "answers.jsonl"
    report = teacher_answers(str(chat_model), prompts, out, max_tokens=12)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.prompts == len(rows) == 2 and 0 < report.tokens <= 24
    llm = LLM.load(chat_model)
    for row, line in zip(rows, lines, strict=True):
        messages = line.get("messages") or [{"role": "user", "content": line["prompt"]}]
        assert row["prompt"] == messages
        want = llm.chat(messages, temperature=0, max_tokens=12)
        assert row["answer"].startswith(want.text) and row["text"].startswith(
            llm.tokenizer.apply_chat_template(messages)
        )
        assert llm.tokenizer.encode(row["text"], add_bos=False)[: len(llm.chat_prompt(messages))] == llm.chat_prompt(
            messages
        )
    assert [d.text for d in load_documents(f"{out}:text")] == [r["text"] for r in rows]  # distill's --data form
    text = tmp_path / "p.txt"
    text.write_text("first question\n\nsecond question\n")
    assert teacher_answers(str(chat_model), text, tmp_path / "t.jsonl", max_tokens=4).prompts == 2
    with pytest.raises(TrainferError, match="exists; pass --force"):
        teacher_answers(str(chat_model), prompts, out)


def test_bad_prompts_are_refused_without_a_traceback(chat_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no prompt field"}\n')
    with pytest.raises(TrainferError, match="needs a 'prompt' string"):
        teacher_answers(str(chat_model), bad, tmp_path / "o.jsonl")
    cmd = [sys.executable, "-m", "trainfer.cli", "dataset", "answers", str(chat_model), "--prompts",
           str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o.jsonl")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "no such prompts file" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "o.jsonl").exists()
