"""MFU's denominator: the matmul-peak probe, its per-machine cache, a stated peak, and what a run records."""

from __future__ import annotations

import datetime
import json
import time

import pytest
import torch

from tests.train.conftest import tiny_settings
from trainfer.errors import TrainferError
from trainfer.model.config import PRESETS
from trainfer.train import metrics
from trainfer.train.config import load_config
from trainfer.train.metrics import PEAK_ENV, matmul_peak, measure_peak_flops, probe_shapes, read_metrics
from trainfer.train.trainer import train

CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """A fake probe that counts its calls (no timing noise), an empty cache home, no stated peak in the env."""
    monkeypatch.setenv("TRAINFER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(PEAK_ENV, raising=False)
    calls: list[tuple] = []
    result = {"flops": 1e11, "share": 1.0}

    def fake(device, dtype, cfg=None, tokens=0):
        calls.append((device, dtype, cfg, tokens))
        return result["flops"], result["share"]

    monkeypatch.setattr(metrics, "measure_peak_flops", fake)
    return calls, result


def cache_entries(tmp_path) -> dict:
    return json.loads((tmp_path / "home" / "peak_flops.json").read_text())


def test_probe_shapes_are_squares_and_the_runs_own_matmuls():
    tiny = PRESETS["tiny"]  # dim 128, hidden 384, vocab 4096
    shapes = probe_shapes(CPU, tiny, tokens=16 * 128)
    assert {(2048, 128, 384), (2048, 384, 128), (2048, 128, 4096), (2048, 2048, 2048), (256, 256, 256)} <= set(shapes)
    flops = [m * k * n for m, k, n in shapes]
    assert flops == sorted(flops)  # cheapest first: an emulated dtype stops before the big ones
    # A big run's tokens are capped so no product costs more than the largest square.
    big = probe_shapes(CPU, PRESETS["base"], tokens=64 * 2048)
    assert max(m * k * n for m, k, n in big) <= 2048**3 and len(big) > 4
    assert probe_shapes(CPU) == [(n, n, n) for n in (256, 512, 1024, 2048)]


def test_the_probe_measures_and_its_cost_is_bounded():
    t = time.perf_counter()
    flops, share = measure_peak_flops(CPU, F32, PRESETS["tiny"], 16 * 128)
    elapsed = time.perf_counter() - t
    assert flops > 1e9 and 0 < share < 1.5
    assert elapsed < 4.0  # 1 s of rounds (at most 2 s) after one warm-up of each shape
    # A product predicted to take over budget_s / 4 is skipped, as an emulated dtype's big squares are.
    t = time.perf_counter()
    flops, _ = measure_peak_flops(CPU, F32, budget_s=0.001, min_rounds=1)
    assert flops > 0 and time.perf_counter() - t < 0.5


def test_the_cache_is_written_and_reused_without_measuring(probe, tmp_path):
    calls, _ = probe
    first = matmul_peak(CPU, F32, PRESETS["tiny"], 2048)
    assert (first.source, first.flops, len(calls)) == ("measured", 1e11, 1)
    assert calls[0][2:] == (PRESETS["tiny"], 2048)  # the run's shapes reach the probe
    (entry,) = cache_entries(tmp_path).values()
    assert entry["flops"] == 1e11 and entry["measured_on"] == datetime.date.today().isoformat()
    assert entry["threads"] == torch.get_num_threads() and entry["dtype"] == "float32" and entry["cpu"]
    second = matmul_peak(CPU, F32)
    assert (second.source, second.flops, len(calls)) == ("cached", 1e11, 1)  # no second measurement


def test_thread_counts_and_dtypes_do_not_share_an_entry(probe, tmp_path):
    calls, result = probe
    before = torch.get_num_threads()
    fewer = 1 if before > 1 else 2
    matmul_peak(CPU, F32)
    try:
        torch.set_num_threads(fewer)
        result["flops"] = 5e10
        other = matmul_peak(CPU, F32)
    finally:
        torch.set_num_threads(before)
    assert (other.source, other.flops, len(calls)) == ("measured", 5e10, 2)
    assert matmul_peak(CPU, F32).flops == 1e11 and len(calls) == 2  # back to the first entry
    assert matmul_peak(CPU, torch.bfloat16).source == "measured" and len(calls) == 3
    keys = [(e["threads"], e["dtype"]) for e in cache_entries(tmp_path).values()]
    assert sorted(keys) == sorted([(before, "float32"), (fewer, "float32"), (before, "bfloat16")])


def test_a_stated_peak_wins(probe, monkeypatch):
    calls, _ = probe
    matmul_peak(CPU, F32)  # cached
    monkeypatch.setenv(PEAK_ENV, "3.5e11")
    env = matmul_peak(CPU, F32)
    assert (env.source, env.flops, env.detail) == ("stated", 3.5e11, PEAK_ENV)
    cfg = matmul_peak(CPU, F32, stated=2e12)  # the run's config key beats the machine's env var
    assert (cfg.source, cfg.flops) == ("stated", 2e12) and len(calls) == 1
    monkeypatch.setenv(PEAK_ENV, "fast")
    with pytest.raises(TrainferError, match="TRAINFER_PEAK_FLOPS must be a positive number"):
        matmul_peak(CPU, F32)
    with pytest.raises(TrainferError, match="invalid value for peak_flops"):
        load_config(None, ["peak_flops=-1"])


def test_a_busy_machine_is_not_cached_and_a_stale_entry_only_rises(probe, tmp_path):
    calls, result = probe
    result.update(flops=4e10, share=0.5)  # another process held one of the two cores
    busy = matmul_peak(CPU, F32)
    assert busy.source == "measured" and "busy" in busy.detail
    assert not (tmp_path / "home" / "peak_flops.json").exists()
    result.update(flops=1e11, share=1.0)
    assert matmul_peak(CPU, F32).source == "measured" and len(calls) == 2  # measured again, now cached
    # Older than CACHE_MAX_AGE_DAYS: measured again; a slower reading keeps the faster old one.
    entries = cache_entries(tmp_path)
    (name,) = entries
    stale = (datetime.date.today() - datetime.timedelta(days=metrics.CACHE_MAX_AGE_DAYS + 1)).isoformat()
    entries[name].update(flops=2e11, measured_on=stale)
    (tmp_path / "home" / "peak_flops.json").write_text(json.dumps(entries))
    kept = matmul_peak(CPU, F32)
    assert (kept.source, kept.flops, len(calls)) == ("cached", 2e11, 3)
    assert cache_entries(tmp_path)[name]["measured_on"] == datetime.date.today().isoformat()
    # A torn or foreign cache file is measured over, not an error.
    (tmp_path / "home" / "peak_flops.json").write_text("{not json")
    assert matmul_peak(CPU, F32).source == "measured" and len(calls) == 4


def test_the_run_records_where_its_peak_came_from(probe, tiny_data, tmp_path, capsys):
    def run(name: str, *extra: str) -> dict:
        settings = tiny_settings(max_steps=4, eval_every=4, ckpt_every=4, eval_batches=1) + list(extra)
        result = train(load_config(None, settings, data=str(tiny_data), out_dir=str(tmp_path / name)))
        start = read_metrics(tmp_path / name / "metrics.jsonl")[0]
        assert start["event"] == "start" and result.peak_source == start["peak_source"]
        return start

    measured, cached = run("a"), run("b")
    stated = run("c", "peak_flops=2e9")
    assert (measured["peak_source"], measured["peak_flops"]) == ("measured", 1e11)
    assert (cached["peak_source"], cached["peak_flops"]) == ("cached", 1e11)
    assert (stated["peak_source"], stated["peak_flops"]) == ("stated", 2e9)
    assert "2.0 GFLOP/s matmul peak, stated" in capsys.readouterr().out
