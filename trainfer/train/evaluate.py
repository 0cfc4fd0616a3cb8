"""Validation: loss / perplexity / bits per byte on token shards, samples, and the memorization probe.

    trainfer eval runs/shakespeare --data data/shakespeare

The probe prompts with the first tokens of N training passages and N held-out passages and counts exact
greedy continuations: a model that memorized its training text continues those and not the held-out ones.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainfer.data.prepare import read_shard
from trainfer.errors import TrainferError
from trainfer.infer.engine import Engine
from trainfer.infer.sampling import SamplingParams
from trainfer.infer.sampling import sample as sample_token
from trainfer.io.loader import load
from trainfer.io.tokenizer import Tokenizer
from trainfer.llm import LLM
from trainfer.model.transformer import Transformer
from trainfer.train import chat_data


def windows(data: np.ndarray, starts: np.ndarray, seq_len: int, device: torch.device | str = "cpu"):
    """Inputs and next-token targets (B, seq_len) for windows beginning at `starts`."""
    idx = starts[:, None] + np.arange(seq_len + 1)
    chunk = torch.from_numpy(data[idx].astype(np.int64)).to(device)  # (B, seq_len + 1)
    return chunk[:, :-1], chunk[:, 1:]


def spread_starts(n_tokens: int, seq_len: int, count: int) -> np.ndarray:
    """`count` window starts spread evenly over a split (fixed, so every evaluation sees the same text)."""
    last = n_tokens - seq_len - 1
    if last < 0:
        raise TrainferError(f"the split has {n_tokens} tokens, fewer than one window of {seq_len + 1}; lower seq_len")
    count = min(count, last + 1)
    return np.linspace(0, last, count).round().astype(np.int64)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (logits may be bf16 under autocast)."""
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    data: np.ndarray,
    seq_len: int,
    batch_size: int,
    n_windows: int,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
) -> float:
    """Mean loss (nats per token) over n_windows fixed windows of the split."""
    starts = spread_starts(len(data), seq_len, n_windows)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = windows(data, starts[i : i + batch_size], seq_len, device)
        with autocast or contextlib.nullcontext():
            total += lm_loss(model, x, y).item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Tokenizer-independent: nats per token -> bits per byte of text."""
    return loss_nats / math.log(2) / bytes_per_token


def loss_record(step: int, train_loss: float, val_loss: float | None, bytes_per_token: float | None) -> dict[str, Any]:
    """An evaluation's metrics.jsonl fields: the held-out loss also as perplexity, as bits per byte (comparable
    across tokenizers) and as its gap over the training loss (overfitting shows there first)."""
    out: dict[str, Any] = {"step": step, "train_eval_loss": train_loss}
    if val_loss is not None:
        out.update(
            val_loss=val_loss,
            val_ppl=math.exp(min(val_loss, 50)),
            val_bpb=bits_per_byte(val_loss, bytes_per_token),
            gap=val_loss - train_loss,
        )
    return out


def bytes_per_token(data_dir: Path, split: str, tokenizer: Tokenizer) -> float:
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    tokens = meta[f"{split}_tokens"]
    n_bytes = meta.get(f"{split}_bytes")
    if n_bytes is None:  # directories from before meta.json recorded it: decode the split once
        n_bytes = len(tokenizer.decode(read_shard(data_dir, split).tolist(), skip_special_tokens=True).encode())
    return n_bytes / max(1, tokens)


@torch.no_grad()
def decode_without_cache(
    model: Transformer,
    ids: list[int],
    max_tokens: int,
    params: SamplingParams,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
) -> list[int]:
    """Token by token by full forwards, no KV cache: the one decoder for a model mid-training, which the
    engine must not be handed (its runner fuses weights in place). It stops early at `stop_ids`; with none,
    it always runs max_tokens forwards, as every FSDP rank must. Leaves the global RNG untouched."""
    gen = params.generator()
    was_training = model.training
    model.eval()
    out: list[int] = []
    context = model.cfg.max_seq_len
    for _ in range(max_tokens):
        x = torch.tensor([(ids + out)[-context:]], device=device)
        with autocast or contextlib.nullcontext():
            logits = model(x)[0, -1]
        token = sample_token(logits.float().cpu(), params, gen)
        if token in stop_ids:
            break
        out.append(token)
    model.train(was_training)
    return out


def sample(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str = "",
    max_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> str:
    """A seeded sample of a model in training (cut at end-of-text afterwards: see decode_without_cache)."""
    ids = tokenizer.encode(prompt, add_bos=False) if prompt else []
    if not ids:
        ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0]  # start of a document
    params = SamplingParams(temperature=temperature, top_k=top_k, seed=seed)
    out = decode_without_cache(model, ids, max_tokens, params, device)
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    return prompt + tokenizer.decode(out, skip_special_tokens=True)


@dataclass
class ProbeResult:
    train_exact: float  # share of training passages continued exactly
    val_exact: float
    train_token_match: float  # share of continuation tokens matching, position by position
    val_token_match: float
    passages: int
    prefix_tokens: int
    continuation_tokens: int

    @property
    def gap(self) -> float:
        """Memorization signal: how much better the model continues text it trained on."""
        return self.train_exact - self.val_exact


def _passages(data: np.ndarray, n: int, length: int, seed: int) -> list[list[int]]:
    if len(data) < length + 1:
        raise TrainferError(f"a split of {len(data)} tokens is too short for probe passages of {length}")
    rng = np.random.default_rng(seed)
    starts = rng.choice(len(data) - length, size=min(n, len(data) - length), replace=False)
    return [data[s : s + length].astype(np.int64).tolist() for s in sorted(starts)]


def memorization_probe(
    model: Transformer,
    train: np.ndarray,
    val: np.ndarray,
    passages: int = 32,
    prefix_tokens: int = 32,
    continuation_tokens: int = 32,
    seed: int = 0,
) -> ProbeResult:
    """Greedy continuations of training vs held-out passages, decoded together on the inference engine."""

    length = prefix_tokens + continuation_tokens
    groups = [_passages(train, passages, length, seed), _passages(val, passages, length, seed + 1)]
    engine = Engine(model, max_num_seqs=min(64, passages), kv_cache_gb=0.25)
    params = SamplingParams(max_tokens=continuation_tokens, temperature=0.0, ignore_eos=True)
    results = []
    for group in groups:
        got = engine.run([p[:prefix_tokens] for p in group], params)
        exact = token = 0.0
        for p, r in zip(group, got, strict=True):
            want, out = p[prefix_tokens:], [e.token_id for e in r[0]]
            exact += out == want
            token += sum(a == b for a, b in zip(out, want, strict=False)) / continuation_tokens
        results.append((exact / len(group), token / len(group)))
    (te, tt), (ve, vt) = results
    return ProbeResult(te, ve, tt, vt, len(groups[0]), prefix_tokens, continuation_tokens)


def probe_fields(model: Transformer, train: np.ndarray, val: np.ndarray, passages: int) -> dict[str, float]:
    """The probe on a model being trained, as metrics.jsonl fields: run in eval mode (the engine leaves its
    modules alone), then put back; a split too short for the passages logs nothing rather than ending the run."""
    was_training = model.training
    model.eval()
    try:
        p = memorization_probe(model, train, val, passages)
    except TrainferError:
        return {}
    finally:
        model.train(was_training)
    return {
        "probe_train_exact": p.train_exact,
        "probe_val_exact": p.val_exact,
        "probe_train_match": p.train_token_match,
        "probe_val_match": p.val_token_match,
    }


@dataclass
class EvalReport:
    model: str
    data: str
    val_loss: float
    val_ppl: float
    val_bpb: float
    train_loss: float
    tokens: int  # per split
    probe: ProbeResult | None

    def summary(self) -> str:
        lines = [
            f"held-out: loss {self.val_loss:.4f}  perplexity {self.val_ppl:.2f}  {self.val_bpb:.3f} bits/byte",
            f"training: loss {self.train_loss:.4f}  (gap val - train {self.val_loss - self.train_loss:+.4f})",
        ]
        if self.probe:
            p = self.probe
            lines.append(
                f"memorization probe ({p.passages} passages each, {p.prefix_tokens}-token prefix, "
                f"{p.continuation_tokens}-token continuation): exact {p.train_exact:.1%} train vs {p.val_exact:.1%} "
                f"held-out (gap {p.gap:+.1%}); tokens matching {p.train_token_match:.1%} vs {p.val_token_match:.1%}"
            )
        return "\n".join(lines)


def evaluate_model(
    model_path: str,
    data_dir: str | Path,
    max_tokens: int = 32768,
    seq_len: int | None = None,
    batch_size: int = 8,
    passages: int = 32,
    prefix_tokens: int = 32,
    continuation_tokens: int = 32,
    dtype: str = "float32",
) -> EvalReport:
    """Loss, perplexity and bits per byte on both splits, plus the memorization probe (passages=0: skip)."""

    data_dir = Path(data_dir)
    if not (data_dir / "meta.json").exists():
        raise TrainferError(f"{data_dir} is not a prepared data directory (no meta.json); run trainfer prepare")
    for name, value, least in [
        ("max tokens", max_tokens, 2), ("seq len", seq_len or 1, 1), ("passages", passages, 0),
        ("prefix tokens", prefix_tokens, 1), ("continuation tokens", continuation_tokens, 1),
        ("batch size", batch_size, 1),
    ]:  # fmt: skip
        if value < least:
            raise TrainferError(f"{name} must be at least {least}, got {value}")
    model, tok = load(model_path, dtype)
    data_tok = Tokenizer.from_dir(data_dir)
    if tok is None or tok.backend.get_vocab() != data_tok.backend.get_vocab():
        raise TrainferError(
            f"{data_dir} was tokenized with another tokenizer than {model_path}'s; "
            f"prepare it with --tokenizer {model_path}"
        )
    train, val = read_shard(data_dir, "train"), read_shard(data_dir, "val")
    if min(len(train), len(val)) < 2:
        raise TrainferError(f"{data_dir} needs a training and a validation split of 2 tokens or more")
    seq_len = min(seq_len or 256, model.cfg.max_seq_len, len(val) - 1, len(train) - 1)
    n = max(1, max_tokens // seq_len)
    val_loss = evaluate_loss(model, val, seq_len, batch_size, n)
    train_loss = evaluate_loss(model, train, seq_len, batch_size, n)
    probe = None
    if passages:
        probe = memorization_probe(model, train, val, passages, prefix_tokens, continuation_tokens)
    return EvalReport(
        str(model_path),
        str(data_dir),
        val_loss,
        math.exp(min(val_loss, 50)),
        bits_per_byte(val_loss, bytes_per_token(data_dir, "val", tok)),
        train_loss,
        min(n, len(spread_starts(len(val), seq_len, n))) * seq_len,
        probe,
    )


@dataclass
class ChatEvalReport:
    model: str
    data: str
    examples: int
    targets: int  # assistant tokens scored
    loss: float  # nats per assistant token
    fact_rate: float | None  # share of greedy answers containing the expected text (or the reference answer)
    equal_rate: float | None  # share equal to the reference answer (whitespace and case folded)
    samples: list[dict]  # question, expected, answer, right: misses first

    def summary(self) -> str:
        lines = [
            f"{self.examples} conversations, {self.targets:,} assistant tokens: loss {self.loss:.4f} nats/token "
            f"(perplexity {math.exp(min(self.loss, 50)):.2f})"
        ]
        if self.fact_rate is not None:
            lines.append(
                f"greedy answers: {self.fact_rate:.1%} contain the expected answer, {self.equal_rate:.1%} equal it"
            )
            for s in self.samples:
                mark = "right" if s["right"] else "MISS"
                lines.append(
                    f"  {mark} Q: {s['question']}\n     expected: {s['expected']}\n     answered: {s['answer']}"
                )
        return "\n".join(lines)


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def evaluate_chat(
    model_path: str,
    data: str | Path,
    exact: bool = False,
    dtype: str = "float32",
    batch_size: int = 8,
    seq_len: int = 1024,
    max_new_tokens: int = 64,
    samples: int = 3,
) -> ChatEvalReport:
    """Assistant-token loss on held-out conversations, and with `exact` the greedy answer to each one's last
    user turn checked against its reference (or the line's "expected" text): base vs tuned on the same set."""

    llm = LLM.load(model_path, dtype)
    records = chat_data.read_jsonl(data)
    examples = [chat_data.render(r, llm.tokenizer, where) for where, r in records]
    pad = llm.tokenizer.eos_token_id if llm.tokenizer.eos_token_id is not None else 0
    packed = chat_data.pack(examples, min(seq_len, llm.model.cfg.max_seq_len), pad, seed=None)
    loss, count = chat_data.packed_loss(llm.model, packed, batch_size)
    fact = equal = None
    shown: list[dict[str, str]] = []
    if exact:
        prompts, refs, wants, questions = [], [], [], []
        for _, r in records:
            if "messages" in r:
                msgs = r["messages"]
                last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
                prompts.append(llm.chat_prompt([{"role": m["role"], "content": m["content"]} for m in msgs[:last]]))
                refs.append(msgs[last]["content"])
                questions.append(next((m["content"] for m in reversed(msgs[:last]) if m["role"] == "user"), ""))
            else:
                prompts.append(llm.tokenizer.encode(r["prompt"]))
                refs.append(r["completion"])
                questions.append(r["prompt"])
            expected = r.get("expected", refs[-1])
            wants.append([expected] if isinstance(expected, str) else list(expected))
        done = llm.complete(prompts, max_tokens=max_new_tokens, temperature=0.0)
        hits = [all(_fold(w) in _fold(d.text) for w in want) for d, want in zip(done, wants, strict=True)]
        same = [_fold(d.text) == _fold(ref) for d, ref in zip(done, refs, strict=True)]
        fact, equal = sum(hits) / len(hits), sum(same) / len(same)
        rows = [
            {"question": q, "expected": " / ".join(w), "answer": d.text.strip(), "right": hit}
            for q, w, d, hit in zip(questions, wants, done, hits, strict=True)
        ]
        shown = sorted(rows, key=lambda row: row["right"])[:samples]  # misses first: what a user needs to see
    return ChatEvalReport(str(model_path), str(data), len(records), count, loss, fact, equal, shown)
