"""`trainfer cost advise`: the seed's "Do you need to train your own model?", checked on the user's own text.

The check: how well does the base model already predict the user's text, in bits per byte (tokenizer-
independent), next to how well it predicts general held-out text (the Shakespeare plays `trainfer prepare`
holds out)? The thresholds are judgment calls, stated in the output:

    ratio <= 1.15   the model knows this kind of text: serve it (prompting, retrieval)
    ratio <= 2.0    a domain or style gap: fine-tune it on the user's data (cost below)
    ratio >  2.0    text the model barely models (a new language, notation or domain): pretrain (cost below)

Costs come from a training step of this model measured here (forward + backward on the user's tokens), the
user's token count, and the price table; pretraining is sized at 20 tokens per parameter (Chinchilla's
compute-optimal ratio) on the table's GPU rows at an assumed MFU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainfer.compress.quality import held_out_ids, score
from trainfer.cost.estimate import project
from trainfer.cost.hardware import PriceTable
from trainfer.data.sources import load_corpus
from trainfer.errors import TrainferError
from trainfer.io.loader import load
from trainfer.train import chat_data, evaluate
from trainfer.train.evaluate import evaluate_chat

SERVE_BELOW, FINETUNE_BELOW = 1.15, 2.0


@dataclass
class Advice:
    verdict: str  # "serve" | "fine-tune" | "pretrain"
    user_bpb: float | None  # None: too little text to score
    reference_bpb: float | None
    ratio: float | None
    user_tokens: int
    step_tokens_per_s: float  # measured training speed of this model on this machine
    finetune_hours_here: float
    finetune_dollars_here: float
    pretrain_flops: float
    pretrain: list[tuple[str, float, float]]  # (hardware, hours, dollars)
    reasons: list[str]
    answer_rate: float | None = None  # advise_chat: share of eval answers right (greedy)
    target: float | None = None


def choose(ratio: float) -> str:
    return "serve" if ratio <= SERVE_BELOW else "fine-tune" if ratio <= FINETUNE_BELOW else "pretrain"


def bits_per_byte(model, ids: list[int], n_bytes: int, window: int) -> float:
    """The mean next-token loss over the text (compress/quality.score's windows), in bits per byte of it."""

    nll, _ = score(model, ids, window)
    return evaluate.bits_per_byte(nll, n_bytes / (len(ids) - 1))


def training_tokens_per_s(model, ids: list[int], seq_len: int = 256) -> float:
    """One optimizer-free training step (forward + backward) of the model on the user's tokens, timed."""
    x = torch.tensor(ids[: seq_len + 1])[None]
    model.train()
    try:
        times = []
        for _ in range(2):  # the first step pays for allocation
            start = time.perf_counter()
            logits = model(x[:, :-1])
            F.cross_entropy(logits.float().view(-1, logits.size(-1)), x[0, 1:]).backward()
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    finally:
        model.eval()
    return (x.shape[1] - 1) / times[-1]


def advise(model_name: str, data: list[str], table: PriceTable, hardware: str = "cpu-2vcpu", epochs: int = 3,
           max_tokens: int = 8192, window: int = 512, mfu: float = 0.4) -> Advice:  # fmt: skip

    model, tok = load_model(model_name)
    text = "\n\n".join(d.text for d in load_corpus(data))
    ids = tok.encode(text, add_bos=False)
    if len(ids) < 64:
        raise TrainferError(f"{', '.join(data)} holds only {len(ids)} tokens; give at least 64 to judge by")
    user_bpb, ref_bpb, scored = text_gap(model, tok, ids, max_tokens, window)
    ratio = user_bpb / ref_bpb
    verdict = choose(ratio)
    reasons = [
        f"{model_name} predicts your text at {user_bpb:.3f} bits per byte vs {ref_bpb:.3f} on held-out Shakespeare "
        f"(ratio {ratio:.2f}; {scored:,} of your {len(ids):,} tokens scored)",
        f"thresholds: <= {SERVE_BELOW} serve as is, <= {FINETUNE_BELOW} fine-tune, above: pretrain (judgment calls)",
    ]
    return costed(Advice(verdict, user_bpb, ref_bpb, ratio, len(ids), 0, 0, 0, 0, [], reasons), model, model_name,
                  ids, table, hardware, epochs, mfu)  # fmt: skip


def load_model(model_name: str):

    model, tok = load(model_name, "float32")
    if tok is None:
        raise TrainferError(f"{model_name} has no tokenizer")
    return model, tok


def text_gap(model, tok, ids: list[int], max_tokens: int, window: int) -> tuple[float, float, int]:
    """Bits per byte of the model on the user's tokens and on as many held-out Shakespeare tokens."""

    scored = ids[:max_tokens]
    ref = held_out_ids(tok, "shakespeare", min(max_tokens, len(scored)))
    window = min(window, model.cfg.max_seq_len - 1)
    user_bpb = bits_per_byte(model, scored, len(tok.decode(scored).encode()), window)
    return user_bpb, bits_per_byte(model, ref, len(tok.decode(ref).encode()), window), len(scored)


def costed(advice: Advice, model, model_name: str, ids: list[int], table: PriceTable, hardware: str, epochs: int,
           mfu: float) -> Advice:  # fmt: skip
    """Fill in what each way costs (fine-tuning from a training step measured now on `ids`, pretraining
    projected on the table's GPUs) and end the reasons with the verdict."""
    rate = training_tokens_per_s(model, ids)
    here = table.get(hardware)
    ft_hours = advice.user_tokens * epochs / rate / 3600
    pre_flops = 6 * model.cfg.n_params * 20 * model.cfg.n_params
    gpus = [project(pre_flops, hw, mfu) for hw in table.rows.values() if hw.peak_dtype != "fp32"]
    advice.step_tokens_per_s, advice.finetune_hours_here = rate, ft_hours
    advice.finetune_dollars_here = ft_hours * here.price_per_hour
    advice.pretrain_flops, advice.pretrain = pre_flops, [(p.hardware, p.hours, p.dollars) for p in gpus]
    advice.reasons += [
        f"fine-tuning {epochs} epochs of your {advice.user_tokens:,} tokens: a training step of this model runs "
        f"{rate:,.0f} tokens/s here (measured just now) -> {ft_hours:.3g} h on {here.name}, "
        f"${ft_hours * here.price_per_hour:.4g}",
        f"pretraining a model this size compute-optimally (20 tokens per parameter, {pre_flops:.3g} FLOPs, "
        f"{mfu:.0%} MFU assumed): " + ", ".join(f"{p.hardware} {p.hours:.3g} h ${p.dollars:,.0f}" for p in gpus),
        {
            "serve": "verdict: serve the model as it is; spend on prompts or retrieval, not training",
            "fine-tune": "verdict: fine-tune on your data; pretraining would cost far more for a gap this size",
            "pretrain": "verdict: the model barely reads this text; pretrain (or pick a base model that covers it)",
        }[advice.verdict],
    ]
    return advice


def advise_chat(model_name: str, eval_data: str, table: PriceTable, train_data: str | None = None,
                target: float = 0.8, hardware: str = "cpu-2vcpu", epochs: int = 3, max_tokens: int = 8192,
                window: int = 512, mfu: float = 0.4, dtype: str = "float32") -> Advice:  # fmt: skip
    """The same question on the user's own eval set of conversations (`trainfer eval --chat-data --exact`): the
    base model's greedy answers are checked against the references. At least `target` of them right: serve it.
    Else the language gap decides: the reference answers read like text the model knows (ratio <= 2.0):
    fine-tune, costed on `train_data` (or the eval set when none is given); a wider gap: pretrain."""

    if not 0 < target <= 1:
        raise TrainferError(f"--target must be in (0, 1], got {target}")
    report = evaluate_chat(model_name, eval_data, exact=True, dtype=dtype)
    model, tok = load_model(model_name)
    records = chat_data.read_jsonl(eval_data)
    answers = [m["content"] for _, r in records
               for m in r.get("messages", [{"role": "assistant", "content": r.get("completion", "")}])
               if m["role"] == "assistant"]  # fmt: skip
    answer_ids = tok.encode("\n\n".join(answers), add_bos=False)
    if len(answer_ids) >= 64:
        user_bpb, ref_bpb, _ = text_gap(model, tok, answer_ids, max_tokens, window)
        ratio = user_bpb / ref_bpb
    else:  # too little text to judge the language by: the answers alone decide
        user_bpb = ref_bpb = ratio = None
    rate = report.fact_rate or 0.0
    verdict = "serve" if rate >= target else "pretrain" if (ratio or 0) > FINETUNE_BELOW else "fine-tune"
    source = train_data or eval_data
    train = chat_data.read_jsonl(train_data) if train_data else records
    rendered = [chat_data.render(r, tok, where) for where, r in train]
    ids = [t for ex in rendered for t in ex.tokens]
    reasons = [
        f"{model_name} answers {rate:.1%} of your {report.examples} held-out questions with the expected answer "
        f"(greedy; {report.equal_rate:.1%} equal the reference); the target is {target:.0%}",
        f"answer loss {report.loss:.3f} nats per assistant token (perplexity {math.exp(min(report.loss, 50)):.2f})",
        (f"the reference answers read at {user_bpb:.3f} bits per byte vs {ref_bpb:.3f} on held-out Shakespeare "
         f"(ratio {ratio:.2f}; above {FINETUNE_BELOW} means text the model barely reads: pretrain)")
        if ratio is not None else "too little answer text (< 64 tokens) to judge the language gap by",
        f"fine-tuning is costed on {source} ({len(rendered)} conversations, {len(ids):,} tokens)",
    ] + [f"  e.g. Q: {s['question']} | expected: {s['expected']} | answered: {s['answer'][:80]}"
         for s in report.samples]  # fmt: skip
    advice = Advice(verdict, user_bpb, ref_bpb, ratio, len(ids), 0, 0, 0, 0, [], reasons, rate, target)
    return costed(advice, model, model_name, ids, table, hardware, epochs, mfu)
