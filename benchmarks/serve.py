"""Serving benchmark: trainfer's server and llama.cpp's llama-server (continuous batching, --parallel 16) on the same
SmolLM2 weights, driven by `trainfer bench serve` under the shared protocol (trainfer/rounds.py): the two servers
alternated in rounds, each round a fresh process of each, >= 128 streamed requests per concurrency level, the
median of per-round ratios with the min-max; a level where either side had a failed request gives no ratio for that
round (failures are printed, never counted as slow success). Writes JSON and a PNG.

    .venv/bin/python benchmarks/serve.py --dtype int8 --llama-gguf Q8_0     # the same bits on both sides
    .venv/bin/python benchmarks/serve.py [--concurrency 1 --concurrency 16] [--rounds 3] [--requests 128]

The load generator needs CPU too: with more cores than the servers' threads + 1, the servers are pinned to the first
cores and the generator to the rest; on a 2-core machine they share (said in the output).

Before/after a change, in one run: `git worktree add /tmp/before <commit>`, then
    .venv/bin/python benchmarks/serve.py --baseline-src /tmp/before --no-llama --rounds 2
serves trainfer from that checkout and from this one, alternately, and prints after/before ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402

from trainfer import registry  # noqa: E402
from trainfer.io.loader import load_checkpoint  # noqa: E402
from trainfer.rounds import alternate, checkout, describe, environment, ratio  # noqa: E402
from trainfer.serve.loadgen import bench_serve, plot  # noqa: E402

MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def run_server(cmd: list[str], label: str, args: argparse.Namespace, tokenizer, env: dict | None = None,
               cwd: str | None = None) -> dict:  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*args.pin, *cmd, "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=cwd)  # fmt: skip
    try:
        wait_healthy(url, proc)
        warm = {"model": MODEL, "prompt": "warm up", "max_tokens": 4}  # neither server is timed cold
        httpx.post(url + "/v1/completions", json=warm, timeout=120)
        return bench_serve(
            url,
            MODEL,
            concurrency=args.concurrency,
            num_prompts=args.requests,
            input_len=args.input_len,
            output_len=args.output_len,
            tokenizer=tokenizer,
            label=label,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def trainfer_cmd(args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "trainfer.cli", "serve", MODEL, "--dtype", args.dtype, "--max-num-seqs", "16",
            "--threads", str(args.threads), "--response-cache-size", "0"]  # fmt: skip


def llama_cmd(args: argparse.Namespace, bin_dir: Path, gguf: Path) -> list[str]:
    ctx = 16 * (args.input_len + args.output_len + 64)
    return [str(bin_dir / "llama-server"), "-m", str(gguf), "--parallel", "16", "-c", str(ctx), "-t",
            str(args.threads), "--host", "127.0.0.1"]  # fmt: skip


def pin(args: argparse.Namespace) -> str:
    """Servers on cores 0..threads-1 and this process (the load generator) on the rest, where there are enough."""
    cores = os.cpu_count() or 1
    args.pin = []
    if cores > args.threads + 1 and shutil.which("taskset"):
        args.pin = ["taskset", "-c", f"0-{args.threads - 1}"]
        os.sched_setaffinity(0, range(args.threads, cores))
        return f"servers pinned to cores 0-{args.threads - 1}, the load generator to {args.threads}-{cores - 1}"
    return f"the load generator shares the servers' {cores} cores (too few to pin apart)"


def compare(a: str, b: str, runs: dict) -> dict:
    """Per level: each side's medians over rounds, the per-round ratios of output tokens/s and TTFT p50 (b's over
    a's: above 1 is better for a), and every failure. A round where either side failed a request has no ratio."""
    out = {}
    for i, level in enumerate(runs[a][0]["levels"]):
        ours = [r["levels"][i] for r in runs[a]]
        theirs = [r["levels"][i] for r in runs[b]]
        clean = [(x, y) for x, y in zip(ours, theirs, strict=True) if x["failed"] == 0 and y["failed"] == 0]
        row: dict = {"requests": level["requests"], "rounds": len(ours), "rounds_without_failures": len(clean)}
        for side, levels in ((a, ours), (b, theirs)):
            row[f"{side}_failed"] = sum(x["failed"] for x in levels)
            row[f"{side}_errors"] = sorted({e for x in levels for e in x["errors"]})
            row[f"{side}_tok_s"] = round(statistics.median(x["output_token_throughput"] for x in levels), 1)
            row[f"{side}_ttft_p50_ms"] = round(1000 * statistics.median(x["ttft_s"]["p50"] for x in levels))
            row[f"{side}_tpot_p50_ms"] = round(1000 * statistics.median(x["tpot_s"]["p50"] for x in levels), 1)
        if clean:
            xs, ys = zip(*clean, strict=True)
            tput = ratio([x["output_token_throughput"] for x in xs], [y["output_token_throughput"] for y in ys])
            ttft = ratio([x["ttft_s"]["p50"] for x in xs], [y["ttft_s"]["p50"] for y in ys], lower_is_better=True)
            row["throughput_ratio"], row["ttft_p50_ratio"] = tput.as_list(), ttft.as_list()
        out[level["level"]] = row
    return out


