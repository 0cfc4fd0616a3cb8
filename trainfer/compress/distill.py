"""`trainfer distill`: train a student to match a teacher's next-token distributions, on the training loop.

    trainfer distill --teacher smollm2-135m-instruct --student pruned/ --data shakespeare --out runs/heal
    trainfer distill --teacher smollm2-135m-instruct --student tiny --data docs/ --out runs/small

The student is a model to start from (a pruned one, to recover what pruning lost) or a preset trained from
scratch with the teacher's tokenizer. The loss is KL(teacher || student) at a temperature (times T^2, so
its gradients keep their scale), over the teacher's top-k tokens when the vocabulary is large (the teacher
renormalized on them: the rest of its mass is mostly noise and costs a full-vocabulary copy per position),
mixed with the next-token loss by `kd_weight`. Teacher logits are computed on the fly, or kept in
`teacher_cache` per training window so that several students of one teacher on the same data and seed
(pruned 25% and 50%, say) pay for the teacher once. Each evaluation also logs the held-out KL to the teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainfer.errors import TrainferError
from trainfer.io.loader import build_model, load_checkpoint
from trainfer.model.transformer import Transformer
from trainfer.train.config import TrainConfig, load_config
from trainfer.train.evaluate import spread_starts, windows
from trainfer.train.trainer import Trainer, TrainResult


@dataclass
class DistillConfig(TrainConfig):
    teacher: str = ""  # an alias, a .gguf, a model directory or a run
    student: str = ""  # a model to start from (a pruned one, say); empty: a fresh `preset` with model.* settings
    kd_weight: float = 1.0  # the KL term's share; 1 - kd_weight goes to the next-token loss
    temperature: float = 1.0
    top_k: int = 64  # teacher tokens per position the KL covers; 0 = the whole vocabulary
    teacher_cache: str = ""  # a directory for the teacher's top-k logits per window; empty: on the fly
    lr: float = 3e-4
    warmup_steps: int = 20
    max_steps: int = 500
    eval_every: int = 100

    def checks(self) -> dict[str, bool]:
        return {
            **super().checks(),
            "kd_weight": 0 <= self.kd_weight <= 1,
            "temperature": self.temperature > 0,
            "top_k": self.top_k >= 0,
            "teacher_cache": not self.teacher_cache or self.top_k > 0,  # full-vocabulary logits are too big to keep
        }


def kd_loss(student: Tensor, teacher: Tensor, index: Tensor | None, temperature: float) -> Tensor:
    """Mean over positions of KL(p_teacher || p_student) * T^2, both softened by T. `teacher` holds the
    teacher's logits at `index` (its top-k tokens, renormalized there), or over the whole vocabulary (None)."""
    t = temperature
    log_q = F.log_softmax(student.float() / t, dim=-1)
    if index is not None:
        log_q = log_q.gather(-1, index)
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t


class TeacherCache:
    """The teacher's top-k logits for each training window, one file per window start, written atomically.
    The key covers the teacher's weights and config, the data, the window length and k."""

    def __init__(self, root: Path, teacher: Transformer, data_dir: Path, seq_len: int, top_k: int) -> None:
        h = hashlib.sha256()
        h.update(json.dumps(teacher.cfg.to_dict(), sort_keys=True).encode())
        for name, p in sorted(teacher.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().flatten()[:4096].numpy().tobytes())  # a sample of each tensor: cheap, enough
        h.update(f"{Path(data_dir).resolve()}:{(Path(data_dir) / 'meta.json').read_text()}:{seq_len}:{top_k}".encode())
        self.dir = Path(root) / h.hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def get(self, start: int) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.dir / f"{start}.npz"
        if not path.exists():
            self.misses += 1
            return None
        self.hits += 1
        with np.load(path) as z:
            return z["values"], z["index"]

    def put(self, start: int, values: np.ndarray, index: np.ndarray) -> None:
        tmp = self.dir / f".{start}.{os.getpid()}.npz"
        with open(tmp, "wb") as f:
            np.savez(f, values=values, index=index)
        os.replace(tmp, self.dir / f"{start}.npz")


