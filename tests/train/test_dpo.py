"""`trainfer dpo`: the loss against a hand computation, the pair rows against scoring each answer alone, a run
that learns to prefer, exact resume, and bad pairs refused with the line that is wrong."""

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

from tests.train.test_finetune import FACTS
from trainfer.errors import TrainferError
from trainfer.io.loader import load_checkpoint, load_model
from trainfer.train import chat_data
from trainfer.train.dpo import DPOTrainer, dpo, dpo_loss, load_dpo_config, load_pairs, pair_logps, pair_rows

WRONG = ["Red.", "Ada.", "Twelve."]


def pairs_file(path: Path, copies: int = 4, chat: bool = True) -> Path:
    lines = []
    for _ in range(copies):
        for (q, good), bad in zip(FACTS, WRONG, strict=True):
            prompt = [{"role": "user", "content": q}] if chat else f"Q: {q}\nA:"
            lines.append(json.dumps({"prompt": prompt, "chosen": good if chat else f" {good}",
                                     "rejected": bad if chat else f" {bad}"}))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_losses_equal_a_hand_computation():
    policy = torch.tensor([[-5.0, -7.0], [-3.0, -2.0]], requires_grad=True)
    reference = torch.tensor([[-6.0, -6.0], [-3.5, -2.5]])
    beta = 0.5
    losses, rewards = dpo_loss(policy, reference, beta, "sigmoid")
    # pair 0: h = (-5 + 6) - (-7 + 6) = 2; pair 1: h = 0.5 - 0.5 = 0
    want = [-np.log(1 / (1 + np.exp(-beta * 2))), np.log(2)]
    assert losses.detach().numpy() == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(rewards.numpy(), [[0.5, -0.5], [0.25, 0.25]], rtol=1e-6)
    losses.sum().backward()
    s = 1 / (1 + np.exp(beta * 2))  # d/dh of -log sigmoid(beta h) is -beta sigmoid(-beta h)
    np.testing.assert_allclose(policy.grad.numpy(), [[-beta * s, beta * s], [-beta / 2, beta / 2]], rtol=1e-6)
    ipo, _ = dpo_loss(policy.detach(), reference, beta, "ipo")
    assert ipo.numpy() == pytest.approx([(2 - 1) ** 2, (0 - 1) ** 2])
    with pytest.raises(TrainferError, match="loss_type"):
        dpo_loss(policy, reference, beta, "kto")


def test_a_pair_row_scores_each_answer_as_alone(chat_model, tmp_path):
    """Both answers share one row under a block-diagonal mask: each log-probability equals its own forward."""
    _, _, tokenizer = load_checkpoint(chat_model)
    model = load_model(chat_model)[0].float().eval()
    pairs = load_pairs(pairs_file(tmp_path / "p.jsonl", copies=1), tokenizer)
    rows = pair_rows(pairs, 96, 0)
    batch = chat_data.batch_tensors(rows, np.arange(len(rows)), "cpu")
    with torch.no_grad():
        got = pair_logps(model, batch)
        mean = pair_logps(model, batch, mean=True)
        for r, pair in enumerate(pairs):
            for d, e in enumerate(pair):
                ids = torch.tensor([e.tokens])
                logp = model(ids[:, :-1]).float().log_softmax(-1)[0].gather(1, ids[0, 1:, None])[:, 0]
                mask = torch.tensor(e.loss[1:])
                assert float(got[r, d]) == pytest.approx(float(logp[mask].sum()), abs=1e-4)
                assert float(mean[r, d]) == pytest.approx(float(logp[mask].mean()), abs=1e-5)


def settings(**extra) -> list[str]:
    base = {"max_steps": 40, "lr": 1e-2, "batch_size": 3, "seq_len": 96, "eval_every": 20, "warmup_steps": 2,
            "dtype": "float32", "lora_dropout": 0, "sample_tokens": 0, "log_every": 5, "beta": 0.5}  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_learns_to_prefer_the_chosen_answers(chat_model, tmp_path, loss_type):
    data = pairs_file(tmp_path / "train.jsonl")
    val = pairs_file(tmp_path / "val.jsonl", copies=1)
    cfg = load_dpo_config(None, settings(loss_type=loss_type), base_model=str(chat_model), data=str(data),
                          val_data=str(val), out_dir=str(tmp_path / "run"), lora=True)  # fmt: skip
    result = dpo(cfg)
    b, a = result.before, result.after
    assert b["val_reward_accuracy"] == 0 and abs(b["val_margin"]) < 1e-5  # the policy starts as the reference
    assert a["val_reward_accuracy"] == 1.0
    if loss_type == "sigmoid":
        assert a["val_margin"] > 1.0  # DPO's margin keeps growing
    else:  # IPO regresses h to 1 / (2 beta): the margin beta * h settles at 1/2 (its regularization)
        assert a["val_margin"] == pytest.approx(0.5, abs=0.05)
    gained = (a["val_chosen_logp"] - a["val_rejected_logp"]) - (b["val_chosen_logp"] - b["val_rejected_logp"])
    assert gained == pytest.approx(a["val_margin"] / 0.5, rel=1e-3)  # the margin is beta times this log-ratio gain
    assert "reward accuracy 0.0% -> 100.0%" in (tmp_path / "run" / "report.md").read_text()


