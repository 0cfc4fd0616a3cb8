"""Replicas behind HAProxy (deploy/haproxy.cfg) on loopback: SmolLM2-135M-Instruct int8, two `trainfer serve`
replicas sharing a Redis response cache, each on one thread of the machine's two cores.

    .venv/bin/python benchmarks/deploy.py [--rounds 2] [--json out.json]

1. kill -9 of one replica a few seconds into a load of plain (non-streamed) requests from `bench serve`'s load
   generator: how many failed (the balancer retries what never got an answer), and who answered after;
2. the same with streamed requests: a stream under way on the killed replica cannot be retried, so it must end
   with an error the client sees (the stream stops without `data: [DONE]`), never hang;
3. multi-turn chats (`bench serve --conversations`) with the x-trainfer-affinity header vs without it
   (round-robin), alternated in rounds with fresh prompts each: prompt tokens found in the prefix caches, and
   the time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, wait_healthy  # noqa: E402

from trainfer.rounds import environment  # noqa: E402
from trainfer.serve.loadgen import run_conversations, run_level, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"


class Replica:
    """One `trainfer serve` process on a free port, one thread (two replicas share the two cores)."""

    def __init__(self, redis_url: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "trainfer.cli", "serve", MODEL, "--dtype", "int8", "--threads", "1",
               "--max-num-seqs", "8", "--served-model-name", "m", "--cache-url", redis_url, "--drain-grace", "3",
               "--port", str(self.port)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_healthy(self.url, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=90)


class Cluster:
    """Redis, two replicas and haproxy with deploy/haproxy.cfg."""

    def __init__(self) -> None:
        redis_port = free_port()
        self.redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.replicas = [Replica(self.redis_url), Replica(self.redis_url)]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TRAINFER_LB_BIND": f"127.0.0.1:{self.port}", "TRAINFER_MAXCONN": "12",
               "TRAINFER_REPLICA_1": f"127.0.0.1:{self.replicas[0].port}",
               "TRAINFER_REPLICA_2": f"127.0.0.1:{self.replicas[1].port}"}  # fmt: skip
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.haproxy = subprocess.Popen([haproxy, "-db", "-f", str(ROOT / "deploy" / "haproxy.cfg")], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.wait_up(2)

    def up(self) -> int:
        seen = set()
        for _ in range(6):
            with contextlib.suppress(httpx.HTTPError):
                seen.add(httpx.get(self.url + "/v1/models", timeout=5).headers.get("x-trainfer-replica"))
        return len(seen - {None})

    def wait_up(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while self.up() != n:
            if time.time() > deadline:
                raise RuntimeError(f"haproxy does not see {n} healthy replicas")
            time.sleep(0.5)

    def revive(self, i: int) -> None:
        """A new replica where the killed one was (same port), and wait until haproxy sends to it again."""
        self.replicas[i] = Replica(self.redis_url, self.replicas[i].port)
        self.wait_up(2)

    def stop(self) -> None:
        self.haproxy.terminate()
        for r in self.replicas:
            r.stop()
        self.redis.terminate()


def kill_mid_run(cluster: Cluster, stream: bool, requests: int, after_s: float) -> dict:
    """`requests` requests at concurrency 8 through the balancer; replica 1 is killed `after_s` seconds in."""
    kind = "streamed" if stream else "plain"  # distinct prompts: the shared response cache must not answer them
    prompts = [f"Write a short {kind} note about topic number {i}." for i in range(requests)]

    async def scenario():
        load = asyncio.ensure_future(run_level(cluster.url, "m", prompts, 64, 8, None, None, 300, 0, stream))
        await asyncio.sleep(after_s)
        os.kill(cluster.replicas[0].proc.pid, signal.SIGKILL)
        return await load

    results, wall = asyncio.run(scenario())
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            kind = "stream ended without [DONE]" if "without [DONE]" in r.error else r.error[:80]
            errors[kind] = errors.get(kind, 0) + 1
    return {"stream": stream, "requests": len(results), "ok": sum(r.ok for r in results), "errors": errors,
            "wall_s": round(wall, 1)}  # fmt: skip


def chats(cluster: Cluster, affinity: bool, seed: int, conversations: int, turns: int) -> dict:
    results, wall = asyncio.run(
        run_conversations(cluster.url, "m", conversations, turns, 150, 32, None, 600, affinity, seed)
    )
    s = summarize(results, wall, 1.0, 0.1)
    later = [r for i, r in enumerate(results) if r.ok and i % turns]  # turns after the first of each chat
    return {
        "affinity": affinity,
        "ok": s["completed"],
        "requests": s["requests"],
        "cached_share": s["cached_prompt_tokens"] / max(1, s["prompt_tokens"]),
        "ttft_p50_ms": 1000 * s["ttft_s"]["p50"],
        "ttft_p50_later_turns_ms": 1000 * statistics.median(r.ttft for r in later) if later else None,
        "output_tok_s": s["output_token_throughput"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--kill-after", type=float, default=4.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(environment())
    cluster = Cluster()
    out: dict = {"environment": environment(), "kill": [], "chats": []}
    try:
        for stream in (False, True):
            r = kill_mid_run(cluster, stream, args.requests, args.kill_after)
            out["kill"].append(r)
            print(f"kill -9 mid-run, {'streamed' if stream else 'plain'}: {r['ok']}/{r['requests']} ok, "
                  f"errors {r['errors'] or 'none'}, {r['wall_s']} s", flush=True)  # fmt: skip
            cluster.revive(0)
        for rnd in range(args.rounds):
            for affinity in (True, False) if rnd % 2 == 0 else (False, True):
                r = chats(cluster, affinity, 100 * (rnd + 1) + affinity, args.conversations, args.turns)
                out["chats"].append(r)
                print(f"round {rnd}, {'affinity   ' if affinity else 'round-robin'}: {r['ok']}/{r['requests']} ok, "
                      f"prompt tokens cached {100 * r['cached_share']:.1f}%, TTFT p50 {r['ttft_p50_ms']:.0f} ms "
                      f"(later turns {r['ttft_p50_later_turns_ms']:.0f} ms), {r['output_tok_s']:.1f} tok/s",
                      flush=True)  # fmt: skip
    finally:
        cluster.stop()
    by = {a: [r for r in out["chats"] if r["affinity"] == a] for a in (True, False)}
    for key in ("cached_share", "ttft_p50_later_turns_ms", "output_tok_s"):
        ratios = [a[key] / b[key] for a, b in zip(by[True], by[False], strict=True) if b[key]]
        if ratios:
            print(f"affinity / round-robin {key}: median {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} rounds)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
