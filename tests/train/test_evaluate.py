"""Evaluation: bits per byte, the memorization probe, and `trainfer eval` on a trained run."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from tests.train.conftest import random_corpus, tiny_settings
from trainfer.data.prepare import prepare, read_shard
from trainfer.errors import TrainferError
from trainfer.io.loader import load_model
from trainfer.train.config import load_config
from trainfer.train.evaluate import bits_per_byte, evaluate_model, memorization_probe
from trainfer.train.trainer import train


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Five documents of 64 random words (~400 characters): four to learn by heart, one held out."""
    return random_corpus(tmp_path_factory.mktemp("small"), docs=5, words=64, val_fraction=0.2, first_seed=100)


@pytest.fixture(scope="module")
def memorized_run(small_data, tmp_path_factory):
    """A model trained for ~200 epochs on ~1,600 characters: long enough to recite them."""
    out = tmp_path_factory.mktemp("memorized") / "run"
    settings = tiny_settings(
        max_steps=600,
        lr=1e-2,
        warmup_steps=20,
        eval_every=600,
        ckpt_every=600,
        log_every=50,
        **{"model.dim": 96, "model.n_layers": 3, "model.n_heads": 4, "model.n_kv_heads": 2, "seq_len": 64},
    )
    train(load_config(None, settings, data=str(small_data), out_dir=str(out), seed=1))
    return out


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), 1.0) == 1.0 and bits_per_byte(math.log(2) * 3, 3.0) == 1.0


def test_probe_tells_a_memorizing_model_from_one_that_did_not(small_data, memorized_run, tmp_path):
    train_ids, val_ids = read_shard(small_data, "train"), read_shard(small_data, "val")
    model, tok = load_model(memorized_run)
    probe = memorization_probe(model, train_ids, val_ids, passages=16, prefix_tokens=48, continuation_tokens=24)
    assert probe.train_exact >= 0.5 and probe.val_exact <= 0.1 and probe.gap >= 0.4, probe
    # A model that saw the data for a few steps only has learned letters, not passages: no gap.
    early = tmp_path / "early"
    train(load_config(None, tiny_settings(max_steps=20), data=str(small_data), out_dir=str(early)))
    model, tok = load_model(early)
    probe = memorization_probe(model, train_ids, val_ids, passages=16, prefix_tokens=48, continuation_tokens=24)
    assert probe.train_exact == 0 and probe.val_exact == 0 and probe.gap == 0, probe


def test_eval_command(small_data, memorized_run):
    report = evaluate_model(str(memorized_run), small_data, max_tokens=2048, seq_len=64, passages=8)
    assert report.train_loss < report.val_loss  # it memorized: training text is easier
    assert report.val_ppl == pytest.approx(math.exp(report.val_loss))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainfer.cli",
            "eval",
            str(memorized_run),
            "--data",
            str(small_data),
            "--max-tokens",
            "1024",
            "--passages",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout and "memorization probe (4 passages each" in r.stdout


@pytest.mark.real
def test_eval_of_smollm2_on_held_out_shakespeare(smollm2_path, tmp_path):
    """The real model on real text, tokenized with its own tokenizer: a sane perplexity, the probe runs."""
    data = tmp_path / "data"
    prepare(["shakespeare"], data, tokenizer=str(smollm2_path), val_fraction=0.1, seed=0)
    report = evaluate_model(str(smollm2_path), data, max_tokens=1024, seq_len=256, passages=6)
    # Measured: 3.96 nats/token = 1.72 bits/byte over 4 windows of 256 tokens (Q4_1 weights, Gutenberg
    # layout with speaker tags and stage directions); a uniform guess would be 15.7 bits per token.
    assert 2.5 < report.val_loss < 5.0 and 1.0 < report.val_bpb < 2.2, report
    assert report.probe is not None and report.probe.passages == 6
    with pytest.raises(TrainferError, match="another tokenizer"):
        evaluate_model(str(smollm2_path), random_corpus(tmp_path / "chars", docs=3, words=80, val_fraction=0.34))
