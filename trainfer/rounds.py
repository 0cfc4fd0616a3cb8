"""The measuring protocol every benchmark shares: sides alternated in rounds, the median of per-round ratios with
its min-max, failures kept apart from speed, and the switches that change a result printed with it.

Why rounds: on a shared machine the memory bandwidth both sides are bound by drifts by tens of percent within
minutes (docs/LOG.md), so one block of our runs then one of the peer's can favour either side. Each round runs
every side once, the order rotating from round to round so neither always runs first (warm page cache, turbo);
the ratio of a round compares two runs minutes apart at most.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# The ISA flags a figure depends on (our kernels and llama.cpp's pick their paths from them).
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
# Environment switches that change what trainfer computes or how fast.
SWITCHES = ("TRAINFER_BF16", "TRAINFER_NATIVE", "OMP_NUM_THREADS")


def alternate(rounds: int, sides: dict[str, Callable[[], T]], log: Callable[[str], None] | None = None) -> dict:
    """Run every side once per round, the starting side rotating; {side: [result of each round]}."""
    names = list(sides)
    out: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(sides[name]())
            if log:
                log(f"round {r + 1}/{rounds}: {name} done")
    return out


@dataclass(frozen=True)
class Ratio:
    """ours / theirs per round (for a time, theirs / ours: above 1 always means we are faster)."""

    median: float
    low: float
    high: float
    rounds: int

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f}, {self.rounds} rounds)"

    def as_list(self) -> list[float]:
        return [round(self.median, 3), round(self.low, 3), round(self.high, 3)]


def ratio(ours: list[float], theirs: list[float], lower_is_better: bool = False) -> Ratio:
    """The median of the per-round ratios and their min-max (not a ratio of medians: a round's two runs share the
    machine's state, two medians do not)."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"need one value per round on each side, got {len(ours)} and {len(theirs)}")
    pairs = zip(ours, theirs, strict=True)
    ratios = sorted(b / a if lower_is_better else a / b for a, b in pairs)
    return Ratio(statistics.median(ratios), ratios[0], ratios[-1], len(ratios))


def environment(threads: int | None = None) -> dict:
    """What a figure was measured on: CPU model and flags, threads, the switches set, torch, commit, UTC time."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    import torch

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": [f for f in FLAGS if f in flags],
        "threads": threads or torch.get_num_threads(),
        "switches": {k: os.environ[k] for k in SWITCHES if k in os.environ},
        "torch": torch.__version__,
        "commit": commit or "unknown",
        "utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
    }


def describe(env: dict) -> str:
    """One line for the top of a benchmark's output."""
    switches = ", ".join(f"{k}={v}" for k, v in env["switches"].items()) or "no switches set (defaults)"
    return (
        f"{env['cpu']}, {env['cores']} cores, {env['threads']} threads, {' '.join(env['flags'])}; {switches}; "
        f"torch {env['torch']}, commit {env['commit']}, {env['utc']} UTC"
    )


def checkout(src: str | Path) -> tuple[dict[str, str], str]:
    """The environment and working directory under which `python -m trainfer...` imports trainfer from the checkout
    `src` (a before/after comparison's "before"). PYTHONPATH alone is not enough: `-m` puts the working directory
    first on sys.path, so a process started in this repository imports this repository's copy whatever PYTHONPATH
    says; the process must also start in `src`. Checked here: a run that would measure the wrong copy is refused."""
    src = Path(src).resolve()
    env = {**os.environ, "PYTHONPATH": str(src)}
    probe = [sys.executable, "-c", "import trainfer; print(trainfer.__file__)"]  # -c, like -m, puts the cwd first
    found = subprocess.run(probe, env=env, cwd=src, capture_output=True, text=True, timeout=120).stdout.strip()
    if not found.startswith(str(src)):
        raise RuntimeError(f"a process started in {src} imports trainfer from {found or 'nowhere'}, not from {src}")
    return env, str(src)