def test_resume_continues_exactly(chat_model, tmp_path):
    """With LoRA dropout on, the resumed run must restore the RNG, the data cursor and the cached reference."""
    data = pairs_file(tmp_path / "train.jsonl", chat=False)

    def run(out: str, steps: int, resume: bool = False):
        sets = settings(max_steps=steps, ckpt_every=4, eval_every=4, lora_dropout=0.1)
        cfg = load_dpo_config(None, sets, base_model=str(chat_model), data=str(data), out_dir=str(tmp_path / out),
                              lora=True)  # fmt: skip
        return dpo(cfg, resume=resume)

    straight = run("a", 8)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same run, as if it had stopped after its step-4 checkpoint
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000008")
    resumed = run("b", 8, resume=True)
    wa = load_file(straight.best_checkpoint / "adapter_model.safetensors")
    wb = load_file(resumed.best_checkpoint / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "line,message",
    [
        ({"prompt": "Q", "chosen": "a"}, "'chosen' and 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "no 'prompt'"),
        ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": "Q", "chosen": "a", "rejected": "a"}, "the same answer"),
        ({"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "prompt is text"),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}],
                "chosen": [{"role": "user", "content": "a"}],
                "rejected": "b",
            },
            "assistant messages",
        ),  # fmt: skip
        ({"prompt": [{"role": "wizard", "content": "Q"}], "chosen": "a", "rejected": "b"}, "message 0"),
    ],
)
def test_bad_pairs_are_refused_naming_the_line(chat_model, tmp_path, line, message):
    _, _, tokenizer = load_checkpoint(chat_model)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(TrainferError, match=f"bad.jsonl:2: .*{message}"):
        load_pairs(path, tokenizer)


def test_the_command_runs_and_fails_cleanly(chat_model, tmp_path):
    data = pairs_file(tmp_path / "train.jsonl")
    cmd = [sys.executable, "-m", "trainfer.cli", "dpo", str(chat_model), "--data", str(data), "--out",
           str(tmp_path / "run"), "--lora", *[a for s in settings(max_steps=4) for a in ("--set", s)]]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dpo (sigmoid, beta 0.5): 12 pairs" in done.stdout and (tmp_path / "run" / "report.md").exists()
    bad = subprocess.run([*cmd[:5], "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r2")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 1 and "no such data file" in bad.stderr and "Traceback" not in bad.stderr


def test_a_run_over_the_resumed_reference_refuses_a_missing_cache(chat_model, tmp_path):
    data = pairs_file(tmp_path / "train.jsonl")
    cfg = load_dpo_config(None, settings(max_steps=2, ckpt_every=2, eval_every=2), base_model=str(chat_model),
                          data=str(data), out_dir=str(tmp_path / "run"), lora=True)  # fmt: skip
    dpo(cfg)
    (tmp_path / "run" / "reference-logps-train.npy").unlink()
    again = load_dpo_config(None, settings(max_steps=4, ckpt_every=2, eval_every=2), base_model=str(chat_model),
                            data=str(data), out_dir=str(tmp_path / "run"), lora=True)  # fmt: skip
    with pytest.raises(TrainferError, match="cannot be rebuilt"):
        DPOTrainer(again, resume=True)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_the_loss_and_its_gradients_equal_trl(tmp_path, loss_type):
    """TRL's DPOTrainer._compute_loss and ours on the same pairs and reference log-probabilities (fp32)."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from tests.conftest import assert_same_gradients, make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), pad_token="!",
                                               eos_token="~")  # fmt: skip
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, loss_type=[loss_type], report_to=[],
                         use_cpu=True, bf16=False)  # fmt: skip
    ds = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    trainer = trl.DPOTrainer(model=hf, args=args, train_dataset=ds, processing_class=tok)
    trainer.precompute_ref_logps = True  # the reference log-probabilities below, as ours are cached
    pairs = [([72, 101, 108], [40, 41, 42, 43], [50, 51]), ([9, 8], [60], [70, 71, 72])]
    reference = torch.tensor([[-9.0, -7.5], [-3.0, -8.0]])
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    width = max(map(len, seqs))
    masks = [[0] * len(p) + [1] * len(c) for p, c, _ in pairs] + [[0] * len(p) + [1] * len(r) for p, _, r in pairs]
    inputs = {"input_ids": torch.tensor([s + [0] * (width - len(s)) for s in seqs]),
              "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
              "completion_mask": torch.tensor([m + [0] * (width - len(m)) for m in masks]),
              "ref_chosen_logps": reference[:, 0], "ref_rejected_logps": reference[:, 1]}  # fmt: skip
    want = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    want.backward()

    ours = load_model(path)[0].float().train()
    examples = [tuple(chat_data.Example(p + a, [False] * len(p) + [True] * len(a), "t") for a in (c, r))
                for p, c, r in pairs]  # fmt: skip
    batch = chat_data.batch_tensors(pair_rows(examples, 16, 0), np.arange(2), "cpu")
    if loss_type == "ipo":  # TRL divides summed log-ratios by the answer's length; ours caches mean log-probabilities
        reference = reference / torch.tensor([[len(c), len(r)] for _, c, r in pairs])
    losses, _ = dpo_loss(pair_logps(ours, batch, mean=loss_type == "ipo"), reference, 0.3, loss_type)
    got = losses.mean()
    got.backward()
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    assert_same_gradients(ours, hf)
