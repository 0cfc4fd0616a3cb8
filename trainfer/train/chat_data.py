"""Fine-tuning data: JSONL conversations -> token ids with a loss mask on assistant tokens -> packed rows.

One line per example, either OpenAI's chat form or a prompt/completion pair:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "...", "weight": 1}]}
    {"prompt": "Q: ...\\nA:", "completion": " ..."}

Conversations are rendered with the model's own chat template; only assistant turns carry loss (an assistant
message with "weight": 0 is context only, as in OpenAI's format), each ending with the template's
end-of-turn token, which the model must learn to emit. A prompt/completion pair is raw text (what
`/v1/completions` sends): the completion and an end-of-text token carry loss.

Examples are packed several to a row; positions restart at 0 for each and a block-diagonal causal mask
keeps them from attending to each other, so a packed forward equals each example's own forward.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainfer.errors import TrainferError
from trainfer.io.tokenizer import Tokenizer

T = TypeVar("T")
ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 4 << 20  # one example larger than this is a mistake, not a conversation


@dataclass
class Example:
    tokens: list[int]
    loss: list[bool]  # loss[i]: token i is a target the model is trained to produce
    source: str  # file:line, for messages about it

    @property
    def n_targets(self) -> int:
        return sum(self.loss[1:])


def read_jsonl(path: str | Path, check=None) -> list[tuple[str, dict[str, Any]]]:
    """(file:line, record) for every non-blank line; a malformed line is an error naming it and why.
    check(record, where) raises on a record of the wrong shape (default: an example, `check_record`)."""
    path = Path(path)
    if not path.is_file():
        raise TrainferError(f"no such data file: {path}")
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            if len(raw) > MAX_LINE_BYTES:
                raise TrainferError(f"{where}: line of {len(raw):,} bytes exceeds {MAX_LINE_BYTES:,}")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TrainferError(f"{where}: not valid JSON ({e})") from None
            (check or check_record)(record, where)
            out.append((where, record))
    if not out:
        raise TrainferError(f"{path} holds no examples")
    return out


def check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise TrainferError(f"{where}: expected an object with 'messages' or 'prompt'/'completion'")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise TrainferError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise TrainferError(
                    f"{where}: message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': text}}, "
                    f"got {m!r:.120}"
                )
            if m.get("weight", 1) not in (0, 1):
                raise TrainferError(f"{where}: message {i} has weight {m['weight']!r}; use 0 or 1")
        if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
            raise TrainferError(f"{where}: no assistant message to learn from")
    elif "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            raise TrainferError(f"{where}: 'prompt' and 'completion' must both be text")
        if not record["completion"]:
            raise TrainferError(f"{where}: empty completion")
    else:
        raise TrainferError(f"{where}: expected 'messages' or 'prompt'/'completion', got keys {sorted(record)[:5]}")


def render(record: dict[str, Any], tokenizer: Tokenizer, where: str = "") -> Example:
    if "messages" in record:
        return render_chat(record["messages"], tokenizer, where)
    prompt = tokenizer.encode(record["prompt"])
    completion = tokenizer.encode(record["completion"], add_bos=False)
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tokens = prompt + completion + end
    return Example(tokens, [False] * len(prompt) + [True] * (len(completion) + len(end)), where)


def render_chat(messages: list[dict[str, Any]], tokenizer: Tokenizer, where: str = "") -> Example:
    """Render the whole conversation once, then mark the characters each trained assistant turn adds.

    Turn i's span is render(messages[:i+1]) minus render(messages[:i], generation prompt): the template itself
    says where the answer starts, whatever its markup. Tokens from there up to and including the first
    end-of-turn token are targets; what follows it (a newline) is template, not the model's to produce.
    """
    if not tokenizer.chat_template:
        raise TrainferError(
            f"{where}: this model has no chat template to render 'messages'; use prompt/completion pairs"
        )
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(clean, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or not m.get("weight", 1):
            continue
        head = tokenizer.apply_chat_template(clean[:i], add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(clean[: i + 1], add_generation_prompt=False)
        if not (text.startswith(upto) and upto.startswith(head)):
            raise TrainferError(
                f"{where}: the chat template does not render turn {i} as a prefix of the conversation "
                "(it rewrites earlier turns), so assistant tokens cannot be located"
            )
        spans.append((len(head), len(upto)))
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    tokens = list(enc.ids)
    loss = [False] * len(tokens)
    stops = tokenizer.stop_token_ids
    for lo, hi in spans:
        for j, (start, _) in enumerate(enc.offsets):
            if lo <= start < hi:
                loss[j] = True
                if tokens[j] in stops:
                    break
    if tokenizer.add_bos and tokenizer.bos_token_id is not None and tokens[:1] != [tokenizer.bos_token_id]:
        tokens, loss = [tokenizer.bos_token_id, *tokens], [False, *loss]
    return Example(tokens, loss, where)


def load_examples(path: str | Path, tokenizer: Tokenizer) -> list[Example]:
    examples = [render(rec, tokenizer, where) for where, rec in read_jsonl(path)]
    return [e for e in examples if e.n_targets]


def split(examples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded held-out share (at least one example each side when there are two or more); of examples, or of
    anything else held out the same way (dpo.py's pairs)."""
    if not 0 <= fraction < 1:
        raise TrainferError(f"val_fraction must be in [0, 1), got {fraction}")
    n_val = min(len(examples) - 1, max(1 if fraction and len(examples) > 1 else 0, round(len(examples) * fraction)))
    order = np.random.default_rng(seed).permutation(len(examples))
    val = sorted(order[:n_val].tolist())
    keep = set(val)
    return [e for i, e in enumerate(examples) if i not in keep], [examples[i] for i in val]


