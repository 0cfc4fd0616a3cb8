"""Helpers shared by the benchmark scripts: machine description, memory bandwidth, medians, the card."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def machine() -> dict:
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def memory_bandwidth_gbs(gib: float = 1.0, reps: int = 5) -> float:
    """Read bandwidth: a sum over a large fp32 buffer (each byte read once), median of `reps`."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def median_of(fn: Callable[[], float], runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def print_card(title: str, rows: list[tuple[str, str]], result: dict) -> None:
    """A human-readable card, then one JSON line a script can parse (always the last line)."""
    width = max(len(k) for k, _ in rows)
    print(f"\n== {title} ==")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))
