"""The customer-support fine-tune: SmolLM2-135M-Instruct learns a fictional company's FAQ (benchmarks/data/faq.json).

    .venv/bin/python benchmarks/finetune_faq.py --out /tmp/faq [--skip-full] [--skip-peer]

    .venv/bin/python benchmarks/finetune_faq.py --out /tmp/faq --readme 0,1,2   # the README's command, as written

Per fact, three phrasings train, a fourth is the dev split (settings were chosen on it) and a fifth the test split
(never used for a choice). Measured, in one run on this machine:
- held-out-phrasing fact rate (the greedy answer contains the fact), dev and test, for the base and the fine-tunes;
- general perplexity on held-out Shakespeare (the model's tokenizer) before and after;
- wall time, tokens/s and MFU of each fine-tune, and the adapter's size;
- the peer: peft + transformers LoRA training steps on the same rows, tokens/s ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from trainfer.rounds import environment

HERE = Path(__file__).resolve().parent
BASE = "smollm2-135m-instruct"


def write_sets(out: Path) -> tuple[Path, Path, Path]:
    """train (three phrasings a fact), dev (the fourth: every setting so far was chosen on it) and test (a fifth,
    written after those choices and never used for one)."""
    faq = json.loads((HERE / "data" / "faq.json").read_text())
    paths = out / "faq-train.jsonl", out / "faq-dev.jsonl", out / "faq-test.jsonl"
    lines: list[list[str]] = [[], [], []]
    for fact in faq["facts"]:
        for i, q in enumerate([*fact["questions"], fact["test"]]):
            messages = [
                {"role": "system", "content": faq["system"]},
                {"role": "user", "content": q},
                {"role": "assistant", "content": fact["answer"]},
            ]
            lines[0 if i < 3 else i - 2].append(json.dumps({"messages": messages, "expected": fact["key"]}) + "\n")
    for path, text in zip(paths, lines, strict=True):
        path.write_text("".join(text))
    return paths


def readme_runs(train: Path, dev: Path, test: Path, out: Path, seeds: list[int], settings: list[str]) -> dict:
    """The README's command as written (`trainfer finetune smollm2-135m-instruct --data faq.jsonl --out DIR --lora`,
    every setting at its default), once per seed, each run scored on the dev and the test phrasings. `settings`
    (--set KEY=VALUE) make it another command: for choosing defaults on the dev split only."""
    import subprocess

    from trainfer.train.evaluate import evaluate_chat

    rows = []
    for seed in seeds:
        run_dir = out / "-".join(["readme", *settings, f"seed{seed}"])
        cmd = [str(Path(sys.executable).parent / "trainfer"), "finetune", BASE, "--data", str(train), "--out",
               str(run_dir), "--lora", "--seed", str(seed)]  # fmt: skip
        cmd += [arg for kv in settings for arg in ("--set", kv)]
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
        wall = time.perf_counter() - start
        plan = next(line for line in run.stdout.splitlines() if line.startswith("fine-tune:"))
        row = {"seed": seed, "wall_s": wall, "plan": plan,
               "dev": evaluate_chat(str(run_dir), dev, exact=True).fact_rate,
               # a run that is choosing settings never sees the test split
               "test": None if settings else evaluate_chat(str(run_dir), test, exact=True).fact_rate}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    for split in ("dev", "test") if not settings else ("dev",):
        rates = sorted(r[split] for r in rows)
        print(f"{split}: median {statistics.median(rates):.1%} (min {rates[0]:.1%}, max {rates[-1]:.1%}) over "
              f"{len(rates)} seeds")  # fmt: skip
    command = "trainfer finetune smollm2-135m-instruct --data faq-train.jsonl --out DIR --lora"
    return {"runs": rows, "command": " ".join([command, *(f"--set {kv}" for kv in settings)])}


def general_ppl(model_path: str, positions: int = 4096) -> float:
    from trainfer.compress.quality import held_out_ids, score
    from trainfer.llm import LLM

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


def tune_in_child(train: Path, held: Path, out: Path, lora: bool, settings: list[str]) -> dict:
    """tune() in a fresh process, so its peak resident memory is its own (ru_maxrss of the child)."""
    import resource
    import subprocess

    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from finetune_faq import tune; from pathlib import Path; "
        "print('RESULT ' + json.dumps(tune(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), "
        "sys.argv[5] == 'lora', sys.argv[6:])))"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    run = subprocess.run([sys.executable, "-c", code, str(HERE), str(train), str(held), str(out),
                          "lora" if lora else "full", *settings], capture_output=True, text=True)  # fmt: skip
    if run.returncode != 0:
        raise SystemExit(run.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    result["peak_rss_gb"] = peak / 2**20 if peak > before else None  # KiB on Linux; None: not above an earlier child
    return result


def step_speeds(train: Path, out: Path, rounds: int = 3, steps: int = 3) -> dict:
    """Same rows, same LoRA (r 16, alpha 32, all projections), bf16 autocast, alternating rounds: trainfer's
    training step vs peft + transformers' on the HF export (positions per second, median over steps)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainfer.io.loader import export_hf
    from trainfer.model.lora import ATTENTION, MLP
    from trainfer.train.finetune import FineTuner, load_finetune_config

    cfg = load_finetune_config(None, ["batch_size=2", "grad_accum=1", "lora_dropout=0.05"], base_model=BASE,
                               data=str(train), out_dir=str(out / "speed"), lora=True)  # fmt: skip
    ours = FineTuner(cfg)
    batch = ours.micro_batches(0)
    hf_dir = out / "hf-base"
    if not (hf_dir / "config.json").exists():
        export_hf(BASE, hf_dir)
    peer = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    lora_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(ATTENTION + MLP),
                          task_type="CAUSAL_LM")  # fmt: skip
    peer = get_peft_model(peer, lora_cfg).train()
    peer_opt = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-4)
    x = batch[0]["inputs"]
    labels = torch.where(batch[0]["loss"], batch[0]["targets"], -100)
    positions = x.numel()

    def our_step() -> None:
        with ours.autocast():
            loss = ours.micro_loss(batch[0], batch)
        loss.backward()
        ours.optimizer.step()
        ours.optimizer.zero_grad()

    def peer_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = peer(input_ids=x).logits  # labels are already the next tokens: no shift
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        peer_opt.step()
        peer_opt.zero_grad()

    times: dict[str, list[float]] = {"trainfer": [], "peft": []}
    for fn in (our_step, peer_step):  # warm-up: kernels, allocator
        fn()
    for _ in range(rounds):
        for name, fn in (("trainfer", our_step), ("peft", peer_step)):
            for _ in range(steps):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    rate = {k: positions / sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"trainfer_positions_per_s": rate["trainfer"], "peft_positions_per_s": rate["peft"],
            "ratio": rate["trainfer"] / rate["peft"], "positions_per_step": positions}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--skip-lora", action="store_true")
    ap.add_argument("--only-peer", action="store_true", help="just the LoRA step speed next to peft")
    ap.add_argument("--readme", metavar="SEEDS", help="only the README's command as written, per seed (0,1,2)")
    ap.add_argument("--readme-set", action="append", default=[], metavar="KEY=VALUE", help="--readme with a setting")
    ap.add_argument("--lora-set", action="append", default=[], metavar="KEY=VALUE", help="extra LoRA settings")
    ap.add_argument("--full-set", action="append", default=[], metavar="KEY=VALUE", help="extra full settings")
    args = ap.parse_args()
    from trainfer.train.evaluate import evaluate_chat

    args.out.mkdir(parents=True, exist_ok=True)
    train, held, test = write_sets(args.out)
    if args.readme:
        results = readme_runs(train, held, test, args.out, [int(x) for x in args.readme.split(",")], args.readme_set)
        results |= {"environment": environment()}
        splits = (("dev", held), ("test", test)) if not args.readme_set else (("dev", held),)
        results["base"] = {split: evaluate_chat(BASE, path, exact=True).fact_rate for split, path in splits}
        print("base:", results["base"])
        (args.out / "readme.json").write_text(json.dumps(results, indent=2))
        return 0
    if args.only_peer:
        print(json.dumps(step_speeds(train, args.out), indent=2))
        return 0
    common = [f"epochs={args.epochs}", "batch_size=2", "grad_accum=1", "eval_every=1000", "ckpt_every=1000"]
    results: dict = {"environment": environment()}
    base_eval = evaluate_chat(BASE, held, exact=True)
    results["base"] = {"fact_rate": base_eval.fact_rate, "loss": base_eval.loss, "general_ppl": general_ppl(BASE)}
    print("base:", results["base"], flush=True)
    runs = [] if args.skip_lora else [("lora", True, args.lora_lr, args.lora_set)]
    runs += [] if args.skip_full else [("full", False, args.full_lr, args.full_set)]
    for name, lora, lr, extra in runs:
        run_dir = args.out / name
        r = tune_in_child(train, held, run_dir, lora, [*common, f"lr={lr}", *extra])
        r["settings"] = [*common, f"lr={lr}", *extra]
        ev = evaluate_chat(str(run_dir), held, exact=True, samples=10_000)  # every answer, misses first
        r["test_fact_rate"] = evaluate_chat(str(run_dir), test, exact=True).fact_rate
        r.update(fact_rate=ev.fact_rate, loss=ev.loss, general_ppl=general_ppl(str(run_dir)), samples=ev.samples)
        r["general_ppl_change"] = r["general_ppl"] / results["base"]["general_ppl"] - 1
        results[name] = r
        print(f"{name}:", {k: v for k, v in r.items() if k != "samples"}, flush=True)
    if not args.skip_peer:
        results["speed"] = step_speeds(train, args.out)
        print("LoRA step, same rows:", results["speed"], flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
