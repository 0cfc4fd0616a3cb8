"""`trainfer bench decode`: prefill, TTFT, single-stream and batched decode of the engine, with peers
measured in the same run (transformers on the same weights; llama.cpp's llama-bench when given).

Prints a card and, as its last line, one JSON object.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainfer.infer.sampling import SamplingParams
from trainfer.io.loader import resolve
from trainfer.llm import LLM
from trainfer.rounds import alternate, describe, environment, ratio


def memory_bandwidth_gbs(gib: float = 1.0, reps: int = 5) -> float:
    """Read bandwidth: a sum over a large fp32 buffer (each byte read once), the best of `reps`: a ceiling is what
    the machine can give, and on a shared machine the median of a few seconds can sit well under it (a decode
    step then reads faster than the 'roofline')."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times) / 1e9


def median(fn: Callable[[], float], runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


def random_prompt(n: int, vocab: int, rng: random.Random) -> list[int]:
    """Random ids well inside the vocabulary: every run gets a new prompt, so no prefix-cache help."""
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def engine_ttft(llm: LLM, prompt: list[int]) -> float:
    """Seconds from adding the request to its first token (prefill of the whole prompt + one sample)."""
    t = time.perf_counter()
    next(iter(llm.engine.stream(prompt, _greedy(1))))
    return time.perf_counter() - t


def engine_decode(llm: LLM, prompt: list[int], n: int) -> float:
    """Single stream: (n - 1) / (time of token n - time of token 1)."""
    times = [time.perf_counter() for _ in llm.engine.stream(prompt, _greedy(n))]
    return (n - 1) / (times[-1] - times[0])


def engine_aggregate(llm: LLM, prompts: list[list[int]], n: int) -> float:
    """Concurrent streams: all output tokens / wall time of the whole run (vLLM's output throughput)."""
    t = time.perf_counter()
    results = llm.engine.run(prompts, [_greedy(n)] * len(prompts))
    return sum(len(r[0]) for r in results) / (time.perf_counter() - t)


def hf_decode(model, prompt: list[int], n: int, batch: int = 1) -> tuple[float, float]:
    """transformers: (time of 1 token = prefill + first sample, decode tokens/s from n - 1 more tokens)."""
    x = torch.tensor([prompt] * batch)
    kw: dict[str, Any] = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def timed(k: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k, **kw)
        return time.perf_counter() - t

    first = timed(1)
    return first, batch * (n - 1) / (timed(n) - first)


def llama_bench_rows(binary: Path, gguf: Path, threads: int, prompt: int, gen: int, reps: int) -> list[dict]:
    """llama-bench's JSON rows for a `prompt`-token prefill and a `gen`-token generation (0: skip), `reps` each."""
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", str(reps)]
    return parse_llama_bench(subprocess.run([*cmd, "-o", "json"], capture_output=True, text=True, check=True).stdout)


def parse_llama_bench(text: str) -> list[dict]:
    """`llama-bench -o json`'s rows, each checked for the fields read here: a renamed field in a newer llama.cpp
    is an error naming it, not a KeyError deep in a benchmark (tests/fixtures holds a real output)."""
    rows = json.loads(text)
    for row in rows:
        missing = [k for k in ("n_prompt", "n_gen", "n_threads", "avg_ts", "samples_ts") if k not in row]
        if missing:
            raise ValueError(f"llama-bench's JSON lacks {', '.join(missing)} (a different llama.cpp version?)")
        if (row["n_prompt"] > 0) == (row["n_gen"] > 0):
            raise ValueError(f"llama-bench row is neither a prefill nor a generation test: {row}")
    return rows


def parse_batched_bench(text: str) -> dict[str, float]:
    """The last row of `llama-batched-bench --output-format jsonl`: S_PP (prefill of every prompt, tokens/s), S_TG
    (tokens after every prompt's prefill, over that time) and the total seconds."""
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    if not rows or any(k not in rows[-1] for k in ("pl", "speed_pp", "speed_tg", "t")):
        raise ValueError("llama-batched-bench printed no JSON row with pl, speed_pp, speed_tg and t")
    r = rows[-1]
    return {"streams": r["pl"], "prefill_tok_s": r["speed_pp"], "decode_tok_s": r["speed_tg"], "total_s": r["t"]}


def llama_bench(binary: Path, gguf: Path, threads: int) -> dict[str, float]:
    """llama.cpp's own benchmark: 512-token prefill and 128-token generation, tokens/s."""
    out = {}
    for r in llama_bench_rows(binary, gguf, threads, 512, 128, 3):
        key = "prefill_512_tok_s" if r["n_prompt"] else "decode_tok_s"
        out[key] = round(r["avg_ts"], 1)
    return out


def paired_decode(llm: LLM, binary: Path, gguf: Path, threads: int, new_tokens: int, rounds: int) -> dict:
    """Single-stream decode of ours and llama-bench's tg under the shared protocol (trainfer/rounds.py)."""
    rng = random.Random(3)
    vocab = llm.model.cfg.vocab_size
    runs = alternate(
        rounds,
        {
            "trainfer": lambda: engine_decode(llm, random_prompt(16, vocab, rng), new_tokens),
            "llama.cpp": lambda: llama_bench_rows(binary, gguf, threads, 0, new_tokens, 1)[0]["avg_ts"],
        },
    )
    r = ratio(runs["trainfer"], runs["llama.cpp"])
    return {
        "rounds": rounds,
        "decode_tok_s": round(statistics.median(runs["trainfer"]), 1),
        "llama_cpp_decode_tok_s": round(statistics.median(runs["llama.cpp"]), 1),
        "ratio_median": round(r.median, 3),
        "ratio_min": round(r.low, 3),
        "ratio_max": round(r.high, 3),
        "per_round": [round(a / b, 3) for a, b in zip(runs["trainfer"], runs["llama.cpp"], strict=True)],
    }


def measure_engine(llm: LLM, runs: int, new_tokens: int, concurrency: tuple[int, ...], bandwidth: float) -> dict:
    rng = random.Random(1)
    vocab = llm.model.cfg.vocab_size

    def prompt(n: int) -> list[int]:
        return random_prompt(n, vocab, rng)

    engine_ttft(llm, prompt(42))  # warm-up
    r: dict[str, Any] = {"ttft_42_ms": round(1000 * median(lambda: engine_ttft(llm, prompt(42)), runs), 1)}
    r["prefill_512_tok_s"] = round(512 / median(lambda: engine_ttft(llm, prompt(512)), runs), 1)
    r["decode_tok_s"] = round(median(lambda: engine_decode(llm, prompt(16), new_tokens), runs), 1)
    for c in concurrency:
        r[f"aggregate_{c}_tok_s"] = round(engine_aggregate(llm, [prompt(16) for _ in range(c)], new_tokens), 1)
    # Prefix cache: a 1,000-token shared prefix, cold then warm (a new question each time).
    prefix = prompt(1000)
    r["prefix_cold_ttft_ms"] = round(1000 * engine_ttft(llm, prefix + prompt(20)), 1)
    r["prefix_warm_ttft_ms"] = round(1000 * median(lambda: engine_ttft(llm, prefix + prompt(20)), runs), 1)
    # Bytes a decode step reads: every weight once (int8 weights are buffers; a tied head counts once).
    weight_bytes = sum({t.data_ptr(): t.numel() * t.element_size() for t in llm.model.state_dict().values()}.values())
    r["roofline_tok_s"] = round(bandwidth * 1e9 / weight_bytes, 1)
    r["fraction_of_roofline"] = round(r["decode_tok_s"] / r["roofline_tok_s"], 4)
    return r


def measure_transformers(hf, vocab: int, runs: int, new_tokens: int, concurrency: tuple[int, ...]) -> dict:
    rng = random.Random(2)
    prompt16 = random_prompt(16, vocab, rng)
    ttft512 = median(lambda: hf_decode(hf, random_prompt(512, vocab, rng), 2)[0], runs)
    peer = {
        "prefill_512_tok_s": round(512 / ttft512, 1),
        "decode_tok_s": round(median(lambda: hf_decode(hf, prompt16, new_tokens)[1], runs), 1),
    }
    for c in concurrency:
        if c <= 32:  # transformers pads a static batch; beyond 32 it is slow and adds little
            peer[f"aggregate_{c}_tok_s"] = round(hf_decode(hf, prompt16, new_tokens, batch=c)[1], 1)
    return peer


# The llama.cpp file each trainfer weight format is measured against (same weights, same bits; auto: SmolLM2's own
# Q4_1 file, which both run as it is).
PEERS = {"float32": ("F32",), "bfloat16": ("F16",), "int8": ("Q8_0",), "int4": ("Q4_0", "Q4_1"), "auto": ("Q4_1",)}


def transformers_model(model: str):
    from transformers import AutoModelForCausalLM

    p = resolve(model)
    kw = {"gguf_file": p.name} if p.is_file() else {}
    return AutoModelForCausalLM.from_pretrained(p.parent if kw else p, dtype=torch.float32, **kw)


def vs_transformers(hf_model, dtype: str, llm: LLM, r: dict, runs: int, new_tokens: int, concurrency) -> tuple:
    """transformers on the same model and (float) dtype: its figures into `r`, and the report's row."""
    hf = hf_model.eval().to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)  # int8: vs fp32
    peer = measure_transformers(hf, llm.model.cfg.vocab_size, runs, new_tokens, concurrency)
    r["transformers"] = peer
    r["decode_vs_transformers"] = round(r["decode_tok_s"] / peer["decode_tok_s"], 2)
    return (f"transformers {dtype}", f"prefill 512: {peer['prefill_512_tok_s']} tok/s, decode "
            f"{peer['decode_tok_s']} tok/s -> trainfer decode is {r['decode_vs_transformers']}x")  # fmt: skip


