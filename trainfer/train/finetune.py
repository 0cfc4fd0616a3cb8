"""`trainfer finetune`: adapt a pre-trained model to a user's conversations, fully or with LoRA, resumably.

    trainfer finetune smollm2-135m-instruct --data faq.jsonl --out runs/faq --lora
    trainfer finetune smollm2-135m-instruct --data faq.jsonl --out runs/faq-full --set lr=3e-5

The pretraining loop (train/trainer.py) with other data and weights: rows of packed conversations whose loss
covers assistant tokens only (train/chat_data.py), the base model's weights (frozen under LoRA,
model/lora.py), and checkpoints that hold a PEFT adapter or a full model. The data order is a pure function
of (seed, cursor), so a resumed fine-tune continues bit for bit. Design: docs/finetune.md.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainfer.data.prepare import read_shard
from trainfer.errors import TrainferError
from trainfer.infer.engine import Engine
from trainfer.infer.sampling import SamplingParams
from trainfer.io import peft
from trainfer.io.hf import load_state_dict, read_config
from trainfer.io.loader import build_model, load_checkpoint, resolve
from trainfer.io.tokenizer import Tokenizer
from trainfer.model import lora
from trainfer.model.transformer import Transformer
from trainfer.quant.blocks import quantize_model
from trainfer.registry import ALIASES
from trainfer.train import chat_data
from trainfer.train.config import load_config
from trainfer.train.distributed import agree, shutdown
from trainfer.train.evaluate import decode_without_cache, loss_record
from trainfer.train.finetune_config import (
    AUTO_LR,
    MAX_AUTO_EPOCHS,
    MIN_STEPS,
    SHORT_RUN,
    SMALL_DATA,
    FineTuneConfig,
    auto_seq_len,
)
from trainfer.train.finetune_loss import MaskedLM, neftune_noise
from trainfer.train.trainer import Trainer, TrainResult


class FineTuner(Trainer):
    """The pretraining loop with a fine-tune's data (packed conversations, replayed general text), weights (the
    base's, LoRA or full), objective (finetune_loss.py) and checkpoints (a PEFT adapter or a full model)."""

    cfg: FineTuneConfig

    def _load_data(self) -> None:
        cfg = self.cfg
        if not cfg.data:
            raise TrainferError("no training data: pass --data FILE.jsonl")
        cfg.data = str(Path(cfg.data).resolve())
        if cfg.val_data:
            cfg.val_data = str(Path(cfg.val_data).resolve())
        if cfg.general_share and not cfg.general_data:
            raise TrainferError('general_share needs general_data: a `trainfer prepare` directory, or "self"')
        tokenizer = self._load_base()
        self._rows_from(tokenizer)
        self.general = self._general_text(tokenizer)
        if not cfg.lr:
            cfg.lr = AUTO_LR[cfg.lora]
        self.schedule()
        if self.dist.main and self.resume_from is None:
            print(self.plan(), flush=True)
        self.val_bytes_per_token = chat_data.bytes_per_target(self.val_rows, tokenizer) if self.val_rows else None
        # LoRA skips the frozen weights' gradients: forward 2N + input gradients 2N of full's 6N
        self.flops_per_token = self.base_cfg.training_flops_per_token(cfg.seq_len) * (4 / 6 if cfg.lora else 1)

    def _load_base(self) -> Tokenizer:
        """The base model's config, weights (fp32, on the CPU until _build) and tokenizer, checked against a resumed
        checkpoint."""
        cfg = self.cfg
        if not cfg.base_model:
            raise TrainferError("no base model: name one (an alias, a .gguf or a model directory)")
        base_path = resolve(cfg.base_model)
        if cfg.base_model not in ALIASES:  # the adapter names its base; make that work from any directory
            cfg.base_model = str(Path(cfg.base_model).resolve())
        if peft.is_adapter(base_path):
            raise TrainferError(f"{cfg.base_model} is a LoRA adapter; fine-tune its base, or merge it first")
        self.base_cfg, self.base_state, tokenizer = load_checkpoint(base_path, torch.float32)
        if tokenizer is None:
            raise TrainferError(f"{cfg.base_model} has no tokenizer.json; trainfer needs the base model's tokenizer")
        resumed_full = self.resume_from is not None and not peft.is_adapter(self.resume_from)
        if resumed_full and read_config(self.resume_from).to_dict() != self.base_cfg.to_dict():
            raise TrainferError(f"{self.resume_from} holds another model than {cfg.base_model}")
        self.tokenizer, self.model_cfg = tokenizer, self.base_cfg
        return tokenizer

    def _rows_from(self, tokenizer) -> None:
        """The training and held-out rows: conversations packed several to a row."""
        cfg = self.cfg
        train = chat_data.load_examples(cfg.data, tokenizer)
        if cfg.val_data:
            val = chat_data.load_examples(cfg.val_data, tokenizer)
        else:
            if cfg.val_fraction == -1:
                cfg.val_fraction = 0.1 if len(train) >= SMALL_DATA else 0.0
            train, val = chat_data.split(train, cfg.val_fraction, cfg.seed)
        if not train:
            raise TrainferError(f"{cfg.data}: no example has an assistant token to learn from")
        if not cfg.seq_len:
            cfg.seq_len = auto_seq_len(train, self.base_cfg.max_seq_len)
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.train_rows = chat_data.pack(train, cfg.seq_len, pad, seed=cfg.seed)
        self.val_rows = chat_data.pack(val, cfg.seq_len, pad, seed=None) if val else None
        self.examples = (len(train), len(val))

    def schedule(self) -> None:
        """max_steps from epochs, and epochs from the data's size, where they are left at 0."""
        cfg = self.cfg
        if not cfg.max_steps:
            per_epoch = self.epoch_rows / self.global_windows
            if not cfg.epochs:
                cfg.epochs = float(min(MAX_AUTO_EPOCHS, max(3, math.ceil(MIN_STEPS / per_epoch))))
            cfg.max_steps = max(1, math.ceil(cfg.epochs * per_epoch))

    def plan(self) -> str:
        """What the run will do, said before it starts: the split, the rows, the steps, and whether that is enough."""
        cfg, (n_train, n_val) = self.cfg, self.examples
        if n_val:
            held = f"{n_val} held out ({cfg.val_data or f'val_fraction {cfg.val_fraction:g}'})"
        elif n_train < SMALL_DATA:
            held = f"none held out (under {SMALL_DATA} conversations every one trains; --val FILE measures unseen ones)"
        else:
            held = "none held out"
        epochs = cfg.max_steps * self.global_windows / max(1, self.epoch_rows)
        lines = [
            f"fine-tune: {n_train} conversations, {held}; {len(self.train_rows)} rows of {cfg.seq_len} tokens, "
            f"{self.global_windows} rows a step: {cfg.max_steps} steps ({epochs:.1f} epochs), lr {cfg.lr:g}"
        ]
        if cfg.max_steps < SHORT_RUN:
            lines.append(
                f"warning: {cfg.max_steps} optimizer steps are too few to learn much (under {SHORT_RUN}); add "
                "conversations, or set epochs / max_steps (docs/finetune.md)"
            )
        return "\n".join(lines)

    def _general_text(self, tokenizer) -> np.ndarray | None:
        cfg = self.cfg
        if not cfg.general_share:
            return None

        if cfg.general_data == "self":
            return self._own_samples(tokenizer)
        path = Path(cfg.general_data)
        if not (path / "meta.json").exists():
            raise TrainferError(f"{path} is not a prepared data directory (no meta.json); run trainfer prepare")
        if Tokenizer.from_dir(path).backend.get_vocab() != tokenizer.backend.get_vocab():
            raise TrainferError(
                f"{path} was tokenized with another tokenizer than {cfg.base_model}'s; "
                f"prepare it with --tokenizer {cfg.base_model}"
            )
        data = read_shard(path, "train")
        if len(data) <= cfg.seq_len:
            raise TrainferError(f"{path} has fewer than {cfg.seq_len + 1} training tokens")
        return data

    def _own_samples(self, tokenizer) -> np.ndarray:
        """Seeded samples of the base model from a document start, made once and kept in the run directory (a
        resumed run reads them back): replaying what the base itself writes holds it near where it began."""
        path = self.out / "replay-tokens.npy"
        if path.exists():
            return np.load(path)

        cfg = self.cfg
        start = tokenizer.backend.token_to_id("<|endoftext|>")
        start = start if start is not None else tokenizer.bos_token_id or tokenizer.eos_token_id or 0
        n = max(4, 2 * self.general_rows_for(len(self.train_rows)))
        model = build_model(self.base_cfg, self.base_state)  # the fp32 base as loaded, not the (LoRA, int8) one trained
        engine = Engine(model, max_num_seqs=n, kv_cache_gb=0.5)
        params = SamplingParams(max_tokens=cfg.seq_len, temperature=1.0, top_p=0.95, seed=cfg.seed, ignore_eos=True)
        got = engine.run([[start]] * n, [dataclasses.replace(params, seed=cfg.seed + i) for i in range(n)])
        data = np.array([t for r in got for t in [start, *(e.token_id for e in r[0])]], dtype=np.int64)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            np.save(path, data)
        return data

    def general_rows_for(self, n_rows: int) -> int:
        share = self.cfg.general_share
        return round(n_rows * share / (1 - share))

    @property
    def general_rows(self) -> int:
        return self.general_rows_for(len(self.train_rows)) if self.general is not None else 0

    @property
    def epoch_rows(self) -> int:
        return len(self.train_rows) + self.general_rows

    def _make_model(self) -> Transformer:

        cfg = self.cfg
        resumed_full = self.resume_from is not None and not cfg.lora
        state = load_state_dict(self.resume_from, torch.float32) if resumed_full else self.base_state
        model = build_model(self.base_cfg, state).train()
        del self.base_state  # the model holds the weights now
        if cfg.base_dtype != "float32":
            quantize_model(model, cfg.base_dtype)  # a tied embedding becomes a new module: hook it after this
        if cfg.neftune_alpha:
            model.embed_tokens.register_forward_hook(functools.partial(neftune_noise, cfg.neftune_alpha))
        if cfg.lora:
            lora.apply_lora(model, cfg.lora_config(), seed=cfg.seed)
            if self.resume_from is not None:
                if not peft.is_adapter(self.resume_from):
                    raise TrainferError(f"{self.resume_from} is a full fine-tune checkpoint; resume it without lora")
                peft.load_adapter(model, self.resume_from)
        elif self.resume_from is not None and peft.is_adapter(self.resume_from):
            raise TrainferError(f"{self.resume_from} is a LoRA checkpoint; resume it with lora = true")
        return model

    def forward_module(self) -> nn.Module:
        if not hasattr(self, "_loss_module"):
            base = None
            if self.cfg.general_kl and not self.cfg.lora:  # full fine-tuning: the base is a frozen copy
                self._frozen = copy.deepcopy(self.raw).eval().requires_grad_(False)
            if self.cfg.general_kl:
                base = self.base_logits
            self._loss_module = MaskedLM(self.raw, self.cfg.general_kl, base)
        return self._loss_module

    def base_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """The base model's logits on the batch: the adapters switched off (LoRA), or the frozen copy."""
        ctx = chat_data.PackedAttention(batch["docs"])
        if not self.cfg.lora:
            return self._frozen(batch["inputs"], batch["positions"], ctx)
        with lora.adapters_off(self.raw):
            return self.raw(batch["inputs"], batch["positions"], ctx)

    # ---- data order ------------------------------------------------------------------------------------

    def row(self, g: int) -> dict[str, np.ndarray]:
        """Global row g of the stream: epoch g // n in its own seeded order, general-text windows mixed in."""
        n = self.epoch_rows
        epoch, i = divmod(g, n)
        j = int(np.random.default_rng([self.cfg.seed, epoch]).permutation(n)[i])
        T = self.cfg.seq_len
        if j < len(self.train_rows):
            p = self.train_rows
            row = {k: getattr(p, k)[j] for k in ("inputs", "targets", "loss", "positions", "docs")}
            return {**row, "anchor": np.zeros(T, bool)}
        start = int(np.random.default_rng([self.cfg.seed, epoch, j]).integers(0, len(self.general) - T))
        window = self.general[start : start + T + 1].astype(np.int64)
        return {
            "inputs": window[:-1], "targets": window[1:], "loss": np.ones(T, bool),
            "positions": np.arange(T), "docs": np.zeros(T, np.int64), "anchor": np.ones(T, bool),
        }  # fmt: skip

    def micro_batches(self, first: int) -> list[dict[str, Tensor]]:
        cfg = self.cfg
        out = []
        for m in range(cfg.grad_accum):
            rows = [self.row(first + m * cfg.batch_size + b) for b in range(cfg.batch_size)]
            batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])).to(self.device) for k in rows[0]}
            out.append(batch)
        return out

    def micro_loss(self, item: dict[str, Tensor], items: list[dict[str, Tensor]]) -> Tensor:
        """Summed loss over this micro-batch / targets in the whole step: the step's mean per target token."""
        total = sum(int(b["loss"].sum()) for b in items)
        loss, _ = self.model(item)
        return loss / max(1, total)

    # ---- evaluation and checkpoints ----------------------------------------------------------------------

    def _rows_loss(self, packed: chat_data.Packed) -> float:
        cfg, was = self.cfg, self.raw.training
        self.raw.eval()
        loss, _ = chat_data.packed_loss(
            self.raw, packed, cfg.batch_size, self.device, cfg.eval_batches * cfg.batch_size, self.autocast()
        )
        self.raw.train(was)
        return loss

    def evaluate(self) -> dict[str, Any]:
        train_loss = self._rows_loss(self.train_rows)
        val = self._rows_loss(self.val_rows) if self.val_rows is not None else None
        return loss_record(self.step, train_loss, val, self.val_bytes_per_token)

    def sample_text(self) -> str:
        """The greedy answer to the first held-out (else training) conversation, without a KV cache."""
        packed = self.val_rows if self.val_rows is not None else self.train_rows
        doc = packed.docs[0]
        first = doc[0]
        where = (doc == first) & packed.loss[0]
        upto = int(np.argmax(where)) if where.any() else int((doc == first).sum())
        prompt = packed.inputs[0, : upto + 1].tolist()  # through the first position whose target is trained
        greedy = SamplingParams(temperature=0.0)
        out = decode_without_cache(
            self.raw,
            prompt,
            self.cfg.sample_tokens,
            greedy,
            self.device,
            self.autocast(),
            self.tokenizer.stop_token_ids,
        )
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def write_model(self, directory: Path, model_state: dict[str, Tensor]) -> None:
        if not self.cfg.lora:
            return super().write_model(directory, model_state)
        peft.save_adapter(directory, self.raw, self.cfg.lora_config(), self.cfg.base_model)


