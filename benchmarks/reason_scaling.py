"""The seed's claim, measured at matched strategy: does a small model with test-time compute match a model 4x its size?

    .venv/bin/python benchmarks/reason_scaling.py --out /tmp/rs [--steps 3000] [--seeds 0,1,2] [--budgets 1,4,16]

Per seed, two models are pretrained from zero with `trainfer train` (that seed) on the same documents for the same
number of tokens: 5-digit additions, half answered directly (`48213+90577=138790`), half worked on a scratchpad
(`48213+90577:3+7+0=10,...;138790`, `reason/tasks.worked_corpus`), on a character tokenizer. The large model has
twice the width and one more layer (4.2x the parameters). On held-out 5-digit problems (kept out of the corpus)
**both** are asked the same ways with `trainfer.reason` (sampling seeded by the seed too): greedy (the direct
answer), cot (the greedy scratchpad), self-consistency and best-of-N by mean logprob, all without a verifier; and
best-of-N by the task's program verifier, which re-checks a scratchpad's every column, carry and read-off from the
question: a complete correctness check, so an **oracle** verifier (labelled so). Compute per problem is what the
engine processed, in FLOPs.

It prints, per strategy and budget, each size's accuracy pooled over seeds with a 95% Wilson interval and the
per-seed min-max, their FLOPs, and which size wins; then the least small-model compute that reaches the large
model's greedy and cot accuracy with and without the oracle; a plot (--plot), and JSON on the last line. Stages
whose output exists are reused (delete --out to start over).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from trainfer.rounds import describe, environment

HELD_OUT = 500  # problems kept out of the corpus; the first --count of them are asked
DIGITS = 5


def held_out(count: int):
    from trainfer.reason.tasks import make

    return make("add-pad", HELD_OUT, seed=1, digits=DIGITS)[:count]


def prepare(out: Path, documents: int) -> Path:
    from trainfer.reason.tasks import worked_corpus

    data = out / "data"
    if (data / "meta.json").exists():
        return data
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    exclude = {p.question for p in held_out(HELD_OUT)}
    docs = worked_corpus(documents, 0, digits=(DIGITS, DIGITS), exclude=exclude)
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    trainfer = [sys.executable, "-m", "trainfer.cli"]
    subprocess.run([*trainfer, "prepare", "--source", f"{corpus}:text", "--tokenizer", "char", "--out", str(data),
                    "--val-fraction", "0.02"], check=True)  # fmt: skip
    return data


def train(out: Path, data: Path, name: str, dim: int, layers: int, steps: int, seed: int) -> Path:
    run = out / f"seed{seed}" / name
    if (run / "metrics.jsonl").exists() and '"end"' in (run / "metrics.jsonl").read_text():
        return run
    cmd = [sys.executable, "-m", "trainfer.cli", "train", "--data", str(data), "--out", str(run), "--preset", "tiny",
           "--set", f"model.dim={dim}", "--set", f"model.n_layers={layers}", "--set", f"max_steps={steps}",
           "--set", "eval_every=500", "--set", "progress=false", "--set", "log_every=100",
           "--set", f"seed={seed}"]  # fmt: skip
    subprocess.run(cmd, check=True)
    return run


def trained_tokens(run: Path) -> int:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max(r.get("tokens", 0) for r in records)


# (strategy, best-of-n scorer, label): the same list for both sizes.
STRATEGIES = [
    ("greedy", "logprob", "greedy (direct answer)"),
    ("cot", "logprob", "cot (greedy scratchpad)"),
    ("self-consistency", "logprob", "self-consistency"),
    ("best-of-n", "logprob", "best-of-n (mean logprob)"),
    ("best-of-n", "verifier", "best-of-n (oracle verifier)"),
]


def measure(run: Path, budgets: list[int], count: int, seed: int):
    from trainfer import LLM
    from trainfer.reason.tasks import evaluate

    llm = LLM.load(run)
    problems = held_out(count)
    rows = []
    for strategy, scorer, label in STRATEGIES:
        for r in evaluate(llm, "add-pad", [strategy], budgets, max_tokens=80, temperature=0.7, scorer=scorer,
                          problems=problems, seed=seed):  # fmt: skip
            rows.append(type(r)(**{**asdict(r), "label": label}))
    return llm.model.cfg.n_params, rows


def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion (Wilson's: sound at 0% and 100%, where the normal one collapses)."""
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled(per_seed: dict[int, list], count: int) -> list[dict]:
    """Per (label, budget): accuracy pooled over seeds, its interval, the per-seed min-max and mean FLOPs."""
    out = []
    for i, first in enumerate(next(iter(per_seed.values()))):
        rows = [rows[i] for rows in per_seed.values()]
        right = round(sum(r.accuracy * count for r in rows))
        n = count * len(rows)
        out.append({"label": first.label, "strategy": first.strategy, "budget": first.budget, "accuracy": right / n,
                    "interval": wilson(right, n), "seed_min": min(r.accuracy for r in rows),
                    "seed_max": max(r.accuracy for r in rows),
                    "flops": statistics.mean(r.flops_per_problem for r in rows),
                    "samples": statistics.mean(r.samples_per_problem for r in rows)})  # fmt: skip
    return out


