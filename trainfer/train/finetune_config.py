"""FineTuneConfig: a fine-tune's settings, and the automatic schedule that fills the ones left at 0.

    trainfer finetune smollm2-135m-instruct --data faq.jsonl --out runs/faq --lora --set epochs=5

Every TrainConfig key applies too (layered the same way: file < keyword values < `--set`); `model.*` does not,
since a fine-tune keeps its base's shape. The defaults and how they were measured: docs/finetune.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from trainfer.model import lora
from trainfer.train import chat_data
from trainfer.train.config import TrainConfig

AUTO_LR = {True: 1e-3, False: 5e-5}  # LoRA, full: see docs/finetune.md for how these were chosen
# The automatic schedule (docs/finetune.md has the measurements): rows as long as the longest conversation, so that
# small data still makes many rows; enough epochs for MIN_STEPS optimizer steps; and no held-out split below
# SMALL_DATA conversations, where every one is needed to learn from. A run under SHORT_RUN steps learns next to
# nothing (measured: 2 and 5 steps on a 48-line FAQ answered none of its new phrasings) and says so first.
MIN_STEPS = 64
MAX_AUTO_EPOCHS = 20
SMALL_DATA = 200
SHORT_RUN = 30
MAX_AUTO_SEQ_LEN = 512


@dataclass
class FineTuneConfig(TrainConfig):
    shapes_model: ClassVar[bool] = False
    base_model: str = ""  # the model to adapt: an alias, a .gguf, a Hugging Face directory or a run
    val_data: str = ""  # held-out conversations (JSONL); empty: hold out val_fraction of data
    val_fraction: float = -1.0  # -1: 0.1 from SMALL_DATA conversations up, none below (every one trains)
    epochs: float = 0.0  # used when max_steps is 0; 0: at least 3, more on small data until MIN_STEPS steps
    max_steps: int = 0
    lr: float = 0.0  # 0: 1e-3 with LoRA, 5e-5 full
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "all"  # all | attention | mlp | a comma-separated list of q_proj, ..., down_proj
    rslora: bool = False
    # LoRA only: hold the frozen base in int8 (Q8_0 blocks) or int4 (Q4_1) instead of fp32, QLoRA-style: ~4x / ~7x
    # less memory for the base, products on the native kernels, gradients to the adapters through dequantized
    # weights. The adapter is saved as usual and applies to the float base (docs/finetune.md).
    base_dtype: str = "float32"
    # General text replayed as a share of each epoch's rows, so tuning does not erase what the base knew: a
    # `trainfer prepare` directory in the base's tokenizer, or "self": the base model's own samples
    general_data: str = ""
    general_share: float = 0.0
    # > 0: the general rows are scored by KL(base || tuned) over the whole vocabulary at every position (times
    # this weight) instead of cross-entropy on their tokens: the tuned model is pulled toward the base's whole
    # distribution, not one sampled token. The base is the same model with its adapter off (LoRA) or a frozen
    # copy (full fine-tuning).
    general_kl: float = 0.0
    # > 0: NEFTune (Jain et al. 2023): uniform noise of +-alpha / sqrt(seq_len * dim) on the input embeddings of
    # training forwards only (not evaluation, not the KL anchor's base); 5 is the paper's usual value
    neftune_alpha: float = 0.0
    seq_len: int = 0  # 0: the longest training conversation rounded up to 64 tokens (at most MAX_AUTO_SEQ_LEN)
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    sample_tokens: int = 32

    def checks(self) -> dict[str, bool]:
        targets_ok = self.lora_r < 1 or self.lora_alpha <= 0 or bool(self.lora_config())  # raises naming a bad one
        return {
            **super().checks(),
            "lora_targets": targets_ok,
            "seq_len": self.seq_len == 0 or self.seq_len > 1,
            "max_steps": self.max_steps >= 0,
            "lr": self.lr >= 0,
            "epochs": self.epochs >= 0,
            "val_fraction": self.val_fraction == -1 or 0 <= self.val_fraction < 1,
            "general_share": 0 <= self.general_share < 1,
            "neftune_alpha": self.neftune_alpha >= 0,
            "general_kl": self.general_kl >= 0 and (self.general_kl == 0 or self.general_share > 0),
            "base_dtype": self.base_dtype == "float32" or self.lora,
            "lora_r": self.lora_r >= 1,
            "lora_alpha": self.lora_alpha > 0,
            "lora_dropout": 0 <= self.lora_dropout < 1,
            # the probe continues passages of token shards; a chat fine-tune's measure is its held-out answers
            "probe_passages": self.probe_passages == 0,
        }

    def choices(self) -> dict[str, tuple[str, ...]]:
        return {**super().choices(), "base_dtype": ("float32", "int8", "int4")}

    def lora_config(self) -> lora.LoRAConfig:
        return lora.LoRAConfig(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets, self.rslora)


def auto_seq_len(examples: list[chat_data.Example], context: int) -> int:
    """Rows as long as the longest conversation (rounded up to 64): a small set still makes many rows, so many
    steps; packing it into long rows left a 48-line FAQ 2-5 optimizer steps in all."""
    longest = max(len(e.tokens) - 1 for e in examples)
    return min(context, MAX_AUTO_SEQ_LEN, max(64, -(-longest // 64) * 64))
