"""Fine-tune vs from scratch at equal compute: held-out Shakespeare bits per byte against training FLOPs.

    .venv/bin/python benchmarks/finetune_vs_scratch.py --out /tmp/fvs [--ft-steps 64] [--scratch tiny small]

(a) full fine-tuning of SmolLM2-135M-Instruct (`trainfer finetune`) on the training plays as raw text, and
(b) `trainfer train` from zero (a preset, on a 4,096-token BPE that `trainfer prepare` learns from the training
plays), given the FLOPs (a) spent. Both hold out the same 4 texts (3 plays and the sonnets):
`split_documents(docs, 0.1, 0)`, the split `trainfer prepare --val-fraction 0.1 --seed 0` makes (checked against
its meta.json). Bits per byte does not depend on the tokenizer, so the two curves share an axis; one PNG plots
them, and the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainfer.rounds import environment  # noqa: E402

BASE = "smollm2-135m-instruct"
CHUNK_TOKENS = 560  # > seq_len + 1 = 513: the packer cuts every chunk to one full row (see write_chunks)
SEQ_LEN, BATCH = 512, 2


def chunk_text(text: str, tokenizer, tokens: int) -> list[str]:
    """Whole lines, gathered until they hold at least `tokens` tokens (the tail of the play is dropped)."""
    out, lines, count = [], [], 0
    for line in text.splitlines(keepends=True):
        lines.append(line)
        count += len(tokenizer.encode(line, add_bos=False))
        if count >= tokens:
            out.append("".join(lines))
            lines, count = [], 0
    return out


def write_chunks(out: Path, tokenizer, val_chunks: int) -> tuple[Path, Path, list[str]]:
    """Training and held-out JSONL of {"prompt": "", "completion": chunk}; the held-out texts actually scored.

    Every chunk is longer than a row, so `chat_data.pack` truncates it to seq_len + 1 tokens: each row is full
    (no padding to pay for) and no target is the end-of-text token that a completion otherwise ends with (an
    arbitrary cut in mid-play would charge the fine-tune for predicting it). The held-out file holds
    `val_chunks` chunks spread evenly over the 4 held-out texts, all of which every evaluation scores.
    """
    from trainfer.data.prepare import split_documents
    from trainfer.data.sources import load_corpus

    train_docs, val_docs = split_documents(load_corpus(["shakespeare"]), 0.1, 0)
    train = [c for d in train_docs for c in chunk_text(d.text, tokenizer, CHUNK_TOKENS)]
    held = [c for d in val_docs for c in chunk_text(d.text, tokenizer, CHUNK_TOKENS)]
    held = [held[i] for i in np.linspace(0, len(held) - 1, val_chunks).round().astype(int)]
    paths = out / "shakespeare-train.jsonl", out / "shakespeare-heldout.jsonl"
    for path, chunks in zip(paths, (train, held), strict=True):
        path.write_text("".join(json.dumps({"prompt": "", "completion": c}) + "\n" for c in chunks))
    # what an evaluation scores: the first seq_len + 1 tokens of each chunk, the first as context only
    scored = [tokenizer.decode(tokenizer.encode(c, add_bos=False)[: SEQ_LEN + 1]) for c in held]
    print(f"data: {len(train)} training chunks, {len(held)} held-out chunks from {[d.name for d in val_docs]}")
    return paths[0], paths[1], scored


def curve(run_dir: Path) -> tuple[list[tuple[float, float]], dict]:
    """(training FLOPs, held-out bits/byte) at each evaluation of a run: tokens x flops_per_token."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    tokens_at = {r["step"]: r["tokens"] for r in records if "tokens" in r}
    points = [
        (tokens_at.get(r["step"], r["step"] * start["tokens_per_step"]) * start["flops_per_token"], r["val_bpb"])
        for r in records
        if r.get("event") == "eval"
    ]
    return points, start


def run_finetune(train: Path, held: Path, out: Path, steps: int, lr: float, evals: int, val_chunks: int) -> dict:
    from trainfer.train.finetune import finetune, load_finetune_config

    settings = [
        f"max_steps={steps}", f"lr={lr}", f"seq_len={SEQ_LEN}", f"batch_size={BATCH}", "grad_accum=1",
        f"warmup_steps={max(1, steps // 10)}", f"eval_every={math.ceil(steps / evals)}",
        f"eval_batches={math.ceil(val_chunks / BATCH)}", "sample_tokens=0", f"ckpt_every={steps}", "keep_last=1",
        "progress=false",
    ]  # fmt: skip
    cfg = load_finetune_config(
        None, settings, base_model=BASE, data=str(train), val_data=str(held), out_dir=str(out), lora=False
    )
    t0 = time.perf_counter()
    r = finetune(cfg)
    points, start = curve(out)
    return {
        "points": [(0.0, r.before["val_bpb"]), *points],  # the base model, evaluated before the first step
        "flops_per_token": start["flops_per_token"],
        "tokens_per_step": start["tokens_per_step"],
        "steps": r.train.steps,
        "tokens_per_s": r.train.tokens_per_s,
        "mfu": r.train.mfu,
        "dtype": start["dtype"],
        "wall_s": time.perf_counter() - t0,
        "settings": settings,
    }