def cheapest_reaching(rows: list[dict], accuracy: float) -> dict | None:
    """The row of least compute whose pooled accuracy is at or above `accuracy`."""
    hits = [r for r in rows if r["accuracy"] >= accuracy]
    return min(hits, key=lambda r: r["flops"]) if hits else None


def matched_table(small: list[dict], large: list[dict], seeds: int, count: int) -> None:
    print(f"\nmatched strategies, {seeds} seeds x {count} problems each; accuracy pooled [95% Wilson] (seed min-max)")
    print(f"  {'strategy':<28} {'n':>3} {'small':>30} {'FLOPs':>9} {'large':>30} {'FLOPs':>9}  winner")
    for a, b in zip(small, large, strict=True):
        cells = []
        for r in (a, b):
            lo, hi = r["interval"]
            cells.append(f"{r['accuracy']:6.1%} [{lo:5.1%}-{hi:5.1%}] ({r['seed_min']:.0%}-{r['seed_max']:.0%})")
        overlap = a["interval"][1] >= b["interval"][0] and b["interval"][1] >= a["interval"][0]
        winner = "tie (intervals overlap)" if overlap else ("small" if a["accuracy"] > b["accuracy"] else "large")
        print(f"  {a['label']:<28} {a['budget']:>3} {cells[0]:>30} {a['flops']:9.3g} {cells[1]:>30} {b['flops']:9.3g}"
              f"  {winner}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--documents", type=int, default=150_000)
    ap.add_argument("--steps", type=int, default=3000, help="optimizer steps of 16 x 128 tokens, both models")
    ap.add_argument("--small", default="96x4", help="width x layers (default 96x4: 0.44M parameters)")
    ap.add_argument("--large", default="192x5", help="width x layers (default 192x5: 1.85M, 4.2x the small)")
    ap.add_argument("--count", type=int, default=200, help="held-out problems asked (at most 500)")
    ap.add_argument("--budgets", default="1,4,16")
    ap.add_argument("--seeds", default="0,1,2", help="a pair of models trained and asked per seed")
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    print(describe(environment()), flush=True)

    data = prepare(args.out, args.documents)
    per_seed: dict[str, dict[int, list]] = {"small": {}, "large": {}}
    params, tokens = {}, {}
    for seed in seeds:
        for size, shape in (("small", args.small), ("large", args.large)):
            run = train(args.out, data, size, *map(int, shape.split("x")), args.steps, seed)
            tokens[size] = trained_tokens(run)
            params[size], per_seed[size][seed] = measure(run, budgets, args.count, seed)
            print(f"seed {seed} {size}: " + ", ".join(f"{r.label} n={r.budget} {r.accuracy:.1%}"
                                                      for r in per_seed[size][seed]), flush=True)  # fmt: skip
    small, large = pooled(per_seed["small"], args.count), pooled(per_seed["large"], args.count)
    print(f"\nsmall {params['small'] / 1e6:.2f}M, large {params['large'] / 1e6:.2f}M parameters, "
          f"{tokens['small'] / 1e6:.1f}M training tokens each")  # fmt: skip
    matched_table(small, large, len(seeds), args.count)
    findings = {}
    for name in ("greedy", "cot"):
        ref = next(r for r in large if r["strategy"] == name)
        for pool, rows in (
            ("with the oracle", small),
            ("without it", [r for r in small if "oracle" not in r["label"]]),
        ):
            hit = cheapest_reaching(rows, ref["accuracy"])
            key = f"large {name} {ref['accuracy']:.1%} ({ref['flops']:.3g} FLOPs)"
            findings[f"{name}, {pool}"] = hit and {**hit, "flops_ratio": hit["flops"] / ref["flops"]}
            print(f"{key}: small {pool} " + (f"reaches it with {hit['label']} n={hit['budget']} ({hit['accuracy']:.1%})"
                  f" at {hit['flops'] / ref['flops']:.2f}x its FLOPs" if hit else "does NOT reach it"))  # fmt: skip
    if args.plot:
        from trainfer.reason.tasks import BudgetRow, plot

        rows = [BudgetRow(r["strategy"], r["budget"], r["accuracy"], r["samples"], 0, r["flops"],
                          f"{who}: {r['label']}") for who, pool in (("small", small), ("large", large))
                for r in pool]  # fmt: skip
        plot(rows, args.plot, f"{DIGITS}-digit addition, {len(seeds)} seeds x {args.count} held-out problems, "
             f"{tokens['small'] / 1e6:.1f}M training tokens")  # fmt: skip
        print(f"plot: {args.plot}")
    print(json.dumps({"environment": environment(), "tokens_trained": tokens, "params": params, "seeds": seeds,
                      "small": small, "large": large, "findings": findings}))  # fmt: skip


if __name__ == "__main__":
    main()
