"""Serving benchmark: trainfer's server and llama.cpp's llama-server (continuous batching, --parallel 16)
on the same SmolLM2 weights, loaded by `trainfer bench serve` in one run. Writes JSON and a PNG.

    .venv/bin/python benchmarks/serve.py [--concurrency 1 --concurrency 4 --concurrency 16] [--out DIR]
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


def run_server(cmd: list[str], label: str, args: argparse.Namespace, tokenizer) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, action="append")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--llama-gguf", default="F32", help="which llama.cpp copy: F32, F16, Q8_0, Q4_1")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    args.concurrency = args.concurrency or [1, 4, 16]
    args.out.mkdir(parents=True, exist_ok=True)
    peers = registry.home() / "peers"
    bin_dir = llama_cpp.build(peers / "llama.cpp")
    gguf = llama_cpp.quantized_copies(bin_dir, peers)[args.llama_gguf]
    tokenizer = load_checkpoint(MODEL)[2]
    ours = run_server(
        [
            sys.executable,
            "-m",
            "trainfer.cli",
            "serve",
            MODEL,
            "--dtype",
            args.dtype,
            "--max-num-seqs",
            "16",
            "--response-cache-size",
            "0",
        ],
        f"trainfer-{args.dtype}",
        args,
        tokenizer,
    )
    ctx = 16 * (args.input_len + args.output_len + 64)
    theirs = run_server(
        [
            str(bin_dir / "llama-server"),
            "-m",
            str(gguf),
            "--parallel",
            "16",
            "-c",
            str(ctx),
            "-t",
            "2",
            "--host",
            "127.0.0.1",
        ],
        f"llama.cpp-{args.llama_gguf}",
        args,
        tokenizer,
    )
    plot([ours, theirs], args.out / "serve.png")
    summary = {}
    for a, b in zip(ours["levels"], theirs["levels"], strict=True):
        summary[a["level"]] = {
            "trainfer_tok_s": round(a["output_token_throughput"], 1),
            "llama_cpp_tok_s": round(b["output_token_throughput"], 1),
            "throughput_ratio": round(a["output_token_throughput"] / b["output_token_throughput"], 2),
            "trainfer_ttft_p50_ms": round(1000 * a["ttft_s"]["p50"]),
            "llama_cpp_ttft_p50_ms": round(1000 * b["ttft_s"]["p50"]),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
