"""The seed's claim, measured: can a small model with test-time compute match a model 4x its size?

    .venv/bin/python benchmarks/reason_scaling.py --out /tmp/rs [--steps 1500] [--count 200] [--budgets 1,2,4,8,16]

Two models are pretrained from zero with `trainfer train` on the same documents for the same number of tokens:
5-digit additions, half answered directly (`48213+90577=138790`), half worked on a scratchpad
(`48213+90577:3+7+0=10,...;138790`, `reason/tasks.worked_corpus`), on a character tokenizer. The large model
has twice the width and one more layer (4.2x the parameters). On held-out 5-digit problems (kept out of the
corpus) each is asked with `trainfer.reason`: greedy (direct answer), cot (greedy scratchpad), self-consistency,
adaptive and best-of-N (by mean logprob, and by the task's program verifier, which checks a scratchpad's own
arithmetic without the reference answer) at each budget. Compute per problem is what the engine processed, in
FLOPs.

It prints each model's table, the smallest small-model compute that reaches the large model's greedy and cot
accuracy (or says that none does), a plot (--plot), and JSON on the last line. Stages whose output exists are
reused (delete --out to start over).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from finetune_faq import cpu_flags  # noqa: E402

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


def train(out: Path, data: Path, name: str, dim: int, layers: int, steps: int) -> Path:
    run = out / name
    if (run / "metrics.jsonl").exists() and '"end"' in (run / "metrics.jsonl").read_text():
        return run
    cmd = [sys.executable, "-m", "trainfer.cli", "train", "--data", str(data), "--out", str(run), "--preset", "tiny",
           "--set", f"model.dim={dim}", "--set", f"model.n_layers={layers}", "--set", f"max_steps={steps}",
           "--set", "eval_every=500", "--set", "progress=false", "--set", "log_every=100"]  # fmt: skip
    subprocess.run(cmd, check=True)
    return run


def trained_tokens(run: Path) -> int:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max(r.get("tokens", 0) for r in records)


def measure(run: Path, strategies: list[str], budgets: list[int], count: int, scorers: list[str]):
    from trainfer import LLM
    from trainfer.reason.tasks import evaluate

    llm = LLM.load(run)
    problems = held_out(count)
    rows = []
    for strategy in strategies:
        for scorer in scorers if strategy == "best-of-n" else ["logprob"]:
            rows += evaluate(llm, "add-pad", [strategy], budgets, max_tokens=80, temperature=0.7, scorer=scorer,
                             problems=problems)  # fmt: skip
    return llm.model.cfg.n_params, rows


def cheapest_reaching(rows, accuracy: float):
    """The small-model row of least compute at or above `accuracy`, over every strategy and budget."""
    hits = [r for r in rows if r.accuracy >= accuracy]
    return min(hits, key=lambda r: r.flops_per_problem) if hits else None


def table(name: str, params: int, rows) -> None:
    print(f"\n{name} ({params / 1e6:.2f}M parameters)")
    print(f"  {'strategy':<24} {'budget':>6} {'accuracy':>9} {'samples':>8} {'tokens':>8} {'FLOPs':>10}  (per problem)")
    for r in rows:
        print(f"  {r.label:<24} {r.budget:>6} {r.accuracy:>9.1%} {r.samples_per_problem:>8.1f} "
              f"{r.tokens_per_problem:>8.0f} {r.flops_per_problem:>10.3g}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--documents", type=int, default=150_000)
    ap.add_argument("--steps", type=int, default=3000, help="optimizer steps of 16 x 128 tokens, both models")
    ap.add_argument("--small", default="96x4", help="width x layers (default 96x4: 0.44M parameters)")
    ap.add_argument("--large", default="192x5", help="width x layers (default 192x5: 1.85M, 4.2x the small)")
    ap.add_argument("--count", type=int, default=200, help="held-out problems asked (at most 500)")
    ap.add_argument("--budgets", default="1,2,4,8,16")
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]

    data = prepare(args.out, args.documents)
    small = train(args.out, data, "small", *map(int, args.small.split("x")), args.steps)
    large = train(args.out, data, "large", *map(int, args.large.split("x")), args.steps)
    tokens = {"small": trained_tokens(small), "large": trained_tokens(large)}

    all_strategies = ["greedy", "cot", "self-consistency", "adaptive", "best-of-n"]
    small_params, small_rows = measure(small, all_strategies, budgets, args.count, ["logprob", "verifier"])
    large_params, large_rows = measure(large, ["greedy", "cot", "self-consistency"], budgets, args.count, [])
    table("small", small_params, small_rows)
    table("large", large_params, large_rows)

    large_single = {r.strategy: r for r in large_rows if r.strategy in ("greedy", "cot")}
    small_tts = [r for r in small_rows if r.strategy not in ("greedy", "cot")]
    findings = {}
    print()
    for name, ref in large_single.items():
        for pool, rows in [("any strategy", small_tts),
                           ("without the verifier", [r for r in small_tts if "verifier" not in r.label])]:  # fmt: skip
            hit = cheapest_reaching(rows, ref.accuracy)
            key = f"large {name} {ref.accuracy:.1%} ({ref.flops_per_problem:.3g} FLOPs)"
            if hit:
                ratio = hit.flops_per_problem / ref.flops_per_problem
                print(f"{key}: small reaches it with {hit.label} at budget {hit.budget} ({pool}): "
                      f"{hit.accuracy:.1%} at {hit.flops_per_problem:.3g} FLOPs, {ratio:.2f}x the large")  # fmt: skip
                findings[f"{name}, {pool}"] = {**asdict(hit), "flops_ratio": ratio}
            else:
                best = max(rows, key=lambda r: r.accuracy)
                print(f"{key}: small does NOT reach it ({pool}); its best is {best.label} at budget {best.budget}: "
                      f"{best.accuracy:.1%}")  # fmt: skip
                findings[f"{name}, {pool}"] = None
    adaptive = {r.budget: r for r in small_rows if r.strategy == "adaptive"}
    fixed = {r.budget: r for r in small_rows if r.strategy == "self-consistency"}
    for b in budgets:
        if b in adaptive and b in fixed and b > 1:
            a, f = adaptive[b], fixed[b]
            print(f"budget {b}: adaptive {a.accuracy:.1%} with {a.samples_per_problem:.1f} samples vs fixed "
                  f"{f.accuracy:.1%} with {b}")  # fmt: skip
    if args.plot:
        from trainfer.reason.tasks import plot

        refs = {f"large {k} ({large_params / 1e6:.1f}M)": (r.accuracy, r.flops_per_problem)
                for k, r in large_single.items()}  # fmt: skip
        relabel = [type(r)(**{**asdict(r), "label": f"{who}: {r.label}"})
                   for who, rows in [("small", small_rows), ("large", large_rows)] for r in rows
                   if who == "small" or r.strategy == "self-consistency"]  # fmt: skip
        plot(relabel, args.plot, f"{DIGITS}-digit addition, {args.count} held-out problems, both models trained on "
             f"{tokens['small'] / 1e6:.1f}M tokens", refs)  # fmt: skip
        print(f"plot: {args.plot}")
    print(json.dumps({"cpu_flags": cpu_flags(), "tokens_trained": tokens, "params": {"small": small_params,
                      "large": large_params}, "small": [asdict(r) for r in small_rows],
                      "large": [asdict(r) for r in large_rows], "findings": findings}))  # fmt: skip


if __name__ == "__main__":
    main()
