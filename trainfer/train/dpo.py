"""Preference tuning: Direct Preference Optimization on pairs of answers, one preferred.

    trainfer dpo smollm2-135m-instruct --data prefs.jsonl --out runs/prefs --lora

The fine-tuning loop (finetune.py) with pairs for data and DPO's loss for objective. One JSONL line per pair, in
TRL's two forms: `{"prompt": TEXT, "chosen": TEXT, "rejected": TEXT}` (raw text) or, for chat, `{"prompt":
[messages], "chosen": [assistant message(s)], "rejected": [...]}` (or `"messages"` for the prompt and plain text
answers). Each pair is one row: the chosen and the rejected sequence side by side under a block-diagonal mask,
so one forward scores both. The reference model's log-probabilities (the starting weights: the base, or LoRA's
zero-initialized adapter) are computed once before the first step and kept in the run directory, so neither a
second model nor a second forward per step is needed, and a resumed run reads them back.

Losses (`loss_type`): "sigmoid", DPO's own (Rafailov et al. 2023), -log sigmoid(beta * h) with h the chosen's
log-ratio to the reference minus the rejected's, over summed token log-probabilities; "ipo" (Azar et al. 2023),
(h - 1 / (2 beta))^2 over per-token mean log-probabilities, as TRL computes it. Design: docs/finetune.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainfer.errors import TrainferError
from trainfer.io.tokenizer import Tokenizer
from trainfer.model import lora
from trainfer.train import chat_data
from trainfer.train.config import load_config
from trainfer.train.distributed import shutdown
from trainfer.train.finetune import FineTuner
from trainfer.train.finetune_config import MIN_STEPS, SHORT_RUN, SMALL_DATA, FineTuneConfig

LOSSES = ("sigmoid", "ipo")
AUTO_LR = {True: 5e-5, False: 1e-6}  # LoRA, full: TRL's DPOConfig default (1e-6) for full; docs/finetune.md
MAX_AUTO_EPOCHS = 10


@dataclass
class DPOConfig(FineTuneConfig):
    beta: float = 0.1  # how far from the reference the policy may move: larger keeps it closer (TRL's default)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo (length-normalized log-probabilities)
    batch_size: int = 4  # pairs per micro-batch (two sequences each)

    def checks(self) -> dict[str, bool]:
        # replayed general text has no pair to prefer; NEFTune and the KL anchor belong to supervised tuning
        return {**super().checks(), "beta": self.beta > 0, "general_share": self.general_share == 0,
                "neftune_alpha": self.neftune_alpha == 0}  # fmt: skip

    def choices(self) -> dict[str, tuple[str, ...]]:
        return {**super().choices(), "loss_type": LOSSES}


def load_dpo_config(path: str | None, overrides: list[str], base: dict[str, Any] | None = None, **values) -> DPOConfig:
    return load_config(path, overrides, base=base, cls=DPOConfig, **values)


# ---- pairs ----------------------------------------------------------------------------------------------


def check_pair(record: Any, where: str) -> None:
    """A pair: a prompt (text or messages) and two different, non-empty answers of the same kind."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise TrainferError(f"{where}: expected an object with 'prompt' (or 'messages'), 'chosen' and 'rejected'")
    prompt = record.get("messages", record.get("prompt"))
    if prompt is None:
        raise TrainferError(f"{where}: no 'prompt' (or 'messages')")
    chat = isinstance(prompt, list)
    if chat:
        chat_data.check_record({"messages": [*prompt, {"role": "assistant", "content": "x"}]}, where)
    elif not isinstance(prompt, str):
        raise TrainferError(f"{where}: 'prompt' must be text or a list of messages")
    for key in ("chosen", "rejected"):
        answer = record[key]
        if isinstance(answer, list):
            if not chat:
                raise TrainferError(f"{where}: '{key}' is a list of messages but the prompt is text")
            if not answer or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in answer):
                raise TrainferError(f"{where}: '{key}' must be assistant messages")
            chat_data.check_record({"messages": answer}, where)
            text = "".join(m["content"] for m in answer)
        elif isinstance(answer, str):
            text = answer
        else:
            raise TrainferError(f"{where}: '{key}' must be text or a list of assistant messages")
        if not text.strip():
            raise TrainferError(f"{where}: '{key}' is empty")
    if record["chosen"] == record["rejected"]:
        raise TrainferError(f"{where}: 'chosen' and 'rejected' are the same answer: nothing to prefer")


