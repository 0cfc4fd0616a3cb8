"""`trainfer grpo`: advantages and the loss against hand computations and against TRL's GRPOTrainer on the same
rollouts, a tiny model that learns a toy reward, exact resume, and bad input (a failing reward function, a task
or data that cannot be used) refused or counted, never a dead run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import CHATML, assert_same_gradients, make_tiny_model_dir
from trainfer.errors import TrainferError
from trainfer.infer.sampling import SamplingParams
from trainfer.io.loader import load_model
from trainfer.reason.grpo import (
    GRPOTrainer,
    advantages,
    completion_logps,
    group_rows,
    grpo,
    grpo_loss,
    load_grpo_config,
    load_reward,
)
from trainfer.train.metrics import read_metrics

REWARDS = '''
def digits(prompt, completion, answer):
    """The share of the completion's characters that are digits: a toy reward a tiny model can learn."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def first_digit(prompt, completion, answer):
    return float(completion[:1].isdigit())


def broken(prompt, completion, answer):
    if "7" in completion:
        raise ValueError("no sevens")
    return "many" if "3" in completion else float(any(c.isdigit() for c in completion))
'''


@pytest.fixture(scope="module")
def flat_model(tmp_path_factory) -> Path:
    """A tiny random Llama with ChatML whose head is left near-uniform, so samples differ within a group."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("flat"), chat_template=CHATML)


def test_advantages_equal_a_hand_computation():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    std = np.std([1, 0, 0, 1], ddof=1)  # unbiased, as TRL's nanstd
    np.testing.assert_allclose(advantages(r, "group")[0].numpy(), np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4),
                               rtol=1e-6)  # fmt: skip
    assert advantages(r, "group")[1].abs().max() == 0  # a group that scored alike teaches nothing
    np.testing.assert_allclose(advantages(r, "none")[0].numpy(), [0.5, -0.5, -0.5, 0.5])
    whole = np.std([1, 0, 0, 1, 0, 0, 0, 0], ddof=1)
    np.testing.assert_allclose(advantages(r, "batch")[0].numpy(), np.array([0.5, -0.5, -0.5, 0.5]) / (whole + 1e-4),
                               rtol=1e-6)  # fmt: skip


def test_the_loss_equals_a_hand_computation():
    """Two sequences of 3 and 1 tokens; the policy moved from `old` so the clip binds on one token."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.5, -0.5], [-0.3, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.tensor([1.0, -2.0])
    ratio = np.exp([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    clipped = np.minimum(ratio, 1.2)  # adv > 0: min(r A, clip(r) A) takes the clipped 1.2 at token 1
    per_token = -np.array([[clipped[0, 0], clipped[0, 1], clipped[0, 2]], [ratio[1, 0] * -2, 0, 0]])
    dapo, _ = grpo_loss(logps, old, adv, mask, 0.2, loss_type="dapo", normalizer=4)
    assert float(dapo) == pytest.approx((per_token[0].sum() + per_token[1, 0]) / 4, rel=1e-6)
    seq, _ = grpo_loss(logps, old, adv, mask, 0.2, loss_type="grpo", normalizer=2)
    assert float(seq) == pytest.approx((per_token[0].mean() + per_token[1, 0]) / 2, rel=1e-6)
    dr, _ = grpo_loss(logps, old, adv, mask, 0.2, loss_type="dr_grpo", normalizer=2 * 3)
    assert float(dr) == pytest.approx((per_token[0].sum() + per_token[1, 0]) / 6, rel=1e-6)
    dapo.backward()
    # d/dlogp of -r A is -r A where unclipped, 0 where the clip binds; padding gets nothing
    np.testing.assert_allclose(logps.grad.numpy(), np.array([[-1, 0, -1], [2, 0, 0]]) / 4, rtol=1e-6)
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-0.3, 0.0, 0.0]])
    with_kl, kl = grpo_loss(logps.detach(), old, adv, mask, 0.2, beta=0.1, ref=ref, normalizer=4)
    k3 = np.exp(-0.5) + 0.5 - 1  # exp(ref - logp) - (ref - logp) - 1 at the one token where they differ
    assert float(kl) == pytest.approx(k3, rel=1e-6)
    assert float(with_kl) == pytest.approx(float(dapo) + 0.1 * k3 / 4, rel=1e-6)
    with pytest.raises(TrainferError, match="loss_type"):
        grpo_loss(logps, old, adv, mask, 0.2, loss_type="ppo")


def test_completion_logps_score_each_completion_as_alone(flat_model):
    model = load_model(flat_model)[0].float().eval()
    prompt, completions = [5, 9, 11, 3], [[40, 41, 42], [50], [60, 61]]
    batch = group_rows(prompt, completions, [0.0, 0.0, 0.0], pad=0)
    with torch.no_grad():
        got = completion_logps(model, batch)
        for i, c in enumerate(completions):
            ids = torch.tensor([prompt + c])
            logits = model(ids[:, :-1]).float()[0, len(prompt) - 1 :]
            want = logits.log_softmax(-1).gather(1, ids[0, len(prompt) :, None])
            np.testing.assert_allclose(got[i, : len(c)].numpy(), want[:, 0].numpy(), rtol=1e-5, atol=1e-5)
            assert got[i, len(c) :].abs().sum() == 0


@pytest.mark.parametrize("loss_type,beta", [("dapo", 0.0), ("grpo", 0.04), ("dr_grpo", 0.0)])
def test_the_loss_and_its_gradients_equal_trl(flat_model, tmp_path, loss_type, beta):
    """TRL's GRPOTrainer._compute_loss and ours on the same rollouts, rewards and reference: loss and gradients."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    hf = transformers.AutoModelForCausalLM.from_pretrained(flat_model, dtype=torch.float32).train()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(flat_model / "tokenizer.json"), pad_token="!")
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=5, report_to=[], beta=beta, loss_type=loss_type, use_cpu=True,
                          bf16=False)  # fmt: skip
    ds = Dataset.from_list([{"prompt": "hi"}] * 4)
    trainer = trl.GRPOTrainer(model=hf, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                              train_dataset=ds, processing_class=tok)  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    prompt, completions = [72, 101, 108, 108], [[40, 41, 42, 43, 44], [50], [60, 61], [70, 71, 72]]
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    adv = advantages(rewards, "group")[0].tolist()
    batch = group_rows(prompt, completions, adv, pad=0)
    gen = torch.Generator().manual_seed(0)
    ref = -torch.rand(batch["mask"].shape, generator=gen) * 3 * batch["mask"]
    inputs = {"prompt_ids": torch.tensor([prompt] * 4), "prompt_mask": torch.ones(4, len(prompt), dtype=torch.long),
              "completion_ids": batch["targets"], "completion_mask": batch["mask"].long(),
              "advantages": batch["advantages"], "num_items_in_batch": batch["mask"].sum(),
              "ref_per_token_logps": ref}  # fmt: skip
    want = trainer._compute_loss(trainer.model, inputs)
    want.backward()

    ours = load_model(flat_model)[0].float().train()
    logps = completion_logps(ours, batch)
    normalizer = {"dapo": int(batch["mask"].sum()), "grpo": 4, "dr_grpo": 4 * 5}[loss_type]
    got, _ = grpo_loss(logps, logps.detach(), batch["advantages"], batch["mask"], 0.2, beta,
                       ref if beta else None, loss_type, normalizer)  # fmt: skip
    got.backward()
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    assert_same_gradients(ours, hf)


def rewards_file(tmp_path: Path) -> Path:
    path = tmp_path / "toy_rewards.py"
    path.write_text(REWARDS)
    return path


def prompts_file(tmp_path: Path, n: int = 24) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say a number, {i}:"}) + "\n" for i in range(n)))
    return path


def settings(**extra) -> list[str]:
    base = {"max_steps": 40, "lr": 1e-2, "group_size": 8, "prompts_per_step": 2, "max_completion_tokens": 8,
            "dtype": "float32", "eval_every": 40, "ckpt_every": 40, "progress": "false"}  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def config(model: Path, tmp_path: Path, out: str, reward: str = "digits", **extra):
    return load_grpo_config(None, settings(**extra), base_model=str(model), data=str(prompts_file(tmp_path)),
                            reward=f"{rewards_file(tmp_path)}:{reward}", out_dir=str(tmp_path / out))  # fmt: skip


def rollout_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "rollout"]


@pytest.mark.parametrize("use_lora", [True, False])
def test_rollouts_come_from_the_weights_being_trained(flat_model, tmp_path, use_lora):
    """On-policy: after the weights move (the adapter's B away from zero, or the full weights), the engine's sampled
    tokens carry the log-probabilities the loss's forward gives them."""
    tuner = GRPOTrainer(config(flat_model, tmp_path, "run", lora=str(use_lora).lower()))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuner.raw.named_parameters():
            if p.requires_grad and (not use_lora or "lora_B" in name):
                p.add_(torch.randn(p.shape, generator=gen) * (0.5 if use_lora else 0.05))
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=3, logprobs=0)
    (samples,) = tuner.sample(tuner.prompts[:1], [params])
    batch = group_rows(tuner.prompts[0].ids, [[e.token_id for e in s] for s in samples], [0.0] * 4, pad=0)
    with torch.no_grad():
        trained = completion_logps(tuner.raw.eval(), batch)
    engine = torch.tensor([[e.logprob for e in s] for s in samples])
    torch.testing.assert_close(engine, trained, atol=2e-4, rtol=1e-4)


def test_a_tiny_model_learns_a_toy_reward(flat_model, tmp_path):
    """Full fine-tuning from a near-uniform policy: 10 of 256 byte tokens are digits, so ~4% at first."""
    result = grpo(config(flat_model, tmp_path, "run"))
    rec = rollout_records(tmp_path / "run")
    first, last = np.mean([r["reward"] for r in rec[:4]]), np.mean([r["reward"] for r in rec[-4:]])
    assert first < 0.15 and last > first + 0.3, (first, last)
    assert all(r["rollout_s"] > 0 and r["update_s"] > 0 and 0 < r["rollout_share"] < 1 for r in rec)
    assert result.after["val_accuracy"] > result.before["val_accuracy"] + 0.3  # held-out prompts, greedy
    assert "held-out greedy accuracy" in (tmp_path / "run" / "report.md").read_text()


def test_resume_continues_exactly(flat_model, tmp_path):
    """The rollouts of a resumed step are drawn from the restored weights with the same seeds: the same run."""
    straight = grpo(config(flat_model, tmp_path, "a", max_steps=6, ckpt_every=3, eval_every=3))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000006")
    resumed = grpo(config(flat_model, tmp_path, "b", max_steps=6, ckpt_every=3, eval_every=3), resume=True)
    wa = load_file(straight.best_checkpoint / "model.safetensors")
    wb = load_file(resumed.best_checkpoint / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = rollout_records(tmp_path / "a"), rollout_records(tmp_path / "b")
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]


def test_leaving_out_groups_that_scored_alike_changes_nothing(flat_model, tmp_path):
    """Without a KL term such a group's gradient is exactly zero: the run without its forward is the same run."""
    runs = {}
    for skip in ("true", "false"):
        out = f"skip-{skip}"
        runs[skip] = grpo(config(flat_model, tmp_path, out, reward="first_digit", max_steps=6, eval_every=6,
                                 ckpt_every=6, skip_uniform_groups=skip))  # fmt: skip
    rec = rollout_records(tmp_path / "skip-true")
    assert sum(r["groups_without_signal"] for r in rec) > 0  # the case happened
    wa = load_file(runs["true"].best_checkpoint / "model.safetensors")
    wb = load_file(runs["false"].best_checkpoint / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_failing_reward_function_scores_zero_and_the_run_goes_on(flat_model, tmp_path):
    grpo(config(flat_model, tmp_path, "run", reward="broken", max_steps=3, eval_every=3, ckpt_every=3))
    rec = rollout_records(tmp_path / "run")
    assert len(rec) == 3 and rec[-1]["reward_failures"] > 0
    assert "scored 0 because the reward function failed" in (tmp_path / "run" / "report.md").read_text()


def test_bad_input_is_refused_clearly(flat_model, tmp_path):
    with pytest.raises(TrainferError, match="unknown task 'sums'"):
        GRPOTrainer(load_grpo_config(None, settings(), base_model=str(flat_model), task="sums",
                                     out_dir=str(tmp_path / "r1")))  # fmt: skip
    with pytest.raises(TrainferError, match="nothing to learn from"):
        GRPOTrainer(load_grpo_config(None, settings(), base_model=str(flat_model), out_dir=str(tmp_path / "r2")))
    with pytest.raises(TrainferError, match="without 'answer' needs --reward"):
        GRPOTrainer(load_grpo_config(None, settings(), base_model=str(flat_model), out_dir=str(tmp_path / "r3"),
                                     data=str(prompts_file(tmp_path))))  # fmt: skip
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"question": "b"}\n')
    with pytest.raises(TrainferError, match="bad.jsonl:2: expected an object with 'prompt'"):
        GRPOTrainer(load_grpo_config(None, settings(), base_model=str(flat_model), out_dir=str(tmp_path / "r4"),
                                     data=str(bad)))  # fmt: skip
    with pytest.raises(TrainferError, match="has no function 'nope'"):
        load_reward(f"{rewards_file(tmp_path)}:nope")
    with pytest.raises(TrainferError, match="cannot import no_such_module"):
        load_reward("no_such_module:f")
    with pytest.raises(TrainferError, match="group_size"):
        load_grpo_config(None, settings(group_size=1), base_model=str(flat_model), task="add")


def test_the_command_runs_and_fails_cleanly(flat_model, tmp_path):
    data = prompts_file(tmp_path)
    base = [sys.executable, "-m", "trainfer.cli", "grpo", str(flat_model)]
    sets = [a for s in settings(max_steps=2, eval_every=2, ckpt_every=2) for a in ("--set", s)]
    cmd = [*base, "--data", str(data), "--reward", f"{rewards_file(tmp_path)}:digits", "--out", str(tmp_path / "run"),
           "--lora", *sets]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "grpo (dapo, beta 0)" in done.stdout and (tmp_path / "run" / "rewards.png").exists()
    bad = subprocess.run([*base, "--task", "rg:no_such_dataset", "--out", str(tmp_path / "r2")], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 1 and "reasoning-gym cannot make" in bad.stderr and "Traceback" not in bad.stderr
