"""The cost model: what a training run cost and would cost elsewhere, what serving costs per million tokens,
per request and per month at a load, the lifetime split, and edge vs cloud. Every input is either read from
a file trainfer measured (a run's metrics.jsonl, a `trainfer bench serve` / `bench decode` JSON) or an
argument the caller states; the functions are plain arithmetic, tested against hand computations.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainfer.cost.hardware import Hardware
from trainfer.errors import TrainferError

HOURS_PER_MONTH = 730.0  # 365 * 24 / 12
# The seed's shares of a training budget (midpoints): accelerators 40-50%, staff 20-30%, servers and
# networking 15-20%, energy 2-6%; the rest is everything else.
COST_SHARES = {"accelerators": 0.45, "staff": 0.25, "servers and networking": 0.175, "energy": 0.04}


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TrainferError(f"no such {what}: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainferError(f"{path} is not a {what} (invalid JSON: {e})") from None


# ---- training -----------------------------------------------------------------------------------------------


@dataclass
class TrainRun:
    """What a training run measured (trainer's metrics.jsonl)."""

    tokens: int
    flops_per_token: float
    wall_s: float
    mfu: float  # mean over logged intervals
    params: int

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token


def read_run(run_dir: Path) -> TrainRun:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise TrainferError(f"{run_dir} has no metrics.jsonl: not a trainfer training run")
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise TrainferError(f"{path} is damaged: {e}") from None
    start = next((r for r in rows if r.get("event") == "start"), None)
    logs = [r for r in rows if "tokens_per_s" in r and "tokens" in r]
    if start is None or not logs:
        raise TrainferError(f"{path} has no start record or no logged steps yet")
    last = max(logs, key=lambda r: r["tokens"])
    mfu = sum(r["mfu"] for r in logs) / len(logs)
    return TrainRun(
        int(last["tokens"]), float(start["flops_per_token"]), float(last["elapsed_s"]), mfu, start["params"]
    )


@dataclass
class Projection:
    hardware: str
    hours: float
    dollars: float
    assumed_mfu: float


def train_dollars(wall_s: float, price_per_hour: float) -> float:
    return wall_s / 3600 * price_per_hour


def project(flops: float, hw: Hardware, mfu: float) -> Projection:
    """The same FLOPs on other hardware at an assumed MFU (stated: nobody measured it there)."""
    if not 0 < mfu <= 1:
        raise TrainferError(f"assumed MFU must be in (0, 1], got {mfu}")
    hours = flops / (hw.peak_flops * mfu) / 3600
    return Projection(hw.name, hours, hours * hw.price_per_hour, mfu)


def full_cost(compute_dollars: float) -> dict[str, float]:
    """The compute bill taken as the accelerators' share of a full training budget (the seed's shares)."""
    total = compute_dollars / COST_SHARES["accelerators"]
    parts = {k: total * v for k, v in COST_SHARES.items()}
    parts["other"] = total - sum(parts.values())
    parts["total"] = total
    return parts


# ---- serving ------------------------------------------------------------------------------------------------


@dataclass
class DecodePoint:
    """Projected batched decode on one hardware row: a roofline, with every efficiency stated, not measured."""

    hardware: str
    batch: int
    step_ms: float
    bound: str  # memory | compute (which roofline term is larger); the step overhead is added to either
    output_tok_s: float
    dollars_per_million: float


def project_decode(hw: Hardware, weight_bytes: float, kv_bytes_per_token: float, flops_per_token: float,
                   context: int, batch: int, bandwidth_efficiency: float, mfu: float,
                   step_overhead_ms: float) -> DecodePoint:  # fmt: skip
    """One decode step of `batch` sequences at `context` tokens: it reads every weight once and each sequence's
    KV cache, at `bandwidth_efficiency` x the row's memory bandwidth, or computes batch x flops_per_token at
    `mfu` x its peak, whichever takes longer; plus a fixed per-step overhead (kernel launches, scheduling)."""
    if not (0 < bandwidth_efficiency <= 1 and 0 < mfu <= 1) or batch < 1 or context < 0 or step_overhead_ms < 0:
        raise TrainferError("efficiencies must be in (0, 1], batch >= 1, context and overhead >= 0")
    memory_s = (weight_bytes + batch * context * kv_bytes_per_token) / (hw.memory_gbs * 1e9 * bandwidth_efficiency)
    compute_s = batch * flops_per_token / (hw.peak_flops * mfu)
    step_s = max(memory_s, compute_s) + step_overhead_ms / 1000
    tok_s = batch / step_s
    bound = "memory" if memory_s >= compute_s else "compute"
    return DecodePoint(hw.name, batch, step_s * 1000, bound, tok_s, hw.price_per_hour / 3600 / tok_s * 1e6)


@dataclass
class ServePoint:
    level: str
    output_tok_s: float
    requests_per_s: float
    ttft_ms: float  # at the chosen percentile
    tpot_ms: float
    dollars_per_million: float
    dollars_per_request: float
    meets_slo: bool


def read_bench(path: Path) -> list[dict[str, Any]]:
    """The load levels of a `trainfer bench serve` JSON (or of a `bench decode` JSON: its aggregate figures)."""
    data = _read_json(path, "benchmark JSON")
    if isinstance(data, dict) and isinstance(data.get("levels"), list) and data["levels"]:
        for lv in data["levels"]:
            need = ("level", "output_token_throughput", "request_throughput", "ttft_s", "tpot_s")
            if not all(k in lv for k in need):
                raise TrainferError(f"{path}: a level lacks one of {', '.join(need)}")
        return data["levels"]
    raise TrainferError(f"{path} is not a `trainfer bench serve --json` report (no levels)")


def serve_points(
    levels: list[dict[str, Any]], price_per_hour: float, slo_ttft_ms: float, slo_tpot_ms: float, pct: str = "p90"
) -> list[ServePoint]:
    """$ per 1M output tokens and per request at each measured level: the machine's hourly price over what
    it produced in an hour at that level; a level meets the SLO if its TTFT and TPOT percentiles do."""
    if price_per_hour <= 0:
        raise TrainferError(f"price per hour must be positive, got {price_per_hour}")
    points = []
    for lv in levels:
        tok_s, req_s = lv["output_token_throughput"], lv["request_throughput"]
        if tok_s <= 0 or req_s <= 0:
            continue  # nothing completed at this level
        ttft, tpot = 1000 * lv["ttft_s"][pct], 1000 * lv["tpot_s"][pct]
        per_s = price_per_hour / 3600
        points.append(
            ServePoint(
                lv["level"],
                tok_s,
                req_s,
                ttft,
                tpot,
                per_s / tok_s * 1e6,
                per_s / req_s,
                ttft <= slo_ttft_ms and tpot <= slo_tpot_ms,
            )  # fmt: skip
        )
    if not points:
        raise TrainferError("no level of the benchmark completed a request")
    return points


def cheapest(points: list[ServePoint]) -> ServePoint | None:
    """The lowest $ per 1M tokens among the points that meet the SLO (None if none does)."""
    ok = [p for p in points if p.meets_slo]
    return min(ok, key=lambda p: p.dollars_per_million) if ok else None


@dataclass
class Fleet:
    peak_requests_per_s: float
    replicas: int
    dollars_per_month: float  # replicas always on
    dollars_per_month_by_tokens: float  # the same tokens billed at the point's $ per 1M (perfect packing)


def fleet(point: ServePoint, price_per_hour: float, requests_per_day: float, tokens_per_request: float,
          peak_to_average: float = 2.0) -> Fleet:  # fmt: skip
    """Replicas to carry the peak of a daily load at this point's measured request rate, and the month's bill."""
    if requests_per_day <= 0 or tokens_per_request <= 0 or peak_to_average < 1:
        raise TrainferError("requests per day and tokens per request must be positive, peak-to-average >= 1")
    peak = requests_per_day / 86400 * peak_to_average
    replicas = max(1, math.ceil(peak / point.requests_per_s))
    tokens_month = requests_per_day * tokens_per_request * 365 / 12
    return Fleet(peak, replicas, replicas * price_per_hour * HOURS_PER_MONTH,
                 tokens_month / 1e6 * point.dollars_per_million)  # fmt: skip


# ---- lifetime -----------------------------------------------------------------------------------------------


@dataclass
class Lifetime:
    training: float
    serving_per_month: float
    months: int
    total: float
    inference_share: float
    months_to_share: dict[str, float]  # when inference passes 80% / 90% of the lifetime cost


def lifetime(training_dollars: float, serving_per_month: float, months: int) -> Lifetime:
    if training_dollars < 0 or serving_per_month <= 0 or months < 1:
        raise TrainferError("training cost >= 0, serving cost per month > 0 and months >= 1, please")
    serving = serving_per_month * months
    total = training_dollars + serving
    # m * S / (T + m * S) >= p  <=>  m >= p * T / ((1 - p) * S)
    when = {f"{int(p * 100)}%": p * training_dollars / ((1 - p) * serving_per_month) for p in (0.8, 0.9)}
    return Lifetime(training_dollars, serving_per_month, months, total, serving / total, when)


def break_even_requests(tuning_dollars: float, per_request_large: float, per_request_small: float) -> float:
    """Requests after which fine-tuning a small model (one-off) beats prompting a larger one (per request)."""
    saving = per_request_large - per_request_small
    return math.inf if saving <= 0 else tuning_dollars / saving


# ---- edge vs cloud ------------------------------------------------------------------------------------------


@dataclass
class Placement:
    where: str
    latency_ms: float  # time to a whole answer of `tokens` tokens
    first_token_ms: float
    dollars_per_user_month: float
    notes: str


def edge_vs_cloud(
    edge_ttft_ms: float,
    edge_tpot_ms: float,
    cloud_ttft_ms: float,
    cloud_tpot_ms: float,
    cloud_dollars_per_million: float,
    tokens: int,
    tokens_per_user_month: float,
    device_price: float,
    device_months: int = 36,
    device_watts: float = 0.0,
    hours_per_month: float = 0.0,
    dollars_per_kwh: float = 0.15,
    rtt_ms: float = 50.0,
) -> list[Placement]:
    """A whole answer's latency and the monthly cost per user, on a device the user owns (amortized, plus its
    energy) vs a cloud endpoint (per token, plus the network round trip). Hybrid: cloud training, edge serving."""
    if tokens < 1 or device_months < 1:
        raise TrainferError("tokens and device months must be at least 1")
    edge = Placement(
        "edge (this machine)",
        edge_ttft_ms + (tokens - 1) * edge_tpot_ms,
        edge_ttft_ms,
        device_price / device_months + device_watts / 1000 * hours_per_month * dollars_per_kwh,
        "private: prompts stay on the device; works offline; updates ship as model files",
    )
    cloud = Placement(
        "cloud",
        rtt_ms + cloud_ttft_ms + (tokens - 1) * cloud_tpot_ms,
        rtt_ms + cloud_ttft_ms,
        tokens_per_user_month / 1e6 * cloud_dollars_per_million,
        "prompts leave the device; needs a network; the provider updates the model",
    )
    hybrid = Placement(
        "hybrid (train in the cloud, serve on the edge)",
        edge.latency_ms,
        edge.first_token_ms,
        edge.dollars_per_user_month,
        "edge latency and privacy; data synced back for the next fine-tune (training billed separately)",
    )
    return [edge, cloud, hybrid]


# ---- the cascade -------------------------------------------------------------------------------------------


@dataclass
class CascadePoint:
    forwarded: float  # share of requests the upstream answered
    latency_s: float  # mean time to a whole answer
    dollars_per_1000: float
    fact_rate: float | None = None  # measured points only (the cascade benchmark's test split)
    label: str = ""


def read_cascade(path: Path, after_sync: bool = False) -> dict[str, Any]:
    """A `benchmarks/cascade.py` report: per setting, the test split's share forwarded, fact rate and latency
    (`after_sync`: those of its sync-back round, with the tuned edge)."""
    data = _read_json(path, "cascade report")
    if after_sync:
        data = data.get("sync") if isinstance(data, dict) else None
        if not isinstance(data, dict):
            raise TrainferError(f"{path} has no sync-back round (benchmarks/cascade.py ran with --no-sync?)")
    settings = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(settings, dict) or "all edge" not in settings or "all cloud" not in settings:
        raise TrainferError(f"{path} is not a benchmarks/cascade.py report (no 'all edge' and 'all cloud' settings)")
    return settings


def cascade(
    settings: dict[str, Any], edge_price_per_hour: float, cloud_price_per_hour: float, split: str = "test"
) -> tuple[list[CascadePoint], list[CascadePoint]]:
    """$ per 1,000 requests and latency of `local-first` at every share forwarded, from measured seconds per
    answer: every request holds the edge for its local answer, a forwarded one the cloud too (latencies add).
    Returns (the measured settings, the line through shares 0-100% in steps of 10)."""
    if edge_price_per_hour <= 0 or cloud_price_per_hour <= 0:
        raise TrainferError("prices per hour must be positive")
    edge_s, cloud_s = settings["all edge"][split]["e2e_mean_s"], settings["all cloud"][split]["e2e_mean_s"]
    edge_d, cloud_d = edge_price_per_hour / 3600, cloud_price_per_hour / 3600

    def point(share: float, label: str = "", fact: float | None = None) -> CascadePoint:
        return CascadePoint(
            share, edge_s + share * cloud_s, 1000 * (edge_d * edge_s + share * cloud_d * cloud_s), fact, label
        )

    measured = []
    for name, row in settings.items():
        r = row[split]
        if name == "all cloud":  # straight to the cloud: no local answer first
            measured.append(CascadePoint(1.0, r["e2e_mean_s"], 1000 * cloud_d * r["e2e_mean_s"], r["fact_rate"], name))
        else:
            p = point(r["forwarded"], name, r["fact_rate"])
            p.latency_s = r["e2e_mean_s"]  # as measured
            measured.append(p)
    return measured, [point(i / 10) for i in range(11)]


def as_dict(obj: Any) -> Any:
    if isinstance(obj, list):
        return [as_dict(o) for o in obj]
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