def vs_llama_bench(result: dict, dtypes, binary: Path, ggufs: dict[str, Path], threads: int, bandwidth: float) -> list:
    """llama-bench on each GGUF (its figures and roofline share into `result`), then each trainfer dtype's ratio
    to its peer formats; the report's rows."""
    rows = []
    lc = {name: llama_bench(binary, path, threads) for name, path in ggufs.items()}
    result["llama.cpp"] = lc
    for name, v in lc.items():
        v["roofline_tok_s"] = round(bandwidth * 1e9 / ggufs[name].stat().st_size, 1)  # the file ~ weights
        v["fraction_of_roofline"] = round(v["decode_tok_s"] / v["roofline_tok_s"], 4)
        rows.append((f"llama.cpp {name}", f"prefill 512: {v['prefill_512_tok_s']} tok/s, decode {v['decode_tok_s']} "
                     f"tok/s ({100 * v['fraction_of_roofline']:.0f}% of roofline)"))  # fmt: skip
    for dtype in dtypes:
        for name in PEERS.get(dtype, ()):
            if name in lc and dtype in result:
                r, v = result[dtype], lc[name]
                ratio = {k: round(r[k] / v[k], 2) for k in ("decode_tok_s", "prefill_512_tok_s")}
                r[f"vs_llama_cpp_{name}"] = ratio
                line = f"decode {ratio['decode_tok_s']}x, prefill 512 {ratio['prefill_512_tok_s']}x"
                rows.append((f"trainfer {dtype} / llama.cpp {name}", line))
    return rows


