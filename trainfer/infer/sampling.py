"""Sampling parameters and the per-step choice of the next token from logits.

Each request owns a `torch.Generator` seeded from its `seed`, so its tokens do not depend on what else
runs beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainfer.errors import TrainferError


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy; OpenAI's default is 1.0 and so is ours
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (all(self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainferError(message)

    def generator(self) -> torch.Generator:
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) on a (vocab,) fp32 row; removed entries are -inf."""
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a (vocab,) row of logits."""
    logits = logits.float()
    if params.temperature == 0:
        return int(logits.argmax())
    probs = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
