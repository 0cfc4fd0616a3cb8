"""The commands that run a model: generate, chat, reason, reason-eval, serve, and ui for training runs."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainfer.cli.flags import arg, default_of
from trainfer.errors import TrainferError
from trainfer.infer.engine import Engine, TokenEvent
from trainfer.infer.kv_cache import KV_DTYPES
from trainfer.infer.sampling import SamplingParams
from trainfer.llm import LLM, WEIGHTS
from trainfer.reason import reason
from trainfer.reason.strategies import SCORERS, STRATEGIES, plan
from trainfer.reason.tasks import evaluate, plot
from trainfer.serve.cache import MemoryCache
from trainfer.serve.limits import MAX_BODY_BYTES, MAX_QUEUE
from trainfer.serve.route import POLICIES, Router, Upstream

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


@dataclass(kw_only=True)
class Threads:
    threads: int | None = None
    """CPU threads for matmuls and the decode step (default: one per core); on a busy machine fewer threads than
    cores avoid waiting on a worker the OS has parked"""


@dataclass(kw_only=True)
class ModelSettings(Threads):
    model: str = arg(positional=True)
    """an alias (see `trainfer models`), a .gguf file or a Hugging Face directory"""
    dtype: str = arg(default_of(LLM.load, "dtype"), choices=WEIGHTS)
    """weights: auto (the file's own: a Q4_K_M GGUF runs as Q4_K_M, memory-mapped), float32, bfloat16, int8 (Q8_0
    blocks) or int4 (Q4_1 blocks)"""
    kv_cache_gb: float = default_of(Engine.__init__, "kv_cache_gb")
    """memory for the paged KV cache in GiB"""
    kv_dtype: str = arg(default_of(LLM.load, "kv_dtype"), choices=KV_DTYPES)
    """the KV cache's element type: fp16 (the default: twice the tokens per GiB of fp32, half the cache read per
    token at depth), int8 (a scale per token and head, ~3.8x the tokens of fp32), fp32, or auto (the model's
    activations' type: results equal to its own forward); the cost in quality: BENCHMARKS.md, Long context"""
    draft: str | None = None
    """speculative decoding: ngram guesses the next tokens from the text so far (prompt lookup; helps when the
    answer repeats its input: edits, quotes, extraction), or a small draft model with the same tokenizer (an
    alias, .gguf or directory) guesses them; the output stays the same"""
    num_draft_tokens: int = default_of(Engine.__init__, "num_draft_tokens")
    """tokens guessed per step with --draft (at most, for a draft model: fewer while it guesses wrong)"""


@dataclass(kw_only=True)
class Generate(ModelSettings):
    """complete a raw-text prompt, streamed"""

    prompt: str = arg(positional=True)
    """the text to continue"""
    sampling: SamplingParams = arg(SamplingParams(), only=SAMPLING_FLAGS)


@dataclass(kw_only=True)
class Chat(ModelSettings):
    """chat with the model's chat template (interactive, or one --message)"""

    message: str | None = None
    """one user turn, answered non-interactively"""
    system: str | None = None
    """system prompt"""
    sampling: SamplingParams = arg(SamplingParams(), only=SAMPLING_FLAGS)


def load(s: ModelSettings, **engine_args) -> LLM:
    """Load the model with the engine, and say what it took on stderr."""
    start = time.perf_counter()
    llm = LLM.load(s.model, dtype=s.dtype, kv_cache_gb=s.kv_cache_gb, kv_dtype=s.kv_dtype, draft=s.draft,
                   num_draft_tokens=s.num_draft_tokens, **engine_args)  # fmt: skip
    pool = llm.engine.pool
    print(
        f"[loaded {s.model} ({llm.model.cfg.n_params / 1e6:.1f}M params, {llm.weights}) in "
        f"{time.perf_counter() - start:.1f} s; KV cache {pool.num_blocks} blocks x {pool.block_size} tokens = "
        f"{pool.nbytes / (1 << 30):.2f} GiB]",
        file=sys.stderr,
    )
    return llm


def generate(s: Generate) -> None:
    llm = load(s)
    ids = llm.tokenizer.encode(s.prompt)
    print_stream(llm.engine.stream(ids, s.sampling), len(ids), llm.engine)


def chat(s: Chat) -> None:
    llm = load(s)
    messages = [{"role": "system", "content": s.system}] if s.system else []
    if s.message is not None:
        messages.append({"role": "user", "content": s.message})
        ids = llm.chat_prompt(messages)
        print_stream(llm.engine.stream(ids, s.sampling), len(ids), llm.engine)
        return
    print("chatting with", s.model, "- an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = llm.chat_prompt(messages)  # the whole conversation so far, every turn
        reply = print_stream(llm.engine.stream(ids, s.sampling), len(ids), llm.engine)
        messages.append({"role": "assistant", "content": reply})


def print_stream(events: Iterator[TokenEvent], prompt_tokens: int, engine: Engine) -> str:
    """Stream text to stdout; timing (and, with --draft, the guesses kept so far) to stderr so that stdout stays
    the model's text alone."""
    start, first, n, text, finish = time.perf_counter(), 0.0, 0, [], "length"
    for e in events:
        if n == 0:
            first = time.perf_counter()
        n += 1
        text.append(e.text)
        finish = e.finish_reason or finish
        sys.stdout.write(e.text)
        sys.stdout.flush()
    end = time.perf_counter()
    rate = (n - 1) / (end - first) if n > 1 and end > first else 0.0
    sys.stdout.write("\n")
    ttft_ms = 1000 * (first - start)
    stats = (
        f"prompt {prompt_tokens} tokens, {n} generated, TTFT {ttft_ms:.0f} ms, {rate:.1f} tokens/s, finish: {finish}"
    )
    if engine.draft_tokens:
        at = ", ".join(f"{share:.0%}" for share in engine.kept_by_position() if share is not None)
        stats += f"; draft guesses kept {engine.accepted_tokens / engine.draft_tokens:.0%} (by position {at})"
    print(f"[{stats}]", file=sys.stderr)
    return "".join(text)


@dataclass(kw_only=True)
class Reason(ModelSettings):
    """answer with test-time compute: CoT, self-consistency, best-of-N, ..."""

    question: str = arg(positional=True)
    """the question to answer"""
    strategy: str = arg(default_of(reason, "strategy"), choices=STRATEGIES)
    """how to spend the compute"""
    n: int = arg(default_of(plan, "n"), flags=("-n",))
    """samples (the budget for adaptive)"""
    kind: str = arg(default_of(plan, "kind"), choices=("number", "option", "line"))
    """what the answer is"""
    scorer: str | None = arg(None, choices=tuple(s for s in SCORERS if s != "verifier"))
    """best-of-n: mean logprob (default) or the model as judge"""
    temperature: float = default_of(plan, "temperature")
    """sampling temperature of the samples"""
    max_tokens: int = default_of(plan, "max_tokens")
    """most tokens per sample"""
    seed: int = default_of(plan, "seed")
    """random seed"""
    json: bool = False
    """print the result as JSON"""


def reason_once(s: Reason) -> None:
    llm = load(s)
    result = reason(llm, s.question, s.strategy, n=s.n, kind=s.kind, temperature=s.temperature,
                    max_tokens=s.max_tokens, seed=s.seed, scorer=s.scorer)  # fmt: skip
    if s.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return
    c = result.compute
    print(f"answer: {result.answer}")
    if result.votes:
        print("votes: " + ", ".join(f"{a}: {v:g}" for a, v in sorted(result.votes.items(), key=lambda kv: -kv[1])))
    print(
        f"compute: {c.samples} samples, {c.generated_tokens} generated tokens, {c.processed_tokens} tokens processed "
        f"({c.cached_prompt_tokens} prompt tokens from the prefix cache), {c.flops:.3g} FLOPs",
        file=sys.stderr,
    )


@dataclass(kw_only=True)
class ReasonEval(ModelSettings):
    """accuracy vs compute of test-time strategies on verifiable tasks"""

    task: str = "add"
    """add | chain-sum | mul | compare | add-pad (the scratchpad format of a model trained on it) |
    rg:NAME[:key=value,...] (a reasoning-gym dataset and its config, e.g. rg:chain_sum:max_terms=2)"""
    strategy: list[str] = arg(["greedy", "cot", "self-consistency"], choices=STRATEGIES)
    """repeatable"""
    budgets: tuple[int, ...] = (1, 2, 4, 8)
    """samples per problem, comma-separated"""
    count: int = default_of(evaluate, "count")
    """problems"""
    digits: int = default_of(evaluate, "digits")
    """digits per operand"""
    seed: int = default_of(evaluate, "seed")
    """which problems, and the samples' seed"""
    max_tokens: int = default_of(evaluate, "max_tokens")
    """most tokens per sample"""
    temperature: float = default_of(evaluate, "temperature")
    """sampling temperature of the samples"""
    scorer: str = arg(default_of(evaluate, "scorer"), choices=SCORERS)
    """how best-of-n picks: mean logprob, the task's verifier program (add-pad), the model as judge"""
    plot: Path | None = None
    """write accuracy vs FLOPs as a PNG here"""


def reason_eval(s: ReasonEval) -> None:
    if not s.budgets or min(s.budgets) < 1:
        raise TrainferError(f"--budgets must be positive integers, got {','.join(map(str, s.budgets))!r}")
    llm = load(s)
    rows = evaluate(llm, s.task, s.strategy, list(s.budgets), s.count, s.seed, s.digits, s.max_tokens,
                    s.temperature, s.scorer)  # fmt: skip
    print(f"{'strategy':<24} {'budget':>6} {'accuracy':>9} {'samples':>8} {'tokens':>9} {'FLOPs':>10}  (per problem)")
    for r in rows:
        print(f"{r.label:<24} {r.budget:>6} {r.accuracy:>9.1%} {r.samples_per_problem:>8.1f} "
              f"{r.tokens_per_problem:>9.0f} {r.flops_per_problem:>10.3g}")  # fmt: skip
    if s.plot:
        plot(rows, s.plot, f"{s.model}: {s.task}, {s.count} problems")
        print(f"plot: {s.plot}")


@dataclass(kw_only=True)
class Listen:
    host: str = "127.0.0.1"
    """the address to listen on"""
    port: int = 8000
    """the port to listen on"""
    log_level: LogLevel = "warning"
    """uvicorn's log level"""

    def check(self) -> None:
        if not 1 <= self.port <= 65535:
            raise TrainferError(f"--port must be in 1..65535, got {self.port}")


@dataclass(kw_only=True)
class Serve(Listen, ModelSettings):
    """an OpenAI-compatible HTTP server (streaming, metrics, cache, auth)"""

    api_key: str | None = None
    """require 'Authorization: Bearer KEY' (or set TRAINFER_API_KEY)"""
    served_model_name: str | None = None
    """the model id clients send (default: MODEL as given)"""
    max_num_seqs: int = default_of(Engine.__init__, "max_num_seqs")
    """sequences decoded together"""
    max_queue: int = MAX_QUEUE
    """sequences waiting beyond --max-num-seqs before 429"""
    max_model_len: int | None = None
    """cap the context (prompt + completion) in tokens"""
    response_cache_size: int = default_of(MemoryCache.__init__, "max_entries")
    """entries in the in-process response cache; 0 = off"""
    cache_url: str | None = None
    """redis://host:port/db: share the response cache between replicas"""
    drain_grace: float = 0.0
    """on SIGTERM, seconds of serving with /health at 503 before closing, for a balancer to notice (deploy/: 3)"""
    drain_timeout: int = 60
    """seconds to finish in-flight requests on SIGTERM"""
    max_body_mb: float = MAX_BODY_BYTES / (1 << 20)
    """largest request body in MiB; larger get 413"""
    log_requests: Path | None = arg(None, metavar="DIR")
    """append each finished request (prompts and answers, in plain text) to DIR/requests-*.jsonl (off)"""
    lora: list[str] = arg([], metavar="NAME=PATH")
    """serve a LoRA adapter (PEFT directory or LoRA run) as model NAME next to the base (repeatable)"""
    run: list[str] = arg([], metavar="DIR")
    """a training run to chart on the page (repeatable)"""
    upstream: str | None = arg(None, metavar="URL")
    """an OpenAI-compatible server to forward to (the edge/cloud cascade; --route says when)"""
    upstream_model: str | None = None
    """the model name sent upstream (default: the upstream's first model)"""
    upstream_api_key: str | None = None
    """the upstream's key (or set TRAINFER_UPSTREAM_API_KEY); sent to it only, never logged"""
    upstream_timeout: float = 30.0
    """seconds the upstream may take to start answering before the local model answers instead"""
    route: str = arg("local-first", choices=POLICIES)
    """with --upstream: local-first (forward unsure answers), load (forward when the queue would break
    --route-slo-ttft-ms), upstream-first (local only when the upstream fails)"""
    route_min_logprob: float = default_of(Router.__init__, "min_logprob")
    """local-first: forward when the local answer's mean token log-probability is below this"""
    route_slo_ttft_ms: float = default_of(Router.__init__, "slo_ttft_ms")
    """load: the time-to-first-token objective the local queue must meet"""


def serve(s: Serve) -> None:
    # the web stack (FastAPI, pydantic, prometheus-client: ~0.4 s) is imported here, not at the top: every
    # command builds the whole parser, and only this one serves (tests/cli/test_flags.py holds it to that)
    from trainfer.serve.app import create_app, serve_forever
    from trainfer.serve.cache import RedisCache
    from trainfer.serve.server import Server
    from trainfer.web import is_run_dir

    s.check()
    if s.max_model_len is not None and s.max_model_len < 1:
        raise TrainferError(f"--max-model-len must be >= 1, got {s.max_model_len}")
    if s.drain_grace < 0 or s.drain_timeout < 0:
        raise TrainferError("--drain-grace and --drain-timeout must be >= 0")
    if s.max_body_mb <= 0:
        raise TrainferError(f"--max-body-mb must be > 0, got {s.max_body_mb}")
    api_key = s.api_key or os.environ.get("TRAINFER_API_KEY") or None
    model_id = s.served_model_name or s.model
    adapters = _adapters(s.lora, model_id)
    router = None  # checked before the model loads: a bad URL fails in a second
    if s.upstream:
        key = s.upstream_api_key or os.environ.get("TRAINFER_UPSTREAM_API_KEY") or None
        upstream = Upstream(s.upstream, s.upstream_model, key, s.upstream_timeout)
        router = Router(upstream, s.route, s.route_min_logprob, s.route_slo_ttft_ms)
    llm = LLM.load(s.model, dtype=s.dtype, adapters=adapters, kv_cache_gb=s.kv_cache_gb, kv_dtype=s.kv_dtype,
                   draft=s.draft, num_draft_tokens=s.num_draft_tokens, max_num_seqs=s.max_num_seqs,
                   max_model_len=s.max_model_len)  # fmt: skip
    cache = None
    if s.cache_url:
        cache = RedisCache(s.cache_url)
    elif s.response_cache_size > 0:
        cache = MemoryCache(max_entries=s.response_cache_size)
    max_body = int(s.max_body_mb * (1 << 20))
    server = Server(llm, model_id, api_key, s.max_queue, cache, max_body, log_requests=s.log_requests, router=router)
    print(f"[serving {server.model_id} on http://{s.host}:{s.port}/v1 (auth {'on' if api_key else 'off'})]",
          file=sys.stderr)  # fmt: skip
    if s.log_requests:
        print(f"[logging prompts and answers in plain text to {s.log_requests}/]", file=sys.stderr)
    if router is not None:
        print(f"[routing {s.route} to {router.upstream.url}]", file=sys.stderr)
    runs = run_dirs(s.run) + ([Path(s.model)] if is_run_dir(s.model) else [])
    print(f"[web page: http://{s.host}:{s.port}/]", file=sys.stderr)
    app = create_app(server, runs)
    serve_forever(app, s.host, s.port, s.log_level, s.drain_grace, s.drain_timeout)


def _adapters(items: list[str], model_id: str) -> dict[str, str]:
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TrainferError(f"--lora expects NAME=PATH, got {item!r}")
        if name in adapters or name == model_id:
            raise TrainferError(f"--lora name {name!r} is used twice (or is the base model's name)")
        adapters[name] = path
    return adapters


def run_dirs(paths: list[str]) -> list[Path]:
    """Training run directories for the page; a directory without metrics.jsonl yet is fine (a run starting)."""
    for p in paths:
        if not Path(p).is_dir():
            raise TrainferError(f"{p} is not a directory (expected a training run directory: `trainfer train --out`)")
    return [Path(p) for p in paths]


@dataclass(kw_only=True)
class Ui(Listen):
    """the web page for training runs: live loss curves, samples, several runs overlaid"""

    runs: list[str] = arg(positional=True, metavar="RUN_DIR")
    """training run directories (their metrics.jsonl)"""


def ui(s: Ui) -> None:
    import uvicorn

    from trainfer.web import create_ui_app

    s.check()
    runs = run_dirs(s.runs)
    print(f"[training runs on http://{s.host}:{s.port}/#runs]", file=sys.stderr)
    uvicorn.run(create_ui_app(runs), host=s.host, port=s.port, log_level=s.log_level)
