"""The shared measuring protocol: rotation of the sides, per-round ratios, what a figure's environment records."""

from __future__ import annotations

import statistics

import pytest

from trainfer.rounds import Ratio, alternate, checkout, describe, environment, ratio


def test_every_side_runs_once_per_round_and_the_first_side_rotates():
    calls = []
    sides = {name: (lambda name=name: calls.append(name) or len(calls)) for name in ("a", "b", "c")}
    out = alternate(3, sides)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert out == {"a": [1, 6, 8], "b": [2, 4, 9], "c": [3, 5, 7]}


def test_the_ratio_is_the_median_of_per_round_ratios_not_a_ratio_of_medians():
    ours, theirs = [10.0, 20.0, 30.0], [10.0, 10.0, 40.0]  # rounds: 1.0, 2.0, 0.75
    r = ratio(ours, theirs)
    assert (r.median, r.low, r.high, r.rounds) == (1.0, 0.75, 2.0, 3)
    assert statistics.median(ours) / statistics.median(theirs) == 2.0  # what a ratio of medians would claim
    assert str(r) == "1.00x (0.75-2.00, 3 rounds)" and r.as_list() == [1.0, 0.75, 2.0]
    # Times and bytes: theirs / ours, so above 1 still means better.
    assert ratio([1.0, 2.0], [2.0, 2.0], lower_is_better=True) == Ratio(1.5, 1.0, 2.0, 2)
    with pytest.raises(ValueError, match="one value per round"):
        ratio([1.0], [1.0, 2.0])


def test_the_environment_names_the_switches_that_change_a_result(monkeypatch):
    monkeypatch.setenv("TRAINFER_BF16", "0")
    monkeypatch.delenv("TRAINFER_NATIVE", raising=False)
    env = environment(threads=2)
    assert env["switches"] == {"TRAINFER_BF16": "0"} | (
        {"OMP_NUM_THREADS": env["switches"]["OMP_NUM_THREADS"]} if "OMP_NUM_THREADS" in env["switches"] else {}
    )
    assert env["threads"] == 2 and env["cpu"] and len(env["commit"]) >= 7
    line = describe(env)
    assert "TRAINFER_BF16=0" in line and "2 threads" in line


def test_checkout_runs_another_copy_or_refuses(tmp_path):
    (tmp_path / "other" / "trainfer").mkdir(parents=True)
    (tmp_path / "other" / "trainfer" / "__init__.py").write_text("")
    env, cwd = checkout(tmp_path / "other")
    assert cwd == str((tmp_path / "other").resolve()) and env["PYTHONPATH"] == cwd
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="imports trainfer from"):
        checkout(tmp_path / "empty")  # nothing there: the installed copy would be measured instead