def render_pair(record: dict[str, Any], tokenizer: Tokenizer, where: str) -> tuple[chat_data.Example, ...]:
    """The chosen and the rejected sequence, each with loss on its answer only (the prompt is context)."""
    prompt = record.get("messages", record.get("prompt"))
    out = []
    for key in ("chosen", "rejected"):
        answer = record[key]
        if isinstance(prompt, str):
            out.append(chat_data.render({"prompt": prompt, "completion": answer}, tokenizer, where))
            continue
        context = [{**m, "weight": 0} for m in prompt]
        turns = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
        out.append(chat_data.render_chat([*context, *turns], tokenizer, where))
    return tuple(out)


def load_pairs(path: str | Path, tokenizer: Tokenizer) -> list[tuple[chat_data.Example, chat_data.Example]]:
    return [render_pair(rec, tokenizer, where) for where, rec in chat_data.read_jsonl(path, check_pair)]


def pair_rows(
    pairs: list[tuple[chat_data.Example, ...]], seq_len: int, pad_id: int, context: int | None = None
) -> chat_data.Packed:
    """One pair a row: the chosen sequence (doc 0), then the rejected (doc 1), then padding. A pair longer than
    the row (or a sequence longer than the model's context) is dropped and counted: cutting it could cut away
    the one token that differs."""
    fits = [len(p[0].tokens) + len(p[1].tokens) - 2 <= seq_len for p in pairs]
    if context is not None:
        fits = [f and max(len(e.tokens) for e in p) - 1 <= context for f, p in zip(fits, pairs, strict=True)]
    kept = [p for p, f in zip(pairs, fits, strict=True) if f]
    n = len(kept)
    inputs = np.full((n, seq_len), pad_id, np.int64)
    targets = np.full((n, seq_len), pad_id, np.int64)
    loss = np.zeros((n, seq_len), bool)
    positions = np.zeros((n, seq_len), np.int64)
    docs = -1 - np.tile(np.arange(seq_len), (n, 1))
    for r, pair in enumerate(kept):
        at = 0
        for d, e in enumerate(pair):
            k = len(e.tokens) - 1
            inputs[r, at : at + k], targets[r, at : at + k] = e.tokens[:-1], e.tokens[1:]
            loss[r, at : at + k], positions[r, at : at + k], docs[r, at : at + k] = e.loss[1:], np.arange(k), d
            at += k
    return chat_data.Packed(inputs, targets, loss, positions, docs, truncated=0, dropped=len(pairs) - n)


# ---- the objective ----------------------------------------------------------------------------------------


def pair_logps(model: nn.Module, batch: dict[str, Tensor], mean: bool = False) -> Tensor:
    """(B, 2): each row's chosen and rejected answer log-probability, summed over its tokens (or their mean)."""
    raw = getattr(model, "module", model)
    h = raw.hidden_states(batch["inputs"], batch["positions"], chat_data.PackedAttention(batch["docs"]))
    sel = batch["loss"]
    logp = -F.cross_entropy(raw.lm_head(h[sel]).float(), batch["targets"][sel], reduction="none")
    rows = torch.arange(sel.shape[0], device=sel.device)[:, None].expand_as(sel)[sel]
    which = batch["docs"][sel]
    sums = torch.zeros(sel.shape[0], 2, device=logp.device).index_put((rows, which), logp, accumulate=True)
    if not mean:
        return sums
    counts = torch.zeros_like(sums).index_put((rows, which), torch.ones_like(logp), accumulate=True)
    return sums / counts.clamp(min=1)


def dpo_loss(policy: Tensor, reference: Tensor, beta: float, loss_type: str = "sigmoid") -> tuple[Tensor, Tensor]:
    """Per-pair losses (B,) and rewards (B, 2), beta * log(policy / reference), from (B, 2) log-probabilities."""
    ratios = policy - reference
    h = ratios[:, 0] - ratios[:, 1]
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise TrainferError(f"unknown loss_type {loss_type!r}: choose from {', '.join(LOSSES)}")
    return losses, beta * ratios.detach()


class PairLoss(nn.Module):
    """The step's forward as a module (what DDP wraps): the summed DPO loss of a micro-batch of pairs."""

    def __init__(self, model: nn.Module, beta: float, loss_type: str) -> None:
        super().__init__()
        self.model, self.beta, self.loss_type = model, beta, loss_type

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        policy = pair_logps(self.model, batch, mean=self.loss_type == "ipo")
        losses, rewards = dpo_loss(policy, batch["reference"], self.beta, self.loss_type)
        return losses.sum(), rewards


