"""Training measurements: FLOPs per token, the machine's matmul peak (for MFU), metrics.jsonl and loss.png."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainfer.errors import TrainferError
from trainfer.model.config import ModelConfig
from trainfer.registry import home

SOURCES = ("stated", "cached", "measured")
PEAK_ENV = "TRAINFER_PEAK_FLOPS"  # a stated peak for every run on this machine (FLOP/s per process)
CACHE_MAX_AGE_DAYS = 30  # then measure again, keeping the faster
MIN_CPU_SHARE = 0.75  # a probe that got less of its threads' CPU time than this ran on a busy machine


@dataclass(frozen=True)
class PeakFlops:
    """The denominator of MFU for one process, and where it came from."""

    flops: float  # FLOP/s
    source: str  # stated (config key or TRAINFER_PEAK_FLOPS) | cached (an earlier measurement here) | measured
    detail: str  # which setting, which cache file and date, or how the measurement went

    def __post_init__(self) -> None:
        assert self.source in SOURCES and self.flops > 0, self


def probe_shapes(device: torch.device, cfg: ModelConfig | None = None, tokens: int = 0) -> list[tuple[int, int, int]]:
    """(m, k, n) products to time, fewest FLOPs first: squares up to 2048 (8192 on CUDA) and the run's own.

    The run's are its micro-batch's (tokens x dim) @ (dim x out) for the attention, MLP and head projections;
    tokens is capped so no product costs more FLOPs than the largest square.
    """
    squares = (1024, 2048, 4096, 8192) if device.type == "cuda" else (256, 512, 1024, 2048)
    shapes = {(n, n, n) for n in squares}
    if cfg is not None and tokens > 0:
        for k, n in [
            (cfg.dim, cfg.n_heads * cfg.head_dim),  # query projection
            (cfg.dim, cfg.hidden_dim),  # MLP gate / up
            (cfg.hidden_dim, cfg.dim),  # MLP down
            (cfg.dim, cfg.vocab_size),  # LM head
        ]:
            m = max(1, min(tokens, squares[-1] ** 3 // (k * n)))
            shapes.add((m, k, n))
    return sorted(shapes, key=lambda s: (s[0] * s[1] * s[2], s))


def measure_peak_flops(
    device: torch.device,
    dtype: torch.dtype,
    cfg: ModelConfig | None = None,
    tokens: int = 0,
    budget_s: float = 0.8,
    min_rounds: int = 3,
) -> tuple[float, float]:
    """Fastest matmul FLOP/s this process gets over probe_shapes, and the share of CPU time its threads got.

    Every shape is warmed up once (thread pool, allocator, packed kernels), then timed in rounds over all shapes
    until budget_s has passed (at least min_rounds, within 2 x budget_s). One short trial is noise on a shared
    machine; rounds spread each shape's trials over the whole budget, so a quiet moment is seen if there is one.
    A shape predicted to take over budget_s / 4 is skipped, so a dtype the hardware only emulates (bf16 on AVX2:
    ~0.3 GFLOP/s) stops at the small sizes instead of stalling start-up for minutes.

    CPU share = process CPU seconds / (wall seconds x torch threads) over the whole probe: ~1 when the probe's
    threads had the cores, ~0.5 when other processes' threads held half of them. Per product it would be noise:
    other threads' CPU time is only counted at scheduler ticks (4 ms), longer than a small product. 1.0 on CUDA.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def rate(flops: int, a: torch.Tensor, b: torch.Tensor) -> float:
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        return flops / (time.perf_counter() - t)

    gen = torch.Generator().manual_seed(0)  # the global RNG belongs to the run being resumed
    start, cpu, best, products = time.perf_counter(), time.process_time(), 0.0, []
    shapes = probe_shapes(device, cfg, tokens)
    # The smallest square always runs: a tiny product's rate is mostly overhead (or one scheduler tick when the
    # cores are busy: 0.1 GFLOP/s seen here) and would predict every larger shape too slow to try.
    always = 2 * min(n for m, k, n in shapes if m == k == n) ** 3
    for m, k, n in shapes:
        flops = 2 * m * k * n
        if flops > always and flops / best > budget_s / 4:
            continue
        a = torch.randn(m, k, generator=gen).to(device, dtype)
        b = torch.randn(k, n, generator=gen).to(device, dtype)
        rate(flops, a, b)  # warm-up, not counted
        best = max(best, rate(flops, a, b))
        products.append((flops, a, b))
    rounds = 1
    while (elapsed := time.perf_counter() - start) < budget_s or (rounds < min_rounds and elapsed < 2 * budget_s):
        best = max(best, *(rate(*product) for product in products))
        rounds += 1
    if device.type == "cuda":
        return best, 1.0
    return best, (time.process_time() - cpu) / (time.perf_counter() - start) / torch.get_num_threads()


