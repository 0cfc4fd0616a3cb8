"""Turn the server's request logs (`trainfer serve --log-requests DIR`) into a fine-tuning set: the data
flywheel's second half. `trainfer dataset from-logs DIR --out FILE.jsonl` runs it.

Each logged choice becomes one example: a chat answer as `{"messages": [..., {"role": "assistant", ...}]}`,
a completion as `{"prompt", "completion"}` (the two line kinds `trainfer finetune --data` reads). Filters in
order: who answered (`--routed` keeps only a cascade's upstream answers, so the edge model learns what it had
to forward: distillation from traffic), finish reason, response length, rating (feedback lines joined by
response id), exact duplicates.
E-mail addresses and phone numbers are redacted in every message before the duplicate check and the write.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainfer.data.redact import redact
from trainfer.errors import TrainferError

LOG_GLOB = "requests-*.jsonl"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Report:
    """What became of the logged answers: kept, and dropped by reason."""

    files: int = 0
    answers: int = 0  # choices in valid request lines
    kept: int = 0
    invalid_lines: int = 0  # torn (a crash mid-write) or not a log line
    dropped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return (
            f"{self.files} log files, {self.answers} answers ({self.invalid_lines} invalid lines skipped): "
            f"kept {self.kept}, dropped {sum(self.dropped.values())} ({reasons})"
        )


def read_logs(log_dir: Path, report: Report) -> tuple[list[dict[str, Any]], dict[tuple[str, int | None], str]]:
    """The request lines, in file order, and the last rating given per (response id, choice index or None)."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise TrainferError(f"{log_dir} is not a directory: pass the DIR given to `trainfer serve --log-requests`")
    files = sorted(log_dir.glob(LOG_GLOB))  # names begin with the UTC time: chronological
    if not files:
        raise TrainferError(f"no request logs ({LOG_GLOB}) in {log_dir}: serve with --log-requests {log_dir} first")
    report.files = len(files)
    requests, ratings = [], {}
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if is_feedback(record):
                    ratings[(record["id"], record.get("index"))] = record["rating"]
                elif is_request(record):
                    requests.append(record)
                else:
                    report.invalid_lines += 1
    return requests, ratings


def is_feedback(r: Any) -> bool:
    if not isinstance(r, dict) or r.get("object") != "feedback" or r.get("rating") not in ("up", "down"):
        return False
    return isinstance(r.get("id"), str) and (r.get("index") is None or isinstance(r["index"], int))


def is_request(r: Any) -> bool:
    """A request line with everything an example is built from (a torn or hand-edited one is not)."""
    if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not isinstance(r.get("choices"), list):
        return False
    choices = r["choices"]
    if not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
        return False
    if [c.get("index") for c in choices] != list(range(len(choices))):
        return False
    if r.get("object") == "chat.completion":
        messages = r.get("messages")
        return isinstance(messages, list) and bool(messages) and all(map(is_message, messages))
    if r.get("object") != "text_completion" or not isinstance(r.get("prompt"), str | list) or not r["prompt"]:
        return False
    return len(choices) % len(prompt_list(r["prompt"])) == 0  # choice i answers prompt i // n


def is_message(m: Any) -> bool:
    return isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)


def prompt_list(prompt: Any) -> list[Any]:
    """A completion request's prompts (as /v1/completions reads its `prompt`): choice i answers i // n."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def example(record: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any] | str:
    """The training line for one logged choice (redacted), or why it has none."""
    text = choice["text"]
    if record["object"] == "chat.completion":
        messages = [{"role": ROLES[m["role"]], "content": redact(m["content"])} for m in record["messages"]]
        return {"messages": [*messages, {"role": "assistant", "content": redact(text)}]}
    prompts = prompt_list(record["prompt"])
    prompt = prompts[choice["index"] // max(1, len(record["choices"]) // len(prompts))]
    if not isinstance(prompt, str):
        return "token-id prompt"  # the log keeps no tokenizer to turn ids back into text
    return {"prompt": redact(prompt), "completion": redact(text)}


@dataclass(frozen=True)
class Filters:
    """Which logged answers become examples."""

    finish_reasons: tuple[str, ...] = ("stop",)
    """keep answers that ended so ("length" ones are cut off mid-sentence)"""
    min_chars: int = 1
    """shortest answer kept, in characters"""
    max_chars: int = 20_000
    """longest answer kept, in characters"""
    only_rated_up: bool = False
    """keep only answers a client rated "up" (POST /v1/feedback)"""
    keep_rated_down: bool = False
    """keep answers rated "down" too (dropped by default)"""
    routed: bool = False
    """keep only the upstream's answers (serve --upstream): what the edge model had to ask the cloud for"""

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise TrainferError(f"need 0 <= min chars <= max chars, got {self.min_chars} and {self.max_chars}")

    def drop_reason(self, record: dict[str, Any], choice: dict[str, Any], rating: str | None) -> str | None:
        if self.routed and record.get("route") != "upstream":
            return "answered locally"
        if choice.get("finish_reason") not in self.finish_reasons:
            return f"finish_reason {choice.get('finish_reason')}"
        if len(choice["text"]) < self.min_chars:
            return "too short"
        if len(choice["text"]) > self.max_chars:
            return "too long"
        if rating == "down" and not self.keep_rated_down:
            return "rated down"
        if self.only_rated_up and rating != "up":
            return "not rated up"
        return None


def dataset_from_logs(log_dir: Path, out: Path, filters: Filters = Filters(), force: bool = False) -> Report:
    """Write the logged answers that pass `filters` to `out` as fine-tuning JSONL, atomically; `force`
    replaces an existing `out`. A choice's own rating counts before one given to its whole answer."""
    out = Path(out)
    if out.exists() and not force:
        raise TrainferError(f"{out} exists: pass --force to replace it, or choose another --out")
    report = Report()
    requests, ratings = read_logs(log_dir, report)
    lines: list[str] = []
    seen: set[str] = set()
    for record in requests:
        for choice in record["choices"]:
            report.answers += 1
            rating = ratings.get((record["id"], choice["index"]), ratings.get((record["id"], None)))
            why = filters.drop_reason(record, choice, rating)
            ex = example(record, choice) if why is None else why
            if isinstance(ex, dict):
                line = json.dumps(ex, ensure_ascii=False)
                if line not in seen:
                    seen.add(line)
                    lines.append(line)
                    continue
                ex = "duplicate"  # the same conversation and answer, after redaction
            report.dropped[ex] += 1
    report.kept = len(lines)
    if not lines:
        raise TrainferError(f"no answer passed the filters, nothing written: {report.summary()}")
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out)  # atomic: a crash never leaves a half-written set behind
    return report
