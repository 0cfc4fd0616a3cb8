"""A fine-tune's objective: cross-entropy on assistant tokens, KL(base || tuned) on replayed general rows, and
NEFTune's noise on the embeddings of training forwards. Design and measurements: docs/finetune.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainfer.model.transformer import Transformer
from trainfer.train import chat_data


def neftune_noise(alpha: float, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    """Embedding forward hook: noisy embeddings in training forwards with gradients; the base's no-grad
    forward for the KL anchor and every evaluation see the clean ones."""
    if not (module.training and torch.is_grad_enabled()):
        return out
    bound = alpha / math.sqrt(out.shape[-2] * out.shape[-1])
    return out + torch.empty_like(out).uniform_(-bound, bound)


class MaskedLM(nn.Module):
    """The step's forward as a module (what DDP wraps): summed loss over assistant targets and their count.
    With `kl_weight`, positions marked `anchor` (general rows) score KL(base || model) instead, the base's
    logits coming from `base_logits(batch)` without gradients."""

    def __init__(self, model: Transformer, kl_weight: float = 0.0, base_logits=None) -> None:
        super().__init__()
        self.model = model
        self.kl_weight, self.base_logits = kl_weight, base_logits

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        anchor = batch.get("anchor")
        if not self.kl_weight or anchor is None or not bool(anchor.any()):
            return chat_data.masked_loss_sum(self.model, batch)
        raw = getattr(self.model, "module", self.model)
        h = raw.hidden_states(batch["inputs"], batch["positions"], chat_data.PackedAttention(batch["docs"]))
        plain = batch["loss"] & ~anchor
        loss = F.cross_entropy(raw.lm_head(h[plain]).float(), batch["targets"][plain], reduction="sum")
        with torch.no_grad():
            base = self.base_logits(batch)[anchor].float().log_softmax(-1)
        tuned = raw.lm_head(h[anchor]).float().log_softmax(-1)
        kl = (base.exp() * (base - tuned)).sum()
        return loss + self.kl_weight * kl, int(batch["loss"].sum())
