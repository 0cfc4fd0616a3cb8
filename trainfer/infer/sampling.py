"""Sampling parameters and the per-step choice of the next token from logits.

Each sequence owns a `torch.Generator` seeded from its request's `seed` (plus its sample index when
n > 1), so its tokens do not depend on what else runs beside it.
Order, as in vLLM: penalties on the raw logits, then temperature, top-k, top-p, min-p, then the draw.
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
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top token's
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL/HF: divide positive (multiply negative) logits of seen tokens
    seed: int | None = None
    n: int = 1  # samples per request; they share the prompt's KV blocks
    logprobs: int | None = None  # also return this many top log-probabilities per token (raw model)
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
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (1 <= self.n <= 128, "n must be in [1, 128]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (all(self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainferError(message)

    def generator(self, index: int = 0) -> torch.Generator:
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed + index)
        return gen

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def apply_penalties(logits: Tensor, params: SamplingParams, seen: Tensor, output: Tensor) -> Tensor:
    """seen: ids of prompt + output (for repetition_penalty); output: ids generated so far."""
    if params.repetition_penalty != 1 and seen.numel():
        ids = seen.unique()
        vals = logits[ids]
        logits = logits.clone()
        logits[ids] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output.numel() and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(output, minlength=logits.numel()).to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> Tensor:
    """Temperature, then top-k, top-p (nucleus) and min-p on a (vocab,) fp32 row; removed entries are -inf."""
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
    if min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a (vocab,) row of (already penalized) logits."""
    logits = logits.float()
    if params.temperature == 0:
        return int(logits.argmax())
    probs = filter_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(logits: Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of the chosen token and the k most likely ones, from the raw model distribution."""
    logp = logits.float().log_softmax(-1)
    top = torch.topk(logp, k) if k else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    return float(logp[token]), pairs
