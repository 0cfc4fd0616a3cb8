"""Training checkpoints: atomic directories in the Hugging Face layout plus the state to resume exactly.

    RUN/checkpoints/step-00000500/  config.json, model.safetensors, tokenizer.json  (loads anywhere)
                                    trainer.pt (optimizer + RNG, tensors only), state.json (step, cursor, ...)

A checkpoint is written to a hidden temp directory, every file fsynced, then renamed into place: a
directory named step-* is always complete, so a kill at any moment leaves the previous one loadable.
Gathering a run's optimizer and RNG state for one, and putting them back on resume, are here too. Reading a run
directory (which checkpoints are complete, the best one) is io/run_dir.py's. See docs/training.md.
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
from trainfer.io.run_dir import best_checkpoint, checkpoints_dir, list_checkpoints, read_state
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.config import ModelConfig
from trainfer.train.config import TrainConfig


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


def gather_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, offload: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full (unsharded) model and optimizer state; every rank must call it, since under FSDP it is a gather."""
    dcp = _state_dict_api()
    opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=offload)
    return dcp.get_model_state_dict(model, options=opts), dcp.get_optimizer_state_dict(model, optimizer, options=opts)


def _state_dict_api():
    """torch.distributed.checkpoint.state_dict, imported when a checkpoint is first written or read: it takes
    ~0.7 s to import, which every `trainfer` command paid at start-up while only training needs it."""
    import torch.distributed.checkpoint.state_dict as api

    return api


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators a resumed run needs to draw what an unbroken run would have (dropout, samples)."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    device: torch.device,
    windows_per_step: int,
) -> dict[str, Any]:
    """Put checkpoint `path`'s optimizer and RNG state back and return its state.json; refused when this run's
    seed, seq_len or global batch differs, because the data order would change and it would not continue."""
    state = read_state(path)
    saved = state["config"]
    changed = [k for k in ("seed", "seq_len") if saved.get(k) != getattr(cfg, k)]
    if changed:
        k = changed[0]
        raise TrainferError(
            f"{path} was trained with {k}={saved.get(k)!r}, this run asks for {getattr(cfg, k)!r}: "
            "the data order would change; resume with the same value"
        )
    trainer_state = load_trainer_state(path)
    dcp = _state_dict_api()
    dcp.set_optimizer_state_dict(
        model, optimizer, trainer_state["optimizer"], options=dcp.StateDictOptions(full_state_dict=True)
    )
    for i, group in enumerate(optimizer.param_groups):  # this run's settings (lr is set per step)
        group["betas"] = (cfg.beta1, cfg.beta2)
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0
    torch.set_rng_state(trainer_state["rng"]["torch"])
    if "cuda" in trainer_state["rng"] and device.type == "cuda":
        torch.cuda.set_rng_state(trainer_state["rng"]["cuda"], device)
    if state["cursor"] != state["step"] * windows_per_step:
        raise TrainferError(
            f"{path} was written with a different global batch ({state['cursor'] // max(1, state['step'])} windows "
            f"per step, now {windows_per_step}); resume with the same batch_size x grad_accum x processes"
        )
    return state


def describe_shape(cfg: ModelConfig) -> str:
    return (
        f"vocab {cfg.vocab_size}, dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads "
        f"({cfg.n_kv_heads} kv), hidden {cfg.hidden_dim}"
    )
