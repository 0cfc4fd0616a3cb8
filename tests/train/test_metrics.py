"""MFU's denominator: the matmul-peak probe, its per-machine cache, a stated peak, and what a run records."""

from __future__ import annotations

import datetime
import json

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


class SimulatedCPU:
    """A clock that only moves when a product runs, by its FLOPs at `rate`: the probe's choices (which shapes, how
    many rounds) become exact, with no timing noise. Patches `Tensor.__matmul__` and the probe's clocks."""

    def __init__(self, monkeypatch, rate: float, cpu_share: float = 1.0):
        self.now, self.rate, self.share, self.products = 0.0, rate, cpu_share, []
        real = torch.Tensor.__matmul__

        def matmul(a, b):
            self.products.append((a.shape[0], a.shape[1], b.shape[1]))
            self.now += 2 * a.shape[0] * a.shape[1] * b.shape[1] / self.rate
            return real(a[:1, :1], b[:1, :1])  # no real work: the simulated time is what counts

        monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
        fake_time = type("FakeTime", (), {})()
        fake_time.perf_counter = lambda: self.now
        fake_time.process_time = lambda: self.now * self.share * torch.get_num_threads()
        monkeypatch.setattr(metrics, "time", fake_time)


def test_the_probe_finds_the_peak_within_its_budget(monkeypatch):
    cpu = SimulatedCPU(monkeypatch, rate=100e9)
    flops, share = measure_peak_flops(CPU, F32, PRESETS["tiny"], 16 * 128, budget_s=0.8)
    assert flops == pytest.approx(100e9) and share == pytest.approx(1.0)
    shapes = probe_shapes(CPU, PRESETS["tiny"], 16 * 128)
    assert set(cpu.products) == set(shapes)  # at 100 GFLOP/s the 2048 square takes 0.17 s: under budget / 4
    # Each shape warmed up and timed once, then whole rounds until 0.8 s: the last round ends past it, within
    # one round's time.
    one_round = sum(2 * m * k * n for m, k, n in shapes) / 100e9
    assert 0.8 <= cpu.now <= 0.8 + 2 * one_round and len(cpu.products) % len(shapes) == 0


def test_an_emulated_dtype_stops_at_the_small_shapes(monkeypatch):
    """bf16 on AVX2 runs at ~0.3 GFLOP/s: a 2048 square would take a minute; it is skipped, and the whole probe
    stays within twice its budget."""
    cpu = SimulatedCPU(monkeypatch, rate=0.3e9, cpu_share=0.5)
    flops, share = measure_peak_flops(CPU, F32, budget_s=0.8, min_rounds=3)
    assert flops == pytest.approx(0.3e9) and share == pytest.approx(0.5)
    # The 256 square always runs (0.11 s here); from its rate the 512 one is predicted at 0.89 s > budget / 4.
    assert set(cpu.products) == {(256, 256, 256)}
    assert 0.8 <= cpu.now <= 0.8 + 2 * 256**3 / 0.3e9
    # A 2.5 GFLOP/s machine (each 512 product 0.11 s) tries 512 but not 1024 (0.86 s).
    slow = SimulatedCPU(monkeypatch, rate=2.5e9)
    measure_peak_flops(CPU, F32, budget_s=0.8)
    assert {n for _, _, n in slow.products} == {256, 512}


def test_the_real_probe_measures_this_machine():
    flops, share = measure_peak_flops(CPU, F32, budget_s=0.05, min_rounds=1)
    assert flops > 1e8 and 0 < share < 1.5


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
