"""The simple generation loop: one sequence, a contiguous KV cache, incremental detokenization, stops.

Prefill runs the whole prompt in one forward (compute-bound); decode then feeds one token at a time
(memory-bound: every step reads all the weights). The continuous-batching engine replaces this loop
for many sequences; this one stays the readable reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainfer.errors import TrainferError
from trainfer.infer.sampling import SamplingParams, sample
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.transformer import Transformer


class KVCache:
    """Keys and values of one batch of sequences, preallocated up to max_len, shared by all layers."""

    def __init__(self, model: Transformer, max_len: int, batch: int = 1) -> None:
        cfg = model.cfg
        p = model.embed_tokens.weight
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)  # (L, B, KV, S, hd)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.max_len = max_len
        self.length = 0  # tokens already stored; the caller advances it after each forward

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T, start = q.shape[1], self.length
        end = start + T
        if end > self.max_len:
            raise TrainferError(f"KV cache holds {self.max_len} tokens; {end} needed")
        self.k[layer, :, :, start:end] = k.transpose(1, 2)
        self.v[layer, :, :, start:end] = v.transpose(1, 2)
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, KV, end, hd)
        mask = None
        if T > 1 and start > 0:  # a chunk after cached tokens: query i sees keys up to start + i
            mask = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=T > 1 and start == 0, enable_gqa=True
        )  # (B, H, T, hd)
        return y.transpose(1, 2)


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
    """Finds stop strings in streamed text, even split across tokens, and never emits any part of one."""

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
        # Hold back the longest tail that could still grow into a stop string.
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class TokenEvent:
    """One generated token, the text it released, and the finish reason on the last one."""

    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the last event


@torch.inference_mode()
def generate_stream(
    model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams
) -> Iterator[TokenEvent]:
    ctx_len = model.cfg.max_seq_len
    if not prompt_ids:
        raise TrainferError("the prompt is empty: give at least one token")
    if len(prompt_ids) >= ctx_len:
        raise TrainferError(f"prompt has {len(prompt_ids)} tokens; the model's context is {ctx_len}")
    budget = min(params.max_tokens, ctx_len - len(prompt_ids))
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else tokenizer.stop_token_ids)
    gen = params.generator()
    device = model.embed_tokens.weight.device
    cache = KVCache(model, len(prompt_ids) + budget)
    detok, stops = Detokenizer(tokenizer), StopMatcher(params.stop)
    tokens = torch.tensor([prompt_ids], device=device)
    for step in range(budget):
        positions = torch.arange(cache.length, cache.length + tokens.shape[1], device=device).unsqueeze(0)
        hidden = model.hidden_states(tokens, positions, cache)[:, -1]  # only the last position needs logits
        cache.length += tokens.shape[1]
        token = sample(model.lm_head(hidden)[0], params, gen)
        if token in stop_ids:
            yield TokenEvent(token, stops.flush(), "stop")
            return
        text, hit = stops.push(detok.add(token))
        if hit:
            yield TokenEvent(token, text, "stop")
            return
        if step == budget - 1:
            yield TokenEvent(token, text + stops.flush(), "length")
            return
        yield TokenEvent(token, text)
        tokens = torch.tensor([[token]], device=device)
