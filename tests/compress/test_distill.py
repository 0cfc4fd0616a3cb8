"""Distillation: the loss against a hand computation, a distilled student closer to its teacher than one
trained on labels alone, the teacher cache equal to computing on the fly, pruned students, and the CLI."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.train.conftest import random_corpus, tiny_settings
from trainfer.compress.distill import distill, kd_loss, load_distill_config
from trainfer.train.config import load_config
from trainfer.train.metrics import read_metrics
from trainfer.train.trainer import train


def test_kd_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    T = 2.0

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    want = 0.0
    for b in range(2):
        for i in range(3):
            p, q = softmax(t[b, i].tolist()), softmax(s[b, i].tolist())
            want += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True))
    assert kd_loss(s, t, None, T).item() == pytest.approx(want / 6 * T * T, rel=1e-5)
    assert kd_loss(t, t, None, 1.0).item() == pytest.approx(0, abs=1e-6)
    # top-k: the teacher renormalized on its k best tokens, the student's full-vocabulary log-probs there
    values, index = t.topk(3, dim=-1)
    want = 0.0
    for b in range(2):
        for i in range(3):
            p = softmax(values[b, i].tolist())
            logq = torch.log_softmax(s[b, i] / T, -1)[index[b, i]].tolist()
            want += sum(pj * (math.log(pj) - lq) for pj, lq in zip(p, logq, strict=True))
    assert kd_loss(s, values, index, T).item() == pytest.approx(want / 6 * T * T, rel=1e-5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A trained tiny model and the data it was trained on (a char tokenizer)."""
    root = tmp_path_factory.mktemp("teacher")
    data = random_corpus(root, docs=5, words=300, val_fraction=0.2)
    train(load_config(None, tiny_settings(max_steps=200, eval_every=100), data=str(data), out_dir=str(root / "run")))
    return root / "run", data


STUDENT = {"model.dim": 16, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 1}


def student_run(teacher, out, **extra):
    run, data = teacher
    settings = tiny_settings(**{"max_steps": 150, "eval_every": 75, "lr": 3e-3, **STUDENT, **extra})
    cfg = load_distill_config(None, settings, teacher=str(run), data=str(data), out_dir=str(out))
    distill(cfg)
    return read_metrics(out / "metrics.jsonl")


def test_a_distilled_student_matches_its_teacher_better_than_labels_alone(teacher, tmp_path):
    kd = student_run(teacher, tmp_path / "kd", kd_weight=1.0, top_k=0)
    labels = student_run(teacher, tmp_path / "ce", kd_weight=0.0, top_k=0)
    kl = {
        name: [r["val_kl"] for r in rows if r.get("event") == "eval"][-1] for name, rows in (("kd", kd), ("ce", labels))
    }
    assert kl["kd"] < 0.97 * kl["ce"], kl  # measured 0.966 vs 1.018 nats
    top = student_run(teacher, tmp_path / "top", kd_weight=1.0, top_k=8)  # 8 of ~30 characters
    assert [r["val_kl"] for r in top if r.get("event") == "eval"][-1] < kl["ce"]


def test_the_teacher_cache_equals_the_teacher(teacher, tmp_path):
    cache = tmp_path / "cache"
    live = student_run(teacher, tmp_path / "live", top_k=8, max_steps=10, eval_every=10)
    first = student_run(teacher, tmp_path / "a", top_k=8, max_steps=10, eval_every=10, teacher_cache=str(cache))
    files = list(cache.glob("*/*.npz"))
    assert len(files) == 10 * 8  # one per training window
    second = student_run(teacher, tmp_path / "b", top_k=8, max_steps=10, eval_every=10, teacher_cache=str(cache))
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (live, first, second)]
    assert losses[0] == losses[1] == losses[2]
    with np.load(files[0]) as z:
        assert z["values"].shape == (32, 8) and z["index"].dtype == np.int32


def test_a_pruned_student_keeps_its_shape_and_learns(teacher, tmp_path):
    from trainfer.compress.prune import prune
    from trainfer.io.hf import read_config

    run, data = teacher
    (tmp_path / "cal.txt").write_text((data.parent / "docs" / "doc0.txt").read_text())
    prune(str(run), tmp_path / "pruned", "depth", 0.5, data=str(tmp_path / "cal.txt"), seq_len=32)
    settings = tiny_settings(max_steps=30, eval_every=10, lr=1e-3)
    settings = [s for s in settings if not s.startswith("model.")]
    cfg = load_distill_config(None, settings, teacher=str(run), student=str(tmp_path / "pruned"), data=str(data),
                              out_dir=str(tmp_path / "heal"))  # fmt: skip
    result = distill(cfg)
    assert read_config(result.best_checkpoint).n_layers == 1  # the pruned shape, trained
    evals = [r for r in read_metrics(tmp_path / "heal" / "metrics.jsonl") if r.get("event") == "eval"]
    assert evals[-1]["val_kl"] < evals[0]["val_kl"]


def test_cli_prepares_text_in_the_teachers_tokenizer(teacher, tmp_path):
    run, data = teacher
    cmd = [sys.executable, "-m", "trainfer.cli", "distill", "--teacher", str(run), "--student", "tiny",
           "--data", str(data.parent / "docs"), "--out", str(tmp_path / "d")]  # fmt: skip
    sets = [a for s in tiny_settings(max_steps=4, eval_every=4, **STUDENT) for a in ("--set", s)]
    r = subprocess.run(cmd + sets, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stdout and (tmp_path / "d" / "data" / "meta.json").exists()
    from trainfer.data.prepare import prepare

    (tmp_path / "digits").mkdir()
    for i in range(3):
        (tmp_path / "digits" / f"{i}.txt").write_text(" ".join(str(n * (i + 7)) for n in range(400)))
    other = tmp_path / "other"
    prepare([str(tmp_path / "digits")], other, "char", val_fraction=0.34)  # another alphabet
    r = subprocess.run([*cmd[:-4], "--data", str(other), "--out", str(tmp_path / "e"), *sets],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1 and "tokenizer" in r.stderr and "Traceback" not in r.stderr
