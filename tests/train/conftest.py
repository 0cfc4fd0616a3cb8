"""A tiny prepared corpus (char-level, seconds to train on) and the settings of a tiny model run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from trainfer.data.prepare import prepare

WORDS = [
    *("king", "queen", "sword", "crown", "night", "ghost", "love", "death"),
    *("honour", "blood", "river", "storm", "rose", "thorn", "winter", "spring"),
]


def random_text(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) + "." for _ in range(n_words // 8)]
    return "\n".join(lines) + "\n"


def random_corpus(root: Path, docs: int, words: int, val_fraction: float, first_seed: int = 0) -> Path:
    """`docs` documents of seeded random words under root/docs, prepared char-level into root/data."""
    (root / "docs").mkdir(parents=True)
    for i in range(docs):
        (root / "docs" / f"doc{i}.txt").write_text(random_text(first_seed + i, words))
    prepare([str(root / "docs")], root / "data", "char", val_fraction=val_fraction, seed=0)
    return root / "data"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Five documents of seeded random words: four to train on, one held out (char tokenizer)."""
    return random_corpus(tmp_path_factory.mktemp("corpus"), docs=5, words=240, val_fraction=0.2)


def tiny_settings(**extra) -> list[str]:
    """`--set` overrides for a ~30k-parameter model that takes milliseconds per step."""
    base = {
        "model.dim": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.n_kv_heads": 1,
        "seq_len": 32,
        "batch_size": 8,
        "max_steps": 30,
        "warmup_steps": 5,
        "lr": 3e-3,
        "eval_every": 10,
        "eval_batches": 2,
        "log_every": 1,
        "ckpt_every": 10,
        "sample_tokens": 0,
        "progress": False,
        "dtype": "float32",  # not auto: that picks bf16 on CPUs with avx512_bf16 or AMX, and tests compare losses
    }
    base.update(extra)
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in base.items()]
