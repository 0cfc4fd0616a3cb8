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

from trainfer.cost.estimate import project
from trainfer.cost.hardware import PriceTable
from trainfer.errors import TrainferError

SERVE_BELOW, FINETUNE_BELOW = 1.15, 2.0


@dataclass
class Advice:
    verdict: str  # "serve" | "fine-tune" | "pretrain"
    user_bpb: float
    reference_bpb: float
    ratio: float
    user_tokens: int
    step_tokens_per_s: float  # measured training speed of this model on this machine
    finetune_hours_here: float
    finetune_dollars_here: float
    pretrain_flops: float
    pretrain: list[tuple[str, float, float]]  # (hardware, hours, dollars)
    reasons: list[str]


def choose(ratio: float) -> str:
    return "serve" if ratio <= SERVE_BELOW else "fine-tune" if ratio <= FINETUNE_BELOW else "pretrain"


def bits_per_byte(model, ids: list[int], n_bytes: int, window: int) -> float:
    """The mean next-token loss over the text (quant/quality.score's windows), in bits per byte of it."""
    from trainfer.quant.quality import score

    nll, _ = score(model, ids, window)
    return nll * (len(ids) - 1) / math.log(2) / n_bytes


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
    from trainfer.data.sources import load_corpus
    from trainfer.quant.checkpoint import load
    from trainfer.quant.quality import held_out_ids

    model, tok = load(model_name, "float32")
    if tok is None:
        raise TrainferError(f"{model_name} has no tokenizer")
    text = "\n\n".join(d.text for d in load_corpus(data))
    ids = tok.encode(text, add_bos=False)
    if len(ids) < 64:
        raise TrainferError(f"{', '.join(data)} holds only {len(ids)} tokens; give at least 64 to judge by")
    user_tokens = len(ids)
    scored = ids[:max_tokens]
    user_bytes = len(tok.decode(scored).encode())
    ref = held_out_ids(tok, "shakespeare", min(max_tokens, len(scored)))
    ref_bytes = len(tok.decode(ref).encode())
    window = min(window, model.cfg.max_seq_len - 1)
    user_bpb = bits_per_byte(model, scored, user_bytes, window)
    ref_bpb = bits_per_byte(model, ref, ref_bytes, window)
    ratio = user_bpb / ref_bpb
    rate = training_tokens_per_s(model, scored)
    here = table.get(hardware)
    ft_hours = user_tokens * epochs / rate / 3600
    pre_flops = 6 * model.cfg.n_params * 20 * model.cfg.n_params
    gpus = [project(pre_flops, hw, mfu) for hw in table.rows.values() if hw.peak_dtype != "fp32"]
    verdict = choose(ratio)
    reasons = [
        f"{model_name} predicts your text at {user_bpb:.3f} bits per byte vs {ref_bpb:.3f} on held-out Shakespeare "
        f"(ratio {ratio:.2f}; {len(scored):,} of your {user_tokens:,} tokens scored)",
        f"thresholds: <= {SERVE_BELOW} serve as is, <= {FINETUNE_BELOW} fine-tune, above: pretrain (judgment calls)",
        f"fine-tuning {epochs} epochs of your {user_tokens:,} tokens: a training step of this model runs "
        f"{rate:,.0f} tokens/s here (measured just now) -> {ft_hours:.3g} h on {here.name}, "
        f"${ft_hours * here.price_per_hour:.4g}",
        f"pretraining a model this size compute-optimally (20 tokens per parameter, {pre_flops:.3g} FLOPs, "
        f"{mfu:.0%} MFU assumed): " + ", ".join(f"{p.hardware} {p.hours:.3g} h ${p.dollars:,.0f}" for p in gpus),
    ]
    reasons.append(
        {
            "serve": "verdict: serve the model as it is; spend on prompts or retrieval, not training",
            "fine-tune": "verdict: fine-tune on your data; pretraining would cost far more for a gap this size",
            "pretrain": "verdict: the model barely reads this text; pretrain (or pick a base model that covers it)",
        }[verdict]
    )
    return Advice(verdict, user_bpb, ref_bpb, ratio, user_tokens, rate, ft_hours, ft_hours * here.price_per_hour,
                  pre_flops, [(p.hardware, p.hours, p.dollars) for p in gpus], reasons)  # fmt: skip