class Distiller(Trainer):
    cfg: DistillConfig

    def _load_data(self) -> None:
        cfg = self.cfg
        if not cfg.teacher:
            raise TrainferError("no teacher: name one with --teacher (an alias, a .gguf or a model directory)")
        super()._load_data()
        t_cfg, t_state, t_tok = load_checkpoint(cfg.teacher, torch.float32)
        if t_tok is None or t_tok.backend.get_vocab() != self.tokenizer.backend.get_vocab():
            raise TrainferError(
                f"{cfg.data} was not tokenized with {cfg.teacher}'s tokenizer; prepare it with "
                f"--tokenizer {cfg.teacher} (trainfer distill does that itself when --data is text)"
            )
        self.teacher = build_model(t_cfg, t_state).to(self.device).eval().requires_grad_(False)
        del t_state
        self.student_state = None
        if cfg.student and cfg.model:
            raise TrainferError("model.* settings shape a fresh student; a student model keeps its own shape")
        if cfg.student:
            s_cfg, self.student_state, _ = load_checkpoint(cfg.student, torch.float32)
            if s_cfg.vocab_size != t_cfg.vocab_size:
                raise TrainferError(
                    f"{cfg.student} has a vocabulary of {s_cfg.vocab_size}, the teacher {t_cfg.vocab_size}"
                )
            self.model_cfg = s_cfg.replace(max_seq_len=max(s_cfg.max_seq_len, cfg.seq_len))
        student, teacher = self.model_cfg.training_flops_per_token, t_cfg.training_flops_per_token
        self.flops_per_token = student(cfg.seq_len) + teacher(cfg.seq_len) / 3  # the teacher: forward only, 2N of 6N
        self.cache = None
        if cfg.teacher_cache:
            self.cache = TeacherCache(Path(cfg.teacher_cache), self.teacher, self.data_dir, cfg.seq_len, cfg.top_k)

    def _make_model(self) -> Transformer:
        if self.student_state is None or self.resume_from is not None:
            return super()._make_model()  # a fresh preset, or the resumed checkpoint
        model = build_model(self.model_cfg, self.student_state)
        self.student_state = None
        return model

    def micro_batches(self, first: int) -> list[tuple[Tensor, Tensor, np.ndarray]]:
        cfg = self.cfg
        starts = self.sampler.starts(first, cfg.batch_size * cfg.grad_accum)
        out = []
        for m in range(cfg.grad_accum):
            chunk = starts[m * cfg.batch_size : (m + 1) * cfg.batch_size]
            x, y = windows(self.train_data, chunk, cfg.seq_len, self.device)
            out.append((x, y, chunk))
        return out

    @torch.no_grad()
    def teacher_logits(self, x: Tensor, starts: np.ndarray | None = None) -> tuple[Tensor, Tensor | None]:
        """(values, index) of the teacher's top-k logits, or (all logits, None) when top_k is 0."""
        k = self.cfg.top_k
        if self.cache is not None and starts is not None:
            got = [self.cache.get(int(s)) for s in starts]
            if all(g is not None for g in got):
                values = torch.from_numpy(np.stack([g[0] for g in got])).to(self.device)
                index = torch.from_numpy(np.stack([g[1] for g in got]).astype(np.int64)).to(self.device)
                return values, index
        with self.autocast():
            logits = self.teacher(x).float()
        if not k:
            return logits, None
        values, index = logits.topk(min(k, logits.size(-1)), dim=-1)  # a small vocabulary: all of it
        if self.cache is not None and starts is not None:
            for s, v, i in zip(starts, values.cpu().numpy(), index.cpu().numpy().astype(np.int32), strict=True):
                self.cache.put(int(s), v, i)
        return values, index

    def micro_loss(self, item: tuple[Tensor, Tensor, np.ndarray], items: list[Any]) -> Tensor:
        cfg = self.cfg
        x, y, starts = item
        t_values, t_index = self.teacher_logits(x, starts)
        logits = self.model(x)
        loss = cfg.kd_weight * kd_loss(logits, t_values, t_index, cfg.temperature)
        if cfg.kd_weight < 1:
            loss = loss + (1 - cfg.kd_weight) * F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return loss / len(items)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """The usual losses (the student's own next-token loss), plus the held-out KL to the teacher over the
        whole vocabulary at temperature 1: how close the student has come to the teacher."""
        out = super().evaluate()
        cfg = self.cfg
        data = self.val_data if len(self.val_data) > cfg.seq_len else self.train_data
        starts = spread_starts(len(data), cfg.seq_len, cfg.eval_batches * cfg.batch_size)
        was = self.raw.training
        self.raw.eval()
        total = 0.0
        for i in range(0, len(starts), cfg.batch_size):
            x, _ = windows(data, starts[i : i + cfg.batch_size], cfg.seq_len, self.device)
            with self.autocast():
                total += kd_loss(self.raw(x), self.teacher(x), None, 1.0).item() * len(x)
        self.raw.train(was)
        out["val_kl"] = total / len(starts)
        return out


def distill(cfg: DistillConfig, resume: bool = False) -> TrainResult:
    import torch.distributed as dist

    try:
        d = Distiller(cfg, resume)
        result = d.train()
        if d.cache is not None and d.dist.main:
            print(f"teacher cache {d.cache.dir}: {d.cache.hits} windows read, {d.cache.misses} computed", flush=True)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def load_distill_config(
    path: str | None, overrides: list[str], base: dict[str, Any] | None = None, **values: Any
) -> DistillConfig:
    return load_config(path, overrides, base=base, cls=DistillConfig, **values)