@dataclass
class FineTuneResult:
    train: TrainResult
    examples: tuple[int, int]  # train, held out
    truncated: int
    trainable: int
    total_params: int
    before: dict[str, Any] | None  # held-out evaluation of the base model (a fresh run only)
    card: str | None  # report.md's text (rank 0)


def finetune(cfg: FineTuneConfig, resume: bool = False) -> FineTuneResult:
    """Fine-tune (or continue), evaluating the base first so the report card says what tuning changed."""
    try:
        tuner = FineTuner(cfg, resume)
        fresh = not resume and tuner.val_rows is not None
        before = agree(tuner.evaluate(), tuner.dist, tuner.device) if fresh else None
        result = tuner.train()
        info = lora.describe(tuner.raw)
        out = FineTuneResult(result, tuner.examples, tuner.train_rows.truncated, info["trainable"], info["total"],
                             before, None)  # fmt: skip
        if tuner.dist.main:
            out.card = report_card(tuner, out)
            (tuner.out / "report.md").write_text(out.card + "\n")
        return out
    finally:
        shutdown()


def report_card(tuner: FineTuner, r: FineTuneResult) -> str:
    cfg, t = tuner.cfg, r.train
    mode = (
        f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha:g}{' (rsLoRA)' if cfg.rslora else ''} on {cfg.lora_targets}"
        if cfg.lora
        else "full fine-tuning"
    )
    lines = [
        f"# Fine-tune of {cfg.base_model}",
        "",
        f"- mode: {mode}; trainable {r.trainable:,} of {r.total_params:,} parameters "
        f"({r.trainable / r.total_params:.2%})",
        f"- data: {r.examples[0]} training conversations ({r.truncated} truncated to {cfg.seq_len} tokens), "
        f"{r.examples[1]} held out; {len(tuner.train_rows)} packed rows, {tuner.train_rows.targets_total:,} "
        f"assistant tokens per epoch",
        f"- {t.steps} steps ({t.steps * tuner.global_windows / max(1, tuner.epoch_rows):.1f} epochs), lr {cfg.lr:g}, "
        f"{t.elapsed_s:.0f} s, {t.tokens_per_s:,.0f} tokens/s (packed positions), MFU {t.mfu:.1%}, "
        f"{str(tuner.amp_dtype).removeprefix('torch.')}",
    ]
    if t.best_checkpoint is not None:
        files = [f for f in t.best_checkpoint.iterdir() if f.suffix in (".safetensors", ".json") and
                 f.name not in ("tokenizer.json", "tokenizer_config.json", "state.json")]  # fmt: skip
        size = sum(f.stat().st_size for f in files)
        base = tuner.base_cfg.n_params * 4
        lines.append(f"- saved: {t.best_checkpoint} ({size / 1e6:.1f} MB; the fp32 base is {base / 1e6:.0f} MB)")
    if r.before is not None and t.val_loss is not None:
        lines.append(
            f"- held-out assistant-token loss: {r.before['val_loss']:.4f} (base) -> {t.val_loss:.4f} nats/token"
        )
    lines.append(
        f"\nUse it anywhere a model goes: `trainfer chat {tuner.out}`, `trainfer serve {tuner.out}`, "
        f"`trainfer eval {tuner.out} --chat-data HELDOUT.jsonl --exact`"
        + (f", `trainfer merge {tuner.out} --out DIR`" if cfg.lora else "")
    )
    return "\n".join(lines)


def load_finetune_config(
    path: str | None, overrides: list[str], base: dict[str, Any] | None = None, **values: Any
) -> FineTuneConfig:
    return load_config(path, overrides, base=base, cls=FineTuneConfig, **values)
