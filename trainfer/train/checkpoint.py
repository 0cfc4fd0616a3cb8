"""Training checkpoints: atomic directories in the Hugging Face layout plus the state to resume exactly.

    RUN/checkpoints/step-00000500/  config.json, model.safetensors, tokenizer.json  (loads anywhere)
                                    trainer.pt (optimizer + RNG, tensors only), state.json (step, cursor, ...)

A checkpoint is written to a hidden temp directory, every file fsynced, then renamed into place: a
directory named step-* is always complete, so a kill at any moment leaves the previous one loadable.
Reading a run directory (which checkpoints are complete, the best one) is io/run_dir.py's. See docs/training.md.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainfer.errors import TrainferError
from trainfer.io.run_dir import best_checkpoint, checkpoints_dir, list_checkpoints
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.config import ModelConfig


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    write_model: Callable[[Path], None],
    tokenizer: Tokenizer,
    trainer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write step-N atomically: write_model(dir) puts the weights (a model, or a LoRA adapter), trainer_state
    holds tensors (optimizer, RNG), state plain JSON values."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_model(tmp)
        tokenizer.save(tmp)
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # the same step again (a resumed run re-saving it): move aside, then delete
            _remove(final)
        os.replace(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest keep_last checkpoints and the best-validation one; drop stale temp directories."""
    ckpts = list_checkpoints(run_dir)
    keep = set(ckpts[-keep_last:])
    best = best_checkpoint(run_dir)
    if best is not None:
        keep.add(best)
    for c in ckpts:
        if c not in keep:
            _remove(c)
    for tmp in checkpoints_dir(run_dir).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(ckpt: Path) -> None:
    """Rename out of the step-* namespace first, so a kill mid-delete never leaves a half checkpoint."""
    trash = ckpt.with_name(f".tmp-del-{ckpt.name}-{os.getpid()}")
    os.replace(ckpt, trash)
    shutil.rmtree(trash, ignore_errors=True)


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """Optimizer and RNG tensors; weights_only refuses anything but tensors and plain containers."""
    try:
        return torch.load(Path(ckpt) / "trainer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainferError(f"{ckpt} has no trainer.pt: it is a model, not a resumable checkpoint") from None
    except Exception as e:
        raise TrainferError(f"cannot read {ckpt}/trainer.pt (corrupt or truncated?): {e}") from None


def describe_shape(cfg: ModelConfig) -> str:
    return (
        f"vocab {cfg.vocab_size}, dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads "
        f"({cfg.n_kv_heads} kv), hidden {cfg.hidden_dim}"
    )
