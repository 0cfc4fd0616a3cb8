"""The edge/cloud cascade on the fictional FAQ (benchmarks/data/faq.json): edge = SmolLM2-135M-Instruct, cloud =
the FAQ fine-tune (the README's `trainfer finetune ... --lora`, every setting at its default) served by a second
trainfer; the edge runs `serve --upstream CLOUD --route local-first --route-min-logprob T`.

    .venv/bin/python benchmarks/cascade.py --out /tmp/cascade [--cloud RUN] [--thresholds -0.4,-0.6,...]
    .venv/bin/python benchmarks/cascade.py --out /tmp/cascade --load [--slo-ttft-ms 1000]   # the load policy

Measured, one question at a time (streamed, greedy, 48 tokens), each server on one thread of the two cores:
- per setting (all edge, all cloud, local-first at each threshold): fact rate on the dev and the test phrasings
  (the answer contains the fact), share forwarded, time to first token and to the whole answer;
- $ per 1,000 requests from `trainfer cost`'s cpu-2vcpu price: each request billed the seconds it held a server
  (the edge always, the cloud when forwarded): single-stream seconds, the worst case for both sides alike;
- the threshold is chosen on dev (the lowest share forwarded within 1 fact of all-cloud's dev rate), reported on
  test;
- sync back: the train phrasings sent through the cascade at that threshold with --log-requests, `trainfer
  dataset from-logs --routed` (what the edge forwarded, with the cloud's answers), the edge fine-tuned on it
  (README defaults), and the cascade measured again with the new edge at the same threshold: does the share
  forwarded at equal accuracy drop?
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from finetune_faq import write_sets  # noqa: E402
from serve import free_port, wait_healthy  # noqa: E402

from trainfer.cost.hardware import load_table  # noqa: E402
from trainfer.rounds import environment  # noqa: E402

BASE = "smollm2-135m-instruct"
TRAINFER = [sys.executable, "-m", "trainfer.cli"]


class Server:
    def __init__(self, model: str, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [*TRAINFER, "serve", model, "--threads", "1", "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(self.url, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def questions(path: Path) -> list[tuple[list[dict], str]]:
    """(messages without the answer, the fact's key) per line."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [([m for m in r["messages"] if m["role"] != "assistant"], r["expected"]) for r in rows]


def ask(url: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start, first, text, route = time.perf_counter(), None, "", "local"
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300,
                      headers={"cache-control": "no-cache"}) as r:  # fmt: skip
        r.raise_for_status()
        route = r.headers.get("x-trainfer-route", "local")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            piece = ((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content")
            if piece:
                first = first or time.perf_counter()
                text += piece
    end = time.perf_counter()
    return {"text": text, "route": route, "ttft_s": (first or end) - start, "e2e_s": end - start}


def measure(edge_url: str, sets: dict[str, list], max_tokens: int) -> dict:
    """Fact rate, share forwarded and latency per split."""
    out = {}
    for split, qs in sets.items():
        rows = []
        for messages, key in qs:
            a = ask(edge_url, messages, max_tokens)
            a["right"] = " ".join(key.lower().split()) in " ".join(a["text"].lower().split())
            rows.append(a)
        out[split] = {
            "fact_rate": sum(r["right"] for r in rows) / len(rows),
            "forwarded": sum(r["route"] == "upstream" for r in rows) / len(rows),
            "ttft_p50_ms": 1000 * statistics.median(r["ttft_s"] for r in rows),
            "e2e_mean_s": statistics.fmean(r["e2e_s"] for r in rows),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cloud", help="an existing FAQ fine-tune run (default: make one with the README's command)")
    ap.add_argument("--thresholds", default="-0.3,-0.5,-0.7,-0.9,-1.2,-1.6")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--no-sync", action="store_true", help="skip the sync-back round")
    ap.add_argument("--load", action="store_true", help="only the `--route load` burst (see load_policy)")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(1)
    print(env, flush=True)
    if args.load:
        result = {"environment": env, **load_policy(args)}
        (args.out / "load.json").write_text(json.dumps(result, indent=2))
        return
    train, dev, test = write_sets(args.out)
    sets = {"dev": questions(dev), "test": questions(test)}
    cloud_run = args.cloud or str(args.out / "cloud")
    if not args.cloud and not (args.out / "cloud" / "report.md").exists():  # written last: the run finished
        t = time.time()
        subprocess.run([*TRAINFER, "finetune", BASE, "--data", str(train), "--out", cloud_run, "--lora"], check=True)
        print(f"cloud fine-tune: {time.time() - t:.0f} s", flush=True)
    price_s = load_table().get("cpu-2vcpu").price_per_hour / 3600
    thresholds = [float(x) for x in args.thresholds.split(",")]
    report: dict = {"environment": env, "thresholds": thresholds, "settings": {}}
    cloud = Server(cloud_run, "--response-cache-size", "0")  # every setting pays for its cloud answers
    try:
        report["settings"] = run_settings(BASE, cloud.url, sets, thresholds, args.max_tokens)
        choice = choose(report["settings"], thresholds, len(sets["dev"]))
        report["chosen"] = choice
        show(report["settings"], price_s, "edge = the base model", choice)
        if not args.no_sync and choice is not None:
            report["sync"] = sync_back(args, cloud.url, train, sets, thresholds, choice, price_s)
    finally:
        cloud.stop()
    (args.out / "cascade.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'cascade.json'}")


def run_settings(edge_model: str, cloud_url: str, sets: dict, thresholds: list[float], max_tokens: int) -> dict:
    settings: dict[str, dict] = {}
    configs = [("all edge", []), ("all cloud", ["--upstream", cloud_url, "--route", "upstream-first"])]
    configs += [(f"local-first {t:g}", ["--upstream", cloud_url, "--route", "local-first",
                                        "--route-min-logprob", str(t)]) for t in thresholds]  # fmt: skip
    for name, flags in configs:
        edge = Server(edge_model, *flags)
        try:
            settings[name] = measure(edge.url, sets, max_tokens)
        finally:
            edge.stop()
        d, t = settings[name]["dev"], settings[name]["test"]
        print(f"{name:<20} dev {d['fact_rate']:.1%} ({d['forwarded']:.0%} forwarded)  test {t['fact_rate']:.1%} "
              f"({t['forwarded']:.0%} forwarded), TTFT p50 {t['ttft_p50_ms']:.0f} ms", flush=True)  # fmt: skip
    return settings


def choose(settings: dict, thresholds: list[float], n: int) -> float | None:
    """On dev only (`n` questions): the threshold forwarding least whose fact rate is within one question of
    all-cloud's."""
    cloud_dev = settings["all cloud"]["dev"]["fact_rate"]
    ok = [t for t in thresholds if settings[f"local-first {t:g}"]["dev"]["fact_rate"] >= cloud_dev - 1 / n - 1e-9]
    return min(ok, key=lambda t: settings[f"local-first {t:g}"]["dev"]["forwarded"]) if ok else None


def dollars_per_1000(row: dict, edge_s: float, cloud_s: float, price_s: float, name: str) -> float:
    """Each request bills the seconds it held a server: the edge unless it went straight up (all cloud), plus
    the cloud's seconds for the share forwarded."""
    edge_part = 0.0 if name == "all cloud" else edge_s
    cloud_part = (1.0 if name == "all cloud" else row["forwarded"]) * cloud_s if name != "all edge" else 0.0
    return 1000 * price_s * (edge_part + cloud_part)


def show(settings: dict, price_s: float, title: str, chosen: float | None) -> None:
    edge_s = settings["all edge"]["test"]["e2e_mean_s"]
    cloud_s = settings["all cloud"]["test"]["e2e_mean_s"]
    print(f"\n{title}; threshold chosen on dev: {chosen}")
    print(
        f"{'setting':<20} {'dev':>6} {'test':>6} {'forwarded (test)':>17} {'TTFT p50':>9} {'answer':>8} {'$/1k req':>9}"
    )
    for name, row in settings.items():
        t = row["test"]
        cost = dollars_per_1000(t, edge_s, cloud_s, price_s, name)
        print(f"{name:<20} {row['dev']['fact_rate']:>6.1%} {t['fact_rate']:>6.1%} {t['forwarded']:>17.0%} "
              f"{t['ttft_p50_ms']:>7.0f}ms {t['e2e_mean_s']:>7.2f}s {cost:>9.4f}")  # fmt: skip


def sync_back(args, cloud_url: str, train: Path, sets: dict, thresholds: list[float], t: float, price_s: float) -> dict:
    """Traffic (the train phrasings) through the cascade at threshold t, logged; the routed answers become the
    edge's fine-tuning set; the cascade again with the tuned edge."""
    logs = args.out / "edge-logs"
    flags = ["--upstream", cloud_url, "--route", "local-first", "--route-min-logprob", str(t),
             "--log-requests", str(logs)]  # fmt: skip
    edge = Server(BASE, *flags)
    try:
        traffic = measure(edge.url, {"train": questions(train)}, args.max_tokens)["train"]
    finally:
        edge.stop()
    routed = args.out / "routed.jsonl"
    subprocess.run([*TRAINFER, "dataset", "from-logs", str(logs), "--out", str(routed), "--routed",
                    "--finish-reason", "stop", "--finish-reason", "length", "--force"], check=True)  # fmt: skip
    tuned = args.out / "edge-tuned"
    if not (tuned / "report.md").exists():
        subprocess.run([*TRAINFER, "finetune", BASE, "--data", str(routed), "--out", str(tuned), "--lora"], check=True)
    after = run_settings(str(tuned), cloud_url, sets, thresholds, args.max_tokens)
    show(after, price_s, "after one sync-back round: edge = the base tuned on what it forwarded", t)
    return {"traffic": traffic, "routed_examples": sum(1 for _ in routed.open()), "settings": after}


def load_policy(args) -> dict:
    """`--route load` under a burst: 64 streamed requests at concurrency 16 on an edge with 4 slots, alone and
    with an upstream (the base model again, on the other core), alternated; TTFT of what each side answered."""
    import asyncio

    from trainfer.serve.loadgen import run_level

    prompts = [f"Tell me something about topic {i}." for i in range(64)]
    out: dict = {"slo_ttft_ms": args.slo_ttft_ms, "rounds": []}
    cloud = Server(BASE, "--dtype", "int8")
    try:
        for rnd in range(args.rounds):
            for routed in (True, False) if rnd % 2 == 0 else (False, True):
                flags = ["--upstream", cloud.url, "--route", "load", "--route-slo-ttft-ms", str(args.slo_ttft_ms)]
                edge = Server(BASE, "--dtype", "int8", "--max-num-seqs", "4", *(flags if routed else []))
                try:
                    tagged = [f"[{rnd}{routed}] {p}" for p in prompts]  # no answer from an earlier round's cache
                    results, wall = asyncio.run(run_level(edge.url, BASE, tagged, 64, 16, None, None, 600, 0, True))
                    stats = httpx.get(edge.url + "/vitals", timeout=10).json().get("route") or {}
                finally:
                    edge.stop()
                row = {"routed": routed, "ok": sum(r.ok for r in results), "wall_s": wall,
                       "forwarded": sum((stats.get("upstream") or {}).values()),
                       "tok_s": sum(r.output_tokens for r in results if r.ok) / wall}  # fmt: skip
                for side, keep in (
                    ("all", {"local", "upstream", ""}),
                    ("local", {"local", ""}),
                    ("upstream", {"upstream"}),
                ):
                    ttfts = sorted(1000 * r.ttft for r in results if r.ok and r.route in keep)
                    if ttfts:
                        row[f"{side}_ttft_p50_ms"] = ttfts[len(ttfts) // 2]
                        row[f"{side}_ttft_p90_ms"] = ttfts[int(0.9 * (len(ttfts) - 1))]
                out["rounds"].append(row)
                sides = ", ".join(
                    f"{side} TTFT p50 {row[side + '_ttft_p50_ms']:.0f} ms p90 {row[side + '_ttft_p90_ms']:.0f} ms"
                    for side in ("all", "local", "upstream")
                    if side + "_ttft_p50_ms" in row
                )
                print(f"round {rnd}, {'load policy' if routed else 'edge alone '}: {row['ok']}/64 ok, {sides}, "
                      f"{row['forwarded']} forwarded, {row['tok_s']:.1f} tok/s", flush=True)  # fmt: skip
    finally:
        cloud.stop()
    return out


if __name__ == "__main__":
    main()
