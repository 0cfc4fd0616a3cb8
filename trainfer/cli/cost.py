"""`trainfer cost ...`: what training and serving cost, from measured figures (the library is trainfer.cost)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from trainfer.cli.flags import arg, default_of
from trainfer.cost import report
from trainfer.cost.advise import advise, advise_chat
from trainfer.cost.hardware import load_table
from trainfer.errors import TrainferError


@dataclass(kw_only=True)
class Output:
    json: bool = False
    """print JSON instead of a table"""


@dataclass(kw_only=True)
class Plotted(Output):
    plot: Path | None = None
    """also write a PNG chart here"""


@dataclass(kw_only=True)
class Priced:
    prices: Path | None = None
    """a TOML price table whose rows replace the shipped ones"""


@dataclass(kw_only=True)
class Train(Output, Priced):
    """a run's compute and dollars, and the same job on other hardware"""

    run: Path | None = arg(None, positional=True)
    """a training run directory (its metrics.jsonl)"""
    flops: float | None = None
    """total training FLOPs instead of a run"""
    wall_s: float | None = None
    """with --flops: how long it took"""
    hardware: str = "cpu-2vcpu"
    """price-table row it ran on"""
    mfu: float = 0.4
    """MFU assumed on other hardware"""
    full: bool = False
    """also the full budget by the seed's cost shares"""


def train(s: Train) -> None:
    report.train(s.run, s.flops, s.wall_s, s.hardware, load_table(s.prices), s.mfu, s.full, s.json)


@dataclass(kw_only=True)
class Decode(Output, Priced):
    """projected decode speed and $ per 1M tokens on other hardware (roofline)"""

    model: str = arg(positional=True)
    """the model whose shape is projected (alias, .gguf, directory, run)"""
    hardware: list[str] = arg(["cpu-2vcpu", "l4", "h100-sxm"])
    """price-table rows (repeatable)"""
    batch: tuple[int, ...] = (1, 16, 64, 256)
    """sequences decoded together"""
    bytes_per_param: float = 2.0
    """2 for bf16, 1.06 int8, 0.63 int4"""
    context: int = 256
    """tokens in each sequence's KV cache"""
    bandwidth_efficiency: float = 0.7
    """assumed share of the memory bandwidth reached"""
    mfu: float = 0.4
    """assumed MFU when compute-bound"""
    step_overhead_ms: float = 0.5
    """assumed fixed cost per step"""
    calibrate: Path | None = None
    """a `bench serve --json` report from the cpu-2vcpu row: print its measured speed next to the projection"""


def decode(s: Decode) -> None:
    report.decode(s.model, s.hardware, load_table(s.prices), list(s.batch), s.bytes_per_param, s.context,
                  s.bandwidth_efficiency, s.mfu, s.step_overhead_ms, s.calibrate, s.json)  # fmt: skip


@dataclass(kw_only=True)
class Serve(Plotted):
    """$ per 1M tokens and per request from a `bench serve --json` report"""

    bench: Path = arg(positional=True)
    """the JSON written by trainfer bench serve --json"""
    price_per_hour: float
    """what the serving machine costs per hour"""
    slo_ttft_ms: float = 1000
    """the time-to-first-token objective"""
    slo_tpot_ms: float = 100
    """the time-per-output-token objective"""
    requests_per_day: float | None = None
    """size a fleet for this load"""
    tokens_per_request: float = 128
    """output tokens per request"""
    peak_to_average: float = 2.0
    """peak load over the day's average"""


def serve(s: Serve) -> None:
    report.serve(s.bench, s.price_per_hour, s.slo_ttft_ms, s.slo_tpot_ms, s.requests_per_day, s.tokens_per_request,
                 s.peak_to_average, s.json, s.plot)  # fmt: skip


@dataclass(kw_only=True)
class Lifetime(Plotted):
    """training once + months of serving: totals and the inference share"""

    training: float
    """training (or fine-tuning) cost, $"""
    serving_per_month: float
    """serving cost per month, $"""
    months: int = 12
    """months of serving"""
    tuning: float | None = None
    """fine-tuning cost, $, for the break-even vs a larger model"""
    per_request_large: float | None = None
    """$ per request prompting the larger model"""
    per_request_small: float | None = None
    """$ per request serving the tuned small model"""