# ---- the run -------------------------------------------------------------------------------------------


class DPOTrainer(FineTuner):
    """The fine-tuning run with pairs for rows and DPO's loss: owns the pairs, their cached reference
    log-probabilities (computed once from the starting weights, kept in the run directory) and the held-out
    preference metrics. It never loads a second model."""

    cfg: DPOConfig

    def _load_data(self) -> None:
        cfg = self.cfg
        if not cfg.lr:
            cfg.lr = AUTO_LR[cfg.lora]
        super()._load_data()  # the base, and the loss's plumbing; its conversation rows are replaced below

    def _rows_from(self, tokenizer: Tokenizer) -> None:
        cfg = self.cfg
        train = load_pairs(cfg.data, tokenizer)
        if cfg.val_data:
            val = load_pairs(cfg.val_data, tokenizer)
        else:
            fraction = cfg.val_fraction if cfg.val_fraction != -1 else (0.1 if len(train) >= SMALL_DATA else 0.0)
            cfg.val_fraction = fraction
            train, val = chat_data.split(train, fraction, cfg.seed)
        if not cfg.seq_len:
            longest = max(len(c.tokens) + len(r.tokens) - 2 for c, r in train)
            cfg.seq_len = min(2 * self.base_cfg.max_seq_len, max(64, -(-longest // 64) * 64))
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        context = self.base_cfg.max_seq_len
        self.train_rows = pair_rows(train, cfg.seq_len, pad, context)
        self.val_rows = pair_rows(val, cfg.seq_len, pad, context) if val else None
        if not len(self.train_rows):
            raise TrainferError(f"{cfg.data}: no pair fits in {cfg.seq_len} tokens (set seq_len higher)")
        self.examples = (len(train), len(val))

    def schedule(self) -> None:
        cfg = self.cfg
        if not cfg.max_steps:
            per_epoch = len(self.train_rows) / self.global_windows
            if not cfg.epochs:
                cfg.epochs = float(min(MAX_AUTO_EPOCHS, max(1, math.ceil(MIN_STEPS / per_epoch))))
            cfg.max_steps = max(1, math.ceil(cfg.epochs * per_epoch))

    def plan(self) -> str:
        cfg, (n_train, n_val) = self.cfg, self.examples
        n_dropped = self.train_rows.dropped
        dropped = f" ({n_dropped} longer than {cfg.seq_len} tokens dropped)" if n_dropped else ""
        lines = [
            f"dpo ({cfg.loss_type}, beta {cfg.beta:g}): {n_train} pairs{dropped}, {n_val} held out; rows of "
            f"{cfg.seq_len} tokens, {self.global_windows} pairs a step: {cfg.max_steps} steps, lr {cfg.lr:g}"
        ]
        if cfg.max_steps < SHORT_RUN:
            lines.append(f"warning: {cfg.max_steps} optimizer steps are too few to learn much (under {SHORT_RUN})")
        return "\n".join(lines)

    def forward_module(self) -> nn.Module:
        if not hasattr(self, "_loss_module"):
            self._loss_module = PairLoss(self.raw, self.cfg.beta, self.cfg.loss_type)
        return self._loss_module

    def _build(self) -> None:
        super()._build()
        self.reference = {"train": self._reference("train", self.train_rows)}
        if self.val_rows is not None:
            self.reference["val"] = self._reference("val", self.val_rows)

    def _reference(self, split: str, rows: chat_data.Packed) -> np.ndarray:
        """The starting weights' log-probabilities of every pair, computed once and kept with the run."""
        path = self.out / f"reference-logps-{split}.npy"
        if path.exists():
            return np.load(path)
        if self.resume_from is not None:
            raise TrainferError(f"{path} is missing: the reference log-probabilities of the run cannot be rebuilt")
        out = self._logps(rows)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            np.save(path, out)
        return out

    @torch.no_grad()
    def _logps(self, rows: chat_data.Packed) -> np.ndarray:
        was = self.raw.training
        self.raw.eval()
        parts = []
        for lo in range(0, len(rows), self.cfg.batch_size):
            batch = chat_data.batch_tensors(rows, np.arange(lo, min(len(rows), lo + self.cfg.batch_size)), self.device)
            with self.autocast():
                parts.append(pair_logps(self.raw, batch, mean=self.cfg.loss_type == "ipo").cpu().numpy())
        self.raw.train(was)
        return np.concatenate(parts)

    def row(self, g: int) -> dict[str, np.ndarray]:
        n = len(self.train_rows)
        epoch, i = divmod(g, n)
        j = int(np.random.default_rng([self.cfg.seed, epoch]).permutation(n)[i])
        p = self.train_rows
        return {**{k: getattr(p, k)[j] for k in ("inputs", "targets", "loss", "positions", "docs")},
                "reference": self.reference["train"][j]}  # fmt: skip

    def micro_loss(self, item: dict[str, Tensor], items: list[dict[str, Tensor]]) -> Tensor:
        """Summed loss over this micro-batch's pairs / pairs in the whole step: the step's mean per pair."""
        loss, _ = self.model(item)
        return loss / sum(len(b["reference"]) for b in items)

    def preferences(self, split: str) -> dict[str, float]:
        """Mean loss, reward accuracy (chosen rewarded above rejected), margin and log-probabilities of a split."""
        rows = self.train_rows if split == "train" else self.val_rows
        n = min(len(rows), self.cfg.eval_batches * self.cfg.batch_size)
        keys = ("inputs", "targets", "loss", "positions", "docs")
        sub = chat_data.Packed(*(getattr(rows, k)[:n] for k in keys), truncated=0, dropped=0)
        policy = torch.from_numpy(self._logps(sub))
        losses, rewards = dpo_loss(policy, torch.from_numpy(self.reference[split][:n]), self.cfg.beta,
                                   self.cfg.loss_type)  # fmt: skip
        margin = rewards[:, 0] - rewards[:, 1]
        return {"loss": float(losses.mean()), "reward_accuracy": float((margin > 0).float().mean()),
                "margin": float(margin.mean()), "chosen_logp": float(policy[:, 0].mean()),
                "rejected_logp": float(policy[:, 1].mean())}  # fmt: skip

    def evaluate(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "train_eval_loss": self.preferences("train")["loss"]}
        if self.val_rows is not None:
            val = self.preferences("val")
            out.update({"val_loss": val.pop("loss")}, **{f"val_{k}": v for k, v in val.items()})
        return out


@dataclass
class DPOResult:
    steps: int
    elapsed_s: float
    tokens_per_s: float
    examples: tuple[int, int]
    before: dict[str, Any] | None  # held-out preferences of the starting model
    after: dict[str, Any] | None
    best_checkpoint: Path | None
    card: str | None


def dpo(cfg: DPOConfig, resume: bool = False) -> DPOResult:
    """Preference-tune (or continue); the report card compares held-out preferences before and after."""
    try:
        tuner = DPOTrainer(cfg, resume)
        fresh = not resume and tuner.val_rows is not None
        before = tuner.evaluate() if fresh else None
        result = tuner.train()
        after = tuner.evaluate() if tuner.val_rows is not None else None
        out = DPOResult(result.steps, result.elapsed_s, result.tokens_per_s, tuner.examples, before, after,
                        result.best_checkpoint, None)  # fmt: skip
        if tuner.dist.main:
            out.card = report_card(tuner, out)
            (tuner.out / "report.md").write_text(out.card + "\n")
        return out
    finally:
        shutdown()


def report_card(tuner: DPOTrainer, r: DPOResult) -> str:
    cfg = tuner.cfg
    info = lora.describe(tuner.raw)
    mode = f"LoRA r={cfg.lora_r} on {cfg.lora_targets}" if cfg.lora else "full"
    lines = [
        f"# Preference tuning (DPO, {cfg.loss_type} loss, beta {cfg.beta:g}) of {cfg.base_model}",
        "",
        f"- {mode}; trainable {info['trainable']:,} of {info['total']:,} parameters",
        f"- data: {r.examples[0]} pairs, {r.examples[1]} held out; {r.steps} steps, lr {cfg.lr:g}, "
        f"{r.elapsed_s:.0f} s, {r.tokens_per_s:,.0f} tokens/s",
    ]
    if r.before and r.after:
        b, a = r.before, r.after
        lines.append(
            f"- held out: reward accuracy {b['val_reward_accuracy']:.1%} -> {a['val_reward_accuracy']:.1%}, "
            f"margin {b['val_margin']:+.3f} -> {a['val_margin']:+.3f}, log p(chosen) {b['val_chosen_logp']:.2f} -> "
            f"{a['val_chosen_logp']:.2f}, log p(rejected) {b['val_rejected_logp']:.2f} -> {a['val_rejected_logp']:.2f}"
        )
    if r.best_checkpoint is not None:
        lines.append(f"- saved: {r.best_checkpoint}; use it as any model: `trainfer chat {tuner.out}`")
    return "\n".join(lines)
