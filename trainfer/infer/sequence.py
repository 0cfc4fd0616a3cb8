"""A sequence: one sample of one request, its tokens, its KV blocks and its sampling state.

The scheduler moves sequences between queues, the pool (kv_cache.py) gives them blocks, the engine
samples their next token. Design and invariants: docs/engine.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from trainfer.infer.sampling import SamplingParams

TopLogprobs = list[tuple[int, float]]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    token_ids: list[int]  # prompt + output so far
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator
    max_tokens: int  # output tokens allowed (the request's max_tokens, or the room left in the context)
    index: int = 0  # which of the request's n samples
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full, computed blocks
    num_computed: int = 0  # tokens whose K/V are in the cache
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    forked: bool = False  # n > 1: children created after the first sample
    adapter: str | None = None  # the LoRA adapter this sequence runs with (None: the base model)
    # With params.prompt_logprobs: (logprob, top) of prompt tokens 1.., filled as the prompt is computed.
    prompt_logprobs: list[tuple[float, TopLogprobs]] = field(default_factory=list)
    drafts: int = 0  # speculative decoding: the last `drafts` token_ids are guesses, not yet checked
    # a draft model's distribution for each guess (sampled output's rejection rule); empty for n-gram or greedy
    draft_probs: list[torch.Tensor] = field(default_factory=list)

    def drop_drafts(self) -> list[int]:
        """Take the unchecked guesses off the end (preempted, cut short by the step's budget, or verified)."""
        if not self.drafts:
            return []
        guesses = self.token_ids[-self.drafts :]
        del self.token_ids[-self.drafts :]
        self.drafts = 0
        self.draft_probs = []
        return guesses

    def __post_init__(self) -> None:
        assert 0 < self.prompt_len <= len(self.token_ids)
        assert self.max_tokens >= 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and not all are known yet (so the prompt must be computed)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.prompt_len - 1

    @property
    def remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return self.num_tokens - self.num_computed
