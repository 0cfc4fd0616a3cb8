"""`trainfer cost advise`: the verdict thresholds, and the check on the real SmolLM2 with fictional texts."""

from __future__ import annotations

import random

import pytest

from trainfer.cost.advise import advise, advise_chat, choose
from trainfer.cost.hardware import load_table
from trainfer.errors import TrainferError


@pytest.mark.parametrize("ratio,verdict", [(0.3, "serve"), (1.15, "serve"), (1.16, "fine-tune"), (2.0, "fine-tune"),
                                           (2.01, "pretrain"), (9, "pretrain")])  # fmt: skip
def test_verdict_thresholds(ratio, verdict):
    assert choose(ratio) == verdict


@pytest.mark.real
def test_advise_on_smollm2(smollm2, tmp_path):
    rng = random.Random(0)
    syllables = ["ka", "zu", "vre", "xo", "qli", "mpa", "dro", "ye", "tsu", "gne"]
    glyphs = tmp_path / "glyphs.txt"  # an invented notation no model has read
    glyphs.write_text("\n".join(" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                                         for _ in range(12)) + " |" for _ in range(120)))  # fmt: skip
    a = advise("smollm2-135m-instruct", [str(glyphs)], load_table(), max_tokens=2048)
    assert a.verdict == "pretrain" and a.ratio > 2 and a.user_tokens > 1000
    assert a.step_tokens_per_s > 0 and a.finetune_dollars_here > 0
    assert a.pretrain_flops == 6 * smollm2.model.cfg.n_params * 20 * smollm2.model.cfg.n_params
    assert {h for h, _, _ in a.pretrain} == {"rtx-4090", "l4", "a100-80gb", "h100-sxm"}  # GPU rows only
    assert any("verdict" in r for r in a.reasons)


GENERAL = [("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
           ("Which planet is the largest in our solar system?", "Jupiter"),
           ("Who wrote Romeo and Juliet?", "Shakespeare"), ("What is the chemical symbol for gold?", "Au")]  # fmt: skip
FICTIONAL = [("When does the Quillmore reading room open on Sundays?", "11:40", "It opens at 11:40 on Sundays."),
             ("What does a Vessendra day pass cost?", "17 florins", "A day pass costs 17 florins."),
             ("Who founded the Ombrel Glassworks?", "Tavi Runcorn", "Tavi Runcorn founded it in 1871."),
             ("Which ferry goes to Lark Skerry?", "the Pellan", "Only the Pellan sails to Lark Skerry."),
             ("How long is the Harrowgate warranty?", "29 months", "It lasts 29 months.")]  # fmt: skip


def write_chat(path, rows):
    import json

    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}], "expected": e}) + "\n"
                            for q, e, a in rows))  # fmt: skip
    return path


@pytest.mark.real
def test_advise_on_a_chat_eval_set(smollm2, tmp_path):
    """Questions the base model answers -> serve; facts it cannot know (a fictional town) -> fine-tune, costed."""
    known = write_chat(tmp_path / "known.jsonl", [(q, e, f"{e}.") for q, e in GENERAL])
    a = advise_chat("smollm2-135m-instruct", str(known), load_table(), max_tokens=1024)
    assert a.verdict == "serve" and a.answer_rate >= 0.8 and a.ratio is None  # 5 short answers: no text gap judged
    fictional = write_chat(tmp_path / "town.jsonl", FICTIONAL)
    train = write_chat(tmp_path / "town-train.jsonl", FICTIONAL * 4)
    b = advise_chat("smollm2-135m-instruct", str(fictional), load_table(), train_data=str(train), max_tokens=1024)
    assert b.verdict == "fine-tune" and b.answer_rate == 0.0 and b.target == 0.8
    assert any("town-train.jsonl (20 conversations" in r for r in b.reasons)  # the training set was costed
    assert b.finetune_dollars_here > 0 and any("verdict: fine-tune" in r for r in b.reasons)
    with pytest.raises(TrainferError, match="target"):
        advise_chat("smollm2-135m-instruct", str(fictional), load_table(), target=0)
