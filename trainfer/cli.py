"""The `trainfer` command: each subcommand is a thin shell over a library function.

trainfer pull smollm2-135m-instruct
trainfer chat smollm2-135m-instruct --message "Hi!"
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainfer import registry
from trainfer.errors import TrainferError, new_directory
from trainfer.infer.engine import TokenEvent
from trainfer.infer.sampling import SamplingParams

_SAMPLING_HELP = {
    "max_tokens": "most tokens to generate",
    "temperature": "0 = greedy; higher = more random",
    "top_p": "nucleus sampling: keep the most likely tokens up to this probability mass",
    "top_k": "keep only the k most likely tokens (0 = off)",
    "seed": "random seed: the same seed gives the same tokens",
}


WEIGHT_DTYPES = ["auto", "float32", "bfloat16", "int8", "int4"]
REASON_STRATEGIES = ["greedy", "cot", "self-consistency", "adaptive", "best-of-n", "self-correction"]
DTYPE_HELP = (
    "weights: auto (the file's own: a Q4_K_M GGUF runs as Q4_K_M, memory-mapped), float32, bfloat16, int8 (Q8_0 "
    "blocks) or int4 (Q4_1 blocks) (default auto)"
)


THREADS_HELP = (
    "CPU threads for matmuls and the decode step (default: one per core); on a busy machine fewer threads "
    "than cores avoid waiting on a worker the OS has parked"
)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an alias (see `trainfer models`), a .gguf file or a Hugging Face directory")
    p.add_argument("--dtype", default="auto", choices=WEIGHT_DTYPES, help=DTYPE_HELP)
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="memory for the paged KV cache (default 1.0)")
    _add_threads_flag(p)


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """What `train` and `finetune` share: a seed, `--set` overrides and resuming."""
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")


def _add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help=THREADS_HELP)


def _load(args: argparse.Namespace):
    """Load the model with the engine, and say what it took on stderr."""
    from trainfer.llm import LLM

    start = time.perf_counter()
    llm = LLM.load(args.model, dtype=args.dtype, kv_cache_gb=args.kv_cache_gb)
    pool = llm.engine.pool
    print(
        f"[loaded {args.model} ({llm.model.cfg.n_params / 1e6:.1f}M params, {llm.weights}) in "
        f"{time.perf_counter() - start:.1f} s; KV cache {pool.num_blocks} blocks x {pool.block_size} tokens = "
        f"{pool.nbytes / (1 << 30):.2f} GiB]",
        file=sys.stderr,
    )
    return llm


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Flags mirror SamplingParams' fields and defaults, so the two cannot drift apart."""
    defaults = SamplingParams()
    for f in dataclasses.fields(SamplingParams):
        if f.name in _SAMPLING_HELP:
            kind = int if f.name in ("max_tokens", "top_k", "seed") else float
            default = getattr(defaults, f.name)
            p.add_argument(
                f"--{f.name.replace('_', '-')}",
                type=kind,
                default=default,
                help=f"{_SAMPLING_HELP[f.name]} (default {default})",
            )
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    sampling = {name: getattr(args, name) for name in (*_SAMPLING_HELP, "stop")}
    SamplingParams(**sampling)  # bad flags fail here, before a model is loaded
    return sampling


def _print_stream(events: Iterator[TokenEvent], prompt_tokens: int) -> str:
    """Stream text to stdout; timing to stderr so that stdout stays the model's text alone."""
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
    print(f"[{stats}]", file=sys.stderr)
    return "".join(text)


def cmd_pull(args: argparse.Namespace) -> None:
    path = registry.pull(args.name)
    print(path)


def cmd_models(args: argparse.Namespace) -> None:
    for name, path in registry.cached_models():
        where = str(path) if path else "not pulled (trainfer pull " + name + ")"
        print(f"{name:28s} {registry.ALIASES[name].description}\n{'':28s} {where}")


def cmd_generate(args: argparse.Namespace) -> None:
    sampling = _sampling(args)
    llm = _load(args)
    ids = llm.tokenizer.encode(args.prompt)
    _print_stream(llm.stream(ids, **sampling), len(ids))


