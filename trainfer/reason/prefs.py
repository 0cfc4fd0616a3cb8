"""Preference pairs from a model's own samples, scored by a checker: DPO's data made from what trainfer has.

    trainfer dataset prefs smollm2-135m-instruct --task chain-sum --out prefs.jsonl
    trainfer dataset prefs MODEL --data prompts.jsonl --reward my_rewards.py:score --out prefs.jsonl
    trainfer dpo smollm2-135m-instruct --data prefs.jsonl --out runs/prefs --lora

Each problem gets `n` samples from the engine (one request, one prefill), scored as `trainfer grpo` scores them:
the task's checker, reasoning-gym's `score_answer`, a prompts file's `answer` by exact match of the extracted
answer, or a user's function. The best-scoring sample is `chosen` and the worst `rejected` (the first of each
among ties, in sampling order); a problem whose samples all score alike (or whose pick is an empty answer, which
DPO refuses) gives no pair and is counted, as is a
sample the user's function could not score (it counts 0). Lines are TRL's conversational form, `{"prompt":
[messages], "chosen": TEXT, "rejected": TEXT}` (raw text for a model without a chat template), which `trainfer
dpo` reads, with the two scores beside them. The work (problems x samples x tokens) is said before sampling starts
and progress with the time left after each batch: the defaults sample up to 204,800 tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from trainfer.errors import TrainferError
from trainfer.infer import native_decode
from trainfer.infer.sampling import SamplingParams
from trainfer.llm import LLM
from trainfer.reason.grpo import load_reward, problems_of, render, score


@dataclass
class PrefsReport:
    problems: int
    pairs: int
    all_alike: int  # problems whose samples all scored the same (or whose best or worst answer is empty): no pair
    mean_reward: float  # over every sample
    failures: int  # samples the reward function could not score (counted 0)

    def summary(self) -> str:
        failed = f"; {self.failures} samples the reward function could not score (counted 0)" if self.failures else ""
        return (f"{self.problems} problems: {self.pairs} pairs, {self.all_alike} without one (every sample scored "
                f"alike); mean sample reward {self.mean_reward:.2f}{failed}")  # fmt: skip


def make_prefs(model: str, out: str | Path, task: str = "", data: str = "", reward: str = "", count: int = 200,
               n: int = 8, temperature: float = 1.0, max_tokens: int = 128, template: str = "direct", seed: int = 0,
               digits: int = 2, force: bool = False) -> PrefsReport:  # fmt: skip
    """Sample, score and pair; the file is written whole (a temporary name, then renamed), so a failed run leaves
    nothing half-written."""
    out = Path(out)
    if out.exists() and not force:
        raise TrainferError(f"{out} exists; pass --force to replace it")
    if n < 2:
        raise TrainferError("n must be at least 2: a pair needs two samples")
    reward_fn = load_reward(reward) if reward else None
    problems, _, messages = problems_of(task, data, count, 0, seed, digits)
    if reward_fn is None and any(not p.answer for p in problems):
        raise TrainferError(f"{data}: a line without 'answer' needs --reward module:function to score it")
    # MAX_ROWS streams: one native step each decode step (as `dataset answers`; docs/LOG.md has the trade)
    llm = LLM.load(model, max_num_seqs=native_decode.MAX_ROWS)
    prompts = [render(p, llm.tokenizer, template, messages[i] if messages else None) for i, p in enumerate(problems)]
    params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed * 1_000_003 + i)
              for i in range(len(prompts))]  # fmt: skip
    most = len(prompts) * n * max_tokens
    print(f"sampling {len(prompts)} problems x {n} samples of up to {max_tokens} tokens (at most {most:,} tokens); "
          "fewer with --count, --n or --max-tokens", flush=True)  # fmt: skip
    got = llm.run_queued([p.ids for p in prompts], params, "problems sampled")
    lines, alike, failures, total = [], 0, 0, 0.0
    for prompt, samples in zip(prompts, got, strict=True):
        texts = [llm.tokenizer.decode([e.token_id for e in s if e.token_id >= 0], skip_special_tokens=True)
                 for s in samples]  # fmt: skip
        scores = [score(reward_fn, prompt, t) for t in texts]
        failures += sum(s is None for s in scores)
        values = [s or 0.0 for s in scores]
        total += sum(values)
        best, worst = values.index(max(values)), values.index(min(values))
        chosen, rejected = texts[best].strip(), texts[worst].strip()
        if values[best] == values[worst] or not chosen or not rejected or chosen == rejected:
            alike += 1
            continue
        lines.append(json.dumps({"prompt": prompt.messages or prompt.text, "chosen": texts[best],
                                 "rejected": texts[worst], "scores": [values[best], values[worst]]}))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out)
    return PrefsReport(len(prompts), len(lines), alike, total / max(1, n * len(prompts)), failures)
