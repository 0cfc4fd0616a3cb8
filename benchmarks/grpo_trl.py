"""GRPO step time: `trainfer grpo` against TRL's GRPOTrainer (transformers' generate for rollouts), same model, task
and settings, alternated in rounds.

    .venv/bin/python benchmarks/grpo_trl.py [--rounds 2] [--steps 4]

Both sides: SmolLM2-135M-Instruct (TRL reads the same GGUF through transformers), LoRA r 16 / alpha 32 / dropout
0.05 on every projection, lr 5e-4, 4 prompts x 8 samples a step (TRL: per-device batch 8, 4 accumulation steps,
num_generations 8, so one generation batch of 32 per optimizer step), up to 64 completion tokens at temperature 1,
loss "dapo", beta 0, bf16 autocast for the update where the CPU has it (TRL's default and trainfer's), 2 threads.
Rewards: the same checker (reason/grpo.task_reward) on the same problems, reasoning-gym's chain_sum with 2-3
one-digit terms. Each side runs `--steps` optimizer steps in its own process per round; a step's time is its
wall time (TRL: between its step-end callbacks; trainfer: rollout + rewards + update from metrics.jsonl), the first
step dropped as warm-up. Prints the median step time per side and round, the ratio (TRL / trainfer: above 1,
trainfer is faster), and one JSON line.

Since the two losses are the same function (tests/reason/test_grpo.py), the same number of steps moves both
policies alike in expectation; this measures the time per step, not the time to a reward (which needs the long
runs of benchmarks/grpo.py on both sides).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trainfer.rounds import alternate, describe, environment, ratio
from trainfer.train.metrics import read_metrics

TRAINFER = str(Path(sys.executable).parent / "trainfer")
TASK = "rg:chain_sum:min_terms=2,max_terms=3,min_digits=1,max_digits=1"

TRL_SIDE = r"""
import json, sys, time
import torch
torch.set_num_threads(2)
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trainfer import registry
from trainfer.io.hf import save_hf
from trainfer.io.loader import load_checkpoint
from trainfer.reason.grpo import Prompt, task_reward
from trainfer.reason.tasks import make

out, steps, task = sys.argv[1], int(sys.argv[2]), sys.argv[3]
path = registry.pull("smollm2-135m-instruct", quiet=True)
# transformers will not train a model it read from GGUF: the same fp32 weights as trainfer loads them, written
# as a Hugging Face directory
cfg, state, _ = load_checkpoint(path, torch.float32)
save_hf(f"{out}/hf", cfg, state, torch.float32)
tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
model = AutoModelForCausalLM.from_pretrained(f"{out}/hf", dtype=torch.float32)
problems = make(task, 64, 0)
by_question = {p.question: p for p in problems}
data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}]} for p in problems])

def reward(prompts, completions, **_):
    return [task_reward(Prompt([], "", by_question[p[-1]["content"]]), c[0]["content"])
            for p, c in zip(prompts, completions)]

class Clock(TrainerCallback):
    def __init__(self):
        self.times = [time.perf_counter()]
    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter())

args = GRPOConfig(output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=4, num_generations=8,
                  max_completion_length=64, temperature=1.0, learning_rate=5e-4, lr_scheduler_type="cosine",
                  warmup_steps=0, beta=0.0, loss_type="dapo", max_steps=steps, use_cpu=True, report_to=[],
                  save_strategy="no", logging_steps=1, seed=0)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
clock = Clock()
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                      peft_config=lora, callbacks=[clock])
clock.times = [time.perf_counter()]
trainer.train()
steps_s = [b - a for a, b in zip(clock.times, clock.times[1:])]
lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
print(json.dumps({"steps_s": steps_s, "completion_tokens": lengths}))
"""


def trl_side(steps: int, task: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", TRL_SIDE, out, str(steps), task], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"TRL's side failed:\n{done.stderr[-3000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "step_s": statistics.median(got["steps_s"][1:]),
        "completion_tokens": statistics.mean(got["completion_tokens"]),
    }


def trainfer_side(steps: int, task: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [TRAINFER, "grpo", "smollm2-135m-instruct", "--task", task, "--out", out, "--lora", "--seed", "0",
               "--set", f"max_steps={steps}", "--set", "eval_problems=0", "--set", "progress=false"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"trainfer's side failed:\n{done.stderr[-3000:]}")
        rec = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r.get("event") == "rollout"]
    times = [r["rollout_s"] + r["reward_s"] + r["update_s"] for r in rec]
    tokens = statistics.mean(r["completion_tokens"] for r in rec)
    return {"step_s": statistics.median(times[1:]), "completion_tokens": tokens,
            "rollout_share": statistics.mean(r["rollout_share"] for r in rec[1:])}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--task", default=TASK)
    args = ap.parse_args()
    env = environment(2)
    print(describe(env), flush=True)
    start = time.perf_counter()
    got = alternate(args.rounds, {"trainfer": lambda: trainfer_side(args.steps, args.task),
                                  "trl": lambda: trl_side(args.steps, args.task)}, log=print)  # fmt: skip
    for side, runs in got.items():
        steps = ", ".join(f"{r['step_s']:.1f}" for r in runs)
        tokens = ", ".join(f"{r['completion_tokens']:.0f}" for r in runs)
        print(f"{side}: step {steps} s; completions {tokens} tokens", flush=True)
    r = ratio([x["step_s"] for x in got["trainfer"]], [x["step_s"] for x in got["trl"]], lower_is_better=True)
    per_token = ratio([x["step_s"] / x["completion_tokens"] for x in got["trainfer"]],
                      [x["step_s"] / x["completion_tokens"] for x in got["trl"]], lower_is_better=True)  # fmt: skip
    print(f"step time, TRL / trainfer: {r}; per sampled token (lengths differ by chance): {per_token}  "
          f"({(time.perf_counter() - start) / 60:.0f} min in all)")  # fmt: skip
    print(json.dumps({"environment": env, "task": args.task, "steps": args.steps, "runs": got, "ratio": r.as_list(),
                      "ratio_per_token": per_token.as_list()}))  # fmt: skip


if __name__ == "__main__":
    main()
