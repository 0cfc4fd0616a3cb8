"""DPO after SFT on the fictional company's FAQ: does preferring the right answer over a fluent wrong one add
held-out facts over supervised fine-tuning alone?

    .venv/bin/python benchmarks/dpo_faq.py --out /tmp/dpo-faq [--seed 0]

The sets are finetune_faq.py's (three phrasings of each fact train, a fourth is dev, a fifth test). A pair is a
conversation's prompt with its right answer as chosen and the answer of the next fact in the file as rejected:
the same company's voice, the wrong fact. Two arms on SmolLM2-135M-Instruct, every setting at its default (none
was chosen on these splits):
  SFT      `trainfer finetune smollm2-135m-instruct --data faq-train.jsonl --out A --lora` (the README's command);
  SFT+DPO  `trainfer merge A --out A-merged`, then `trainfer dpo A-merged --data pairs-train.jsonl --val
           pairs-dev.jsonl --out B --lora`.
Both see the same questions and answers (DPO adds the wrong answers and more steps). Measured: the held-out fact
rate (the greedy answer contains the fact) on dev and test for the base, SFT and SFT+DPO, and DPO's held-out
reward accuracy and margin before and after. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_faq import BASE, write_sets  # noqa: E402

from trainfer.rounds import describe, environment  # noqa: E402
from trainfer.train.evaluate import evaluate_chat  # noqa: E402

TRAINFER = str(Path(sys.executable).parent / "trainfer")


def pairs(conversations: Path, out: Path) -> Path:
    """Each conversation's prompt, its answer (chosen) and the next fact's answer (rejected)."""
    records = [json.loads(line) for line in conversations.read_text().splitlines() if line.strip()]
    answers = list(dict.fromkeys(r["messages"][-1]["content"] for r in records))  # one per fact, in file order
    lines = []
    for r in records:
        right = r["messages"][-1]["content"]
        wrong = answers[(answers.index(right) + 1) % len(answers)]
        lines.append(json.dumps({"prompt": r["messages"][:-1], "chosen": right, "rejected": wrong}))
    out.write_text("\n".join(lines) + "\n")
    return out


def run(*args: str) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run([TRAINFER, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"trainfer {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(describe(env), flush=True)
    train, dev, test = write_sets(args.out)
    train_pairs, dev_pairs = pairs(train, args.out / "pairs-train.jsonl"), pairs(dev, args.out / "pairs-dev.jsonl")
    sft, merged, tuned = (
        args.out / f"sft-{args.seed}",
        args.out / f"sft-{args.seed}-merged",
        args.out / f"dpo-{args.seed}",
    )
    _, sft_s = run("finetune", BASE, "--data", str(train), "--out", str(sft), "--lora", "--seed", str(args.seed))
    run("merge", str(sft), "--out", str(merged))
    card, dpo_s = run("dpo", str(merged), "--data", str(train_pairs), "--val", str(dev_pairs), "--out", str(tuned),
                      "--lora", "--seed", str(args.seed))  # fmt: skip
    rows = {}
    for name, model in (("base", BASE), ("SFT", str(sft)), ("SFT+DPO", str(tuned))):
        rows[name] = {split: evaluate_chat(model, path, exact=True).fact_rate for split, path in
                      (("dev", dev), ("test", test))}  # fmt: skip
        print(f"{name:<8} dev {rows[name]['dev']:6.1%}  test {rows[name]['test']:6.1%}", flush=True)
    print(card.strip().splitlines()[-2] if card.strip() else "", flush=True)
    print(f"wall: SFT {sft_s:.0f} s, DPO {dpo_s:.0f} s")
    print(json.dumps({"environment": env, "seed": args.seed, "fact_rate": rows, "sft_s": sft_s, "dpo_s": dpo_s,
                      "dpo_card": card}))  # fmt: skip


if __name__ == "__main__":
    main()