@dataclass
class Packed:
    """Rows of seq_len positions: inputs, next-token targets, which targets carry loss, positions, example ids."""

    inputs: np.ndarray  # (rows, T) int64
    targets: np.ndarray
    loss: np.ndarray  # bool
    positions: np.ndarray
    docs: np.ndarray  # example index per position, a unique negative id per padding position
    truncated: int  # examples cut to fit a row
    dropped: int  # examples with no target left after truncation

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def targets_total(self) -> int:
        return int(self.loss.sum())


def pack(examples: list[Example], seq_len: int, pad_id: int, seed: int | None = 0) -> Packed:
    """Greedy first-fit of (seeded-shuffled) examples into rows; an example longer than a row is truncated."""
    order = list(range(len(examples))) if seed is None else np.random.default_rng(seed).permutation(len(examples))
    rows: list[list[int]] = []  # example indices per row
    free: list[int] = []
    pieces: dict[int, tuple[list[int], list[bool]]] = {}
    truncated = dropped = 0
    for i in order:
        e = examples[int(i)]
        tokens, loss = e.tokens, e.loss
        if len(tokens) - 1 > seq_len:
            tokens, loss = tokens[: seq_len + 1], loss[: seq_len + 1]
            truncated += 1
            if not any(loss[1:]):
                dropped += 1
                continue
        pieces[int(i)] = (tokens, loss)
        need = len(tokens) - 1
        for r, room in enumerate(free):
            if room >= need:
                rows[r].append(int(i))
                free[r] -= need
                break
        else:
            rows.append([int(i)])
            free.append(seq_len - need)
    n = len(rows)
    inputs = np.full((n, seq_len), pad_id, np.int64)
    targets = np.full((n, seq_len), pad_id, np.int64)
    mask = np.zeros((n, seq_len), bool)
    positions = np.zeros((n, seq_len), np.int64)
    docs = -1 - np.tile(np.arange(seq_len), (n, 1))  # padding: each position alone
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            tokens, loss = pieces[i]
            k = len(tokens) - 1
            inputs[r, at : at + k] = tokens[:-1]
            targets[r, at : at + k] = tokens[1:]
            mask[r, at : at + k] = loss[1:]
            positions[r, at : at + k] = np.arange(k)
            docs[r, at : at + k] = i
            at += k
    return Packed(inputs, targets, mask, positions, docs, truncated, dropped)


class PackedAttention:
    """Causal attention within each packed example only (the model's AttentionContext for training)."""

    def __init__(self, docs: Tensor) -> None:
        T = docs.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
        self.mask = ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]  # (B, 1, T, T)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.mask, enable_gqa=True
        )
        return y.transpose(1, 2)


def batch_tensors(packed: Packed, rows: np.ndarray, device: torch.device | str) -> dict[str, Tensor]:
    """The chosen rows, cut after the last real position any of them uses (less work for short rows)."""
    used = packed.docs[rows] >= 0
    width = int(used.any(0).nonzero()[0].max()) + 1 if used.any() else 1
    take = {k: getattr(packed, k)[rows, :width] for k in ("inputs", "targets", "loss", "positions", "docs")}
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in take.items()}


@torch.no_grad()
def packed_loss(
    model: torch.nn.Module,
    packed: Packed,
    batch_size: int,
    device: torch.device | str = "cpu",
    rows: int | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[float, int]:
    """Mean loss per target over the first `rows` rows (all by default) and the number of targets scored."""
    n = len(packed) if rows is None else min(rows, len(packed))
    total, count = 0.0, 0
    for lo in range(0, n, batch_size):
        batch = batch_tensors(packed, np.arange(lo, min(n, lo + batch_size)), device)
        with autocast or contextlib.nullcontext():
            s, c = masked_loss_sum(model, batch)
        total, count = total + s.item(), count + c
    return total / max(1, count), count


def masked_loss_sum(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Summed cross-entropy over the loss-carrying targets; the LM head runs on those positions only."""
    raw = getattr(model, "module", model)  # DDP wraps the model; hidden_states lives on the module
    h = raw.hidden_states(batch["inputs"], batch["positions"], PackedAttention(batch["docs"]))
    sel = batch["loss"]
    logits = raw.lm_head(h[sel])  # (n, V)
    loss = F.cross_entropy(logits.float(), batch["targets"][sel], reduction="sum")
    return loss, int(sel.sum())


def bytes_per_target(packed: Packed, tokenizer: Tokenizer) -> float:
    """Text bytes per trained (assistant) token: what turns a chat loss into bits per byte."""
    ids = packed.targets[packed.loss].tolist()
    # text bytes only: an end-of-turn token is markup the model emits, not bytes of the answer
    return max(1, len(tokenizer.decode(ids, skip_special_tokens=True).encode())) / max(1, len(ids))
