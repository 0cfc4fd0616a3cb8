"""Long context: decode at depth and prefill of long prompts, trainfer next to llama.cpp (llama-bench), same run.

    .venv/bin/python benchmarks/long_context.py [--depths 4096 8000] [--rounds 3] [--tokens 32] [--dtype int8]
    .venv/bin/python benchmarks/long_context.py --shape 1.7b [--kind Q4_K_M] [--kv fp16 int8] [--no-prefill-at 4096]
        [--no-decode]

SmolLM2-135M-Instruct (8k context) in int8 against llama.cpp's Q8_0 copy of the same file, one thread per core;
with --shape, a real-size file of benchmarks/sizes.py (random weights, 8k context) that both sides run as it is
(trainfer's dtype auto). trainfer's KV cache in fp32, fp16 and int8 (--kv-dtype; --kv picks which); llama.cpp's in
f16 (its default; flash attention off and on, the faster counted) and q8_0 (flash attention on: q8_0 V needs
it). Each engine's pool is sized to its sequence.

Decode at depth d: each trainfer engine prefills one random-token prompt of d tokens once, then each round decodes
the next `tokens` tokens greedily (the depth grows by rounds x tokens, under 2%); llama-bench -d d -n tokens
re-prefills its depth untimed each round. Prefill of d tokens: each round a fresh random prompt (no prefix-cache hit)
through the engine's chunked prefill, start to first token; llama-bench -p d. Ratios are trainfer / llama.cpp per
round (median, min-max): fp16 and fp32 against f16, int8 against q8_0. Prints one line per figure, then JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402
import sizes  # noqa: E402

from trainfer import LLM, registry  # noqa: E402
from trainfer.bench import parse_llama_bench  # noqa: E402
from trainfer.infer.engine import Engine  # noqa: E402
from trainfer.infer.kv_cache import bytes_per_block, kv_cache_dtype  # noqa: E402
from trainfer.infer.sampling import SamplingParams  # noqa: E402
from trainfer.rounds import alternate, describe, environment, ratio  # noqa: E402

MODEL = "smollm2-135m-instruct"
PAIRS = {"fp16": "f16", "fp32": "f16", "int8": "q8_0"}  # trainfer's KV type -> llama.cpp's it is compared with


def random_prompt(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class Deep:
    """One engine holding one sequence at depth: prefilled once, then decoded `tokens` at a time."""

    def __init__(self, engine: Engine, prompt: list[int], budget: int) -> None:
        self.engine = engine
        engine.add_request("deep", prompt, SamplingParams(max_tokens=budget, temperature=0, ignore_eos=True))
        while not engine.step():  # the prompt's chunks, until its first token
            pass

    def decode(self, tokens: int) -> float:
        start = time.perf_counter()
        for _ in range(tokens):
            self.engine.step()
        return tokens / (time.perf_counter() - start)


def prefill(engine: Engine, prompt: list[int]) -> float:
    """Tokens/s from adding a request to its first token."""
    start = time.perf_counter()
    engine.add_request("prefill", prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    engine.requests.pop("prefill", None)
    return len(prompt) / (time.perf_counter() - start)


def llama(binary: Path, gguf: Path, threads: int, kv: str, *, depth: int = 0, prompt: int = 0, gen: int = 0) -> float:
    """llama-bench's rate, with flash attention off and on where the cache allows both (f16), the faster counted:
    which one wins depends on the machine (on for SmolLM2 on AVX-512, off for a 1.7B file on AVX2: 5.29 vs 2.0
    tokens/s at depth 4,096). A quantized V cache needs it on."""
    fa = "0,1" if kv == "f16" else "1"
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-d", str(depth),
           "-r", "1", "-fa", fa, "-ctk", kv, "-ctv", kv, "-o", "json"]  # fmt: skip
    rows = parse_llama_bench(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return max(row["avg_ts"] for row in rows)


def engine(llm: LLM, kv: str, tokens: int) -> Engine:
    """An engine whose pool holds `tokens` (plus a block of slack) in this KV type: a fixed size would not fit an
    8k sequence of a 1.7B model, or would hold gigabytes a 135M one never touches."""
    dtype = kv_cache_dtype(kv, llm.model.embed_tokens.weight.dtype)
    gb = (tokens // 16 + 2) * bytes_per_block(llm.model.cfg, 16, dtype) / (1 << 30)
    return Engine(llm.model, kv_dtype=kv, kv_cache_gb=gb, block_size=16)


def decode_sides(llm: LLM, depth: int, args: argparse.Namespace, binary: Path, gguf: Path, threads: int) -> dict:
    """Per KV type, an engine holding one sequence at `depth`, and llama-bench -d."""
    vocab, budget = llm.model.cfg.vocab_size, args.rounds * args.tokens + 8
    deep = {kv: Deep(engine(llm, kv, depth + budget), random_prompt(depth, 0, vocab), budget) for kv in args.kv}
    sides = {kv: (lambda d=deep[kv]: d.decode(args.tokens)) for kv in args.kv}
    return sides | {kv: partial(llama, binary, gguf, threads, kv, depth=depth, gen=args.tokens) for kv in peers(args)}


def prefill_sides(llm: LLM, depth: int, args: argparse.Namespace, binary: Path, gguf: Path, threads: int) -> dict:
    """Per KV type, an engine that prefills a fresh random prompt each round, and llama-bench -p."""
    vocab, seeds = llm.model.cfg.vocab_size, iter(range(1, 10_000))
    engines = {kv: engine(llm, kv, depth + 8) for kv in args.kv}
    sides = {kv: (lambda e=engines[kv]: prefill(e, random_prompt(depth, next(seeds), vocab))) for kv in args.kv}
    return sides | {kv: partial(llama, binary, gguf, threads, kv, prompt=depth) for kv in peers(args)}


def peers(args: argparse.Namespace) -> set[str]:
    """llama.cpp's cache types that pair with the KV types asked for."""
    return {PAIRS[kv] for kv in args.kv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="int8")
    ap.add_argument("--depths", type=int, nargs="+", default=[4096, 8000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--no-prefill", action="store_true", help="decode at depth only")
    ap.add_argument("--no-prefill-at", type=int, nargs="*", default=[], help="depths to measure decode at only")
    ap.add_argument("--no-decode", action="store_true", help="prefill only (each depth's decode run is long)")
    ap.add_argument("--shape", choices=list(sizes.SHAPES), help="a real-size file of benchmarks/sizes.py instead")
    ap.add_argument("--kind", default="Q4_K_M", choices=["Q8_0", "Q4_K_M"], help="that file's type")
    ap.add_argument("--kv", nargs="+", default=list(PAIRS), choices=list(PAIRS), help="trainfer's KV types to run")
    args = ap.parse_args()
    env = environment()
    print(describe(env), flush=True)
    threads = torch.get_num_threads()
    peer_dir = registry.home() / "peers"
    peer_dir.mkdir(parents=True, exist_ok=True)
    binary = llama_cpp.build(peer_dir / "llama.cpp") / "llama-bench"
    if args.shape:
        gguf = sizes.make_files(binary.parent, peer_dir / "sizes", args.shape)[args.kind]
        llm = LLM.load(str(gguf), kv_cache_gb=0.01)
    else:
        gguf = llama_cpp.quantized_copies(binary.parent, peer_dir)["Q8_0"]
        llm = LLM.load(MODEL, dtype=args.dtype, kv_cache_gb=0.1)
    print(f"{gguf.name}: trainfer runs it as {llm.weights}", flush=True)
    result: dict = {"environment": env, "args": vars(args), "threads": threads, "decode": {}, "prefill": {}}

    def report(kind: str, depth: int, runs: dict[str, list[float]]) -> None:
        row = {name: sorted(v) for name, v in runs.items()}
        for ours in args.kv:
            theirs = PAIRS[ours]
            r = ratio(runs[ours], runs[theirs])
            row[f"{ours}/{theirs}"] = r.as_list()
            mid = args.rounds // 2
            print(f"{kind} at {depth}: trainfer {ours} KV {r} llama.cpp {theirs} ({sorted(runs[ours])[mid]:.1f} vs "
                  f"{sorted(runs[theirs])[mid]:.1f} tokens/s)", flush=True)  # fmt: skip
        result[kind][str(depth)] = row

    for depth in args.depths:
        if not args.no_decode:
            report("decode", depth, alternate(args.rounds, decode_sides(llm, depth, args, binary, gguf, threads)))
        if not args.no_prefill and depth not in args.no_prefill_at:
            report("prefill", depth, alternate(args.rounds, prefill_sides(llm, depth, args, binary, gguf, threads)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
