"""Training measurements: FLOPs per token, the machine's matmul peak (for MFU), metrics.jsonl and loss.png."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from trainfer.model.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention (PaLM's 12*L*H*hd*T, as nanoGPT counts)."""
    n = cfg.n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)  # lookups are not matmuls
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def measure_peak_flops(device: torch.device, dtype: torch.dtype, budget_s: float = 0.05) -> float:
    """Best square-matmul FLOP/s this process gets at start-up: the denominator of MFU on this machine.

    The size doubles from 256 until one product takes budget_s (or 2048 / 8192 on CUDA), so a dtype the
    hardware only emulates (bf16 on AVX2: ~0.3 GFLOP/s, a minute per 2048^3 product) costs milliseconds.
    """
    gen = torch.Generator().manual_seed(0)  # the global RNG belongs to the run being resumed
    cap = 8192 if device.type == "cuda" else 2048
    n, best = 128, 0.0
    while n < cap:
        n *= 2
        a = torch.randn(n, n, generator=gen).to(device, dtype)
        b = torch.randn(n, n, generator=gen).to(device, dtype)
        times = []
        for _ in range(4):  # the first is a warm-up (thread pool, allocator, kernels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            if times[-1] > budget_s * 4:
                break
        best = max(best, 2 * n**3 / min(times[1:] or times))
        if min(times) > budget_s:
            break
    return best


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
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_eval_loss"] for r in evals], "o-", label="train (eval)")
        if "val_loss" in evals[0]:
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