def lifetime(s: Lifetime) -> None:
    report.lifetime(s.training, s.serving_per_month, s.months, s.tuning, s.per_request_large, s.per_request_small,
                    s.json, s.plot)  # fmt: skip


@dataclass(kw_only=True)
class Advise(Output, Priced):
    """do you need to train? the model on your text, with the costs of each way"""

    model: str = arg(positional=True)
    """the base model (alias, .gguf, directory, run)"""
    data: list[str] = arg([])
    """your text: file, directory, glob, FILE.jsonl:FIELD (repeatable)"""
    chat_data: str | None = None
    """or your eval conversations (JSONL as for eval --chat-data): answers checked"""
    train_data: str | None = None
    """with --chat-data: the fine-tuning set to cost (default: the eval set)"""
    target: float = default_of(advise_chat, "target")
    """with --chat-data: share of right answers to serve as is"""
    hardware: str = default_of(advise, "hardware")
    """price-table row for the fine-tuning estimate"""
    epochs: int = default_of(advise, "epochs")
    """fine-tuning epochs to cost"""
    max_tokens: int = default_of(advise, "max_tokens")
    """tokens of your text scored"""


def advise_cmd(s: Advise) -> None:
    if bool(s.data) == bool(s.chat_data):
        raise TrainferError("cost advise needs --data (your text) or --chat-data (your eval conversations)")
    if s.chat_data:
        advice = advise_chat(s.model, s.chat_data, load_table(s.prices), s.train_data, s.target, s.hardware,
                             s.epochs, s.max_tokens)  # fmt: skip
    else:
        advice = advise(s.model, s.data, load_table(s.prices), s.hardware, s.epochs, s.max_tokens)
    print(json.dumps(dataclasses.asdict(advice), indent=2) if s.json else "\n".join(advice.reasons))


@dataclass(kw_only=True)
class EdgeVsCloud(Plotted):
    """latency and cost per user: this machine vs a cloud endpoint"""

    bench: Path = arg(positional=True)
    """a `bench serve --json` report measured on the edge machine"""
    cloud_per_million: float
    """cloud $ per 1M output tokens"""
    cloud_ttft_ms: float = 150
    """the cloud endpoint's time to first token"""
    cloud_tpot_ms: float = 10
    """the cloud endpoint's time per output token"""
    rtt_ms: float = 50
    """network round trip to the cloud"""
    tokens: int = 128
    """tokens per answer"""
    tokens_per_user_month: float = 100_000
    """output tokens a user reads per month"""
    device_price: float = 800
    """the edge device, $"""
    device_months: int = 36
    """months to amortize it over"""


@dataclass(kw_only=True)
class Cascade(Output, Priced):
    """$ per 1,000 requests and latency of the edge/cloud cascade at each share forwarded"""

    report: Path = arg(positional=True)
    """the JSON benchmarks/cascade.py writes (cascade.json)"""
    edge_hardware: str = "cpu-2vcpu"
    """the price-table row the edge runs on"""
    cloud_hardware: str = "cpu-2vcpu"
    """the price-table row the cloud model runs on"""
    after_sync: bool = False
    """the settings measured after the report's sync-back round (the edge tuned on what it forwarded)"""


def cascade(s: Cascade) -> None:
    table = load_table(s.prices)
    report.cascade(s.report, table.get(s.edge_hardware).price_per_hour, table.get(s.cloud_hardware).price_per_hour,
                   s.json, s.after_sync)  # fmt: skip


def edge_vs_cloud(s: EdgeVsCloud) -> None:
    report.edge_vs_cloud(s.bench, s.cloud_per_million, s.cloud_ttft_ms, s.cloud_tpot_ms, s.tokens,
                         s.tokens_per_user_month, s.device_price, s.device_months, s.rtt_ms, s.json,
                         s.plot)  # fmt: skip
