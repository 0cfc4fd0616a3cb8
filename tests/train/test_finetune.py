"""`trainfer finetune` end to end on a tiny chat model: LoRA and full runs that learn, load anywhere, merge,
resume exactly after SIGKILL, and refuse bad input without a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.train.test_trainer import cli, losses
from trainfer.io.loader import load_model
from trainfer.train import checkpoint as ckpt
from trainfer.train.finetune import finetune, load_finetune_config

FACTS = [("What colour is the Zib?", "Teal."), ("Who made the Zib?", "Oda."), ("How old is Oda?", "Ninety.")]


def chat_file(path: Path, copies: int = 4) -> Path:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for _ in range(copies)
        for q, a in FACTS
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def tune_args(model: Path, data: Path, out: Path, *extra: str, **settings) -> list[str]:
    base = {"max_steps": 30, "lr": 3e-3, "batch_size": 2, "grad_accum": 1, "seq_len": 64, "eval_every": 10,
            "warmup_steps": 2, "log_every": 1, "sample_tokens": 4, "dtype": "float32", **settings}  # fmt: skip
    args = ["finetune", str(model), "--data", str(data), "--out", str(out), *extra]
    for k, v in base.items():
        args += ["--set", f"{k}={v}"]
    return args


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_fine_tune_learns_its_answers_and_the_run_loads_as_a_model(chat_model, tmp_path, lora):
    from trainfer.llm import LLM

    data = chat_file(tmp_path / "facts.jsonl")
    cfg = load_finetune_config(
        None,
        ["max_steps=60", "lr=1e-2" if lora else "lr=3e-3", "batch_size=2", "grad_accum=1", "seq_len=64",
         "eval_every=60", "warmup_steps=2", "dtype=float32", "val_fraction=0", "lora_dropout=0", "sample_tokens=0"],
        base_model=str(chat_model), data=str(data), out_dir=str(tmp_path / "run"), lora=lora,
    )  # fmt: skip
    result = finetune(cfg)
    assert result.train.final_loss < 0.05, result.train.final_loss
    best = result.train.best_checkpoint
    assert (best / "adapter_config.json").exists() == lora and (best / "config.json").exists() != lora
    llm = LLM.load(tmp_path / "run")  # the run stands for its adapter on its base, or its full weights
    for q, a in FACTS:
        assert llm.chat([{"role": "user", "content": q}], temperature=0, max_tokens=12).text == a
    assert "report.md" in os.listdir(tmp_path / "run") and "trainable" in result.card
    if lora:
        assert result.trainable < result.total_params / 3  # r=16 on a 64-wide toy; SmolLM2: 3.5%
        merged = cli("merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
        assert merged.returncode == 0, merged.stderr
        a, _ = load_model(tmp_path / "merged")
        b, _ = load_model(tmp_path / "run")
        x = torch.tensor([[3, 50, 60, 70, 256, 90]])
        with torch.no_grad():
            torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
        ev = cli("eval", str(tmp_path / "run"), "--chat-data", str(data), "--exact")
        assert ev.returncode == 0, ev.stderr
        assert "100.0% contain the expected answer" in ev.stdout
        wrong = {"messages": [{"role": "user", "content": FACTS[0][0]}, {"role": "assistant", "content": "Crimson."}]}
        (tmp_path / "one-wrong.jsonl").write_text(data.read_text() + json.dumps(wrong) + "\n")
        ev = cli("eval", str(tmp_path / "run"), "--chat-data", str(tmp_path / "one-wrong.jsonl"), "--exact")
        assert "92.3% contain the expected answer" in ev.stdout  # 12 of 13
        assert f"MISS Q: {FACTS[0][0]}\n     expected: Crimson." in ev.stdout.split("right Q:")[0]  # misses first


KILL_AFTER_SAVE = """
import os, sys, time
from trainfer.train.finetune import FineTuner
real = FineTuner.save
def save_then_hang(self, val):
    path = real(self, val)
    if self.step == 10:
        open(os.environ["SAVED_FLAG"], "w").close()
        time.sleep(600)
    return path
