"""`trainfer quantize --report` on the real SmolLM2: the issue's quality targets on 2,048 held-out positions of
each corpus (int8 perplexity within +1% of fp32, int4 within +5%)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainfer.compress.quality import _common_prefix, held_out_ids, quality_report


def test_common_prefix():
    assert _common_prefix([1, 2, 3], [1, 2, 4]) == 2 and _common_prefix([], [1]) == 0 and _common_prefix([5], [5]) == 1


@pytest.mark.real
def test_quality_targets_on_smollm2(smollm2):
    ids = held_out_ids(smollm2.tokenizer, "shakespeare", 2049)
    assert len(ids) == 2049 and smollm2.tokenizer.decode(ids[:50]).strip()
    rows = quality_report("smollm2-135m-instruct", positions=2048, n_prompts=8, tokens=16)
    by = {(r.corpus.split()[0], r.weights): r for r in rows}
    assert set(by) == {(c, w) for c in ("shakespeare", "human-eval") for w in ("float32", "int8", "int4")}
    for corpus in ("shakespeare", "human-eval"):
        ref = by[corpus, "float32"]
        assert ref.ppl_change == 0 and ref.top1_agreement == 1 and ref.greedy_identical == 1 and ref.positions == 2048
        assert by[corpus, "int8"].ppl_change <= 0.01 and by[corpus, "int4"].ppl_change <= 0.05
        for w in ("int8", "int4"):
            assert by[corpus, w].top1_agreement > 0.9 and by[corpus, w].greedy_prefix > 0.3


def test_report_needs_to_and_out_unless_reporting(tmp_path):
    run = subprocess.run([sys.executable, "-m", "trainfer.cli", "quantize", "nonexistent-model", "--to", "int8"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 1 and "--to and --out" in run.stderr and "Traceback" not in run.stderr