def bench_decode(
    model: str = "smollm2-135m-instruct",
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    runs: int = 3,
    new_tokens: int = 128,
    concurrency: tuple[int, ...] = (8, 32, 64),
    peers: bool = True,
    llama_bench_binary: Path | None = None,
    llama_ggufs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    threads = torch.get_num_threads()
    bandwidth = memory_bandwidth_gbs()
    env = environment(threads)
    result: dict[str, Any] = {
        "machine": env,
        "model": model,
        "memory_bandwidth_gbs": round(bandwidth, 1),
        "new_tokens": new_tokens,
    }
    rows = [("machine", f"{describe(env)}; {bandwidth:.1f} GB/s read")]
    hf_model = None
    for dtype in dtypes:
        llm = LLM.load(model, dtype=dtype, max_num_seqs=max(concurrency, default=1), max_num_batched_tokens=1024)
        r = measure_engine(llm, runs, new_tokens, concurrency, bandwidth)
        agg = ", ".join(f"{c}: {r[f'aggregate_{c}_tok_s']}" for c in concurrency)
        rows += [
            (f"trainfer {dtype}", f"prefill 512: {r['prefill_512_tok_s']} tok/s, TTFT(42) {r['ttft_42_ms']} ms"),
            ("", f"decode 1 stream: {r['decode_tok_s']} tok/s ({100 * r['fraction_of_roofline']:.0f}% of roofline)"),
            ("", f"aggregate tok/s at concurrency {agg}"),
            ("", f"TTFT, 1,000-token prefix: cold {r['prefix_cold_ttft_ms']} ms, warm {r['prefix_warm_ttft_ms']} ms"),
        ]
        if peers:
            if hf_model is None:
                hf_model = transformers_model(model)
            rows.append(vs_transformers(hf_model, dtype, llm, r, runs, new_tokens, concurrency))
        for name in PEERS.get(dtype, ()) if llama_bench_binary and llama_ggufs else ():
            if name in llama_ggufs:
                pair = paired_decode(llm, llama_bench_binary, llama_ggufs[name], threads, new_tokens, max(runs, 5))
                r[f"paired_vs_llama_cpp_{name}"] = pair
                rows.append((f"alternated with llama.cpp {name}",
                             f"decode {pair['decode_tok_s']} vs {pair['llama_cpp_decode_tok_s']} tok/s, per-round "
                             f"ratio median {pair['ratio_median']}x ({pair['ratio_min']}-{pair['ratio_max']}, "
                             f"{pair['rounds']} rounds)"))  # fmt: skip
        result[dtype] = r
    if llama_bench_binary and llama_ggufs:
        rows += vs_llama_bench(result, dtypes, llama_bench_binary, llama_ggufs, threads, bandwidth)
    width = max(len(k) for k, _ in rows)
    print(f"\n== trainfer bench decode: {model} ==")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))
    return result
