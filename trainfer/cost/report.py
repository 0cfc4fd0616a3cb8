"""`trainfer cost ...`: each subcommand's figures as a table (rich) or JSON, with its inputs named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainfer.cost import estimate as est
from trainfer.cost.hardware import PriceTable
from trainfer.errors import TrainferError
from trainfer.io.loader import load_checkpoint, resolve


def show(title: str, columns: list[str], rows: list[list[Any]], notes: list[str], data: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        table.add_row(*[_fmt(x) for x in r])
    console = Console(width=None if Console().is_terminal else 140)
    console.print(table)
    for n in notes:
        console.print(n, highlight=False)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        return f"{x:,.4g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _figure(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_serve(points: list[est.ServePoint], path: Path) -> None:
    """$ per 1M tokens at each level, against the level's TTFT p90 (the trade a deployment picks from)."""

    def draw(ax):
        ax.plot([p.ttft_ms for p in points], [p.dollars_per_million for p in points], "o-")
        for p in points:
            ax.annotate(f"{p.level}{'' if p.meets_slo else ' (breaks SLO)'}", (p.ttft_ms, p.dollars_per_million))
        ax.set(xlabel="TTFT p90 (ms)", ylabel="$ per 1M output tokens", title="serving cost vs latency")

    _figure(path, draw)


def plot_lifetime(training: float, serving_per_month: float, months: int, path: Path) -> None:
    def draw(ax):
        ms = list(range(months + 1))
        ax.stackplot(ms, [training] * len(ms), [serving_per_month * m for m in ms], labels=["training", "inference"])
        ax.set(xlabel="months", ylabel="cumulative $", title="lifetime cost")
        ax.legend(loc="upper left")

    _figure(path, draw)


def plot_placements(places: list[est.Placement], path: Path) -> None:
    def draw(ax):
        names = [p.where.split(" (")[0] for p in places]
        ax.bar(names, [p.dollars_per_user_month for p in places])
        for i, p in enumerate(places):
            ax.annotate(f"{p.latency_ms:.0f} ms", (i, p.dollars_per_user_month), ha="center", va="bottom")
        ax.set(ylabel="$ per user per month", title="edge vs cloud (labels: time to a whole answer)")

    _figure(path, draw)


def train(run: Path | None, flops: float | None, wall_s: float | None, hardware: str, table: PriceTable,
          mfu: float, full: bool, as_json: bool) -> None:  # fmt: skip
    if run is not None:
        measured = est.read_run(run)
        flops, wall_s, basis = measured.flops, measured.wall_s, f"measured in {run}/metrics.jsonl"
        measured_mfu = measured.mfu
    else:
        if flops is None:
            raise TrainferError("give a run directory, or --flops (and --wall-s for the measured bill)")
        basis, measured_mfu = "stated FLOPs", None
    here = table.get(hardware)
    rows = []
    if wall_s is not None:
        mfu_txt = f"{measured_mfu:.1%} measured" if measured_mfu is not None else ""
        rows.append([f"{here.name} (as run)", wall_s / 3600, est.train_dollars(wall_s, here.price_per_hour), mfu_txt])
    projections = [est.project(flops, hw, mfu) for hw in table.rows.values()]
    rows += [[p.hardware, p.hours, p.dollars, f"{p.assumed_mfu:.0%} assumed"] for p in projections]
    notes = [f"{flops:.3e} FLOPs ({basis}); prices: {'; '.join(table.sources)}"]
    data: dict[str, Any] = {"flops": flops, "basis": basis, "rows": rows, "prices": table.sources}
    if full and rows:
        parts = est.full_cost(rows[0][2])
        notes.append(
            "full training budget if the first row's compute is the accelerators' 45% (the seed's shares): "
            + ", ".join(f"{k} ${v:,.2f}" for k, v in parts.items())
        )
        data["full_cost"] = parts
    show("training cost", ["hardware", "hours", "dollars", "MFU"], rows, notes, data, as_json)


