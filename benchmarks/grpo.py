"""GRPO on SmolLM2-135M-Instruct: does reinforcement on checked answers raise held-out accuracy, and where does the
wall time go (sampling vs the update)?

    .venv/bin/python benchmarks/grpo.py --out /tmp/grpo [--seeds 0,1,2] [--steps 60] [--minutes 30]

`trainfer grpo smollm2-135m-instruct --task TASK --out RUN --lora --seed S` with every other setting at its default
(the README's command), once per seed. The task is reasoning-gym's chain_sum with 2-3 one-digit terms, where the
model starts below 50% greedy. The held-out problems come from another seed than the training ones, and any
training problem asked the same way as a held-out one is dropped (tasks/grpo.py). Measured per seed: held-out
greedy accuracy before and after, the best evaluation, the wall time, the share of it spent sampling, rollout
tokens/s, and the training reward of the first and last fifth of the steps. `--minutes` stops a seed's run at that
wall time (the issue's budget); it resumes nothing. Prints a line per seed, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from trainfer.llm import LLM
from trainfer.reason.grpo import HELDOUT_SEED, SEED_SPACING
from trainfer.reason.tasks import Format, evaluate, plot
from trainfer.rounds import describe, environment
from trainfer.train.metrics import read_metrics

TRAINFER = str(Path(sys.executable).parent / "trainfer")
TASK = "rg:chain_sum:min_terms=2,max_terms=3,min_digits=1,max_digits=1"


def run_seed(out: Path, seed: int, steps: int, minutes: float, task: str) -> dict:
    run = out / f"seed-{seed}"
    cmd = [TRAINFER, "grpo", "smollm2-135m-instruct", "--task", task, "--out", str(run), "--lora", "--seed",
           str(seed), "--set", f"max_steps={steps}"]  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=minutes * 60)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    except subprocess.TimeoutExpired:
        pass  # the budget ran out: what was evaluated so far counts
    wall = time.perf_counter() - start
    rows = read_metrics(run / "metrics.jsonl")
    evals = [r for r in rows if r.get("event") == "eval" and "val_accuracy" in r]
    rec = [r for r in rows if r.get("event") == "rollout"]
    fifth = max(1, len(rec) // 5)
    return {
        "seed": seed, "wall_s": wall, "steps": len(rec), "before": evals[0]["val_accuracy"],
        "after": evals[-1]["val_accuracy"], "best": max(e["val_accuracy"] for e in evals),
        "curve": [(e["step"], e["val_accuracy"]) for e in evals],
        "rollout_share": statistics.mean(r["rollout_share"] for r in rec),
        "rollout_tokens_per_s": statistics.median(r["rollout_tokens_per_s"] for r in rec),
        "reward_first": statistics.mean(r["reward"] for r in rec[:fifth]),
        "reward_last": statistics.mean(r["reward"] for r in rec[-fifth:]),
        "completion_tokens_last": statistics.mean(r["completion_tokens"] for r in rec[-fifth:]),
    }  # fmt: skip


def test_time(model: str, task: str, seed: int, budgets: list[int], count: int) -> list:
    """Greedy and self-consistency at each budget on the run's own held-out problems (drawn as grpo draws them),
    every strategy asked the question as grpo asked it, samples at 0.7 as reason-eval's."""
    llm = LLM.load(model)
    held = seed * SEED_SPACING + HELDOUT_SEED
    return evaluate(llm, task, ["greedy", "self-consistency"], budgets, count=count, seed=held,
                    max_tokens=64, fmt=Format(direct="{question}", cot="{question}"))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--task", default=TASK)
    ap.add_argument("--test-time", default="", help="budgets (e.g. 1,4,8): accuracy vs samples before and after")
    ap.add_argument("--test-time-only", action="store_true", help="skip training: measure the runs in --out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(describe(env), flush=True)
    results = []
    for seed in map(int, args.seeds.split(",")) if not args.test_time_only else []:
        r = run_seed(args.out, seed, args.steps, args.minutes, args.task)
        results.append(r)
        print(f"seed {seed}: held-out accuracy {r['before']:.1%} -> {r['after']:.1%} (best {r['best']:.1%}) in "
              f"{r['steps']} steps, {r['wall_s'] / 60:.1f} min, {r['rollout_share']:.0%} sampling at "
              f"{r['rollout_tokens_per_s']:.0f} tokens/s; training reward {r['reward_first']:.2f} -> "
              f"{r['reward_last']:.2f}", flush=True)  # fmt: skip
    if results:
        gains = [r["after"] - r["before"] for r in results]
        print(f"gain: median {statistics.median(gains):+.1%} (min {min(gains):+.1%}, max {max(gains):+.1%}) over "
              f"{len(gains)} seed(s)")  # fmt: skip
    scaling = {}
    if args.test_time:
        budgets, seed = [int(b) for b in args.test_time.split(",")], int(args.seeds.split(",")[0])
        rows = []
        for name, model in (("base", "smollm2-135m-instruct"), ("GRPO", str(args.out / f"seed-{seed}"))):
            for row in test_time(model, args.task, seed, budgets, 100):
                row.label = f"{name}: {row.label}"
                rows.append(row)
                scaling.setdefault(name, []).append((row.strategy, row.budget, row.accuracy))
                print(f"{row.label:<28} {row.budget:>3} samples: {row.accuracy:6.1%}", flush=True)
        plot(rows, args.out / "test-time.png", f"chain_sum held out, seed {seed}: before and after GRPO")
        print(f"plot: {args.out / 'test-time.png'}")
    print(json.dumps({"environment": env, "task": args.task, "results": results, "test_time": scaling}))


if __name__ == "__main__":
    main()