def report(a: str, b: str, table: dict) -> None:
    for level, row in table.items():
        failed = f"failed {row[f'{a}_failed']} vs {row[f'{b}_failed']} of {row['requests']} x {row['rounds']}"
        if "throughput_ratio" not in row:
            print(f"{level:>16}: no clean round ({failed}): {row[f'{a}_errors']} {row[f'{b}_errors']}")
            continue
        t, f = row["throughput_ratio"], row["ttft_p50_ratio"]
        tok_s = f"{row[f'{a}_tok_s']} vs {b} {row[f'{b}_tok_s']} tok/s: {t[0]:.2f}x ({t[1]:.2f}-{t[2]:.2f})"
        ttft = f"{row[f'{a}_ttft_p50_ms']} vs {row[f'{b}_ttft_p50_ms']} ms: {f[0]:.2f}x ({f[1]:.2f}-{f[2]:.2f})"
        print(f"{level:>16}: {a} {tok_s}; TTFT p50 {ttft}; {failed}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, action="append")
    ap.add_argument("--requests", type=int, default=128, help="requests per concurrency level and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="each server's threads")
    ap.add_argument("--dtype", default="int8", choices=["float32", "bfloat16", "int8", "int4"])
    ap.add_argument("--llama-gguf", default="Q8_0", help="which llama.cpp copy: F32, F16, Q8_0, Q4_0, Q4_1")
    ap.add_argument("--baseline-src", type=Path, help="another trainfer checkout to serve as 'before'")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-server (no llama.cpp build)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    args.concurrency = args.concurrency or [1, 4, 16]
    args.out.mkdir(parents=True, exist_ok=True)
    print(describe(environment(args.threads)) + "; " + pin(args), flush=True)
    tokenizer = load_checkpoint(MODEL)[2]
    sides = {}
    if args.baseline_src:
        env, cwd = checkout(args.baseline_src)
        sides["before"] = partial(run_server, trainfer_cmd(args), "before", args, tokenizer, env, cwd)
        sides["after"] = partial(run_server, trainfer_cmd(args), "after", args, tokenizer)
    if not args.no_llama:
        peers = registry.home() / "peers"
        bin_dir = llama_cpp.build(peers / "llama.cpp")
        gguf = llama_cpp.quantized_copies(bin_dir, peers)[args.llama_gguf]
        sides["trainfer"] = partial(run_server, trainfer_cmd(args), f"trainfer-{args.dtype}", args, tokenizer)
        sides["llama.cpp"] = partial(run_server, llama_cmd(args, bin_dir, gguf), f"llama.cpp-{args.llama_gguf}",
                                     args, tokenizer)  # fmt: skip
    runs = alternate(args.rounds, sides, log=lambda line: print(line, flush=True))
    result = {"environment": environment(args.threads), "args": {k: str(v) for k, v in vars(args).items()}}
    for a, b in (("after", "before"), ("trainfer", "llama.cpp")):
        if a in runs:
            result[f"{a}_vs_{b}"] = compare(a, b, runs)
            report(a, b, result[f"{a}_vs_{b}"])
            plot([runs[a][-1], runs[b][-1]], args.out / f"serve-{a}-vs-{b}.png")
    (args.out / "serve.json").write_text(json.dumps(result | {"runs": runs}, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