def cmd_chat(args: argparse.Namespace) -> None:
    sampling = _sampling(args)
    llm = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:
        messages.append({"role": "user", "content": args.message})
        ids = llm.chat_prompt(messages)
        _print_stream(llm.stream(ids, **sampling), len(ids))
        return
    print("chatting with", args.model, "- an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        ids = llm.chat_prompt(messages)  # the whole conversation so far, every turn
        reply = _print_stream(llm.stream(ids, **sampling), len(ids))
        messages.append({"role": "assistant", "content": reply})


def cmd_convert(args: argparse.Namespace) -> None:
    from trainfer.io.export import export_model

    kind = {"auto": "F32", "float32": "F32", "bfloat16": "BF16"}.get(args.dtype, args.dtype)
    print(export_model(args.model, args.to, Path(args.out_dir), kind))


def cmd_export(args: argparse.Namespace) -> None:
    from trainfer.io.export import export_model

    print(export_model(args.model, args.to, Path(args.out), args.type))


def cmd_quantize(args: argparse.Namespace) -> None:
    from trainfer.io.quantized import save_quantized
    from trainfer.llm import LLM

    if args.report:
        from trainfer.compress.quality import format_report, quality_report

        weights = ("float32", args.to) if args.to else ("float32", "int8", "int4")
        print(format_report(args.model, quality_report(args.model, weights, positions=args.positions)))
        if not args.out:
            return
    if not (args.to and args.out):
        raise TrainferError("quantize needs --to and --out (or --report alone for the quality table)")
    out = new_directory(args.out)
    llm = LLM.load(args.model, dtype=args.to, num_blocks=2)
    print(save_quantized(llm.model, llm.tokenizer, out))


def cmd_prepare(args: argparse.Namespace) -> None:
    from trainfer.data.prepare import prepare

    stats = prepare(
        args.source, Path(args.out), args.tokenizer, args.vocab_size, args.val_fraction, args.seed, args.split
    )
    print(
        f"{stats.documents} documents ({stats.train_documents} train / {stats.val_documents} val), "
        f"{stats.train_tokens:,} train + {stats.val_tokens:,} val tokens, vocabulary {stats.vocab_size}, "
        f"{stats.bytes_per_token:.2f} bytes per token -> {args.out}"
    )


def _resumed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's own settings, so `--resume --out DIR` is enough; anything given again must agree."""
    from trainfer.io.run_dir import list_checkpoints, read_state

    found = list_checkpoints(Path(args.out)) if args.resume and args.out else []
    return read_state(found[-1])["config"] if found else {}


def cmd_train(args: argparse.Namespace) -> None:
    from trainfer.train.config import load_config
    from trainfer.train.trainer import train

    base = _resumed_settings(args)
    cfg = load_config(
        args.config, args.set, base=base, data=args.data, out_dir=args.out, preset=args.preset, seed=args.seed
    )
    result = train(cfg, resume=args.resume)
    if result.best_checkpoint is None:  # not rank 0 of a distributed run
        return
    val = f", val loss {result.val_loss:.4f} ({result.val_bpb:.3f} bits/byte)" if result.val_loss is not None else ""
    print(
        f"{result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s "
        f"({result.tokens_per_s:,.0f} tokens/s, MFU {result.mfu:.1%} against a {result.peak_source} peak){val}"
        f"{' (stopped early)' if result.stopped_early else ''}\nbest checkpoint: {result.best_checkpoint}"
    )


def cmd_finetune(args: argparse.Namespace) -> None:
    from trainfer.train.finetune import finetune, load_finetune_config

    base = _resumed_settings(args)
    values = {"base_model": args.model, "data": args.data, "val_data": args.val, "out_dir": args.out}
    if args.lora:
        values["lora"] = True
    cfg = load_finetune_config(args.config, args.set, base=base, seed=args.seed, **values)
    result = finetune(cfg, resume=args.resume)
    if result.card is not None:
        print(result.card)


def cmd_merge(args: argparse.Namespace) -> None:
    from trainfer.io import peft
    from trainfer.io.loader import export_hf, resolve

    if not peft.is_adapter(resolve(args.adapter)):
        raise TrainferError(f"{args.adapter} is not a LoRA adapter (no adapter_config.json): nothing to merge")
    print(export_hf(args.adapter, Path(args.out), args.dtype, base=args.base))


def cmd_prune(args: argparse.Namespace) -> None:
    from trainfer.compress.prune import prune

    report = prune(args.model, args.out, args.method, args.ratio, args.metric, args.kv_heads, args.data,
                   args.windows, args.seq_len, args.seed)  # fmt: skip
    print(report.summary())
    before, after = report.scores["calibration_loss_before"], report.scores["calibration_loss_after"]
    print(f"calibration loss {before:.4f} -> {after:.4f} nats/token; wrote {args.out} (see prune.json)")
    print(f"recover what was lost: trainfer distill --teacher {args.model} --student {args.out} --data ... --out RUN")


def cmd_distill(args: argparse.Namespace) -> None:
    from trainfer.compress.distill import distill, load_distill_config
    from trainfer.model.config import PRESETS

    base = _resumed_settings(args)
    values: dict[str, Any] = {"teacher": args.teacher, "out_dir": args.out, "data": args.data}
    if args.student in PRESETS:
        values["preset"] = args.student  # a fresh student of that shape, with the teacher's vocabulary
    elif args.student:
        values["student"] = args.student
    if args.data and not base and not (Path(args.data) / "meta.json").exists():
        values["data"] = str(_teacher_tokenized(args.data, args.teacher, Path(args.out) / "data"))
    cfg = load_distill_config(args.config, args.set, base=base, seed=args.seed, **values)
    result = distill(cfg, resume=args.resume)
    if result.best_checkpoint is None:
        return
    val = f", held-out loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"{result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s{val}")
    print(f"the student: {result.best_checkpoint} (best held-out loss)")


def _teacher_tokenized(source: str, teacher: str, out: Path) -> Path:
    """Text (a corpus name, files, a directory) as token shards in the teacher's tokenizer, kept in the run."""
    from trainfer.data.prepare import prepare

    if not (out / "meta.json").exists():
        stats = prepare([source], out, tokenizer=teacher)
        print(f"prepared {source}: {stats.train_tokens:,} training + {stats.val_tokens:,} held-out tokens -> {out}")
    return out


def cmd_eval(args: argparse.Namespace) -> None:
    from trainfer.train.evaluate import evaluate_chat, evaluate_model

    if bool(args.data) == bool(args.chat_data):
        raise TrainferError("eval needs --data DIR (text) or --chat-data FILE.jsonl (conversations), one of them")
    if args.chat_data:
        print(evaluate_chat(args.model, args.chat_data, args.exact, args.dtype).summary())
        return
    report = evaluate_model(
        args.model, args.data, args.max_tokens, args.seq_len, passages=args.passages,
        prefix_tokens=args.prefix_tokens, continuation_tokens=args.continuation_tokens, dtype=args.dtype,
    )  # fmt: skip
    print(report.summary())


def cmd_cost(args: argparse.Namespace) -> None:
    from trainfer.cost import report
    from trainfer.cost.hardware import load_table

    if args.what == "train":
        table = load_table(args.prices)
        report.train(args.run, args.flops, args.wall_s, args.hardware, table, args.mfu, args.full, args.json)
    elif args.what == "serve":
        report.serve(args.bench, args.price_per_hour, args.slo_ttft_ms, args.slo_tpot_ms, args.requests_per_day,
                     args.tokens_per_request, args.peak_to_average, args.json, args.plot)  # fmt: skip
    elif args.what == "decode":
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
        report.decode(args.model, args.hardware or ["cpu-2vcpu", "l4", "h100-sxm"], load_table(args.prices), batches,
                      args.bytes_per_param, args.context, args.bandwidth_efficiency, args.mfu, args.step_overhead_ms,
                      args.calibrate, args.json)  # fmt: skip
    elif args.what == "lifetime":
        report.lifetime(args.training, args.serving_per_month, args.months, args.tuning, args.per_request_large,
                        args.per_request_small, args.json, args.plot)  # fmt: skip
    elif args.what == "advise":
        import dataclasses
        import json

        from trainfer.cost.advise import advise, advise_chat

        if bool(args.data) == bool(args.chat_data):
            raise TrainferError("cost advise needs --data (your text) or --chat-data (your eval conversations)")
        if args.chat_data:
            advice = advise_chat(args.model, args.chat_data, load_table(args.prices), args.train_data, args.target,
                                 args.hardware, args.epochs, args.max_tokens)  # fmt: skip
        else:
            advice = advise(args.model, args.data, load_table(args.prices), args.hardware, args.epochs, args.max_tokens)
        print(json.dumps(dataclasses.asdict(advice), indent=2) if args.json else "\n".join(advice.reasons))
    else:
        report.edge_vs_cloud(args.bench, args.cloud_per_million, args.cloud_ttft_ms, args.cloud_tpot_ms, args.tokens,
                             args.tokens_per_user_month, args.device_price, args.device_months, args.rtt_ms,
                             args.json, args.plot)  # fmt: skip


def cmd_reason(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from trainfer.reason import reason

    llm = _load(args)
    result = reason(llm, args.question, args.strategy, n=args.n, kind=args.kind, temperature=args.temperature,
                        max_tokens=args.max_tokens, seed=args.seed, scorer=args.scorer)  # fmt: skip
    if args.json:
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


def cmd_reason_eval(args: argparse.Namespace) -> None:
    from trainfer.reason.tasks import evaluate, plot

    llm = _load(args)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    if not budgets or min(budgets) < 1:
        raise TrainferError(f"--budgets must be positive integers, got {args.budgets!r}")
    rows = evaluate(llm, args.task, args.strategy or ["greedy", "cot", "self-consistency"], budgets, args.count,
                    args.seed, args.digits, args.max_tokens, args.temperature, args.scorer)  # fmt: skip
    print(f"{'strategy':<24} {'budget':>6} {'accuracy':>9} {'samples':>8} {'tokens':>9} {'FLOPs':>10}  (per problem)")
    for r in rows:
        print(f"{r.label:<24} {r.budget:>6} {r.accuracy:>9.1%} {r.samples_per_problem:>8.1f} "
              f"{r.tokens_per_problem:>9.0f} {r.flops_per_problem:>10.3g}")  # fmt: skip
    if args.plot:
        plot(rows, args.plot, f"{args.model}: {args.task}, {args.count} problems")
        print(f"plot: {args.plot}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from trainfer.quickstart import quickstart

    done = quickstart(args.out, args.steps)
    print()
    print(done.report.read_text())
    print(f"report card: {done.report} (loss curve: {done.out_dir / 'loss.png'})")
    run = done.out_dir / "run"
    print(f"in a browser: `trainfer ui {run}` (curves, samples, probe), `trainfer serve {run}` (chat with it too)")


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    import uvicorn

    from trainfer.llm import LLM
    from trainfer.serve.app import create_app
    from trainfer.serve.cache import MemoryCache, RedisCache
    from trainfer.serve.server import Server
    from trainfer.web import is_run_dir

    if not 1 <= args.port <= 65535:
        raise TrainferError(f"--port must be in 1..65535, got {args.port}")
    api_key = args.api_key or os.environ.get("TRAINFER_API_KEY") or None
    if args.max_model_len is not None and args.max_model_len < 1:
        raise TrainferError(f"--max-model-len must be >= 1, got {args.max_model_len}")
    engine_args = dict(kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    adapters = {}
    for item in args.lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TrainferError(f"--lora expects NAME=PATH, got {item!r}")
        if name in adapters or name == (args.served_model_name or args.model):
            raise TrainferError(f"--lora name {name!r} is used twice (or is the base model's name)")
        adapters[name] = path
    llm = LLM.load(args.model, dtype=args.dtype, adapters=adapters, **engine_args)
    cache = None
    if args.cache_url:
        cache = RedisCache(args.cache_url)
    elif args.response_cache_size > 0:
        cache = MemoryCache(max_entries=args.response_cache_size)
    if args.max_body_mb <= 0:
        raise TrainferError(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    max_body = int(args.max_body_mb * (1 << 20))
    model_id = args.served_model_name or args.model
    server = Server(llm, model_id, api_key, args.max_queue, cache, max_body, log_requests=args.log_requests)
    print(
        f"[serving {server.model_id} on http://{args.host}:{args.port}/v1 (auth {'on' if api_key else 'off'})]",
        file=sys.stderr,
    )
    if args.log_requests:
        print(f"[logging prompts and answers in plain text to {args.log_requests}/]", file=sys.stderr)
    runs = _run_dirs(args.run) + ([Path(args.model)] if is_run_dir(args.model) else [])
    print(f"[web page: http://{args.host}:{args.port}/]", file=sys.stderr)
    uvicorn.run(
        create_app(server, runs),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.drain_timeout,
    )


def _run_dirs(paths: list[str]) -> list[Path]:
    """Training run directories for the page; a directory without metrics.jsonl yet is fine (a run starting)."""
    for p in paths:
        if not Path(p).is_dir():
            raise TrainferError(f"{p} is not a directory (expected a training run directory: `trainfer train --out`)")
    return [Path(p) for p in paths]


def cmd_ui(args: argparse.Namespace) -> None:
    import uvicorn

    from trainfer.web import create_ui_app

    if not 1 <= args.port <= 65535:
        raise TrainferError(f"--port must be in 1..65535, got {args.port}")
    runs = _run_dirs(args.runs)
    print(f"[training runs on http://{args.host}:{args.port}/#runs]", file=sys.stderr)
    uvicorn.run(create_ui_app(runs), host=args.host, port=args.port, log_level=args.log_level)


def cmd_dataset_from_logs(args: argparse.Namespace) -> None:
    from trainfer.data.from_logs import Filters, dataset_from_logs

    filters = Filters(
        finish_reasons=tuple(args.finish_reason or Filters.finish_reasons),
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        only_rated_up=args.only_rated_up,
        keep_rated_down=args.keep_rated_down,
    )
    report = dataset_from_logs(args.dir, args.out, filters, args.force)
    print(report.summary())
    print(f"wrote {report.kept} examples to {args.out}")


def cmd_bench_decode(args: argparse.Namespace) -> None:
    from trainfer.bench import bench_decode

    ggufs = {}
    for item in args.llama_gguf:
        name, sep, path = item.partition("=")
        if not sep:
            raise TrainferError(f"--llama-gguf wants NAME=PATH, got {item!r}")
        ggufs[name] = Path(path)
    bench_decode(
        args.model,
        dtypes=tuple(args.dtype or ["float32", "bfloat16"]),
        runs=args.runs,
        new_tokens=args.new_tokens,
        concurrency=tuple(args.concurrency or [8, 32, 64]),
        peers=not args.no_peers,
        llama_bench_binary=Path(args.llama_bench) if args.llama_bench else None,
        llama_ggufs=ggufs,
    )


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from trainfer.serve.loadgen import bench_serve

    tokenizer = None
    if args.tokenizer:
        from trainfer.io.loader import load_checkpoint

        tokenizer = load_checkpoint(args.tokenizer)[2]
    bench_serve(
        args.url,
        args.model,
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        tokenizer=tokenizer,
        api_key=args.api_key,
        time_limit_s=args.time_limit,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        out_json=Path(args.json) if args.json else None,
        out_png=Path(args.plot) if args.plot else None,
        label=args.label,
        dataset=Path(args.dataset) if args.dataset else None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download a model by alias into the cache")
    p.add_argument("name", help="alias, e.g. smollm2-135m-instruct")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list model aliases and what is cached")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="complete a raw-text prompt, streamed")
    _add_model_flags(p)
    p.add_argument("prompt")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model's chat template (interactive, or one --message)")
    _add_model_flags(p)
    p.add_argument("--message", help="one user turn, answered non-interactively")
    p.add_argument("--system", help="system prompt")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("reason", help="answer with test-time compute: CoT, self-consistency, best-of-N, ...")
    _add_model_flags(p)
    p.add_argument("question")
    p.add_argument("--strategy", default="self-consistency", choices=REASON_STRATEGIES)
    p.add_argument("-n", type=int, default=8, help="samples (the budget for adaptive)")
    p.add_argument("--kind", default="number", choices=["number", "option", "line"], help="what the answer is")
    p.add_argument("--scorer", choices=["logprob", "judge"], help="best-of-n: mean logprob (default) or model as judge")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reason)

    p = sub.add_parser("reason-eval", help="accuracy vs compute of test-time strategies on verifiable tasks")
    _add_model_flags(p)
    p.add_argument("--task", default="add",
                   help="add | chain-sum | mul | compare | add-pad (the scratchpad format of a model trained on it) "
                        "| rg:NAME[:key=value,...] (a reasoning-gym dataset and its config, "
                        "e.g. rg:chain_sum:max_terms=2)")  # fmt: skip
    p.add_argument("--strategy", action="append", choices=REASON_STRATEGIES,
                   help="repeatable (default greedy, cot, self-consistency)")  # fmt: skip
    p.add_argument("--budgets", default="1,2,4,8", help="samples per problem, comma-separated (default 1,2,4,8)")
    p.add_argument("--count", type=int, default=20, help="problems (default 20)")
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument(
        "--scorer",
        default="logprob",
        choices=["logprob", "verifier", "judge"],
        help="how best-of-n picks: mean logprob, the task's verifier program (add-pad), the model as judge",
    )
    p.add_argument("--plot", type=Path, help="accuracy vs FLOPs PNG")
    p.set_defaults(func=cmd_reason_eval)

    p = sub.add_parser("quantize", help="write an int8 / int4 copy of a model that loads without re-quantizing")
    p.add_argument("model", help="an alias, a .gguf file, a Hugging Face directory or a training run")
    p.add_argument("--to", choices=["int8", "int4"], help="int8: Q8_0 blocks; int4: Q4_1 blocks")
    p.add_argument("--out", help="a new directory to write")
    p.add_argument(
        "--report",
        action="store_true",
        help="print perplexity, top-1 and greedy agreement against fp32 on held-out Shakespeare and HumanEval "
        "(for --to, or for int8 and int4)",
    )
    p.add_argument("--positions", type=int, default=4096, help="tokens scored per corpus for --report")
    _add_threads_flag(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("convert", help="export a model to another format")
    _add_model_flags(p)
    p.add_argument("--to", required=True, choices=["hf"], help="target format (hf: config.json + safetensors)")
    p.add_argument("out_dir", help="a new directory to write")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a model for another engine: llama.cpp (gguf), onnxruntime, transformers")
    p.add_argument("model", help="an alias, a .gguf file, a Hugging Face directory, a training run or an adapter")
    p.add_argument(
        "--to",
        required=True,
        choices=["gguf", "onnx", "hf"],
        help="gguf: one llama.cpp file; onnx: a decoder with KV-cache inputs and outputs; hf: safetensors",
    )
    p.add_argument("--out", required=True, help="the file (gguf, onnx) or new directory (hf) to write")
    p.add_argument(
        "--type",
        default="F32",
        choices=["F32", "F16", "BF16", "Q8_0", "Q4_0"],
        help="weights (default F32): gguf takes every type, onnx F32, hf F32, F16 or BF16",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("prepare", help="train a tokenizer and pack text into token shards for training")
    p.add_argument(
        "--source",
        action="append",
        required=True,
        help="shakespeare | FILE | DIR | GLOB | FILE.jsonl:FIELD (repeatable)",
    )
    p.add_argument("--out", required=True, help="a new directory for tokenizer.json, train.bin, val.bin, meta.json")
    p.add_argument("--tokenizer", default="bpe", help="bpe (trained here), char, or a model whose tokenizer to reuse")
    p.add_argument("--vocab-size", type=int, default=8192, help="for bpe (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split",
        default="documents",
        choices=["documents", "contiguous"],
        help="hold out whole documents (default) or the end of the concatenated text (nanoGPT's way)",
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="pretrain a model on prepared shards (resumable; torchrun for DDP/FSDP)")
    p.add_argument("--config", help="a TOML file of settings (see docs/training.md)")
    p.add_argument("--data", help="a directory written by trainfer prepare")
    p.add_argument("--out", help="the run directory: checkpoints/, metrics.jsonl, loss.png (default runs/run)")
    p.add_argument("--preset", help="model size and its run defaults: tiny, small, base (default tiny)")
    _add_run_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("quickstart", help="prepare, train, validate and run a small model in ~5 CPU minutes")
    p.add_argument("--out", default="runs/quickstart", help="where the run and report.md go (replaced each time)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (default 1000, ~3 minutes on 2 cores)")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("finetune", help="adapt a pre-trained model to your conversations (full or LoRA; resumable)")
    p.add_argument("model", nargs="?", help="the base: an alias, a .gguf, a model directory or a run (not on --resume)")
    p.add_argument("--data", help="JSONL of {'messages': [...]} or {'prompt', 'completion'} lines")
    p.add_argument("--val", help="held-out JSONL (default: hold out val_fraction of --data)")
    p.add_argument("--out", help="the run directory: checkpoints/, metrics.jsonl, loss.png, report.md")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (PEFT format) on the frozen base")
    p.add_argument("--config", help="a TOML file of settings (see docs/finetune.md)")
    _add_run_flags(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base: a plain Hugging Face model directory")
    p.add_argument("base", nargs="?", help="the base model (default: the one the adapter names)")
    p.add_argument("adapter", help="a PEFT adapter directory or a LoRA fine-tune's run directory")
    p.add_argument("--out", required=True, help="the new model directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=cmd_merge)

    from trainfer.compress.prune import DEPTH_METRICS, METHODS, SPARSITY_METRICS

    p = sub.add_parser("prune", help="a smaller model: drop blocks (depth), narrow MLPs / heads (width), or sparsify")
    p.add_argument("model", help="an alias, a .gguf, a model directory or a training run")
    p.add_argument("--out", required=True, help="the new model directory")
    p.add_argument("--method", default="depth", choices=METHODS)
    p.add_argument("--ratio", type=float, default=0.25, help="share of the blocks' parameters to remove (0.25)")
    p.add_argument(
        "--metric",
        choices=[*DEPTH_METRICS, "activation", *SPARSITY_METRICS],
        help="importance: depth influence|loss (influence), width activation, sparsity wanda|magnitude (wanda)",
    )
    p.add_argument("--kv-heads", type=int, help="width: key-value head groups to keep per layer (default: all)")
    p.add_argument("--data", default="shakespeare", help="calibration text: a corpus name, file, directory or glob")
    p.add_argument("--windows", type=int, default=16, help="calibration windows (16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (256)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("distill", help="train a student (a pruned model, or a preset) on a teacher's distributions")
    p.add_argument("--teacher", help="the model to imitate: an alias, a .gguf, a model directory or a run")
    p.add_argument("--student", help="the model to train: a directory (e.g. from prune) or a preset (tiny, small)")
    p.add_argument(
        "--data", help="text (corpus name, file, directory) or a directory prepared with the teacher's tokenizer"
    )
    p.add_argument("--out", required=True, help="the run directory")
    p.add_argument("--config", help="a TOML file of settings (kd_weight, temperature, top_k, teacher_cache, ...)")
    _add_run_flags(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="held-out loss, perplexity, bits per byte and a memorization probe")
    p.add_argument("model", help="a training run directory, a checkpoint, an alias or a Hugging Face directory")
    p.add_argument("--data", help="a prepared directory tokenized with the model's tokenizer")
    p.add_argument("--chat-data", help="JSONL conversations: assistant-token loss on them (fine-tuning's measure)")
    p.add_argument("--exact", action="store_true", help="with --chat-data: greedy answers vs the references")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens scored per split (default 32768)")
    p.add_argument("--seq-len", type=int, help="window length (default: 256, capped by the model's context)")
    p.add_argument("--passages", type=int, default=32, help="probe passages per split; 0 = no probe")
    p.add_argument("--prefix-tokens", type=int, default=32)
    p.add_argument("--continuation-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=WEIGHT_DTYPES, help=DTYPE_HELP)
    _add_threads_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (streaming, metrics, cache, auth)")
    _add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set TRAINFER_API_KEY)")
    p.add_argument("--served-model-name", help="the model id clients send (default: MODEL as given)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (default 64)")
    p.add_argument(
        "--max-queue", type=int, default=256, help="sequences waiting beyond --max-num-seqs before 429 (256)"
    )
    p.add_argument("--max-model-len", type=int, help="cap the context (prompt + completion) in tokens")
    p.add_argument("--response-cache-size", type=int, default=1024, help="entries in the in-process cache; 0 = off")
    p.add_argument("--cache-url", help="redis://host:port/db: share the response cache between replicas")
    p.add_argument("--drain-timeout", type=int, default=60, help="seconds to finish in-flight requests on SIGTERM")
    p.add_argument("--max-body-mb", type=float, default=4, help="largest request body in MiB; larger get 413 (4)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--log-requests",
        type=Path,
        metavar="DIR",
        help="append each finished request (prompts and answers, in plain text) to DIR/requests-*.jsonl (off)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve a LoRA adapter (PEFT directory or LoRA run) as model NAME next to the base (repeatable)",
    )
    p.add_argument(
        "--run", action="append", default=[], metavar="DIR", help="a training run to chart on the page (repeatable)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="the web page for training runs: live loss curves, samples, several runs overlaid")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories (their metrics.jsonl)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_ui)

    from trainfer.data.from_logs import Filters

    dataset = sub.add_parser("dataset", help="build fine-tuning data").add_subparsers(dest="what", required=True)
    p = dataset.add_parser("from-logs", help="a fine-tuning JSONL from `serve --log-requests` (filtered, redacted)")
    p.add_argument("dir", type=Path, help="the directory given to --log-requests")
    p.add_argument("--out", type=Path, required=True, help="the JSONL to write (messages / prompt+completion lines)")
    p.add_argument("--finish-reason", action="append", help="keep answers that ended so (repeatable; default stop)")
    p.add_argument(
        "--min-chars", type=int, default=Filters.min_chars, help="shortest answer kept in characters (%(default)s)"
    )
    p.add_argument(
        "--max-chars", type=int, default=Filters.max_chars, help="longest answer kept in characters (%(default)s)"
    )
    p.add_argument("--only-rated-up", action="store_true", help="keep only answers rated up via /v1/feedback")
    p.add_argument("--keep-rated-down", action="store_true", help="keep answers rated down (dropped by default)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_dataset_from_logs)

    cost = sub.add_parser("cost", help="what training and serving cost, from measured figures").add_subparsers(
        dest="what", required=True
    )
    p = cost.add_parser("train", help="a run's compute and dollars, and the same job on other hardware")
    p.add_argument("run", nargs="?", type=Path, help="a training run directory (its metrics.jsonl)")
    p.add_argument("--flops", type=float, help="total training FLOPs instead of a run")
    p.add_argument("--wall-s", type=float, help="with --flops: how long it took")
    p.add_argument("--hardware", default="cpu-2vcpu", help="price-table row it ran on (default cpu-2vcpu)")
    p.add_argument("--mfu", type=float, default=0.4, help="MFU assumed on other hardware (default 0.4)")
    p.add_argument("--full", action="store_true", help="also the full budget by the seed's cost shares")
    p.add_argument("--prices", type=Path, help="a TOML price table whose rows replace the shipped ones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cost)
    p = cost.add_parser("decode", help="projected decode speed and $ per 1M tokens on other hardware (roofline)")
    p.add_argument("model", help="the model whose shape is projected (alias, .gguf, directory, run)")
    p.add_argument("--hardware", action="append", help="price-table rows (repeatable; default cpu-2vcpu, l4, h100-sxm)")
    p.add_argument("--batch", default="1,16,64,256", help="sequences decoded together (default 1,16,64,256)")
    p.add_argument("--bytes-per-param", type=float, default=2.0, help="2 for bf16, 1.06 int8, 0.63 int4 (default 2)")
    p.add_argument("--context", type=int, default=256, help="tokens in each sequence's KV cache (default 256)")
    p.add_argument("--bandwidth-efficiency", type=float, default=0.7, help="assumed share of bandwidth (default 0.7)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU when compute-bound (default 0.4)")
    p.add_argument("--step-overhead-ms", type=float, default=0.5, help="assumed fixed cost per step (default 0.5)")
    p.add_argument("--calibrate", type=Path, help="a `bench serve --json` report from the cpu-2vcpu row: "
                   "print its measured speed next to the projection")  # fmt: skip
    p.add_argument("--prices", type=Path, help="a TOML price table whose rows replace the shipped ones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cost)
    p = cost.add_parser("serve", help="$ per 1M tokens and per request from a `bench serve --json` report")
    p.add_argument("bench", type=Path, help="the JSON written by trainfer bench serve --json")
    p.add_argument("--price-per-hour", type=float, required=True, help="what the serving machine costs per hour")
    p.add_argument("--slo-ttft-ms", type=float, default=1000)
    p.add_argument("--slo-tpot-ms", type=float, default=100)
    p.add_argument("--requests-per-day", type=float, help="size a fleet for this load")
    p.add_argument("--tokens-per-request", type=float, default=128)
    p.add_argument("--peak-to-average", type=float, default=2.0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, help="also write a PNG chart here")
    p.set_defaults(func=cmd_cost)
    p = cost.add_parser("lifetime", help="training once + months of serving: totals and the inference share")
    p.add_argument("--training", type=float, required=True, help="training (or fine-tuning) cost, $")
    p.add_argument("--serving-per-month", type=float, required=True, help="serving cost per month, $")
    p.add_argument("--months", type=int, default=12)
    p.add_argument("--tuning", type=float, help="fine-tuning cost, $, for the break-even vs a larger model")
    p.add_argument("--per-request-large", type=float, help="$ per request prompting the larger model")
    p.add_argument("--per-request-small", type=float, help="$ per request serving the tuned small model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, help="also write a PNG chart here")
    p.set_defaults(func=cmd_cost)
    p = cost.add_parser("advise", help="do you need to train? the model on your text, with the costs of each way")
    p.add_argument("model", help="the base model (alias, .gguf, directory, run)")
    p.add_argument("--data", action="append", help="your text: file, directory, glob, FILE.jsonl:FIELD")
    p.add_argument("--chat-data", help="or your eval conversations (JSONL as for eval --chat-data): answers checked")
    p.add_argument("--train-data", help="with --chat-data: the fine-tuning set to cost (default: the eval set)")
    p.add_argument("--target", type=float, default=0.8, help="with --chat-data: share of right answers to serve as is")
    p.add_argument("--hardware", default="cpu-2vcpu", help="price-table row for the fine-tuning estimate")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs to cost (default 3)")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens of your text scored (default 8192)")
    p.add_argument("--prices", type=Path, help="a TOML price table whose rows replace the shipped ones")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cost)
    p = cost.add_parser("edge-vs-cloud", help="latency and cost per user: this machine vs a cloud endpoint")
    p.add_argument("bench", type=Path, help="a `bench serve --json` report measured on the edge machine")
    p.add_argument("--cloud-per-million", type=float, required=True, help="cloud $ per 1M output tokens")
    p.add_argument("--cloud-ttft-ms", type=float, default=150)
    p.add_argument("--cloud-tpot-ms", type=float, default=10)
    p.add_argument("--rtt-ms", type=float, default=50, help="network round trip to the cloud")
    p.add_argument("--tokens", type=int, default=128, help="tokens per answer")
    p.add_argument("--tokens-per-user-month", type=float, default=100_000)
    p.add_argument("--device-price", type=float, default=800, help="the edge device, $")
    p.add_argument("--device-months", type=int, default=36, help="months to amortize it over")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", type=Path, help="also write a PNG chart here")
    p.set_defaults(func=cmd_cost)

    bench = sub.add_parser("bench", help="measure trainfer next to its peers").add_subparsers(
        dest="what", required=True
    )
    p = bench.add_parser("decode", help="prefill, TTFT, single-stream and batched decode (+ transformers, llama.cpp)")
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    p.add_argument(
        "--dtype",
        action="append",
        choices=WEIGHT_DTYPES,
        help="repeatable (default float32, bfloat16)",
    )
    p.add_argument("--runs", type=int, default=3, help="runs per figure; medians are reported")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, action="append", help="repeatable (default 8, 32, 64)")
    p.add_argument("--no-peers", action="store_true", help="skip transformers")
    p.add_argument("--llama-bench", help="path to llama.cpp's llama-bench binary")
    p.add_argument("--llama-gguf", action="append", default=[], help="NAME=PATH of a GGUF for llama-bench (repeatable)")
    _add_threads_flag(p)
    p.set_defaults(func=cmd_bench_decode)

    p = bench.add_parser("serve", help="load-test any OpenAI-compatible server (vLLM's metric definitions)")
    p.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the model id to send")
    p.add_argument("--concurrency", type=int, action="append", help="repeatable (default 1, 4, 16)")
    p.add_argument("--request-rate", type=float, help="Poisson arrivals at this many requests/s instead")
    p.add_argument("--num-prompts", type=int, help="requests per level (default 2 x concurrency, at least 4)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tokenizer", help="a model whose tokenizer sizes the prompts exactly (alias or path)")
    p.add_argument("--dataset", help="JSONL file of prompts (field 'prompt') instead of synthetic ones")
    p.add_argument("--api-key")
    p.add_argument("--time-limit", type=float, default=600, help="seconds per level before giving up")
    p.add_argument("--slo-ttft-ms", type=float, default=1000)
    p.add_argument("--slo-tpot-ms", type=float, default=100)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="write a latency-vs-throughput PNG here")
    p.add_argument("--label", default="server")
    p.set_defaults(func=cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise TrainferError(f"--threads must be at least 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        args.func(args)
    except TrainferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
