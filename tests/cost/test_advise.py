"""`trainfer cost advise`: the verdict thresholds, and the check on the real SmolLM2 with fictional texts."""

from __future__ import annotations

import random

import pytest

from trainfer.cost.advise import advise, choose
from trainfer.cost.hardware import load_table


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