def serve(bench: Path, price_per_hour: float, slo_ttft_ms: float, slo_tpot_ms: float, requests_per_day: float | None,
          tokens_per_request: float, peak_to_average: float, as_json: bool,
          plot: Path | None = None) -> None:  # fmt: skip
    points = est.serve_points(est.read_bench(bench), price_per_hour, slo_ttft_ms, slo_tpot_ms)
    if plot:
        plot_serve(points, plot)
    best = est.cheapest(points)
    rows = [[p.level, p.output_tok_s, p.dollars_per_million, p.dollars_per_request, p.ttft_ms, p.tpot_ms,
             "yes" if p.meets_slo else "no"] for p in points]  # fmt: skip
    notes = [f"{bench} at ${price_per_hour}/hour; SLO: TTFT p90 <= {slo_ttft_ms} ms, TPOT p90 <= {slo_tpot_ms} ms"]
    notes.append(
        f"cheapest point meeting the SLO: {best.level}, ${best.dollars_per_million:.4g} per 1M output tokens"
        if best
        else "no measured point meets the SLO"
    )
    data: dict[str, Any] = {"points": est.as_dict(points), "cheapest": est.as_dict(best)}
    if requests_per_day and best:
        f = est.fleet(best, price_per_hour, requests_per_day, tokens_per_request, peak_to_average)
        notes.append(
            f"{requests_per_day:,.0f} requests/day x {tokens_per_request:g} tokens, peak {peak_to_average:g}x the "
            f"average = {f.peak_requests_per_s:.3g} req/s: {f.replicas} replica(s) at {best.level}, "
            f"${f.dollars_per_month:,.2f}/month always on (${f.dollars_per_month_by_tokens:,.2f} if billed per token)"
        )
        data["fleet"] = est.as_dict(f)
    cols = ["level", "output tok/s", "$ / 1M tokens", "$ / request", "TTFT p90 ms", "TPOT p90 ms", "meets SLO"]
    show("serving cost", cols, rows, notes, data, as_json)


def decode(model: str, hardware: list[str], table, batches: list[int], weight_bytes_per_param: float,
           context: int, bandwidth_efficiency: float, mfu: float, step_overhead_ms: float,
           calibrate: Path | None, as_json: bool) -> None:  # fmt: skip
    """Projected $ per 1M output tokens of a model's decode on price-table rows (and, with --calibrate, the same
    projection for the machine a `bench serve` report was measured on next to what it measured)."""

    cfg, _, _ = load_checkpoint(resolve(model), "float32")
    weight_bytes = cfg.n_params * weight_bytes_per_param
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # K and V, 16-bit
    per_token = cfg.forward_flops(1, 1, context)
    points = [est.project_decode(table.get(h), weight_bytes, kv_bytes, per_token, context, b, bandwidth_efficiency,
                                 mfu, step_overhead_ms) for h in hardware for b in batches]  # fmt: skip
    rows = [[p.hardware, p.batch, p.bound, p.step_ms, p.output_tok_s, p.dollars_per_million] for p in points]
    notes = [
        f"{model}: {cfg.n_params / 1e6:.1f}M parameters at {weight_bytes_per_param:g} bytes each "
        f"({weight_bytes / 1e6:.0f} MB read per step), KV {kv_bytes} bytes per token, context {context}",
        f"PROJECTED, not measured: {bandwidth_efficiency:.0%} of the row's memory bandwidth, {mfu:.0%} MFU, "
        f"{step_overhead_ms:g} ms per step of overhead (assumptions; prices from {', '.join(table.sources)})",
    ]
    data: dict[str, Any] = {"points": est.as_dict(points)}
    if calibrate:
        measured = est.read_bench(calibrate)[0]
        hw = table.get("cpu-2vcpu")
        p = est.project_decode(hw, weight_bytes, kv_bytes, per_token, context, 1, bandwidth_efficiency, mfu,
                               step_overhead_ms)  # fmt: skip
        ratio = measured["output_token_throughput"] / p.output_tok_s
        notes.append(f"calibration: {calibrate} measured {measured['output_token_throughput']:.1f} output tok/s at "
                     f"{measured['level']} on {hw.name}; the same projection says {p.output_tok_s:.1f} "
                     f"(measured / projected = {ratio:.2f})")  # fmt: skip
        data["calibration"] = {"measured": measured["output_token_throughput"], "projected": p.output_tok_s}
    cols = ["hardware", "batch", "bound", "step ms", "output tok/s", "$ / 1M tokens"]
    show("projected decode cost", cols, rows, notes, data, as_json)


