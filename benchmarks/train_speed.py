"""`trainfer train`'s throughput: this checkout against another one (the commit before a change), alternated.

    git worktree add /tmp/before <commit>
    .venv/bin/python benchmarks/train_speed.py --baseline-src /tmp/before [--rounds 4] [--steps 60]

The peer of a refactoring is the code before it: each round runs `trainfer train` once from each checkout, a fresh
process each, the starting side rotating, on the same prepared Shakespeare shards (BPE, the `prepare` defaults) and
the same settings (the tiny preset, bf16 autocast where the CPU has it, `--steps` optimizer steps, no evaluation
or checkpoint inside the timed steps). A run's figure is the one `trainfer train` prints: the median tokens/s over
its logged intervals. Prints the median of per-round ratios (after/before, above 1 is faster) with the min-max,
then one JSON line. trainfer's speed against nanoGPT's is benchmarks/nanogpt.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

from trainfer import registry
from trainfer.data.prepare import prepare
from trainfer.rounds import alternate, checkout, describe, environment, ratio

RATE = re.compile(r"\(([\d,]+) tokens/s")


def shards() -> Path:
    """Shakespeare prepared once with the defaults, shared by both sides (the shard format did not change)."""
    out = registry.home() / "bench" / "shakespeare-bpe"
    if not (out / "meta.json").exists():
        prepare(["shakespeare"], out)
    return out


def train_once(src: Path | None, data: Path, steps: int) -> float:
    """One `trainfer train` run from checkout `src` (None: this one); its median tokens/s."""
    env, cwd = checkout(src) if src else (dict(os.environ), None)
    with tempfile.TemporaryDirectory() as tmp:
        sets = [f"max_steps={steps}", f"eval_every={10 * steps}", f"ckpt_every={10 * steps}", "log_every=5",
                "progress=false", "warmup_steps=5"]  # fmt: skip
        cmd = [sys.executable, "-m", "trainfer.cli", "train", "--data", str(data), "--out", f"{tmp}/run"]
        cmd += [a for s in sets for a in ("--set", s)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=1800)
    found = RATE.search(done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"train from {src or 'this checkout'} failed ({done.returncode}): {done.stderr[-2000:]}")
    return float(found.group(1).replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-src", type=Path, required=True, help="the trainfer checkout to compare against")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per run (tiny preset, 16 x 128 tokens)")
    args = ap.parse_args()
    env = environment(torch.get_num_threads())  # PyTorch's default: one thread per core
    print(describe(env), flush=True)
    data = shards()
    sides = {
        "before": partial(train_once, args.baseline_src, data, args.steps),
        "after": partial(train_once, None, data, args.steps),
    }
    runs = alternate(args.rounds, sides, log=lambda line: print(line, flush=True))
    r = ratio(runs["after"], runs["before"])
    print(f"after {sorted(runs['after'])} vs before {sorted(runs['before'])} tokens/s: "
          f"{r.median:.3f}x ({r.low:.3f}-{r.high:.3f}, {r.rounds} rounds)")  # fmt: skip
    print(json.dumps({"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                      "after_vs_before": r.as_list()}))  # fmt: skip


if __name__ == "__main__":
    main()
