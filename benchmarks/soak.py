"""Soak: many requests at high concurrency against `trainfer serve`, a fraction abandoned mid-stream.
Reports errors (any 5xx or transport error), leaked KV blocks and the server's RSS growth.

    .venv/bin/python benchmarks/soak.py [--requests 2000] [--concurrency 64] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, wait_healthy  # noqa: E402


async def soak(url: str, model: str, requests: int, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    counts = {"ok": 0, "abandoned": 0, "4xx": 0, "5xx": 0, "transport": 0}

    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": model,
            "prompt": "Tell me about " + rng.choice(["rivers", "music", "winter", "bread"]),
            "max_tokens": rng.randrange(4, 32),
            "temperature": 0.8,
            "stream": rng.random() < 0.7,
        }
        abandon = rng.random() < 0.2
        async with sem:
            try:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code >= 500:
                        counts["5xx"] += 1
                        return
                    if r.status_code >= 400:
                        counts["4xx"] += 1
                        return
                    n = 0
                    async for _ in r.aiter_lines():
                        n += 1
                        if abandon and n >= 2:
                            counts["abandoned"] += 1
                            return
                    counts["ok"] += 1
            except httpx.HTTPError:
                counts["transport"] += 1

    async with httpx.AsyncClient(
        base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency + 8)
    ) as http:
        await asyncio.gather(*(one(http, i) for i in range(requests)))
    return counts


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "trainfer.cli",
        "serve",
        args.model,
        "--port",
        str(port),
        "--max-num-seqs",
        "64",
        "--response-cache-size",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        warm = asyncio.run(soak(url, args.model, 200, args.concurrency, seed=0))  # reach the working set
        rss0 = psutil.Process(proc.pid).memory_info().rss
        t = time.perf_counter()
        counts = asyncio.run(soak(url, args.model, args.requests, args.concurrency, seed=1))
        wall = time.perf_counter() - t
        time.sleep(1)
        rss1 = psutil.Process(proc.pid).memory_info().rss
        result = {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "wall_s": round(wall, 1),
            **counts,
            "warmup": warm,
            "rss_before_mb": round(rss0 / 2**20, 1),
            "rss_after_mb": round(rss1 / 2**20, 1),
            "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 2),
            "kv_cache_usage_after": metric(url, "trainfer_kv_cache_usage_ratio"),
            "running_after": metric(url, "trainfer_num_requests_running"),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