def lifetime(training: float, serving_per_month: float, months: int, tuning: float | None,
             per_request_large: float | None, per_request_small: float | None, as_json: bool,
             plot: Path | None = None) -> None:  # fmt: skip
    life = est.lifetime(training, serving_per_month, months)
    if plot:
        plot_lifetime(training, serving_per_month, months, plot)
    rows = [[m, training, serving_per_month * m, training + serving_per_month * m,
             f"{serving_per_month * m / (training + serving_per_month * m):.2%}"]
            for m in sorted({1, 3, 6, 12, months}) if m <= months]  # fmt: skip
    notes = [f"inference passes 80% of the lifetime cost after {life.months_to_share['80%']:.2g} months, 90% "
             f"after {life.months_to_share['90%']:.2g}"]  # fmt: skip
    data: dict[str, Any] = {"lifetime": est.as_dict(life)}
    if tuning is not None and per_request_large is not None and per_request_small is not None:
        n = est.break_even_requests(tuning, per_request_large, per_request_small)
        notes.append(f"fine-tuning for ${tuning:,.2f} pays for itself after {n:,.0f} requests" if n != float("inf")
                     else "the small model is not cheaper per request: fine-tuning never pays back")  # fmt: skip
        data["break_even_requests"] = n
    show("lifetime cost", ["month", "training $", "serving $", "total $", "inference share"], rows, notes, data,
         as_json)  # fmt: skip


def edge_vs_cloud(bench: Path, cloud_dollars_per_million: float, cloud_ttft_ms: float, cloud_tpot_ms: float,
                  tokens: int, tokens_per_user_month: float, device_price: float, device_months: int,
                  rtt_ms: float, as_json: bool, plot: Path | None = None) -> None:  # fmt: skip
    levels = est.read_bench(bench)
    one = min(levels, key=lambda lv: lv.get("concurrency") or 1)  # the lone-user figure
    places = est.edge_vs_cloud(1000 * one["ttft_s"]["p50"], 1000 * one["tpot_s"]["p50"], cloud_ttft_ms,
                               cloud_tpot_ms, cloud_dollars_per_million, tokens, tokens_per_user_month,
                               device_price, device_months, rtt_ms=rtt_ms)  # fmt: skip
    if plot:
        plot_placements(places, plot)
    rows = [[p.where, p.first_token_ms, p.latency_ms, p.dollars_per_user_month, p.notes] for p in places]
    notes = [f"edge figures measured in {bench} ({one['level']}); cloud figures stated; {tokens}-token answers, "
             f"{tokens_per_user_month:,.0f} tokens per user per month, device ${device_price:,.0f} over "
             f"{device_months} months"]  # fmt: skip
    cols = ["where", "first token ms", f"{tokens}-token answer ms", "$ / user / month", ""]
    show("edge vs cloud", cols, rows, notes, {"placements": est.as_dict(places)}, as_json)


def cascade(path: Path, edge_price: float, cloud_price: float, as_json: bool, after_sync: bool = False) -> None:
    measured, line = est.cascade(est.read_cascade(path, after_sync), edge_price, cloud_price)
    rows = [[p.label, f"{100 * p.forwarded:.0f}%", f"{100 * p.fact_rate:.1f}%", p.latency_s, p.dollars_per_1000]
            for p in measured]  # fmt: skip
    rows += [[f"local-first at {100 * p.forwarded:.0f}% forwarded", f"{100 * p.forwarded:.0f}%", None, p.latency_s,
              p.dollars_per_1000] for p in line]  # fmt: skip
    notes = [
        f"measured settings from {path} (test split); the line below them is the cost model: each request holds "
        f"the edge (${edge_price}/h) for its local answer, a forwarded one the cloud (${cloud_price}/h) too"
    ]
    cols = ["setting", "forwarded", "fact rate", "answer s", "$ / 1k requests"]
    show("the edge/cloud cascade", cols, rows, notes,
         {"measured": est.as_dict(measured), "line": est.as_dict(line)}, as_json)  # fmt: skip
