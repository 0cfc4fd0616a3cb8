"""Sampling parameters and the per-step choice of the next token from logits.

Each sequence owns a `torch.Generator` seeded from its request's `seed` (and, for samples 1.. of n, a
hash of seed and index), so its tokens do not depend on what else runs beside it.
Order, as in vLLM: penalties on the raw logits, then temperature, top-k, top-p, min-p, then the draw.
Every accepted value is numerically safe: a temperature below 1e-5 is greedy (as in vLLM), and logits
pushed to +-inf by extreme penalties are clamped before the draw.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainfer.errors import TrainferError

# The bounds every caller shares (the HTTP schema imports them).
MAX_N = 16  # samples per request
MAX_LOGPROBS = 20  # top log-probabilities per token, as OpenAI
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4; lm-eval tasks sometimes pass more)
MAX_STOP_CHARS = 256  # characters per stop string: matching costs O(length) per token
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
GREEDY_BELOW = 1e-5  # temperatures below this sample greedily: dividing by them overflows


@dataclass
class SamplingParams:
    max_tokens: int | None = 128
    """most tokens to generate (None: until the context is full)"""
    temperature: float = 1.0
    """0 = greedy; higher = more random (OpenAI's default is 1.0 and so is ours)"""
    top_p: float = 1.0
    """nucleus sampling: keep the most likely tokens up to this probability mass"""
    top_k: int = 0
    """keep only the k most likely tokens (0 = off)"""
    min_p: float = 0.0  # drop tokens whose probability is below min_p * the top token's
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL/HF: divide positive (multiply negative) logits of seen tokens
    seed: int | None = None
    """random seed: the same seed gives the same tokens"""
    n: int = 1  # samples per request; they share the prompt's KV blocks
    logprobs: int | None = None  # also return this many top log-probabilities per token (raw model)
    stop: list[str] = field(default_factory=list)
    """stop when this text appears (repeatable)"""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    prompt_logprobs: int | None = None  # also score the prompt: logprob of each prompt token and the top k

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}]"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX, f"seed must be in [{SEED_MIN}, {SEED_MAX}]"),
            (len(self.stop) <= MAX_STOPS, f"at most {MAX_STOPS} stop strings"),
            (
                all(0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
                f"stop strings must have 1 to {MAX_STOP_CHARS} characters",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainferError(message)

    def generator(self, index: int = 0) -> torch.Generator:
        """Sample 0 draws from `seed` itself; sample i > 0 from a hash of (seed, i), so that sample 1 of
        seed s is not sample 0 of seed s + 1 (and seed + i cannot overflow)."""
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        elif index == 0:
            gen.manual_seed(self.seed)
        else:
            digest = hashlib.sha256(f"trainfer-sample:{self.seed}:{index}".encode()).digest()
            gen.manual_seed(int.from_bytes(digest[:8], "little"))
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


def sample(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    draft: int | None = None,
    draft_probs: Tensor | None = None,
) -> int:
    """One token id from a (vocab,) row of (already penalized) logits.

    draft: a token guessed for this position (speculative decoding, infer/speculate.py and infer/draft.py).
    Greedy keeps the argmax (the draft is accepted exactly when it is the argmax). Sampling applies the
    rejection rule of Leviathan et al. 2023: accept the draft with probability min(1, p(draft) / q(draft)),
    otherwise draw from max(p - q, 0) renormalized; either way the token is distributed as p. q is
    `draft_probs`, the distribution the draft model drew the guess from, or one-hot on the guess when None (an
    n-gram guess is made with certainty: accept with p(draft), otherwise draw from p without it)."""
    logits = logits.float()
    if params.greedy:  # one pass in the common case: argmax lands on a NaN if there is one, then look closer
        # numpy's argmax over a 49k vocabulary: ~3 us against torch's ~35 us (its reduction machinery), per token
        best = int(logits.numpy().argmax()) if logits.device.type == "cpu" else int(logits.argmax())
        if math.isfinite(float(logits[best])):
            return best
    if torch.isnan(logits).all() or torch.isneginf(logits).all():
        raise TrainferError("the model produced no finite logits for this sequence")
    if params.greedy:
        return int(torch.nan_to_num(logits, nan=float("-inf")).argmax())
    probs = probabilities(logits, params)
    if draft is not None:
        q = float(draft_probs[draft]) if draft_probs is not None else 1.0
        if float(torch.rand((), generator=generator)) * q < float(probs[draft]):
            return draft
        residual = probs.clone() if draft_probs is None else (probs - draft_probs.to(probs.device)).clamp_min(0)
        if draft_probs is None:
            residual[draft] = 0.0
        if not float(residual.sum()) > 0:  # p and q agree up to rounding, and the coin said otherwise
            return draft if draft_probs is None else int(torch.multinomial(probs, 1, generator=generator))
        probs = residual
    return int(torch.multinomial(probs, 1, generator=generator))


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution a sampled (not greedy) token is drawn from: (vocab,) fp32, filtered entries 0."""
    # Shift so the best token is at 0: dividing by a small temperature then only moves others toward -inf.
    big = torch.finfo(torch.float32).max
    logits = torch.nan_to_num(logits.float(), nan=float("-inf")).clamp(-big, big)
    logits = logits - logits.max()
    return filter_logits(logits, params.temperature, params.top_k, params.top_p, params.min_p).softmax(-1)


def top_logprobs(logits: Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of the chosen token and the k most likely ones, from the raw model distribution."""
    return batch_logprobs(logits[None], [token], k)[0]


def batch_logprobs(logits: Tensor, tokens: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of (R, vocab) logits: the log-probability of tokens[r] and the k most likely tokens."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if not k:
        return [(c, []) for c in chosen]
    top = torch.topk(logp, k)
    ids, vals = top.indices.tolist(), top.values.tolist()
    return [(c, list(zip(i, v, strict=True))) for c, i, v in zip(chosen, ids, vals, strict=True)]
