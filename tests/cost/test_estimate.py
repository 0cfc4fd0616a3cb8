"""The cost model against hand computations, and its errors on bad inputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from trainfer.cost import estimate as est
from trainfer.cost.hardware import Hardware, load_table
from trainfer.errors import TrainferError

H100 = Hardware("h", "", 1000, "bf16", 3000, 3.0, "test", "2026-01")  # 1e15 FLOP/s, $3/h


def level(name, tok_s, req_s, ttft_p90, tpot_p90, concurrency=1):
    return {
        "level": name,
        "concurrency": concurrency,
        "output_token_throughput": tok_s,
        "request_throughput": req_s,
        "ttft_s": {"p50": ttft_p90 / 2, "p90": ttft_p90},
        "tpot_s": {"p50": tpot_p90 / 2, "p90": tpot_p90},
    }


def test_training_dollars_and_projection():
    assert est.train_dollars(7200, 1.5) == 3.0  # 2 hours at $1.5
    p = est.project(3.6e18, H100, 0.5)  # 3.6e18 / (1e15 * 0.5) = 7200 s = 2 h
    assert math.isclose(p.hours, 2.0) and math.isclose(p.dollars, 6.0)
    with pytest.raises(TrainferError, match="MFU"):
        est.project(1e18, H100, 0)
    parts = est.full_cost(45.0)  # accelerators are 45% of 100
    assert math.isclose(parts["total"], 100) and math.isclose(parts["staff"], 25) and math.isclose(parts["other"], 8.5)


def test_read_run(tmp_path):
    rows = [
        {"step": 0, "event": "start", "params": 1000, "flops_per_token": 6000.0},
        {"step": 10, "tokens": 5000, "tokens_per_s": 100.0, "mfu": 0.2, "elapsed_s": 50.0},
        {"step": 20, "tokens": 10000, "tokens_per_s": 100.0, "mfu": 0.4, "elapsed_s": 100.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = est.read_run(tmp_path)
    assert (run.tokens, run.wall_s, run.params) == (10000, 100.0, 1000) and math.isclose(run.mfu, 0.3)
    assert run.flops == 6e7
    with pytest.raises(TrainferError, match="no metrics.jsonl"):
        est.read_run(tmp_path / "nope")
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(TrainferError, match="damaged"):
        est.read_run(tmp_path)


@pytest.mark.parametrize(
    "price,tok_s,req_s,per_million,per_request",
    [
        (3.6, 1000, 10, 1.0, 1e-4),  # $0.001/s over 1000 tok/s = $1e-6/token
        (0.10, 144.7, 1.13, 0.10 / 3600 / 144.7 * 1e6, 0.10 / 3600 / 1.13),
    ],
)
def test_serve_points(price, tok_s, req_s, per_million, per_request):
    (p,) = est.serve_points([level("c1", tok_s, req_s, 0.2, 0.01)], price, 1000, 100)
    assert math.isclose(p.dollars_per_million, per_million) and math.isclose(p.dollars_per_request, per_request)
    assert p.meets_slo and p.ttft_ms == 200 and p.tpot_ms == 10


def test_the_cheapest_point_that_meets_the_slo():
    levels = [level("c1", 100, 1, 0.1, 0.01), level("c4", 300, 3, 0.5, 0.03), level("c16", 900, 9, 3.0, 0.09)]
    points = est.serve_points(levels, 1.0, slo_ttft_ms=1000, slo_tpot_ms=100)
    assert [p.meets_slo for p in points] == [True, True, False]
    assert est.cheapest(points).level == "c4"  # c16 is cheaper but breaks the TTFT SLO
    assert est.cheapest(est.serve_points(levels, 1.0, slo_ttft_ms=50, slo_tpot_ms=100)) is None


def test_fleet_for_a_daily_load():
    (p,) = est.serve_points([level("c4", 300, 3, 0.5, 0.03)], 2.0, 1000, 100)
    f = est.fleet(p, 2.0, requests_per_day=864_000, tokens_per_request=100, peak_to_average=3)
    # average 10 req/s, peak 30 req/s, 3 req/s per replica -> 10 replicas x $2 x 730 h
    assert math.isclose(f.peak_requests_per_s, 30) and f.replicas == 10 and math.isclose(f.dollars_per_month, 14600)
    tokens_month = 864_000 * 100 * 365 / 12
    assert math.isclose(f.dollars_per_month_by_tokens, tokens_month / 1e6 * p.dollars_per_million)
    with pytest.raises(TrainferError):
        est.fleet(p, 2.0, 0, 100)


def test_lifetime_split_and_break_even():
    life = est.lifetime(training_dollars=1000, serving_per_month=500, months=12)
    assert life.total == 7000 and math.isclose(life.inference_share, 6000 / 7000)
    # 0.8 * 1000 / (0.2 * 500) = 8 months; 0.9 * 1000 / (0.1 * 500) = 18 months
    assert math.isclose(life.months_to_share["80%"], 8) and math.isclose(life.months_to_share["90%"], 18)
    assert est.break_even_requests(100, 0.003, 0.001) == pytest.approx(50_000)
    assert est.break_even_requests(100, 0.001, 0.002) == math.inf


def test_edge_vs_cloud():
    edge, cloud, hybrid = est.edge_vs_cloud(
        100,
        10,
        150,
        5,
        cloud_dollars_per_million=2.0,
        tokens=101,
        tokens_per_user_month=500_000,
        device_price=720,
        device_months=36,
        device_watts=100,
        hours_per_month=10,
        dollars_per_kwh=0.2,
        rtt_ms=50,
    )
    assert edge.latency_ms == 100 + 100 * 10 and cloud.latency_ms == 50 + 150 + 100 * 5
    assert math.isclose(edge.dollars_per_user_month, 720 / 36 + 0.1 * 10 * 0.2)  # $20 + 1 kWh x $0.2
    assert math.isclose(cloud.dollars_per_user_month, 1.0)  # 0.5M tokens x $2 per 1M
    assert hybrid.dollars_per_user_month == edge.dollars_per_user_month


def test_price_table_loads_and_overrides(tmp_path):
    table = load_table()
    assert {"cpu-2vcpu", "h100-sxm", "a100-80gb"} <= set(table.rows) and "2026" in table.sources[0]
    mine = tmp_path / "mine.toml"
    mine.write_text(
        'date = "2030-01"\n[[hardware]]\nname = "h100-sxm"\ndescription = "cheaper"\npeak_tflops = 989\n'
        'peak_dtype = "bf16"\nmemory_gbs = 3350\nprice_per_hour = 1.0\nsource = "me"\nas_of = "2030-01"\n'
    )
    table = load_table(mine)
    assert table.get("h100-sxm").price_per_hour == 1.0 and "2030-01" in table.sources[1]
    with pytest.raises(TrainferError, match="no hardware 'tpu'"):
        table.get("tpu")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[hardware]]\nname = "x"\n')
    with pytest.raises(TrainferError, match="lacks"):
        load_table(bad)
    bad.write_text("not = [toml")
    with pytest.raises(TrainferError, match="not valid TOML"):
        load_table(bad)
    with pytest.raises(TrainferError, match="no such price table"):
        load_table(tmp_path / "missing.toml")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "trainfer.cli", "cost", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_serve_json_and_errors(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(
        json.dumps(
            {"levels": [level("concurrency 1", 100, 1, 0.1, 0.01), level("concurrency 4", 300, 3, 0.5, 0.03, 4)]}
        )
    )
    out = run_cli("serve", str(bench), "--price-per-hour", "3.6", "--requests-per-day", "86400", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["cheapest"]["level"] == "concurrency 4" and math.isclose(
        data["cheapest"]["dollars_per_million"], 1e6 / 300 / 1000
    )
    assert data["fleet"]["replicas"] == 1  # peak 2 req/s vs 3 per replica
    text = run_cli("serve", str(bench), "--price-per-hour", "3.6", "--plot", str(tmp_path / "cost.png"))
    assert text.returncode == 0 and "cheapest point meeting the SLO: concurrency 4" in text.stdout
    assert (tmp_path / "cost.png").stat().st_size > 10_000
    edge = run_cli("edge-vs-cloud", str(bench), "--cloud-per-million", "2", "--plot", str(tmp_path / "edge.png"))
    assert edge.returncode == 0 and "hybrid" in edge.stdout and (tmp_path / "edge.png").exists()
    for broken, message in [
        ("missing.json", "no such benchmark JSON"),
        ("garbage", "invalid JSON"),
        ("{}", "no levels"),
    ]:
        path = tmp_path / "x.json"
        if broken != "missing.json":
            path.write_text(broken)
        bad = run_cli(
            "serve", str(tmp_path / broken) if broken == "missing.json" else str(path), "--price-per-hour", "1"
        )
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr
        path.unlink(missing_ok=True)


def test_cli_train_and_lifetime(tmp_path):
    out = run_cli("train", "--flops", "3.6e18", "--wall-s", "7200", "--hardware", "h100-sxm", "--full", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["rows"][0][0] == "h100-sxm (as run)" and math.isclose(data["rows"][0][2], 2 * 2.99)
    assert "total" in data["full_cost"]
    life = run_cli(
        "lifetime",
        "--training",
        "1000",
        "--serving-per-month",
        "500",
        "--months",
        "12",
        "--tuning",
        "100",
        "--per-request-large",
        "0.003",
        "--per-request-small",
        "0.001",
    )
    assert life.returncode == 0 and "after 8 months" in life.stdout and "50,000 requests" in life.stdout
    none = run_cli("train")
    assert none.returncode == 1 and "--flops" in none.stderr


# H100 here: 3000 GB/s, 1e15 FLOP/s, $3/h. (weights, kv/token, flops/token, context, batch, bw eff, mfu, overhead ms)
@pytest.mark.parametrize(
    "args,step_ms,bound",
    [((3e9, 0, 1e9, 0, 1, 1.0, 1.0, 0.0), 1.0, "memory"),  # 3 GB at 3000 GB/s = 1 ms
     ((3e9, 0, 1e9, 0, 1, 0.5, 1.0, 0.25), 2.25, "memory"),  # half the bandwidth, + 0.25 ms
     ((3e9, 1e6, 1e9, 1000, 2, 1.0, 1.0, 0.0), 1 + 2 * 1000 * 1e6 / 3e12 * 1e3, "memory"),  # + 2 GB of KV
     ((3e9, 0, 1e12, 0, 10, 1.0, 0.5, 0.0), 20.0, "compute")],  # 1e13 FLOPs at 5e14 FLOP/s = 20 ms
)  # fmt: skip
def test_projected_decode_by_hand(args, step_ms, bound):
    p = est.project_decode(H100, *args)
    batch = args[4]
    assert p.step_ms == pytest.approx(step_ms) and p.bound == bound
    assert p.output_tok_s == pytest.approx(batch / (step_ms / 1000))
    assert p.dollars_per_million == pytest.approx(3.0 / 3600 / p.output_tok_s * 1e6)
    with pytest.raises(TrainferError, match="efficiencies"):
        est.project_decode(H100, 1, 0, 1, 0, 1, 1.5, 0.5, 0)


def test_cli_decode_projection(tmp_path):
    from tests.conftest import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "m")
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"levels": [level("concurrency 1", 100, 1, 0.1, 0.01)]}))
    out = run_cli("decode", str(model), "--hardware", "h100-sxm", "--batch", "1,8", "--calibrate", str(bench),
                  "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [p["batch"] for p in data["points"]] == [1, 8] and data["calibration"]["measured"] == 100
    assert data["points"][1]["output_tok_s"] > data["points"][0]["output_tok_s"]  # batching amortizes the weights
    bad = run_cli("decode", str(model), "--hardware", "tpu-v9")
    assert bad.returncode == 1 and "no hardware 'tpu-v9'" in bad.stderr and "Traceback" not in bad.stderr


def test_cascade_cost_by_hand(tmp_path):
    """local-first holds the edge for every answer and the cloud for the share forwarded; all cloud skips the edge."""

    def row(fact, forwarded, e2e):
        return {"test": {"fact_rate": fact, "forwarded": forwarded, "e2e_mean_s": e2e, "ttft_p50_ms": 1.0}}

    settings = {"all edge": row(0.1, 0, 1.0), "all cloud": row(0.9, 1, 2.0), "local-first -0.5": row(0.8, 0.5, 2.1)}
    measured, line = est.cascade(settings, edge_price_per_hour=3.6, cloud_price_per_hour=7.2)  # $0.001 and $0.002/s
    by = {p.label: p for p in measured}
    assert by["all edge"].dollars_per_1000 == pytest.approx(1000 * 0.001 * 1.0)
    assert by["all cloud"].dollars_per_1000 == pytest.approx(1000 * 0.002 * 2.0)
    assert by["local-first -0.5"].dollars_per_1000 == pytest.approx(1000 * (0.001 * 1.0 + 0.5 * 0.002 * 2.0))
    assert by["local-first -0.5"].latency_s == 2.1 and by["local-first -0.5"].fact_rate == 0.8  # as measured
    assert [p.forwarded for p in line] == pytest.approx([i / 10 for i in range(11)])
    assert line[-1].latency_s == pytest.approx(3.0) and line[0].dollars_per_1000 == pytest.approx(1.0)
    path = tmp_path / "cascade.json"
    path.write_text(json.dumps({"settings": settings}))
    out = run_cli("cascade", str(path), "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["line"]) == 11
    tuned = {**settings, "all edge": row(0.6, 0, 1.0)}
    path.write_text(json.dumps({"settings": settings, "sync": {"settings": tuned}}))
    out = run_cli("cascade", str(path), "--after-sync", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["measured"][0]["fact_rate"] == 0.6
    path.write_text(json.dumps({"settings": settings}))
    bad = run_cli("cascade", str(path), "--after-sync")
    assert bad.returncode == 1 and "no sync-back round" in bad.stderr
    path.write_text(json.dumps({"settings": {"all edge": settings["all edge"]}}))
    bad = run_cli("cascade", str(path))
    assert bad.returncode == 1 and "not a benchmarks/cascade.py report" in bad.stderr and "Traceback" not in bad.stderr
