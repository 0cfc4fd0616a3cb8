"""What a run sees when: the order of training windows and the learning rate at each step.

Both are pure functions of the config and the step, which is what makes resuming exact.
"""

from __future__ import annotations

import math

import numpy as np

from trainfer.errors import TrainferError
from trainfer.train.config import TrainConfig


class WindowSampler:
    """Epochs over non-overlapping seq_len windows: a seeded shuffle per epoch, shifted by a seeded offset.

    Window i of the run (counting across epochs) is a pure function of (seed, i): resuming needs only i.
    """

    def __init__(self, n_tokens: int, seq_len: int, seed: int) -> None:
        self.n_tokens, self.seq_len, self.seed = n_tokens, seq_len, seed
        self.per_epoch = (n_tokens - seq_len) // seq_len  # leaves room for any shift and the last target
        if self.per_epoch < 1:
            raise TrainferError(
                f"the training split has {n_tokens} tokens, too few for windows of {seq_len} (it needs "
                f"{2 * seq_len}, room for a shifted epoch); lower seq_len"
            )
        self._epoch, self._order, self._shift = -1, np.zeros(0, np.int64), 0

    def starts(self, first: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            epoch, pos = divmod(first + j, self.per_epoch)
            if epoch != self._epoch:
                rng = np.random.default_rng([self.seed, epoch])
                self._epoch, self._order = epoch, rng.permutation(self.per_epoch)
                self._shift = int(rng.integers(self.seq_len))
            out[j] = self._shift + self._order[pos] * self.seq_len
        return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine (or WSD: flat, then linear decay over the last decay_fraction) to min."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps * (1 - cfg.decay_fraction)
        if step < decay_start:
            return peak
        frac = (step - decay_start) / max(1.0, cfg.max_steps - decay_start)
        return peak + (floor - peak) * min(1.0, frac)
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, frac)))
