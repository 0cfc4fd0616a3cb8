"""`trainfer dataset prefs`: pairs from a model's own samples, the better-scored one chosen, in the form `trainfer
dpo` reads; problems without a pair and failing scores counted; bad input refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.reason.test_grpo import flat_model, prompts_file, rewards_file  # noqa: F401 (a fixture)
from trainfer.errors import TrainferError
from trainfer.io.loader import load_checkpoint
from trainfer.reason.prefs import make_prefs
from trainfer.train.dpo import load_pairs


def test_pairs_prefer_the_better_scored_sample_and_load_in_dpo(flat_model, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "prefs.jsonl"
    report = make_prefs(str(flat_model), out, data=str(prompts_file(tmp_path)),
                        reward=f"{rewards_file(tmp_path)}:digits", count=24, n=8, max_tokens=12)  # fmt: skip
    said = capsys.readouterr().out  # the work before it starts, then progress with the time left, 8 problems a batch
    assert "sampling 24 problems x 8 samples of up to 12 tokens (at most 2,304 tokens)" in said
    assert "8/24 problems sampled" in said and "min left" in said and "24/24 problems sampled" in said
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.problems == 24 and report.pairs == len(lines) > 0 and report.pairs + report.all_alike == 24
    for line in lines:
        share = [sum(c.isdigit() for c in t) / max(1, len(t)) for t in (line["chosen"], line["rejected"])]
        assert line["scores"] == pytest.approx(share) and share[0] > share[1]
        assert line["prompt"][-1]["role"] == "user" and line["chosen"].strip() != line["rejected"].strip()
    _, _, tokenizer = load_checkpoint(flat_model)
    assert len(load_pairs(out, tokenizer)) == report.pairs
    with pytest.raises(TrainferError, match="exists; pass --force"):
        make_prefs(str(flat_model), out, data=str(prompts_file(tmp_path)), reward=f"{rewards_file(tmp_path)}:digits")


def test_failures_are_counted_and_bad_input_refused(flat_model, tmp_path):  # noqa: F811
    out = tmp_path / "prefs.jsonl"
    report = make_prefs(str(flat_model), out, data=str(prompts_file(tmp_path, 6)),
                        reward=f"{rewards_file(tmp_path)}:broken", n=8, max_tokens=12)  # fmt: skip
    assert report.failures > 0 and "could not score" in report.summary()
    with pytest.raises(TrainferError, match="without 'answer' needs --reward"):
        make_prefs(str(flat_model), tmp_path / "b.jsonl", data=str(prompts_file(tmp_path)))
    with pytest.raises(TrainferError, match="n must be at least 2"):
        make_prefs(str(flat_model), tmp_path / "c.jsonl", task="add", n=1)
    cmd = [sys.executable, "-m", "trainfer.cli", "dataset", "prefs", str(flat_model), "--out", str(tmp_path / "d"),
           "--task", "sums"]  # fmt: skip
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "unknown task 'sums'" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "d").exists()
