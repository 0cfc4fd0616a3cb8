"""What a training run shows as it goes: a progress bar with the latest loss, tokens/s and MFU, the evaluation
lines printed above it, and the clock behind tokens/s, which leaves evaluation and checkpoint time out of it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm import tqdm


class Progress:
    """One session of `Trainer.train`; a resumed run starts a new one whose clock continues the saved elapsed time."""

    def __init__(self, max_steps: int, step: int, elapsed: float, show: bool) -> None:
        self.bar = tqdm(total=max_steps, initial=step, disable=not show or None, unit="step", dynamic_ncols=True)
        now = time.perf_counter()
        self.t_log, self.session_start = now, now - elapsed
        self.steps = 0  # since the last log line
        self.rates: list[float] = []  # tokens/s of each logged interval

    def step(self) -> None:
        self.steps += 1
        self.bar.update(1)

    def lap(self, tokens_per_step: int) -> tuple[float, float]:
        """(tokens/s since the last log line, seconds since the run began); the rate joins the run's median."""
        now = time.perf_counter()
        rate = self.steps * tokens_per_step / (now - self.t_log)
        self.rates.append(rate)
        self.t_log, self.steps = now, 0
        return rate, now - self.session_start

    def elapsed(self) -> float:
        return time.perf_counter() - self.session_start

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpoints) is not training throughput."""
        t0 = time.perf_counter()
        yield
        self.t_log += time.perf_counter() - t0

    def median_rate(self) -> float:
        return float(np.median(self.rates)) if self.rates else 0.0

    def show_loss(self, loss: float, rate: float, mfu: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", mfu=f"{mfu:.1%}", refresh=False)

    def show_eval(self, step: int, ev: dict[str, Any], stopped: bool) -> None:
        """One line of losses above the bar (the sample, if any, indented below it)."""
        msg = f"step {step}: train {ev['train_eval_loss']:.4f}" if "train_eval_loss" in ev else f"step {step}:"
        if "val_accuracy" in ev:  # a task's held-out answers (reason/grpo.py)
            msg += f" held-out accuracy {ev['val_accuracy']:.1%}, {ev['val_completion_tokens']:.0f} tokens an answer"
        elif "val_ppl" in ev:  # a language-model loss
            msg += (
                f" val {ev['val_loss']:.4f} (ppl {ev['val_ppl']:.1f}, {ev['val_bpb']:.3f} bits/byte, "
                f"gap {ev['gap']:+.4f})"
            )
        elif "val_reward_accuracy" in ev:  # a preference loss (dpo.py)
            accuracy, margin = ev["val_reward_accuracy"], ev["val_margin"]
            msg += f" val {ev['val_loss']:.4f} (reward accuracy {accuracy:.1%}, margin {margin:+.3f})"
        self.bar.write(msg + ("  [early stop]" if stopped else ""))
        if "sample" in ev:
            self.bar.write("  | " + ev["sample"].replace("\n", "\n  | "))

    def close(self) -> None:
        self.bar.close()