def machine_key(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What a matmul peak depends on: the processor (model and ISA flags) or GPU, threads, dtype, torch build."""
    dtype_name = str(dtype).removeprefix("torch.")
    key: dict[str, Any] = {"device": device.type, "dtype": dtype_name, "torch": torch.__version__}
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
        return key
    model, flags = "", ""
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = ln.partition(":")
            if name.strip() == "model name" and not model:
                model = value.strip()
            elif name.strip() in ("flags", "Features") and not flags:  # x86 | ARM
                flags = hashlib.sha256(" ".join(sorted(value.split())).encode()).hexdigest()[:12]
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    key.update(cpu=model or platform.machine(), cpu_flags=flags, cpus=cpus, threads=torch.get_num_threads())
    return key


def peak_cache_path() -> Path:

    return home() / "peak_flops.json"


def _stated(value: float, env: str | None) -> PeakFlops | None:
    if value:
        return PeakFlops(float(value), "stated", "peak_flops in the run's config")
    if env is None or not env.strip():
        return None
    try:
        flops = float(env)
    except ValueError:
        flops = 0.0
    if not flops > 0 or math.isinf(flops):
        raise TrainferError(f"{PEAK_ENV} must be a positive number of FLOP/s per process (e.g. 1.8e11), got {env!r}")
    return PeakFlops(flops, "stated", PEAK_ENV)


def matmul_peak(
    device: torch.device,
    dtype: torch.dtype,
    cfg: ModelConfig | None = None,
    tokens: int = 0,
    stated: float = 0.0,
    cache: Path | None = None,
) -> PeakFlops:
    """The MFU denominator for one process: stated (argument, then $TRAINFER_PEAK_FLOPS), cached, or measured.

    The cache ($TRAINFER_HOME/peak_flops.json) holds one entry per machine_key: the best rate measured there and
    its date. An entry is reused for CACHE_MAX_AGE_DAYS; a new measurement replaces it only if faster, so a
    probe run while the machine was busy cannot lower it. Delete the file to start over.
    """
    found = _stated(stated, os.environ.get(PEAK_ENV))
    if found is not None:
        return found
    path = cache or peak_cache_path()
    key = machine_key(device, dtype)
    name = json.dumps(key, sort_keys=True)
    try:
        entries = json.loads(path.read_text())
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, json.JSONDecodeError):
        entries = {}
    today = datetime.date.today()
    try:
        old = entries[name]
        old_flops, old_day = float(old["flops"]), datetime.date.fromisoformat(old["measured_on"])
    except (TypeError, KeyError, ValueError):  # no entry, or one this version cannot read
        old_flops, old_day = 0.0, today
    if old_flops > 0 and 0 <= (today - old_day).days <= CACHE_MAX_AGE_DAYS:
        return PeakFlops(old_flops, "cached", f"{path}, measured {old_day}")
    flops, share = measure_peak_flops(device, dtype, cfg, tokens)
    if share < MIN_CPU_SHARE:  # an understated peak, not worth keeping: the next run measures again
        busy = f"machine busy: the probe got {share:.0%} of its threads' CPU time, so MFU reads high; not cached"
        return PeakFlops(max(flops, old_flops), "cached" if old_flops > flops else "measured", busy)
    peak = PeakFlops(flops, "measured", f"best of timed matmuls, now cached in {path}")
    if old_flops > flops:  # measured again after CACHE_MAX_AGE_DAYS, and slower: keep the faster
        peak = PeakFlops(old_flops, "cached", f"{path}; re-measured {flops / 1e9:.3g} GFLOP/s today, kept {old_day}'s")
    entries[name] = {**key, "flops": peak.flops, "measured_on": today.isoformat()}
    try:  # written whole, then renamed: two ranks or runs measuring at once leave one valid file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next run its own measurement
    return peak


def cpu_has_bf16() -> bool:
    """avx512_bf16 or AMX: without them PyTorch emulates bf16 matmuls on the CPU, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a line torn by a crash mid-write is skipped."""
    rows = []
    for ln in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep the lines up to `step`: what an interrupted run logged after its last checkpoint is logged again by
    the resumed run. A torn last line is dropped too; the file is replaced atomically."""
    if path.exists():
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)


def plot_metrics(metrics: Path, out: Path) -> None:
    """Training loss (per logged step) and train/val evaluation losses against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.6, label="train (batch)")
    if evals and "train_eval_loss" in evals[0]:
        ax.plot([r["step"] for r in evals], [r["train_eval_loss"] for r in evals], "o-", label="train (eval)")
    if evals and "val_loss" in evals[-1] and "val_accuracy" not in evals[-1]:  # grpo plots its accuracy itself
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "s-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
