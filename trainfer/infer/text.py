"""Text out of token ids: incremental detokenization that never splits a UTF-8 character, and stop strings.

The engine works in token ids; `TextOutput`, the output processor handed to it, turns each sample's ids into
the text a user sees with these two.
"""

from __future__ import annotations

from trainfer.infer.sampling import SamplingParams
from trainfer.io.tokenizer import Tokenizer


class TextOutput:
    """The engine's output processor: owns each running sample's detokenizer and stop-string matcher, keyed
    by sequence id, from `start` to `end`. It decides text and stop strings only; the engine owns the rest."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.samples: dict[int, tuple[Detokenizer, StopMatcher]] = {}

    def start(self, key: int, params: SamplingParams) -> None:
        self.samples[key] = (Detokenizer(self.tokenizer), StopMatcher(params.stop))

    def token(self, key: int, token_id: int, finish_reason: str | None) -> tuple[str, str | None]:
        """The text `token_id` releases and the sample's finish reason: the engine's ("stop" for a stop token,
        which adds no text, or "length"), or "stop" when a stop string ends it here (its text is withheld)."""
        detok, stops = self.samples[key]
        if finish_reason == "stop":
            return stops.flush(), "stop"
        text, hit = stops.push(detok.add(token_id))
        if hit:
            return text, "stop"
        if finish_reason:
            text += stops.flush()
        return text, finish_reason

    def end(self, key: int) -> None:
        self.samples.pop(key, None)


class Detokenizer:
    """Turns a stream of token ids into text deltas, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were already turned into text
        self.read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(full) > len(done) and not full.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return full[len(done) :]
        return ""


class StopMatcher:
    """Finds stop strings in streamed text, even split across tokens, and never emits any part of one.

    Cost per token: O(len(pending) + sum of stop lengths) string work in C, where pending is the held-back
    tail (shorter than the longest stop) plus the new text; stop counts and lengths are bounded by
    SamplingParams.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was hit)."""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((self._held(s) for s in self.stops), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _held(self, stop: str) -> int:
        """Length of the longest tail of pending that is a proper prefix of stop (it may still grow into it)."""
        tail = self.pending[-(len(stop) - 1) :] if len(stop) > 1 else ""
        i = tail.find(stop[0])
        while i >= 0:  # the earliest start that matches is the longest tail
            if stop.startswith(tail[i:]):
                return len(tail) - i
            i = tail.find(stop[0], i + 1)
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
