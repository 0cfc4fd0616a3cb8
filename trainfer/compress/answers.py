"""A model's own answers as distillation data: what a speculative draft (or any student) should learn to predict.

    trainfer dataset answers smollm2-135m-instruct --prompts prompts.txt --out answers.jsonl
    trainfer prune smollm2-135m-instruct --ratio 0.867 --out draft0
    trainfer distill --teacher smollm2-135m-instruct --student draft0 --data answers.jsonl:text --out runs/draft

A draft is right when it guesses what the target will say, so it learns best from the target's own text, not a
corpus (self-distillation; docs/engine.md, Speculative decoding, has the recipe and its cost). The engine answers
every prompt, all of them batched, greedy by default (the answers a greedy request gets). Each line holds the
whole transcript as the model read it (the chat template, the answer and its end-of-turn token) under "text", with
the prompt and the answer beside it; every line is one document, so distill's held-out split keeps whole
transcripts apart.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from trainfer.errors import TrainferError
from trainfer.infer import native_decode
from trainfer.infer.sampling import SamplingParams
from trainfer.llm import LLM

MAX_PROMPTS = 100_000  # a bound on one run: each prompt is a generation


@dataclass
class AnswersReport:
    prompts: int
    tokens: int  # answer tokens generated
    stopped: int  # answers that ended with the end-of-turn token (the rest ran into max_tokens)
    seconds: float

    def summary(self) -> str:
        return (f"{self.prompts} answers, {self.tokens} tokens ({self.tokens / max(self.seconds, 1e-9):.0f} tokens/s), "
                f"{self.stopped} ended on their own, {self.prompts - self.stopped} cut at max_tokens; "
                f"{self.seconds:.0f} s")  # fmt: skip


def read_prompts(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations to answer: a text file (one user message per non-empty line) or JSONL lines with "prompt"
    (a user message) or "messages" (a conversation ending with a user turn)."""
    path = Path(path)
    if not path.is_file():
        raise TrainferError(f"no such prompts file: {path}")
    lines = [(i + 1, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if line.strip()]
    if not lines:
        raise TrainferError(f"{path} has no prompts")
    if len(lines) > MAX_PROMPTS:
        raise TrainferError(f"{path} has {len(lines)} prompts; at most {MAX_PROMPTS} per run")
    if path.suffix != ".jsonl":
        return [[{"role": "user", "content": line.strip()}] for _, line in lines]
    out = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainferError(f"{path}:{number} is not valid JSON: {e}") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            out.append([{"role": "user", "content": row["prompt"]}])
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            out.append(row["messages"])
        else:
            raise TrainferError(f"{path}:{number} needs a 'prompt' string or a 'messages' list")
    return out


def teacher_answers(
    model: str,
    prompts: str | Path,
    out: str | Path,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    dtype: str = "auto",
    force: bool = False,
) -> AnswersReport:
    """Answer every prompt with the model; the file is written whole (a temporary name, then renamed)."""
    out = Path(out)
    if out.exists() and not force:
        raise TrainferError(f"{out} exists; pass --force to replace it")
    conversations = read_prompts(prompts)
    # MAX_ROWS streams: one native step each decode step (more take several; docs/LOG.md has the trade)
    llm = LLM.load(model, dtype=dtype, max_num_seqs=native_decode.MAX_ROWS)
    if not llm.tokenizer.chat_template:
        raise TrainferError(f"{model} has no chat template: its answers would not be chat transcripts")
    start, rows, tokens, stopped = time.perf_counter(), [], 0, 0
    ids = [llm.chat_prompt(m) for m in conversations]
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed * 1_000_003 + i)
              for i in range(len(conversations))]  # fmt: skip
    for messages, prompt, result in zip(conversations, ids, llm.run_queued(ids, params, "answered"), strict=True):
        events = result[0]
        if events[-1].finish_reason == "error":
            raise TrainferError(f"generation failed: {events[-1].error}")
        answer = [e.token_id for e in events]
        tokens += len(answer)
        stopped += events[-1].finish_reason == "stop"
        rows.append({
            "text": llm.tokenizer.decode(prompt + answer),
            "prompt": messages,
            "answer": "".join(e.text for e in events),
            "finish_reason": events[-1].finish_reason,
        })  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    return AnswersReport(len(rows), tokens, stopped, time.perf_counter() - start)
