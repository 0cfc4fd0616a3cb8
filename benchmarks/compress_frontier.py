"""The size / speed / quality frontier of compressed SmolLM2-135M-Instruct, every variant measured in one run.

    .venv/bin/python benchmarks/compress_frontier.py [--distill-steps 200] [--out benchmarks/results/compress]

Variants: fp32, auto (the file's own Q4_1 blocks, the default), int8, int4 (weights quantized at load), pruned
25% and 50% by depth (block influence) and by width (MLP channels; at 50% also one of three KV head groups), the
50% ones distilled from the fp32 model on Shakespeare's training plays (top-64 KL, a shared teacher cache), and the
best distilled one in int8. For each: weight bytes, single-stream greedy decode tokens/s (median of rounds of 256
tokens, variants alternated so that a noisy neighbour hits all alike; the speed-up is the median of per-round
ratios to fp32, with the min-max), perplexity on held-out Shakespeare plays, and greedy accuracy on 2-digit
addition and on "which is larger" (100 seeded problems each, trainfer/reason/tasks.py). Pareto-optimal
rows (no other row at least as good on all four and better on one) are marked. Writes frontier.json and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from trainfer import LLM  # noqa: E402
from trainfer.compress.distill import distill, load_distill_config  # noqa: E402
from trainfer.compress.prune import prune  # noqa: E402
from trainfer.compress.quality import held_out_ids, score  # noqa: E402
from trainfer.reason import extract  # noqa: E402
from trainfer.reason.tasks import make  # noqa: E402
from trainfer.rounds import describe, environment  # noqa: E402

MODEL = "smollm2-135m-instruct"
PRUNED = {  # name: (method, ratio, kv head groups kept)
    "depth-25": ("depth", 0.25, None),
    "depth-50": ("depth", 0.50, None),
    "width-25": ("width", 0.25, None),
    "width-50": ("width", 0.50, 2),
}


def make_variants(out: Path, steps: int) -> dict[str, tuple[str, str]]:
    """name -> (model path or alias, dtype); prunes and distills what is not on disk yet."""
    variants = {"fp32": (MODEL, "float32"), "auto": (MODEL, "auto"), "int8": (MODEL, "int8"), "int4": (MODEL, "int4")}
    for name, (method, ratio, kv) in PRUNED.items():
        path = out / name
        if not (path / "prune.json").exists():
            print(f"pruning {name}", flush=True)
            print(prune(MODEL, path, method, ratio, kv_heads=kv).summary(), flush=True)
        variants[name] = (str(path), "float32")
    data = out / "shakespeare-smollm2"
    if not (data / "meta.json").exists():
        from trainfer.data.prepare import prepare

        prepare(["shakespeare"], data, tokenizer=MODEL)  # the same held-out plays as held_out_ids
    for name in ("depth-50", "width-50"):
        run = out / f"{name}-distilled"
        if not (run / "metrics.jsonl").exists() or '"event": "end"' not in (run / "metrics.jsonl").read_text():
            print(f"distilling {name} for {steps} steps", flush=True)
            settings = [f"max_steps={steps}", "seq_len=256", "batch_size=4", "grad_accum=2", "lr=2e-4",
                        "warmup_steps=20", f"eval_every={steps // 2}", "eval_batches=4", "sample_tokens=0",
                        "progress=false", f"ckpt_every={steps}", "keep_last=1", "top_k=64"]  # fmt: skip
            cfg = load_distill_config(None, settings, teacher=MODEL, student=str(out / name), data=str(data),
                                      out_dir=str(run), teacher_cache=str(out / "teacher-cache"))  # fmt: skip
            distill(cfg)
        variants[f"{name}+distill"] = (str(run), "float32")
    best = min(("depth-50", "width-50"), key=lambda n: final_val_loss(out / f"{n}-distilled"))
    variants[f"{best}+distill+int8"] = (str(out / f"{best}-distilled"), "int8")
    return variants


def final_val_loss(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if r.get("event") == "eval"][-1]


def weight_bytes(llm: LLM) -> int:
    """Bytes of the weights as held for inference (int8/int4 blocks with their scales), embeddings once."""
    seen, total = set(), 0
    for t in [*llm.model.parameters(), *llm.model.buffers()]:
        if t.data_ptr() in seen or t.numel() < 2:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total - llm.model.inv_freq.numel() * llm.model.inv_freq.element_size()


def accuracy(llm: LLM, task: str, count: int = 100) -> float:
    problems = make(task, count, seed=0)
    answers = llm.chat([[{"role": "user", "content": p.question}] for p in problems], max_tokens=24, temperature=0)
    read = {"number": extract.number, "option": extract.option}
    return sum(read[p.kind](a.text) == p.answer for p, a in zip(problems, answers, strict=True)) / count


def decode_speed(llm: LLM, tokens: int) -> float:
    done = llm.generate("The history of the English stage", max_tokens=tokens, temperature=0, ignore_eos=True)
    return done.decode_tokens_per_s


def pareto(rows: list[dict]) -> None:
    def better_or_equal(a, b) -> bool:
        return (a["bytes"] <= b["bytes"] and a["tokens_per_s"] >= b["tokens_per_s"] and a["ppl"] <= b["ppl"]
                and a["accuracy"] >= b["accuracy"])  # fmt: skip

    for r in rows:
        r["pareto"] = not any(better_or_equal(o, r) and o != r and (
            o["bytes"] < r["bytes"] or o["tokens_per_s"] > r["tokens_per_s"] or o["ppl"] < r["ppl"]
            or o["accuracy"] > r["accuracy"]) for o in rows)  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "bytes", "weights (MB)"), (axes[1], "speedup", "decode speed vs fp32 (x)")):
        for r in rows:
            x = r["bytes"] / 1e6 if key == "bytes" else r["speedup"]
            ax.scatter(x, r["ppl"], marker="*" if r["pareto"] else "o", s=120 if r["pareto"] else 40)
            ax.annotate(r["name"], (x, r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out Shakespeare perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M compressed: * = Pareto-optimal on size, speed, perplexity and task accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compress")
    ap.add_argument("--distill-steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--positions", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=256, help="decoded tokens per speed measurement")
    ap.add_argument("--speed-only", action="store_true", help="reuse frontier.json's quality, measure speed again")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    variants = make_variants(args.out, args.distill_steps)
    rows = {}
    if args.speed_only:
        rows = {r["name"]: {**r, "speeds": []} for r in json.loads((args.out / "frontier.json").read_text())}
    for name, (path, dtype) in variants.items():
        if name in rows:
            continue
        llm = LLM.load(path, dtype=dtype)
        ids = held_out_ids(llm.tokenizer, "shakespeare", args.positions + 1)
        nll, _ = score(llm.model, ids, 512)
        rows[name] = {
            "name": name, "path": path, "dtype": dtype, "params": llm.model.cfg.n_params, "bytes": weight_bytes(llm),
            "ppl": math.exp(nll), "add": accuracy(llm, "add"), "compare": accuracy(llm, "compare"), "speeds": [],
        }  # fmt: skip
        rows[name]["accuracy"] = (rows[name]["add"] + rows[name]["compare"]) / 2
        print(f"{name}: ppl {rows[name]['ppl']:.2f}, add {rows[name]['add']:.0%}, compare {rows[name]['compare']:.0%}",
              flush=True)  # fmt: skip
        del llm
        gc.collect()
    for _ in range(args.rounds):  # alternated; the median of rounds
        for name, (path, dtype) in variants.items():
            llm = LLM.load(path, dtype=dtype)
            decode_speed(llm, 16)  # warm-up
            rows[name]["speeds"].append(decode_speed(llm, args.tokens))
            del llm
            gc.collect()
    out = list(rows.values())
    base = rows["fp32"]
    for r in out:
        r["tokens_per_s"] = statistics.median(r["speeds"])
        ratios = [s / b for s, b in zip(r["speeds"], base["speeds"], strict=True)]  # fp32 in the same round
        r["speedup"], r["speedup_range"] = statistics.median(ratios), (min(ratios), max(ratios))
        r["ppl_change"] = r["ppl"] / base["ppl"] - 1
    pareto(out)
    (args.out / "frontier.json").write_text(json.dumps(out, indent=2))
    plot(out, args.out / "frontier.png")
    print(f"\nSmolLM2-135M-Instruct compressed; {describe(environment())}; "
          f"{time.time() - t0:.0f} s")  # fmt: skip
    print(f"{'variant':26} {'params':>8} {'MB':>7} {'tok/s':>7} {'x fp32 (min-max)':>20} {'ppl':>8} {'ppl +':>7} "
          f"{'add':>5} {'cmp':>5}  pareto")  # fmt: skip
    for r in out:
        print(f"{r['name']:26} {r['params'] / 1e6:7.1f}M {r['bytes'] / 1e6:7.1f} {r['tokens_per_s']:7.1f} "
              f"{r['speedup']:6.2f}x ({r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}) {r['ppl']:8.2f} "
              f"{r['ppl_change']:+6.1%} {r['add']:5.0%} {r['compare']:5.0%}  "
              f"{'*' if r['pareto'] else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
