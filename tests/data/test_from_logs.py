"""`trainfer dataset from-logs`: request logs (written by the server's own RequestLog) to a fine-tuning set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainfer.cli import main
from trainfer.data.from_logs import Filters, dataset_from_logs
from trainfer.errors import TrainferError
from trainfer.serve.request_log import RequestLog, feedback_record, request_record
from trainfer.serve.responses import Choice
from trainfer.serve.schemas import ChatCompletionRequest, CompletionRequest

USAGE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def rid(i: int, chat: bool = True) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + f"{i:032x}"


def chat(i: int, messages: list[dict] | str, *answers: str, finish: str = "stop") -> dict:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    req = ChatCompletionRequest(messages=messages, n=len(answers))
    choices = [Choice(text=a, finish_reason=finish) for a in answers]
    return request_record("chat.completion", rid(i), "m", req, choices, USAGE, {})


def completion(i: int, prompt, *answers: str) -> dict:
    req = CompletionRequest(prompt=prompt)
    req.n = len(answers) // len(req.prompt_list())
    choices = [Choice(text=a, finish_reason="stop") for a in answers]
    return request_record("text_completion", rid(i, chat=False), "m", req, choices, USAGE, {})


def write_logs(directory: Path, *records: dict, torn: str = "") -> Path:
    log = RequestLog(directory)
    for r in records:
        log.append(r)
    log.close()
    if torn:  # a crash mid-write leaves a partial last line
        with open(log.files[-1], "a") as f:
            f.write(torn)
    return directory


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def user_and(answer: str, question: str = "Q") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_filters_dedup_and_torn_lines(tmp_path):
    system = [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "Hello"}]
    logs = write_logs(
        tmp_path / "logs",
        chat(1, "Q", "A good answer."),
        chat(2, "Q", "A good answer."),  # the same conversation again
        chat(3, "Q", "Cut off mid", finish="length"),
        chat(4, "Q", ""),
        chat(5, "Q", "x" * 51),
        chat(6, system, "Hi!", "Hello!"),  # n = 2: one example per choice
        completion(7, "The sky is", " blue."),
        completion(8, ["Roses are", "Violets are"], " red.", " crimson.", " blue.", " violet."),
        completion(9, [1, 2, 3], " ids."),
        torn='{"object": "chat.completion", "id": "chatcmpl-',
    )
    with open(next(logs.iterdir()), "a") as f:
        f.write("\nnot json\n[1, 2]\n" + json.dumps({"object": "chat.completion", "id": "x", "choices": [{}]}) + "\n")
    out = tmp_path / "set.jsonl"
    report = dataset_from_logs(logs, out, Filters(max_chars=50))
    assert read(out) == [
        user_and("A good answer."),
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Hi!"}]},
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Hello!"}]},
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": "Roses are", "completion": " red."},
        {"prompt": "Roses are", "completion": " crimson."},
        {"prompt": "Violets are", "completion": " blue."},
        {"prompt": "Violets are", "completion": " violet."},
    ]  # fmt: skip
    assert report.kept == 8 and report.answers == 13 and report.files == 1
    assert report.invalid_lines == 4  # the torn line, "not json", a non-object, a request without its fields
    want = {"duplicate": 1, "finish_reason length": 1, "too short": 1, "too long": 1, "token-id prompt": 1}
    assert report.dropped == want
    assert "kept 8, dropped 5" in report.summary()
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed into place


def test_ratings_joined_by_response_id(tmp_path):
    logs = write_logs(
        tmp_path / "logs",
        chat(1, "Q1", "up"),
        chat(2, "Q2", "down"),
        chat(3, "Q3", "unrated"),
        chat(4, "Q4", "first", "second"),
        feedback_record(rid(1), "up", None, None),
        feedback_record(rid(2), "up", None, None),
        feedback_record(rid(2), "down", None, "wrong"),  # the last rating wins
        feedback_record(rid(4), "up", None, None),
        feedback_record(rid(4), "down", 1, None),  # a choice's own rating counts before its answer's
    )
    default = dataset_from_logs(logs, tmp_path / "a.jsonl")
    assert read(tmp_path / "a.jsonl") == [user_and("up", "Q1"), user_and("unrated", "Q3"), user_and("first", "Q4")]
    assert default.dropped == {"rated down": 2}
    only_up = dataset_from_logs(logs, tmp_path / "b.jsonl", Filters(only_rated_up=True))
    assert read(tmp_path / "b.jsonl") == [user_and("up", "Q1"), user_and("first", "Q4")]
    assert only_up.dropped == {"rated down": 2, "not rated up": 1}
    dataset_from_logs(logs, tmp_path / "c.jsonl", Filters(keep_rated_down=True))
    assert len(read(tmp_path / "c.jsonl")) == 5


def test_every_message_is_redacted_before_dedup(tmp_path):
    messages = [
        {"role": "system", "content": "Support line: +44 20 7946 0958."},
        {"role": "user", "content": "I am ann@corp.com, call me on 0171 1234567 about v2.1.0"},
    ]
    other = [messages[0], {"role": "user", "content": "I am bob@corp.org, call me on 0171 7654321 about v2.1.0"}]
    logs = write_logs(
        tmp_path / "logs",
        chat(1, messages, "Done, ann@corp.com: we call 555-123-4567 on 2024-01-15."),
        chat(2, other, "Done, bob@x.io: we call 555-987-6543 on 2024-01-15."),  # the same once redacted
        completion(3, "Mail joe@site.net", " or +1 (555) 123-4567 at 9.30"),
    )
    report = dataset_from_logs(logs, tmp_path / "set.jsonl")
    assert read(tmp_path / "set.jsonl") == [
        {"messages": [
            {"role": "system", "content": "Support line: [phone]."},
            {"role": "user", "content": "I am [email], call me on [phone] about v2.1.0"},
            {"role": "assistant", "content": "Done, [email]: we call [phone] on 2024-01-15."},
        ]},
        {"prompt": "Mail [email]", "completion": " or [phone] at 9.30"},
    ]  # fmt: skip
    assert report.dropped == {"duplicate": 1}


def test_rotated_files_are_read_in_order(tmp_path):
    log = RequestLog(tmp_path / "logs", max_bytes=200)
    for i in range(6):
        log.append(chat(i, f"Q{i}", f"A{i}"))
    log.append(feedback_record(rid(0), "down", None, None))  # in a later file than its answer
    log.close()
    assert len(log.files) == 7
    dataset_from_logs(tmp_path / "logs", tmp_path / "set.jsonl")
    assert read(tmp_path / "set.jsonl") == [user_and(f"A{i}", f"Q{i}") for i in range(1, 6)]


def test_cli_counts_and_errors(tmp_path, capsys):
    logs = write_logs(tmp_path / "logs", chat(1, "Q", "An answer."), chat(2, "Q", "Cut", finish="length"))
    out = tmp_path / "set.jsonl"

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(["dataset", "from-logs", *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, stdout, _ = cli(str(logs), "--out", str(out))
    assert code == 0 and "kept 1, dropped 1 (1 finish_reason length)" in stdout and "wrote 1 examples" in stdout
    code, _, err = cli(str(logs), "--out", str(out))
    assert code == 1 and err.startswith("error: ") and "--force" in err and "Traceback" not in err
    code, stdout, _ = cli(
        str(logs), "--out", str(out), "--force", "--finish-reason", "stop", "--finish-reason", "length"
    )
    assert code == 0 and "kept 2" in stdout and len(read(out)) == 2
    code, _, err = cli(str(tmp_path / "missing"), "--out", str(tmp_path / "x.jsonl"))
    assert code == 1 and "is not a directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli(str(tmp_path / "empty"), "--out", str(tmp_path / "x.jsonl"))
    assert code == 1 and "no request logs" in err
    code, _, err = cli(str(logs), "--out", str(tmp_path / "x.jsonl"), "--only-rated-up")
    assert code == 1 and "no answer passed the filters" in err and "1 not rated up" in err
    assert not (tmp_path / "x.jsonl").exists()
    code, _, err = cli(str(logs), "--out", str(tmp_path / "x.jsonl"), "--min-chars", "9", "--max-chars", "3")
    assert code == 1 and "min chars" in err


def test_library_errors_are_trainfer_errors(tmp_path):
    with pytest.raises(TrainferError, match="not a directory"):
        dataset_from_logs(tmp_path / "nope", tmp_path / "out.jsonl")
