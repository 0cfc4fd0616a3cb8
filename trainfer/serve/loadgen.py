"""`trainfer bench serve`: a load generator for any OpenAI-compatible server (trainfer, llama.cpp, vLLM).

Fixed concurrency levels or Poisson arrivals; streamed requests; bounded in count and time. Metrics use
vLLM's definitions: TTFT, TPOT = (E2E - TTFT) / (output tokens - 1), ITL, E2E, request and output token
throughput, goodput under SLOs. Writes a JSON report and a latency-vs-throughput PNG.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

WORDS = [
    "time",
    "person",
    "year",
    "way",
    "day",
    "thing",
    "man",
    "world",
    "life",
    "hand",
    "part",
    "child",
    "eye",
    "woman",
    "place",
    "work",
    "week",
    "case",
    "point",
    "government",
    "company",
    "number",
    "group",
    "problem",
    "fact",
    "river",
    "music",
    "light",
    "story",
    "garden",
    "winter",
    "market",
    "window",
]


@dataclass
class RequestResult:
    ok: bool
    status: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    text: str = ""  # the answer (streamed requests), for a conversation's next turn
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache (usage.prompt_tokens_details)
    route: str = ""  # who answered, behind `serve --upstream` (x-trainfer-route)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def synthetic_prompts(n: int, input_len: int, tokenizer: Any | None, seed: int = 0) -> list[str]:
    """Prompts of about input_len tokens (exactly, when the model's tokenizer is given)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(input_len)]
        text = " ".join(words)
        if tokenizer is not None:
            while len(tokenizer.encode(text)) > input_len:
                words.pop()
                text = " ".join(words)
        prompts.append(text)
    return prompts


def dataset_prompts(path: Path, n: int, field: str = "prompt", seed: int = 0) -> list[str]:
    """n prompts drawn (with a seed) from a JSONL file's `field`, e.g. one prompt per line of a chat log."""
    rows = [json.loads(line)[field] for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} has no rows with a {field!r} field")
    rng = random.Random(seed)
    return [rng.choice(rows) for _ in range(n)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    s = sorted(values)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]

    return {"mean": statistics.fmean(s), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


async def one_request(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    """One request, streamed or not as `body` says. A stream that ends without `data: [DONE]` (the server or the
    balancer went away mid-answer) is a failure, whatever it delivered before."""
    if not body.get("stream"):
        return await one_plain_request(http, url, body)
    start = time.perf_counter()
    times: list[float] = []
    tokens_from_usage, usage, pieces = None, {}, []
    done = False
    try:
        async with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return RequestResult(False, r.status_code, error=r.text[:200])
            route = r.headers.get("x-trainfer-route", "")
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                if not line.startswith("data: ") or done:
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    usage = data["usage"]
                    tokens_from_usage = usage.get("completion_tokens")
                for choice in data.get("choices") or []:
                    piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if piece:
                        times.append(time.perf_counter())
                        pieces.append(piece)
    except httpx.HTTPError as e:
        if times:  # the connection broke mid-answer (the replica died, say): the same failure as a short stream
            return RequestResult(False, 200, error=f"the stream ended without [DONE] ({type(e).__name__}: {e})")
        return RequestResult(False, 0, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    if not done:
        return RequestResult(False, 200, error="the stream ended without [DONE]")
    if not times:
        return RequestResult(False, 200, error="no tokens streamed")
    n = tokens_from_usage or len(times)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    prompt_tokens = usage.get("prompt_tokens", 0)
    return RequestResult(True, 200, times[0] - start, end - start, n, gaps, "", "".join(pieces), prompt_tokens, cached,
                         route)  # fmt: skip


async def one_plain_request(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    """A non-streamed request: TTFT is not seen by the client, so it reads as the whole answer's time."""
    start = time.perf_counter()
    try:
        r = await http.post(url, json=body)
    except httpx.HTTPError as e:
        return RequestResult(False, 0, error=f"{type(e).__name__}: {e}")
    e2e = time.perf_counter() - start
    if r.status_code != 200:
        return RequestResult(False, r.status_code, error=r.text[:200])
    n = (r.json().get("usage") or {}).get("completion_tokens", 0)
    route = r.headers.get("x-trainfer-route", "")
    return RequestResult(n > 0, 200, e2e, e2e, n, error="" if n else "no tokens in the answer", route=route)


async def run_level(
    base_url: str,
    model: str,
    prompts: list[str],
    output_len: int,
    concurrency: int | None,
    rate: float | None,
    api_key: str | None,
    time_limit_s: float,
    seed: int = 0,
    stream: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send every prompt (bounded by concurrency, or at Poisson times for `rate` req/s); (results, wall s)."""
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency or len(prompts))
    # A fresh connection per request: reusing a kept-alive one races a server that closes it on its own schedule
    # (llama-server's cpp-httplib: an idle timeout and a request count), and that race failed ~1 request in 5 at
    # concurrency 1 as "Server disconnected": requests the server never saw. Loopback connects cost ~0.1 ms.
    limits = httpx.Limits(max_connections=(concurrency or len(prompts)) + 4, max_keepalive_connections=0)

    async with httpx.AsyncClient(timeout=time_limit_s, headers=headers, limits=limits) as http:

        async def go(prompt: str, delay: float) -> RequestResult:
            await asyncio.sleep(delay)
            async with sem:
                body = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": output_len,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": stream,
                }
                if stream:
                    body["stream_options"] = {"include_usage": True}
                return await one_request(http, url, body)

        delays, t = [], 0.0
        for _ in prompts:
            delays.append(t)
            if rate:
                t += rng.expovariate(rate)
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(go(p, d)) for p, d in zip(prompts, delays, strict=True)]
        done, pending = await asyncio.wait(tasks, timeout=time_limit_s)
        for task in pending:
            task.cancel()
        results = [task.result() if task in done else RequestResult(False, error="time limit") for task in tasks]
        return results, time.perf_counter() - start


async def run_conversations(
    base_url: str,
    model: str,
    conversations: int,
    turns: int,
    input_len: int,
    output_len: int,
    api_key: str | None,
    time_limit_s: float,
    affinity: bool,
    seed: int = 0,
) -> tuple[list[RequestResult], float]:
    """Multi-turn chats, all at once: each opens with its own system prompt of about `input_len` words and
    sends its whole history every turn, as chat clients do, so a server's prefix cache can skip all but the
    newest turn. With `affinity`, each conversation names itself in x-trainfer-affinity (deploy/haproxy.cfg
    hashes it) so that a balancer keeps it on one replica."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=0)

    async def converse(i: int) -> list[RequestResult]:
        rng = random.Random(f"{seed}-{i}")
        system = " ".join(rng.choice(WORDS) for _ in range(input_len))
        messages = [{"role": "system", "content": f"Conversation {i}. {system}"}]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if affinity:
            headers["x-trainfer-affinity"] = f"conversation-{seed}-{i}"
        results: list[RequestResult] = []
        async with httpx.AsyncClient(timeout=time_limit_s, headers=headers, limits=limits) as http:
            for t in range(turns):
                messages.append({"role": "user", "content": f"Turn {t}: tell me about the {rng.choice(WORDS)}."})
                body = {
                    "model": model,
                    "messages": messages,
                    "max_tokens": output_len,
                    "temperature": 0,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                results.append(await one_request(http, url, body))
                if not results[-1].ok:
                    break
                messages.append({"role": "assistant", "content": results[-1].text})
        return results

    start = time.perf_counter()
    done = await asyncio.wait_for(asyncio.gather(*(converse(i) for i in range(conversations))), time_limit_s)
    return [r for rs in done for r in rs], time.perf_counter() - start


def summarize(results: list[RequestResult], wall: float, slo_ttft_s: float, slo_tpot_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft <= slo_ttft_s and (r.tpot is None or r.tpot <= slo_tpot_s)]
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error or str(r.status) for r in results if not r.ok})[:5],
        "wall_s": wall,
        "request_throughput": len(ok) / wall,
        "output_token_throughput": sum(r.output_tokens for r in ok) / wall,
        "goodput_rps": len(good) / wall,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": percentiles([g for r in ok for g in r.itl]),
        "e2e_s": percentiles([r.e2e for r in ok]),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
    }


def bench_serve(
    base_url: str,
    model: str,
    concurrency: list[int] | tuple[int, ...] = (1, 4, 16),
    request_rate: float | None = None,
    num_prompts: int | None = None,
    input_len: int = 128,
    output_len: int = 128,
    tokenizer: Any | None = None,
    api_key: str | None = None,
    time_limit_s: float = 600,
    slo_ttft_ms: float = 1000,
    slo_tpot_ms: float = 100,
    out_json: Path | None = None,
    out_png: Path | None = None,
    label: str = "server",
    dataset: Path | None = None,
    stream: bool = True,
    conversations: int | None = None,
    turns: int = 4,
    affinity: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Load levels one after another (fixed concurrency or a Poisson rate), or with `conversations`, that many
    multi-turn chats at once (see run_conversations), whose report adds the prefix-cache hit rate."""
    levels: list[tuple[str, int | None, float | None]] = (
        [(f"{conversations} chats x {turns} turns", conversations, None)]
        if conversations
        else [(f"rate {request_rate}/s", None, request_rate)]
        if request_rate
        else [(f"concurrency {c}", c, None) for c in concurrency]
    )
    report: dict[str, Any] = {
        "label": label,
        "base_url": base_url,
        "model": model,
        "input_len": input_len,
        "output_len": output_len,
        "stream": stream,
        "turns": turns if conversations else None,
        "affinity": affinity,
        "seed": seed,
        "levels": [],
    }
    for name, c, rate in levels:
        level_seed = seed + len(report["levels"])  # a new seed, new prompts: no answer cached from a past run
        if conversations:
            run = run_conversations(base_url, model, conversations, turns, input_len, output_len, api_key,
                                    time_limit_s, affinity, level_seed)  # fmt: skip
        else:
            n = num_prompts or (64 if rate else max(4, 2 * c))  # by default two waves per concurrency level
            prompts = (
                dataset_prompts(dataset, n, seed=level_seed)
                if dataset
                else synthetic_prompts(n, input_len, tokenizer, level_seed)
            )
            run = run_level(base_url, model, prompts, output_len, c, rate, api_key, time_limit_s, level_seed, stream)
        results, wall = asyncio.run(run)
        s = summarize(results, wall, slo_ttft_ms / 1000, slo_tpot_ms / 1000)
        s.update({"level": name, "concurrency": c, "request_rate": rate})
        report["levels"].append(s)
        print(
            f"{label:>12} {name:>16}: {s['completed']}/{s['requests']} ok, {s['output_token_throughput']:.1f} tok/s, "
            f"TTFT p50 {1000 * s['ttft_s']['p50']:.0f} ms p99 {1000 * s['ttft_s']['p99']:.0f} ms, "
            f"TPOT p50 {1000 * s['tpot_s']['p50']:.1f} ms, goodput {s['goodput_rps']:.2f} req/s"
            + (
                f", prefix cache {s['cached_prompt_tokens']}/{s['prompt_tokens']} prompt tokens"
                if conversations
                else ""
            ),
            flush=True,
        )
    if out_json:
        out_json.write_text(json.dumps(report, indent=2))
    if out_png:
        plot([report], out_png)
    return report


def plot(reports: list[dict[str, Any]], path: Path) -> None:
    """Latency vs throughput: one line per server, one point per load level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for rep in reports:
        xs = [lv["output_token_throughput"] for lv in rep["levels"]]
        axes[0].plot(xs, [1000 * lv["ttft_s"]["p50"] for lv in rep["levels"]], "o-", label=rep["label"])
        axes[1].plot(xs, [1000 * lv["tpot_s"]["p50"] for lv in rep["levels"]], "o-", label=rep["label"])
        for lv, x in zip(rep["levels"], xs, strict=True):
            axes[0].annotate(str(lv["concurrency"] or lv["request_rate"]), (x, 1000 * lv["ttft_s"]["p50"]))
    axes[0].set(xlabel="output tokens/s", ylabel="TTFT p50 (ms)", title="time to first token")
    axes[1].set(xlabel="output tokens/s", ylabel="TPOT p50 (ms)", title="time per output token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
