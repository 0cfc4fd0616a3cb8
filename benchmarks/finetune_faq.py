"""The customer-support fine-tune: SmolLM2-135M-Instruct learns a fictional company's FAQ (benchmarks/data/faq.json).

    .venv/bin/python benchmarks/finetune_faq.py --out /tmp/faq [--skip-full] [--skip-peer]

Per fact, three phrasings train and a fourth is held out. Measured, in one run on this machine:
- held-out-phrasing fact rate (the greedy answer contains the fact) for the base, LoRA and full fine-tunes;
- general perplexity on held-out Shakespeare (the model's tokenizer) before and after;
- wall time, tokens/s and MFU of each fine-tune, and the adapter's size;
- the peer: peft + transformers LoRA training steps on the same rows, tokens/s ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BASE = "smollm2-135m-instruct"


def write_sets(out: Path) -> tuple[Path, Path]:
    faq = json.loads((HERE / "data" / "faq.json").read_text())
    train, held = out / "faq-train.jsonl", out / "faq-heldout.jsonl"
    with open(train, "w") as ft, open(held, "w") as fh:
        for fact in faq["facts"]:
            for i, q in enumerate(fact["questions"]):
                messages = [
                    {"role": "system", "content": faq["system"]},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": fact["answer"]},
                ]
                line = json.dumps({"messages": messages, "expected": fact["key"]}) + "\n"
                (fh if i == len(fact["questions"]) - 1 else ft).write(line)
    return train, held


def general_ppl(model_path: str, positions: int = 4096) -> float:
    from trainfer.llm import LLM
    from trainfer.quant.quality import held_out_ids, score

    llm = LLM.load(model_path, num_blocks=2)
    ids = held_out_ids(llm.tokenizer, "shakespeare", positions + 1)
    return math.exp(score(llm.model, ids, 512)[0])


def tune(train: Path, held: Path, out: Path, lora: bool, settings: list[str]) -> dict:
    from trainfer.train.finetune import finetune, load_finetune_config

    cfg = load_finetune_config(
        None, settings, base_model=BASE, data=str(train), val_data=str(held), out_dir=str(out), lora=lora
    )
    start = time.perf_counter()
    r = finetune(cfg)
    return {
        "wall_s": time.perf_counter() - start,
        "train_s": r.train.elapsed_s,
        "steps": r.train.steps,
        "tokens_per_s": r.train.tokens_per_s,
        "mfu": r.train.mfu,
        "trainable": r.trainable,
        "val_loss_before": r.before["val_loss"] if r.before else None,
        "val_loss_after": r.train.val_loss,
        "checkpoint": str(r.train.best_checkpoint),
        "saved_mb": sum(f.stat().st_size for f in r.train.best_checkpoint.glob("*.safetensors")) / 1e6,
        "lr": cfg.lr,
    }


def peer_lora_tokens_per_s(train: Path, steps: int, batch: int, seq_len: int, lora_cfg: dict) -> float:
    """peft + transformers: the same LoRA (targets, rank) on the HF export, bf16 autocast, same row shape."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainfer.io.loader import export_hf

    hf_dir = Path(train).parent / "hf-base"
    if not (hf_dir / "config.json").exists():
        export_hf(BASE, hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**lora_cfg, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return batch * seq_len / sorted(times[1:])[len(times[1:]) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--lora-set", action="append", default=[], metavar="KEY=VALUE", help="extra LoRA settings")
    ap.add_argument("--full-set", action="append", default=[], metavar="KEY=VALUE", help="extra full settings")
    args = ap.parse_args()
    from trainfer.train.evaluate import evaluate_chat

    args.out.mkdir(parents=True, exist_ok=True)
    train, held = write_sets(args.out)
    common = [f"epochs={args.epochs}", "batch_size=2", "grad_accum=1", "eval_every=1000", "ckpt_every=1000"]
    results: dict = {"machine_flags": _flags(), "date": time.strftime("%Y-%m-%d")}
    base_eval = evaluate_chat(BASE, held, exact=True)
    results["base"] = {"fact_rate": base_eval.fact_rate, "loss": base_eval.loss, "general_ppl": general_ppl(BASE)}
    print("base:", results["base"], flush=True)
    runs = [] if args.skip_lora else [("lora", True, args.lora_lr, args.lora_set)]
    runs += [] if args.skip_full else [("full", False, args.full_lr, args.full_set)]
    for name, lora, lr, extra in runs:
        run_dir = args.out / name
        r = tune(train, held, run_dir, lora, [*common, f"lr={lr}", *extra])
        r["settings"] = [*common, f"lr={lr}", *extra]
        ev = evaluate_chat(str(run_dir), held, exact=True)
        r.update(fact_rate=ev.fact_rate, loss=ev.loss, general_ppl=general_ppl(str(run_dir)), samples=ev.samples)
        r["general_ppl_change"] = r["general_ppl"] / results["base"]["general_ppl"] - 1
        results[name] = r
        print(f"{name}:", {k: v for k, v in r.items() if k != "samples"}, flush=True)
    if not args.skip_peer and not args.skip_lora:
        from trainfer.train.lora import ATTENTION, MLP

        lora_cfg = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": list(ATTENTION + MLP)}
        peer = peer_lora_tokens_per_s(train, 4, 2, 512, lora_cfg)
        results["peer_peft_tokens_per_s"] = peer
        results["lora_vs_peft"] = results["lora"]["tokens_per_s"] / peer
        print(f"peft+transformers LoRA: {peer:,.0f} tokens/s; trainfer LoRA {results['lora_vs_peft']:.2f}x")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items()}, indent=2, default=str))
    return 0


def _flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0]
    keep = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in flags.split() if f in keep)


if __name__ == "__main__":
    sys.exit(main())
