"""`trainfer train`: pretrain the Llama-style Transformer on prepared token shards, resumable bit for bit.

    trainfer train --data data/shakespeare --out runs/shakespeare --preset tiny
    torchrun --nproc_per_node 2 -m trainfer.cli train ...   # DDP (gloo on CPU, NCCL on CUDA)

One step = grad_accum micro-batches per process; the global batch is batch_size x grad_accum x world
windows of seq_len tokens. The data order is a pure function of (seed, cursor), so a checkpoint's cursor
and optimizer state are all it takes to continue exactly. Design: docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainfer.data.prepare import read_shard
from trainfer.errors import TrainferError
from trainfer.io import run_dir
from trainfer.io.hf import load_state_dict, read_config, save_hf
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.transformer import Transformer
from trainfer.train import checkpoint as ckpt
from trainfer.train.config import TrainConfig
from trainfer.train.distributed import agree, average, barrier, data_parallel, setup_device, shard, shutdown
from trainfer.train.evaluate import bytes_per_token, evaluate_loss, lm_loss, loss_record, probe_fields, sample, windows
from trainfer.train.metrics import PeakFlops, drop_metrics_after, matmul_peak, plot_metrics
from trainfer.train.progress import Progress
from trainfer.train.schedule import WindowSampler, lr_at


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    final_loss: float
    val_loss: float | None
    val_bpb: float | None
    best_checkpoint: Path | None
    tokens_per_s: float  # median over logged intervals
    mfu: float
    elapsed_s: float
    stopped_early: bool
    peak_source: str = "measured"  # where MFU's denominator came from: stated | cached | measured


class Trainer:
    """Owns one training run: its output directory (checkpoints, metrics.jsonl, report), the model, optimizer,
    schedule and the data cursor, all restored exactly on `resume`. It refuses a directory that already holds
    another run's checkpoints; it does not prepare data or touch a run it did not start."""

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        existing = run_dir.list_checkpoints(self.out)
        if resume and not existing:
            raise TrainferError(f"nothing to resume: {self.out} has no checkpoints")
        if existing and not resume:
            raise TrainferError(
                f"{self.out} already has checkpoints (latest {existing[-1].name}); pass --resume to continue it "
                "or choose another --out"
            )
        self.resume_from = existing[-1] if resume else None
        self.dist, self.device, self.amp_dtype = setup_device(cfg.device, cfg.dtype)
        self._load_data()
        self._build()

    def _load_data(self) -> None:
        """Token shards from `trainfer prepare`, the tokenizer they were made with, and the model shape."""
        cfg = self.cfg
        if not cfg.data:
            raise TrainferError("no training data: pass --data DIR (a directory written by `trainfer prepare`)")
        self.data_dir = Path(cfg.data).resolve()
        cfg.data = str(self.data_dir)  # checkpoints record where the data is, wherever a resume runs from
        if not (self.data_dir / "meta.json").exists():
            raise TrainferError(
                f"{self.data_dir} is not a prepared data directory (no meta.json); run trainfer prepare"
            )
        self.tokenizer = Tokenizer.from_dir(self.data_dir)
        self.train_data, self.val_data = read_shard(self.data_dir, "train"), read_shard(self.data_dir, "val")
        if len(self.train_data) == 0:
            raise TrainferError(f"{self.data_dir} has an empty training split")
        self.model_cfg = cfg.model_config(
            self.tokenizer.vocab_size, self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        )
        self.sampler = WindowSampler(len(self.train_data), cfg.seq_len, cfg.seed)
        if 0 < len(self.val_data) <= cfg.seq_len:
            raise TrainferError(
                f"the validation split has {len(self.val_data)} tokens, fewer than one window of "
                f"{cfg.seq_len + 1}; lower seq_len or hold out more text"
            )
        self.val_bytes_per_token = bytes_per_token(self.data_dir, "val", self.tokenizer) if len(self.val_data) else None
        self.flops_per_token = self.model_cfg.training_flops_per_token(cfg.seq_len)

    def _make_model(self) -> Transformer:
        """Fresh weights, or the resumed checkpoint's (on the CPU; _build moves them)."""
        cfg = self.cfg
        model = Transformer(self.model_cfg)
        model.init_weights(cfg.seed)
        if self.resume_from is not None:
            saved = read_config(self.resume_from)
            if saved.to_dict() != self.model_cfg.to_dict():
                raise TrainferError(
                    f"{self.resume_from} holds a different model ({ckpt.describe_shape(saved)}) than this run asks "
                    f"for ({ckpt.describe_shape(self.model_cfg)}); resume with the same preset and model settings"
                )
            state = load_state_dict(self.resume_from, torch.float32)
            if self.model_cfg.tie_embeddings:
                state.pop("lm_head.weight", None)  # the tied head is the embedding
            model.load_state_dict(state, strict=False)
        return model

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.raw = self._make_model()
        self.raw.to(self.device).train()
        if cfg.fsdp:
            shard(self.raw, self.dist)
        trained = [p for p in self.raw.parameters() if p.requires_grad]  # LoRA freezes the base
        decay = [p for p in trained if p.dim() >= 2]
        no_decay = [p for p in trained if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused kernels where PyTorch has them for plain tensors; FSDP's DTensors take the foreach path
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=not cfg.fsdp, foreach=True if cfg.fsdp else None
        )
        self.model: torch.nn.Module = self.forward_module()
        self.ddp = None
        if self.dist.world > 1 and not cfg.fsdp:
            self.ddp = data_parallel(self.forward_module(), self.device)
            self.model = self.ddp
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.step, self.best_val, self.bad_evals, self.elapsed = 0, float("inf"), 0, 0.0
        if self.resume_from is not None:
            self._restore(self.resume_from)
            if self.step >= cfg.max_steps:
                raise TrainferError(
                    f"{self.out} has already trained {self.step} steps (max_steps {cfg.max_steps}); "
                    f"pass --set max_steps=N with N > {self.step} to train further"
                )

    # ---- checkpoints -------------------------------------------------------------------------------

    def save(self, val_loss: float | None) -> Path | None:
        """Every rank joins the gather (FSDP); rank 0 writes."""
        model_state, optim_state = ckpt.gather_state(self.raw, self.optimizer, offload=self.dist.world > 1)
        path = None
        if self.dist.main:
            state = {
                "cursor": self.step * self.global_windows,
                "best_val": self.best_val if math.isfinite(self.best_val) else None,
                "bad_evals": self.bad_evals,
                "elapsed_s": self.elapsed,
                "val_loss": val_loss,
                "config": self.cfg.to_dict(),
            }
            model_state = {k: v.cpu() for k, v in model_state.items()}
            path = ckpt.save_checkpoint(
                self.out,
                self.step,
                lambda d: self.write_model(d, model_state),
                self.tokenizer,
                {"optimizer": optim_state, "rng": ckpt.rng_state(self.device)},
                state,
            )
            ckpt.prune_checkpoints(self.out, self.cfg.keep_last)
        barrier(self.dist)
        return path

    def _restore(self, path: Path) -> None:
        state = ckpt.restore(path, self.raw, self.optimizer, self.cfg, self.device, self.global_windows)
        self.step = state["step"]
        self.best_val = state["best_val"] if state["best_val"] is not None else float("inf")
        self.bad_evals, self.elapsed = state["bad_evals"], state["elapsed_s"]

    # ---- the loop ----------------------------------------------------------------------------------

    @property
    def global_windows(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, Any]:
        cfg = self.cfg
        n = cfg.eval_batches * cfg.batch_size

        def loss(data: np.ndarray) -> float:
            return evaluate_loss(self.raw, data, cfg.seq_len, cfg.batch_size, n, self.device, self.autocast())

        train_loss = loss(self.train_data)
        val = loss(self.val_data) if len(self.val_data) > cfg.seq_len else None
        return loss_record(self.step, train_loss, val, self.val_bytes_per_token)

    def forward_module(self) -> torch.nn.Module:
        """What DDP wraps and the step calls: the model itself here, a loss module for fine-tuning."""
        return self.raw

    def micro_batches(self, first: int) -> list[Any]:
        """This rank's grad_accum micro-batches of the step whose first global window is `first`."""
        cfg = self.cfg
        starts = self.sampler.starts(first, cfg.batch_size * cfg.grad_accum)
        return [
            windows(self.train_data, starts[m * cfg.batch_size : (m + 1) * cfg.batch_size], cfg.seq_len, self.device)
            for m in range(cfg.grad_accum)
        ]

    def micro_loss(self, item: Any, items: list[Any]) -> torch.Tensor:
        """One micro-batch's share of the step's mean loss."""
        x, y = item
        return lm_loss(self.model, x, y) / len(items)

    def sample_text(self) -> str:
        cfg = self.cfg
        return sample(self.raw, self.tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed, device=self.device)

    def write_model(self, directory: Path, model_state: dict[str, torch.Tensor]) -> None:
        save_hf(directory, self.model_cfg, model_state, torch.float32)

    def train(self) -> TrainResult:
        """Steps until max_steps or an early stop: a log line every log_every, an evaluation every eval_every,
        a checkpoint every ckpt_every (and at a new best, a stop and the end)."""
        cfg = self.cfg
        found, peak = self._begin()
        tokens_per_step = self.global_windows * cfg.seq_len
        progress = Progress(cfg.max_steps, self.step, self.elapsed, show=cfg.progress and self.dist.main)
        loss_val, last_eval, stopped = float("nan"), None, False
        while self.step < cfg.max_steps and not stopped:
            lr, loss_sum, grad_norm = self._optimizer_step()
            progress.step()
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                loss_val = self._log_progress(progress, lr, loss_sum, grad_norm, tokens_per_step, peak)
            is_eval = self.step % cfg.eval_every == 0 or self.step == cfg.max_steps
            new_best = False
            if is_eval:
                with progress.paused():
                    last_eval, new_best, stopped = self._evaluate_and_report(progress)
            if self.step % cfg.ckpt_every == 0 or new_best or stopped or self.step == cfg.max_steps:
                with progress.paused():
                    self.elapsed = progress.elapsed()
                    self.save(last_eval.get("val_loss") if is_eval and last_eval else None)
        progress.close()
        self._log({"step": self.step, "event": "end", "early_stop": stopped, "elapsed_s": self.elapsed})
        if self.dist.main:
            plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png")
        rate = progress.median_rate()
        return TrainResult(
            self.out, self.step, self.step * tokens_per_step, loss_val,
            last_eval.get("val_loss") if last_eval else None, last_eval.get("val_bpb") if last_eval else None,
            run_dir.best_checkpoint(self.out) if self.dist.main else None, rate, rate * self.flops_per_token / peak,
            self.elapsed, stopped, found.source,
        )  # fmt: skip

    def _begin(self) -> tuple[PeakFlops, float]:
        """The run directory (a resumed run's metrics after its checkpoint dropped), the MFU peak, the start record."""
        cfg, world = self.cfg, self.dist.world
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume_from is not None:
                drop_metrics_after(self.out / "metrics.jsonl", self.step)
        found = matmul_peak(self.device, self.amp_dtype, self.model_cfg, cfg.batch_size * cfg.seq_len, cfg.peak_flops)
        peak = found.flops * world
        if self.dist.main:
            print(f"MFU against a {peak / 1e9:,.1f} GFLOP/s matmul peak, {found.source} ({found.detail})", flush=True)
        if self.dist.main and self.step == 0:
            self._log(
                {
                    "step": 0,
                    "event": "start",
                    "params": self.model_cfg.n_params,
                    "flops_per_token": self.flops_per_token,
                    "peak_flops": peak,
                    "peak_source": found.source,
                    "peak_detail": found.detail,
                    "tokens_per_step": self.global_windows * cfg.seq_len,
                    "world": world,
                    "dtype": str(self.amp_dtype).removeprefix("torch."),
                    "config": cfg.to_dict(),
                }
            )
        return found, peak

    def _optimizer_step(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches: (lr, summed loss, gradient norm before clipping)."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        first = self.step * self.global_windows + self.dist.rank * cfg.batch_size * cfg.grad_accum
        items = self.micro_batches(first)
        loss_sum = torch.zeros((), device=self.device)
        for micro, item in enumerate(items):
            # Gradients are reduced across ranks once per step, after the last micro-batch.
            sync = micro == cfg.grad_accum - 1
            if cfg.fsdp:
                self.raw.set_requires_gradient_sync(sync)
            skip = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
            with skip, self.autocast():
                loss = self.micro_loss(item, items)
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr, loss_sum, grad_norm

    def _log_progress(
        self, progress: Progress, lr: float, loss_sum: torch.Tensor, grad_norm, tokens_per_step: int, peak: float
    ) -> float:
        """The training loss (averaged over ranks), throughput and MFU since the last log line; returns the loss."""
        average(loss_sum, self.dist)
        loss_val = loss_sum.item()
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        rate, self.elapsed = progress.lap(tokens_per_step)
        mfu = rate * self.flops_per_token / peak
        progress.show_loss(loss_val, rate, mfu)
        self._log(
            {
                "step": self.step,
                "loss": loss_val,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": self.step * tokens_per_step,
                "tokens_per_s": rate,
                "mfu": mfu,
                "elapsed_s": self.elapsed,
            }
        )
        return loss_val

    def _evaluate_and_report(self, progress: Progress) -> tuple[dict[str, Any], bool, bool]:
        """Validation (and a sample, the memorization probe), early stopping's count, the eval record and line:
        (the eval, whether it is a new best, whether to stop)."""
        cfg = self.cfg
        new_best = stopped = False
        last_eval = agree(self.evaluate(), self.dist, self.device)
        sample_due = cfg.sample_every == 0 or self.step % cfg.sample_every == 0
        if sample_due and cfg.sample_tokens > 0:
            last_eval["sample"] = self.sample_text()
        if cfg.probe_passages and self.dist.main:
            last_eval.update(probe_fields(self.raw, self.train_data, self.val_data, cfg.probe_passages))
        val = last_eval.get("val_loss")
        if val is not None:
            if val < self.best_val - cfg.early_stop_min_delta:
                self.best_val, self.bad_evals, new_best = val, 0, True
            else:
                self.bad_evals += 1
                stopped = bool(cfg.early_stop_patience) and self.bad_evals >= cfg.early_stop_patience
        self.elapsed = progress.elapsed()
        last_eval["elapsed_s"] = self.elapsed
        self._log({**last_eval, "event": "eval"})
        if self.dist.main:
            progress.show_eval(self.step, last_eval, stopped)
        return last_eval, new_best, stopped


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    """Train (or continue) a run; the shutdown at the end lets torchrun workers exit cleanly."""
    try:
        return Trainer(cfg, resume).train()
    finally:
        shutdown()