def prepare_data(data_dir: Path) -> None:
    """`trainfer prepare --source shakespeare --vocab-size 4096` (once), checked to hold out the same texts."""
    from trainfer.data.prepare import prepare, split_documents
    from trainfer.data.sources import load_corpus

    if not (data_dir / "meta.json").exists():
        prepare(["shakespeare"], data_dir, "bpe", 4096, 0.1, 0)
    held = [d.name for d in split_documents(load_corpus(["shakespeare"]), 0.1, 0)[1]]
    meta = json.loads((data_dir / "meta.json").read_text())
    if meta["val_names"] != held:
        raise SystemExit(f"{data_dir} holds out {meta['val_names']}, the fine-tune {held}: prepare it again")


def run_scratch(preset: str, data_dir: Path, out: Path, budget: float, evals: int, dtype: str) -> dict:
    from trainfer.io.tokenizer import Tokenizer
    from trainfer.train.config import load_config
    from trainfer.train.trainer import train

    cfg = load_config(None, [], preset=preset)
    tok = Tokenizer.from_dir(data_dir)
    fpt = cfg.model_config(tok.vocab_size, tok.bos_token_id, tok.eos_token_id).training_flops_per_token(cfg.seq_len)
    per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    steps = max(1, round(budget / (fpt * per_step)))
    val_tokens = json.loads((data_dir / "meta.json").read_text())["val_tokens"]
    settings = [
        f"max_steps={steps}", f"warmup_steps={min(cfg.warmup_steps, steps // 10)}",
        f"eval_every={math.ceil(steps / evals)}", f"dtype={dtype}",
        # windows spread over the whole held-out split, about one per seq_len tokens: every token is scored
        f"eval_batches={math.ceil(val_tokens / cfg.seq_len / cfg.batch_size)}",
        "sample_tokens=0", f"ckpt_every={steps}", "keep_last=1", "progress=false",
    ]  # fmt: skip
    cfg = load_config(None, settings, data=str(data_dir), out_dir=str(out), preset=preset)
    t0 = time.perf_counter()
    r = train(cfg)
    points, start = curve(out)
    assert start["flops_per_token"] == fpt and start["tokens_per_step"] == per_step, "the budget was sized wrongly"
    return {
        "points": points,
        "flops_per_token": fpt,
        "tokens_per_step": per_step,
        "steps": r.steps,
        "params": start["params"],
        "seq_len": cfg.seq_len,
        "tokens_per_s": r.tokens_per_s,
        "mfu": r.mfu,
        "dtype": start["dtype"],
        "wall_s": time.perf_counter() - t0,
        "settings": settings,
    }


@torch.inference_mode()
def bits_per_byte_on(run_dir: Path, texts: list[str], window: int) -> float:
    """A run's best checkpoint on the fine-tune's exact held-out texts (first token of each as context only)."""
    import torch.nn.functional as F

    from trainfer.llm import LLM

    llm = LLM.load(str(run_dir), num_blocks=2)
    nats, n_bytes = 0.0, 0
    for text in texts:
        ids = torch.tensor(llm.tokenizer.encode(text, add_bos=False))
        for s in range(0, len(ids) - 1, window):  # non-overlapping windows, as the trainer evaluates
            chunk = ids[s : s + window + 1]
            nats += float(F.cross_entropy(llm.model(chunk[None, :-1])[0].float(), chunk[1:], reduction="sum"))
        n_bytes += len(llm.tokenizer.decode(ids[1:].tolist()).encode())
    return nats / math.log(2) / n_bytes


