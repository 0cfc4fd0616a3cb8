"""`trainfer bench ...`: measure trainfer next to its peers (decode against transformers and llama.cpp; any
OpenAI-compatible server under load)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainfer.bench import bench_decode
from trainfer.cli.flags import arg, default_of
from trainfer.cli.infer import Threads
from trainfer.errors import TrainferError
from trainfer.io.loader import load_checkpoint
from trainfer.llm import WEIGHTS
from trainfer.serve.loadgen import bench_serve


@dataclass(kw_only=True)
class Decode(Threads):
    """prefill, TTFT, single-stream and batched decode (+ transformers, llama.cpp)"""

    model: str = arg(default_of(bench_decode, "model"), positional=True)
    """an alias, a .gguf file or a Hugging Face directory"""
    dtype: list[str] = arg(list(default_of(bench_decode, "dtypes")), choices=WEIGHTS)
    """weights to measure (repeatable)"""
    runs: int = default_of(bench_decode, "runs")
    """runs per figure; medians are reported"""
    new_tokens: int = default_of(bench_decode, "new_tokens")
    """tokens generated per run"""
    concurrency: list[int] = arg(list(default_of(bench_decode, "concurrency")))
    """batched decode at these many sequences (repeatable)"""
    no_peers: bool = False
    """skip transformers"""
    llama_bench: Path | None = None
    """path to llama.cpp's llama-bench binary"""
    llama_gguf: list[str] = arg([], metavar="NAME=PATH")
    """a GGUF for llama-bench (repeatable)"""


def decode(s: Decode) -> None:
    ggufs = {}
    for item in s.llama_gguf:
        name, sep, path = item.partition("=")
        if not sep:
            raise TrainferError(f"--llama-gguf wants NAME=PATH, got {item!r}")
        ggufs[name] = Path(path)
    bench_decode(s.model, dtypes=tuple(s.dtype), runs=s.runs, new_tokens=s.new_tokens,
                 concurrency=tuple(s.concurrency), peers=not s.no_peers, llama_bench_binary=s.llama_bench,
                 llama_ggufs=ggufs)  # fmt: skip


@dataclass(kw_only=True)
class Serve:
    """load-test any OpenAI-compatible server (vLLM's metric definitions)"""

    url: str = arg(positional=True)
    """base URL, e.g. http://127.0.0.1:8000"""
    model: str
    """the model id to send"""
    concurrency: list[int] = arg(list(default_of(bench_serve, "concurrency")))
    """requests in flight at each level (repeatable)"""
    request_rate: float | None = None
    """Poisson arrivals at this many requests/s instead"""
    num_prompts: int | None = None
    """requests per level (default 2 x concurrency, at least 4)"""
    input_len: int = default_of(bench_serve, "input_len")
    """prompt tokens"""
    output_len: int = default_of(bench_serve, "output_len")
    """tokens to generate per request"""
    tokenizer: str | None = None
    """a model whose tokenizer sizes the prompts exactly (alias or path)"""
    dataset: Path | None = None
    """JSONL file of prompts (field 'prompt') instead of synthetic ones"""
    api_key: str | None = None
    """sent as 'Authorization: Bearer KEY'"""
    time_limit: float = default_of(bench_serve, "time_limit_s")
    """seconds per level before giving up"""
    slo_ttft_ms: float = default_of(bench_serve, "slo_ttft_ms")
    """the time-to-first-token objective goodput counts against"""
    slo_tpot_ms: float = default_of(bench_serve, "slo_tpot_ms")
    """the time-per-output-token objective goodput counts against"""
    json: Path | None = None
    """write the report here"""
    plot: Path | None = None
    """write a latency-vs-throughput PNG here"""
    label: str = default_of(bench_serve, "label")
    """the server's name in the report"""
    stream: bool = default_of(bench_serve, "stream")
    """stream the answers (--no-stream: plain JSON answers; TTFT then reads as the whole answer's time)"""
    conversations: int | None = None
    """instead of levels: this many multi-turn chats at once (each resends its history; prefix-cache hits shown)"""
    turns: int = default_of(bench_serve, "turns")
    """turns per chat with --conversations"""
    affinity: bool = False
    """each chat sends an x-trainfer-affinity header (deploy/haproxy.cfg keeps a chat on one replica)"""
    seed: int = default_of(bench_serve, "seed")
    """the prompts' seed: change it between runs on one server, or its caches answer from the last run"""


def serve(s: Serve) -> None:
    if (s.conversations is not None and s.conversations < 1) or s.turns < 1:
        raise TrainferError("--conversations and --turns must be >= 1")
    tokenizer = load_checkpoint(s.tokenizer)[2] if s.tokenizer else None
    bench_serve(s.url, s.model, concurrency=s.concurrency, request_rate=s.request_rate, num_prompts=s.num_prompts,
                input_len=s.input_len, output_len=s.output_len, tokenizer=tokenizer, api_key=s.api_key,
                time_limit_s=s.time_limit, slo_ttft_ms=s.slo_ttft_ms, slo_tpot_ms=s.slo_tpot_ms, out_json=s.json,
                out_png=s.plot, label=s.label, dataset=s.dataset, stream=s.stream,
                conversations=s.conversations, turns=s.turns, affinity=s.affinity, seed=s.seed)  # fmt: skip
