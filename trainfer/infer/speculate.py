"""Prompt-lookup (n-gram) drafts for speculative decoding: guesses copied from the text so far.

When a model rewrites, quotes or summarizes its input, the next tokens often repeat a span already in the
context. The last few tokens are looked up earlier in the sequence, and the tokens that followed that
occurrence become the draft; the target model checks them all in one forward (engine.py) and keeps the
longest prefix it agrees with, plus one token of its own. No second model, nothing to train.

The lookup follows vLLM's and llama.cpp's prompt lookup: the longest suffix first (`max_ngram` tokens, down to
`min_ngram`), its most recent earlier occurrence (closest to what is being written now). A one-token match guesses
too often in free text: `min_ngram` 2 was chosen on a tuning set of prompts apart from the benchmark's (docs/LOG.md).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

DRAFTS = ("ngram",)  # what --draft accepts (a draft model is not built yet)
MAX_DRAFT_TOKENS = 16  # a bound on --num-draft-tokens: a longer guess is rarely all right and costs its forward


def ngram_draft(token_ids: list[int], k: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens, for the
    largest n in [min_ngram, max_ngram] that occurs; [] when none does."""
    if k < 1 or len(token_ids) < min_ngram + 1:
        return []
    ids = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        suffix = ids[-n:]
        # windows starting at 0 .. len-n-1: every occurrence but the suffix itself
        windows = sliding_window_view(ids[:-1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return ids[start : start + k].tolist()
    return []
