"""Serving benchmark: trainfer's server and llama.cpp's llama-server (continuous batching, --parallel 16)
on the same SmolLM2 weights, loaded by `trainfer bench serve` in one run. Writes JSON and a PNG.

    .venv/bin/python benchmarks/serve.py [--concurrency 1 --concurrency 4 --concurrency 16] [--out DIR]
    .venv/bin/python benchmarks/serve.py --dtype int8 --llama-gguf Q8_0     # the same bits on both sides

Before/after a change, in one run: `git worktree add /tmp/before <commit>`, then
    .venv/bin/python benchmarks/serve.py --baseline-src /tmp/before --no-llama --rounds 2
serves trainfer from that checkout and from this one, alternately, and prints after/before ratios.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402

from trainfer import registry  # noqa: E402
from trainfer.io.loader import load_checkpoint  # noqa: E402
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


def run_server(cmd: list[str], label: str, args: argparse.Namespace, tokenizer, env: dict | None = None) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_healthy(url, proc)
        warm = {"model": MODEL, "prompt": "warm up", "max_tokens": 4}  # neither server is timed cold
        httpx.post(url + "/v1/completions", json=warm, timeout=120)
        return bench_serve(
            url,
            MODEL,
            concurrency=args.concurrency,
            input_len=args.input_len,
            output_len=args.output_len,
            tokenizer=tokenizer,
            label=label,
            out_json=args.out / f"serve-{label}.json",
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def trainfer_cmd(args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "trainfer.cli", "serve", MODEL, "--dtype", args.dtype, "--max-num-seqs", "16",
            "--response-cache-size", "0"]  # fmt: skip


def ratios(after: dict, before: dict, a: str, b: str) -> dict:
    out = {}
    for x, y in zip(after["levels"], before["levels"], strict=True):
        out[x["level"]] = {
            f"{a}_tok_s": round(x["output_token_throughput"], 1),
            f"{b}_tok_s": round(y["output_token_throughput"], 1),
            "throughput_ratio": round(x["output_token_throughput"] / y["output_token_throughput"], 2),
            f"{a}_ttft_p50_ms": round(1000 * x["ttft_s"]["p50"]),
            f"{b}_ttft_p50_ms": round(1000 * y["ttft_s"]["p50"]),
            f"{a}_tpot_p50_ms": round(1000 * x["tpot_s"]["p50"], 1),
            f"{b}_tpot_p50_ms": round(1000 * y["tpot_s"]["p50"], 1),
        }
    return out


def before_after(args: argparse.Namespace, tokenizer) -> dict:
    """This checkout and another one (--baseline-src), alternated for --rounds so drift hits both alike."""
    import os

    env = {**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())}
    rounds = []
    for r in range(args.rounds):
        before = run_server(trainfer_cmd(args), f"before-{r}", args, tokenizer, env)
        after = run_server(trainfer_cmd(args), f"after-{r}", args, tokenizer)
        rounds.append(ratios(after, before, "after", "before"))
        print(json.dumps(rounds[-1]), flush=True)
    return {"rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, action="append")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8", "int4"])
    ap.add_argument("--llama-gguf", default="F32", help="which llama.cpp copy: F32, F16, Q8_0, Q4_0, Q4_1")
    ap.add_argument("--baseline-src", type=Path, help="another trainfer checkout to serve as 'before'")
    ap.add_argument("--rounds", type=int, default=1, help="before/after rounds (with --baseline-src)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-server (no llama.cpp build)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    args.concurrency = args.concurrency or [1, 4, 16]
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_checkpoint(MODEL)[2]
    if args.baseline_src:
        print(json.dumps(before_after(args, tokenizer)))
    if args.no_llama:
        return
    peers = registry.home() / "peers"
    bin_dir = llama_cpp.build(peers / "llama.cpp")
    gguf = llama_cpp.quantized_copies(bin_dir, peers)[args.llama_gguf]
    ours = run_server(trainfer_cmd(args), f"trainfer-{args.dtype}", args, tokenizer)
    ctx = 16 * (args.input_len + args.output_len + 64)
    theirs = run_server(
        [str(bin_dir / "llama-server"), "-m", str(gguf), "--parallel", "16", "-c", str(ctx), "-t",
         str(torch.get_num_threads()), "--host", "127.0.0.1"],
        f"llama.cpp-{args.llama_gguf}",
        args,
        tokenizer,
    )  # fmt: skip
    plot([ours, theirs], args.out / "serve.png")
    print(json.dumps(ratios(ours, theirs, "trainfer", "llama_cpp")))


if __name__ == "__main__":
    main()