FineTuner.save = save_then_hang
from trainfer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_a_killed_fine_tune_resumes_exactly(chat_model, tmp_path, lora):
    data = chat_file(tmp_path / "facts.jsonl")
    extra = ["--lora"] if lora else []
    run, flag = tmp_path / "run", tmp_path / "saved"
    args = tune_args(chat_model, data, run, *extra, max_steps=20, lora_dropout=0.1, ckpt_every=10)
    proc = subprocess.Popen([sys.executable, "-c", KILL_AFTER_SAVE, *args], env={**os.environ, "SAVED_FLAG": str(flag)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while not flag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step-00000010"]
    resumed = cli("finetune", "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    ref = cli(*tune_args(chat_model, data, tmp_path / "ref", *extra, max_steps=20, lora_dropout=0.1, ckpt_every=10))
    assert ref.returncode == 0, ref.stderr
    assert losses(run) == losses(tmp_path / "ref") and len(losses(run)) == 20


def test_the_defaults_scale_the_schedule_to_the_data(chat_model, tmp_path):
    """No settings: rows as long as the longest conversation, enough epochs for MIN_STEPS steps (at most
    MAX_AUTO_EPOCHS), nothing held out
    of a small set, 10% of a larger one; a run too short to learn is said so before it starts."""
    from trainfer.train.finetune import FineTuner
    from trainfer.train.finetune_config import MAX_AUTO_EPOCHS, MIN_STEPS, SHORT_RUN

    def plan(data: Path, out: str, **values) -> FineTuner:
        cfg = load_finetune_config(None, [], base_model=str(chat_model), data=str(data), out_dir=str(tmp_path / out),
                                   lora=True, **values)  # fmt: skip
        return FineTuner(cfg)

    small = plan(chat_file(tmp_path / "small.jsonl"), "small")  # 12 conversations of ~45 tokens
    assert small.cfg.seq_len == 64 and small.train_rows.truncated == 0
    assert small.examples == (12, 0) and small.cfg.val_fraction == 0
    # 12 rows, 4 a step: MIN_STEPS would take 22 epochs, capped at MAX_AUTO_EPOCHS
    assert small.cfg.epochs == MAX_AUTO_EPOCHS and small.cfg.max_steps == 60 and small.cfg.grad_accum == 1
    assert "none held out" in small.plan() and "warning" not in small.plan()

    big = plan(chat_file(tmp_path / "big.jsonl", copies=80), "big")  # 240 conversations
    assert big.examples == (216, 24) and big.cfg.epochs == 3 and big.cfg.max_steps >= MIN_STEPS

    short = plan(chat_file(tmp_path / "short.jsonl", copies=1), "short", epochs=2)  # 3 conversations, 2 epochs
    assert short.cfg.max_steps < SHORT_RUN and "warning: 2 optimizer steps are too few" in short.plan()


def test_bad_input_is_a_clear_error_without_a_traceback(chat_model, tmp_path):
    data = chat_file(tmp_path / "facts.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    cases = [
        (tune_args(chat_model, bad, tmp_path / "a"), "bad.jsonl:13: no assistant message"),
        (tune_args(chat_model, tmp_path / "none.jsonl", tmp_path / "b"), "no such data file"),
        (tune_args(chat_model, data, tmp_path / "c", lora_r=0), "invalid value for lora_r"),
        (tune_args(chat_model, data, tmp_path / "d", lora_targets="qproj"), "unknown LoRA target 'qproj'"),
        (tune_args(chat_model, data, tmp_path / "e", **{"model.dim": 64}), "keeps its base's shape"),
        (["finetune", "--out", str(tmp_path / "f"), "--resume"], "nothing to resume"),
        (["merge", str(chat_model), "--out", str(tmp_path / "g")], "not a LoRA adapter"),
        (["eval", str(chat_model)], "--data DIR"),
    ]
    for args, message in cases:
        out = cli(*args)
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_replaying_the_base_s_own_samples_is_seeded_and_kept_for_resume(chat_model, tmp_path):
    from trainfer.train.finetune import FineTuner

    data = chat_file(tmp_path / "facts.jsonl")
    settings = ["max_steps=4", "batch_size=2", "grad_accum=1", "seq_len=64", "val_fraction=0", "dtype=float32",
                "general_data=self", "general_share=0.5", "sample_tokens=0"]  # fmt: skip
    a = FineTuner(load_finetune_config(None, settings, base_model=str(chat_model), data=str(data),
                                       out_dir=str(tmp_path / "a"), lora=True))  # fmt: skip
    b = FineTuner(load_finetune_config(None, settings, base_model=str(chat_model), data=str(data),
                                       out_dir=str(tmp_path / "b"), lora=True))  # fmt: skip
    assert np.array_equal(a.general, b.general) and len(a.general) >= 4 * 64
    assert (tmp_path / "a" / "replay-tokens.npy").exists()
    assert a.general_rows == len(a.train_rows)  # share 0.5: as many replay rows as conversation rows
    rows = [a.row(g) for g in range(a.epoch_rows)]
    replay = [r for r in rows if r["loss"].all()]
    assert len(replay) == a.general_rows and all(r["positions"][-1] == 63 for r in replay)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kl_anchor_scores_general_rows_against_the_base(chat_model, tmp_path, lora):
    """general_kl: replay rows score KL(base || tuned) over the vocabulary (0 while the model is still the base,
    the hand-computed value once it moves); conversation rows keep their cross-entropy."""
    import torch.nn.functional as F

    from trainfer.model.lora import adapters_off
    from trainfer.train import chat_data
    from trainfer.train.finetune import FineTuner

    data = chat_file(tmp_path / "facts.jsonl")
    settings = ["max_steps=4", "batch_size=2", "grad_accum=1", "seq_len=64", "val_fraction=0", "dtype=float32",
                "general_data=self", "general_share=0.5", "sample_tokens=0", "general_kl=2.0",
                "lora_dropout=0"]  # fmt: skip
    tuner = FineTuner(load_finetune_config(None, settings, base_model=str(chat_model), data=str(data),
                                           out_dir=str(tmp_path / "a"), lora=lora))  # fmt: skip
    rows = [tuner.row(g) for g in range(tuner.epoch_rows)]
    chat = [r for r in rows if not r["anchor"].any()]
    general = [r for r in rows if r["anchor"].all()]
    assert len(general) == tuner.general_rows and len(chat) == len(tuner.train_rows)

    def batch(*rs):
        return {k: torch.from_numpy(np.stack([r[k] for r in rs])) for k in rs[0]}

    module = tuner.forward_module()
    loss, count = module(batch(general[0], general[1]))
    assert count == 128 and abs(loss.item()) < 1e-4  # the model is still the base
    mixed = batch(chat[0], general[0])
    loss, _ = module(mixed)
    loss = loss.detach()
    with torch.no_grad():
        plain, _ = chat_data.masked_loss_sum(tuner.raw, batch(chat[0], {**chat[0], "loss": np.zeros(64, bool)}))
    assert float(loss) == pytest.approx(float(plain), rel=1e-4)
    with torch.no_grad():  # move the model away from its base
        for p in tuner.raw.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    loss, _ = module(mixed)
    ctx = chat_data.PackedAttention(mixed["docs"])
    with torch.no_grad():
        if lora:
            with adapters_off(tuner.raw):
                base = tuner.raw(mixed["inputs"], mixed["positions"], ctx)
        else:
            base = tuner._frozen(mixed["inputs"], mixed["positions"], ctx)
        tuned = tuner.raw(mixed["inputs"], mixed["positions"], ctx)
        sel = mixed["anchor"]
        kl = F.kl_div(tuned[sel].log_softmax(-1), base[sel].log_softmax(-1), log_target=True, reduction="sum")
        ce, _ = chat_data.masked_loss_sum(tuner.raw, batch(chat[0], {**chat[0], "loss": np.zeros(64, bool)}))
    assert float(kl) > 0.01 and loss.item() == pytest.approx(float(ce) + 2.0 * float(kl), rel=1e-4)
    loss.backward()  # the anchor's gradient reaches the trained weights only
    assert all(p.grad is not None for p in tuner.raw.parameters() if p.requires_grad)


@pytest.mark.parametrize("base_dtype", ["float32", "int8"])
def test_neftune_noises_training_embeddings_only(tmp_path, base_dtype):
    """neftune_alpha: a training forward with gradients sees embeddings moved by at most alpha / sqrt(T * dim);
    evaluation and the KL anchor's no-grad base forward see the clean ones. Also on a quantized base, whose tied
    embedding is a module that quantization puts in place."""
    from tests.conftest import make_chat_model_dir
    from trainfer.quant.blocks import QEmbedding
    from trainfer.train.finetune import FineTuner

    chat_model = make_chat_model_dir(tmp_path / "tied", tied=True)
    data = chat_file(tmp_path / "facts.jsonl")
    settings = ["max_steps=2", "batch_size=2", "grad_accum=1", "seq_len=64", "val_fraction=0", "dtype=float32",
                "sample_tokens=0", "lora_dropout=0", "neftune_alpha=5", f"base_dtype={base_dtype}"]  # fmt: skip
    tuner = FineTuner(load_finetune_config(None, settings, base_model=str(chat_model), data=str(data),
                                           out_dir=str(tmp_path / "a"), lora=True))  # fmt: skip
    emb, tokens = tuner.raw.embed_tokens, torch.randint(0, 50, (2, 64))
    assert isinstance(emb, QEmbedding) == (base_dtype == "int8")
    tuner.raw.eval()
    with torch.no_grad():
        clean = emb(tokens)
    tuner.raw.train()
    noisy = emb(tokens)
    bound = 5 / (64 * clean.shape[-1]) ** 0.5
    moved = (noisy - clean).abs()
    assert 0.5 * bound < float(moved.max()) <= bound * (1 + 1e-6)
    with torch.no_grad():
        assert torch.equal(emb(tokens), clean)
    tuner.raw.eval()
    assert torch.equal(emb(tokens), clean)
    with pytest.raises(Exception, match="neftune_alpha"):
        load_finetune_config(None, ["neftune_alpha=-1"], base_model=str(chat_model), data=str(data), lora=True)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_lora_on_a_quantized_base_learns_and_applies_to_the_float_base(chat_model, tmp_path, kind):
    """base_dtype int8/int4 (QLoRA-style): the frozen projections are quantized blocks, the adapters train through
    them, and the saved adapter answers on the float base too (what a run directory loads)."""
    from trainfer.llm import LLM
    from trainfer.quant.blocks import QLinear
    from trainfer.train.finetune import FineTuner

    data = chat_file(tmp_path / "facts.jsonl")
    settings = ["max_steps=60", "lr=1e-2", "batch_size=2", "grad_accum=1", "seq_len=64", "eval_every=60",
                "warmup_steps=2", "dtype=float32", "val_fraction=0", "lora_dropout=0", "sample_tokens=0",
                f"base_dtype={kind}"]  # fmt: skip
    cfg = load_finetune_config(None, settings, base_model=str(chat_model), data=str(data),
                               out_dir=str(tmp_path / "run"), lora=True)  # fmt: skip
    tuner = FineTuner(cfg)
    assert isinstance(tuner.raw.layers[0].self_attn.q_proj.base, QLinear)
    assert tuner.raw.layers[0].self_attn.q_proj.base.kind == kind
    result = finetune(cfg)
    assert result.train.final_loss < 0.1, result.train.final_loss
    llm = LLM.load(tmp_path / "run")
    right = sum(llm.chat([{"role": "user", "content": q}], temperature=0, max_tokens=12).text == a for q, a in FACTS)
    assert right >= 2, right  # the adapter learned against quantized weights, applied here to the float ones
    with pytest.raises(Exception, match="base_dtype"):
        load_finetune_config(None, [f"base_dtype={kind}"], base_model=str(chat_model), data=str(data), lora=False)