def at(points: list[tuple[float, float]], flops: float) -> float:
    """A curve's bits/byte at `flops`, linearly interpolated between its evaluations."""
    xs, ys = zip(*points, strict=True)
    return float(np.interp(flops, xs, ys))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results["runs"].values():
        xs, ys = zip(*r["points"], strict=True)
        ax.plot([x / 1e12 for x in xs], ys, marker="o", label=r["label"])
    ax.set_xlabel("training FLOPs (TFLOP)")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title("Held-out Shakespeare: fine-tune vs from scratch at equal compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="working directory (data, runs, results.json)")
    ap.add_argument("--ft-steps", type=int, default=64, help="fine-tune steps of 2 x 512 tokens: the FLOP budget")
    ap.add_argument("--ft-lr", type=float, default=3e-5)
    ap.add_argument("--scratch", nargs="+", default=["tiny"], help="presets trained from zero (tiny, small)")
    ap.add_argument("--scratch-dtype", default="auto", help="auto | float32 | bfloat16 (FLOPs are the same)")
    ap.add_argument("--evals", type=int, default=6, help="evaluations per run (the fine-tune adds its base)")
    ap.add_argument("--val-chunks", type=int, default=12, help="held-out chunks of 512 tokens the fine-tune scores")
    ap.add_argument("--plot", type=Path, help="PNG path (default OUT/finetune-vs-scratch.png)")
    args = ap.parse_args()
    from trainfer.io.loader import load_checkpoint
    from trainfer.registry import resolve

    args.out.mkdir(parents=True, exist_ok=True)
    for name in ["finetune", *(f"scratch-{p}" for p in args.scratch)]:
        shutil.rmtree(args.out / name, ignore_errors=True)  # runs append to metrics.jsonl: start fresh
    t_start = time.perf_counter()
    tokenizer = load_checkpoint(resolve(BASE), torch.float32)[2]
    train_path, held_path, scored = write_chunks(args.out, tokenizer, args.val_chunks)
    data_dir = args.out / "shakespeare-bpe4096"
    prepare_data(data_dir)

    runs: dict[str, dict] = {}
    ft = run_finetune(train_path, held_path, args.out / "finetune", args.ft_steps, args.ft_lr, args.evals,
                      args.val_chunks)  # fmt: skip
    ft["label"] = f"full fine-tune of SmolLM2-135M-Instruct (lr {args.ft_lr:g})"
    runs["finetune"] = ft
    budget = ft["points"][-1][0]
    print(f"fine-tune: {ft['steps']} steps, {budget / 1e12:.1f} TFLOP, {ft['wall_s']:.0f} s", flush=True)
    for preset in args.scratch:
        r = run_scratch(preset, data_dir, args.out / f"scratch-{preset}", budget, args.evals, args.scratch_dtype)
        r["label"] = f"from scratch, preset {preset} ({r['params'] / 1e6:.1f}M parameters, BPE 4096)"
        r["bpb_on_finetune_heldout"] = bits_per_byte_on(args.out / f"scratch-{preset}", scored, r["seq_len"])
        runs[f"scratch-{preset}"] = r
        print(f"scratch-{preset}: {r['steps']} steps, {r['points'][-1][0] / 1e12:.1f} TFLOP, {r['wall_s']:.0f} s")

    results = {"environment": environment(), "budget_flops": budget, "runs": runs,
               "wall_s": time.perf_counter() - t_start}  # fmt: skip
    plot(results, args.plot or args.out / "finetune-vs-scratch.png")

    print(f"\nHeld-out bits per byte ({len(scored)} chunks of the 4 held-out texts for the fine-tune; the whole")
    print("held-out split for the scratch runs) against training FLOPs:")
    for r in runs.values():
        print(f"\n{r['label']}: {r['steps']} steps, {r['flops_per_token'] / 1e6:,.1f} MFLOP/token, "
              f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}, {r['dtype']}, {r['wall_s']:.0f} s")  # fmt: skip
        print("  TFLOP      tokens   bits/byte")
        for flops, bpb in r["points"]:
            print(f"  {flops / 1e12:7.2f} {flops / r['flops_per_token']:11,.0f}   {bpb:.4f}")
        if "bpb_on_finetune_heldout" in r:
            print(f"  final model on the fine-tune's exact held-out chunks: {r['bpb_on_finetune_heldout']:.4f}")
    ft_final = ft["points"][-1][1]
    summary = {"budget_tflop": budget / 1e12, "base_bpb": ft["points"][0][1], "finetune_bpb": ft_final}
    for preset in args.scratch:
        r = runs[f"scratch-{preset}"]
        final = r["points"][-1][1]
        print(f"\nat {budget / 1e12:.1f} TFLOP: fine-tune {ft_final:.3f} bits/byte, scratch ({preset}) {final:.3f} "
              f"({final / ft_final:.2f}x the fine-tune's; the untuned base: {ft['points'][0][1]:.3f})")  # fmt: skip
        mid = budget / 2
        if r["points"][0][0] <= mid:  # interpolate, never extrapolate
            print(f"at {mid / 1e12:.1f} TFLOP: fine-tune {at(ft['points'], mid):.3f}, scratch ({preset}) "
                  f"{at(r['points'], mid):.3f} (interpolated)")  # fmt: skip
        summary[f"scratch_{preset}_bpb"] = final
        summary[f"scratch_{preset}_bpb_same_text"] = r["bpb_on_finetune_heldout"]
        summary[f"scratch_{preset}_over_finetune"] = final / ft_final
    (args.out / "results.json").write_text(json.dumps({**results, "summary": summary}, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
