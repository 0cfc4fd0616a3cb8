"""The training loop: learning, exact resume after SIGKILL, atomic checkpoints, DDP/FSDP, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.conftest import tiny_settings
from trainfer.train import checkpoint as ckpt
from trainfer.train.config import load_config
from trainfer.train.metrics import read_metrics
from trainfer.train.schedule import WindowSampler
from trainfer.train.trainer import train


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainfer.cli", *args], capture_output=True, text=True, env=env, timeout=300, **kw
    )


def train_args(data: Path, out: Path, **extra) -> list[str]:
    args = ["train", "--data", str(data), "--out", str(out)]
    for s in tiny_settings(**extra):
        args += ["--set", s]
    return args


def test_loss_decreases_and_the_checkpoint_is_a_model(tiny_data, tmp_path):
    cfg = load_config(
        None,
        tiny_settings(max_steps=150, eval_every=50, sample_tokens=16, probe_passages=4),
        data=str(tiny_data),
        out_dir=str(tmp_path / "run"),
    )
    result = train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in rows if r.get("event") == "eval"]
    first, last = rows[1]["loss"], result.final_loss
    assert last < 0.6 * first, (first, last)  # ln(vocab) ~ 3.2 nats down to the word-level structure
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and "sample" in evals[0]
    for e in evals:  # the memorization probe at each evaluation, on a copy (the checkpoint check below holds)
        assert all(0 <= e[f"probe_{k}"] <= 1 for k in ("train_exact", "val_exact", "train_match", "val_match"))
    assert evals[-1]["probe_train_match"] > 0.08  # above chance (~1/26): it continues some of the words
    assert rows[-1] == {"step": 150, "event": "end", "early_stop": False, "elapsed_s": rows[-1]["elapsed_s"]}
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / 0.6931471805599453, rel=0.02)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000
    assert result.tokens == 150 * 8 * 32 and 0 < result.mfu < 1
    # A checkpoint is a Hugging Face model: transformers loads it and computes the same logits.
    import transformers

    from trainfer.io.loader import load_model

    best = result.best_checkpoint
    ours, tok = load_model(tmp_path / "run")  # a run directory stands for its best checkpoint
    ref = transformers.AutoModelForCausalLM.from_pretrained(best).eval()
    ids = torch.tensor([tok.encode("king queen sword")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_sampler_covers_each_epoch_once_and_is_a_function_of_the_cursor():
    s = WindowSampler(n_tokens=1000, seq_len=10, seed=3)
    epoch = s.starts(0, s.per_epoch)
    shift = epoch.min() % 10
    assert sorted((epoch - shift) // 10) == list(range(s.per_epoch)) and epoch.max() + 11 <= 1000
    again = WindowSampler(1000, 10, 3)
    assert (again.starts(150, 40) == s.starts(150, 40)).all()  # across the epoch boundary at 99


def test_exact_resume_after_sigkill(tiny_data, tmp_path):
    """Killed mid-run with SIGKILL, then resumed: every later loss equals the uninterrupted run's, bitwise."""
    extra = {"max_steps": 60, "ckpt_every": 7, "grad_accum": 2}
    ref = cli(*train_args(tiny_data, tmp_path / "ref", **extra))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainfer.cli", *train_args(tiny_data, run, **extra)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(run) if (run / "metrics.jsonl").exists() else {}) < 25:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(run))
    assert 25 <= killed_at < 60
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9999, "loss": 1.')  # a line torn by the kill is dropped on resume
    resumed = cli(*train_args(tiny_data, run, **extra), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == losses(tmp_path / "ref")  # all 60 steps, floats compared exactly
    assert [c.name for c in ckpt.list_checkpoints(run)][-1] == "step-00000060"


KILL_DURING_SAVE = """
import os, sys, time
from trainfer.train import trainer
real = trainer.save_hf
def slow_save(out_dir, *a, **k):
    real(out_dir, *a, **k)
    if "step-00000020" in str(out_dir):  # half-written: weights there, trainer.pt and state.json not yet
        open(os.environ["SAVING_FLAG"], "w").close()
        time.sleep(600)
trainer.save_hf = slow_save
from trainfer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_the_checkpoint_write_leaves_the_previous_one(tiny_data, tmp_path):
    run, flag = tmp_path / "run", tmp_path / "saving"
    env = {**os.environ, "SAVING_FLAG": str(flag)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, *train_args(tiny_data, run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((run / "checkpoints").glob(".tmp-step-00000020-*"))  # the interrupted write
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step-00000010"]
    resumed = cli(*train_args(tiny_data, run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    ref = cli(*train_args(tiny_data, tmp_path / "ref"))
    assert ref.returncode == 0 and losses(run) == losses(tmp_path / "ref")
    assert not list((run / "checkpoints").glob(".tmp-*"))  # cleaned up by the next save


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tiny_data, tmp_path, fsdp):
    """Same global batch of 8 windows (2 processes x 2 micro-batches x 2, with gradient sync skipped on the
    first micro-batch, vs 1 x 4 x 2): torchrun with 2 CPU processes follows the single-process losses."""
    single = cli(*train_args(tiny_data, tmp_path / "one", max_steps=20, batch_size=2, grad_accum=4))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "trainfer.cli",
        *train_args(tiny_data, tmp_path / "two", max_steps=20, batch_size=2, grad_accum=2, fsdp=fsdp),
    ]
    two = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 20
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    # rank 0 wrote the checkpoints; a distributed run resumes from them
    more = subprocess.run(
        [*cmd, "--resume", "--set", "max_steps=24"], capture_output=True, text=True, env=env, timeout=300
    )
    assert more.returncode == 0, more.stderr[-3000:]
    assert max(losses(tmp_path / "two")) == 24


def test_bad_input_is_a_clear_error_and_overwrites_nothing(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert cli(*train_args(tiny_data, run, max_steps=10)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    cases = [
        (train_args(tiny_data, run), "already has checkpoints"),
        ([*train_args(tiny_data, run), "--resume", "--set", "model.dim=64"], "holds a different model"),
        ([*train_args(tiny_data, run), "--resume", "--set", "batch_sizes=3"], "did you mean 'batch_size'"),
        (train_args(tmp_path / "nothing", tmp_path / "r2"), "not a prepared data directory"),
        (train_args(tiny_data, tmp_path / "r3", seq_len=100000), "too few for windows"),
        (["train", "--out", str(tmp_path / "r4"), "--resume"], "nothing to resume"),
        (["train", "--out", str(run), "--resume"], "has already trained 10 steps"),
        (["train", "--out", str(run), "--resume", "--seed", "5", "--set", "max_steps=20"], "trained with seed=0"),
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_early_stopping_and_retention(tiny_data, tmp_path):
    """A vanishing lr never improves by min_delta: stop after `patience` evaluations; keep the last K + best."""
    cfg = load_config(
        None,
        tiny_settings(
            max_steps=200,
            lr=1e-9,
            warmup_steps=0,
            eval_every=5,
            ckpt_every=5,
            early_stop_patience=2,
            early_stop_min_delta=1e-3,
            keep_last=1,
        ),
        data=str(tiny_data),
        out_dir=str(tmp_path / "run"),
    )
    result = train(cfg)
    assert result.stopped_early and result.steps < 30
    kept = ckpt.list_checkpoints(tmp_path / "run")
    assert len(kept) <= 2 and kept[-1].name == f"step-{result.steps:08d}"
    assert result.best_checkpoint in kept
    state = json.loads((kept[-1] / "state.json").read_text())
    assert state["bad_evals"] == 2


def test_bf16_autocast_and_compile_paths_train(tiny_data, tmp_path):
    """The other two compute paths: bf16 autocast (emulated on CPUs without avx512_bf16) and torch.compile."""
    runs = {}
    for name, extra in {"eager": {}, "bf16": {"dtype": "bfloat16"}, "compiled": {"compile": True}}.items():
        cfg = load_config(None, tiny_settings(max_steps=12, eval_every=12, **extra), data=str(tiny_data),
                          out_dir=str(tmp_path / name))  # fmt: skip
        train(cfg)
        rows = read_metrics(tmp_path / name / "metrics.jsonl")
        runs[name] = (rows[0]["dtype"], [r["loss"] for r in rows if "loss" in r])
    assert runs["bf16"][0] == "bfloat16" and runs["eager"][0] == "float32"
    for name, (_, loss) in runs.items():
        assert loss[-1] < loss[0], name
    assert runs["compiled"][1][0] == pytest.approx(runs["eager"][1][0], rel=1e-5)  # same model, same batch
    assert runs["bf16"][1][0] == pytest.approx(runs["eager"][1][0], rel=2e-2)  # bf16 matmuls: ~3 digits


def test_a_run_without_a_validation_split(tmp_path):
    """val_fraction 0: an empty val.bin; training runs, reports no held-out loss, keeps the latest."""
    from tests.train.conftest import random_corpus
    from trainfer.data.prepare import read_shard

    data = random_corpus(tmp_path, docs=1, words=200, val_fraction=0.0)
    assert len(read_shard(data, "val")) == 0
    cfg = load_config(None, tiny_settings(max_steps=10), data=str(tmp_path / "data"), out_dir=str(tmp_path / "run"))
    result = train(cfg)
    assert result.val_loss is None and result.best_checkpoint.name == "step-00000010"
