"""Real sizes: 1.7B- and 8B-shaped GGUF files (random weights, SmolLM2's tokenizer) run by trainfer (dtype auto: the
file's own blocks, memory-mapped) and by llama.cpp, alternated in rounds: peak RSS, launch to first token, decode
at one stream and prefill (llama-bench), and decode at 16 streams (llama-batched-bench).

    .venv/bin/python benchmarks/sizes.py [--shape 1.7b|8b ...] [--rounds 3] [--gen 64] [--prompt 256]
    .venv/bin/python benchmarks/sizes.py --quality      # perplexity of K-quant files of SmolLM2's real weights

The files are written once under $TRAINFER_HOME/peers/sizes/ with gguf's writer (Q8_0 blocks of random bytes: speed
and memory do not depend on the values) and llama.cpp's llama-quantize (Q4_K_M). Each run of either side is its own
process, so its peak RSS is its own (os.wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import gguf
import httpx
import numpy as np
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402
from serve import free_port, wait_healthy  # noqa: E402

from trainfer import registry  # noqa: E402
from trainfer.bench import parse_batched_bench, parse_llama_bench  # noqa: E402
from trainfer.rounds import alternate, describe, environment, ratio  # noqa: E402

SHAPES = {  # (dim, layers, heads, kv heads, MLP width, tied)
    "1.7b": (2048, 24, 32, 32, 8192, True),  # SmolLM2-1.7B
    "8b": (4096, 32, 32, 8, 14336, False),  # Llama-3.1-8B
}
GIB = 1 << 30


def write_q8_0(path: Path, shape: str) -> None:
    """A Llama-architecture GGUF of this shape in Q8_0 (norms F32), tokenizer and chat template from SmolLM2's file."""
    dim, layers, heads, kv, hidden, tied = SHAPES[shape]
    src = gguf.GGUFReader(registry.pull("smollm2-135m-instruct"))
    w = gguf.GGUFWriter(str(path), "llama")
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, value, vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(key, value, vtype)
    vocab = len(src.fields["tokenizer.ggml.tokens"].contents())
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    hd = dim // heads
    tensors = [("token_embd.weight", (vocab, dim)), ("output_norm.weight", (dim,))]
    if not tied:
        tensors.append(("output.weight", (vocab, dim)))
    for i in range(layers):
        tensors += [(f"blk.{i}.attn_norm.weight", (dim,)), (f"blk.{i}.ffn_norm.weight", (dim,)),
                    (f"blk.{i}.attn_q.weight", (heads * hd, dim)), (f"blk.{i}.attn_k.weight", (kv * hd, dim)),
                    (f"blk.{i}.attn_v.weight", (kv * hd, dim)), (f"blk.{i}.attn_output.weight", (dim, heads * hd)),
                    (f"blk.{i}.ffn_gate.weight", (hidden, dim)), (f"blk.{i}.ffn_up.weight", (hidden, dim)),
                    (f"blk.{i}.ffn_down.weight", (dim, hidden))]  # fmt: skip
    rng = np.random.default_rng(0)
    pool = rng.integers(-127, 128, 1 << 24, dtype=np.int8).view(np.uint8)  # 16 MB of random quants, reused
    d = np.array([0.02 / 127], dtype=np.float16).view(np.uint8).tobytes()

    def data(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float32)
        rows, cols = shape
        blocks = rows * cols // 32
        out = np.empty((blocks, 34), dtype=np.uint8)
        out[:, :2] = np.frombuffer(d, dtype=np.uint8)
        start = rng.integers(0, pool.size - 32)
        out[:, 2:] = np.resize(np.roll(pool, -int(start)), blocks * 32).reshape(blocks, 32)
        return out.reshape(rows, cols // 32 * 34)

    for name, shape in tensors:
        raw_type = Q.F32 if len(shape) == 1 else Q.Q8_0
        nbytes = 4 * shape[0] if len(shape) == 1 else shape[0] * shape[1] // 32 * 34
        w.add_tensor_info(name, tuple(reversed(shape)) if raw_type == Q.F32 else (shape[0], shape[1] // 32 * 34),
                          np.float32 if raw_type == Q.F32 else np.uint8, nbytes, raw_dtype=raw_type)  # fmt: skip
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in tensors:
        w.write_tensor_data(data(name, shape))
    w.close()


def make_files(bin_dir: Path, out: Path, shape: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    q8 = out / f"{shape}.Q8_0.gguf"
    if not q8.exists():
        tmp = q8.with_suffix(".tmp")
        write_q8_0(tmp, shape)
        tmp.rename(q8)
    files = {"Q8_0": q8}
    q4 = out / f"{shape}.Q4_K_M.gguf"
    if not q4.exists():
        cmd = [
            str(bin_dir / "llama-quantize"),
            "--allow-requantize",
            str(q8),
            str(q4.with_suffix(".tmp")),
            "Q4_K_M",
            "2",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        q4.with_suffix(".tmp").rename(q4)
    files["Q4_K_M"] = q4
    return files


TRAINFER_RUN = r"""
import json, sys, time
t0 = float(sys.argv[1])
import torch
from trainfer import LLM
path, prompt, gen = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = LLM.load(path, kv_cache_gb=0.25)
first = llm.complete([[1, 2, 3, 4]], temperature=0, max_tokens=1, ignore_eos=True)[0]
launch = time.time() - t0
ids = [(7 * i + 3) % 40000 + 100 for i in range(prompt)]
t = time.perf_counter()
llm.complete([ids], temperature=0, max_tokens=1, ignore_eos=True)
prefill = prompt / (time.perf_counter() - t)
out = llm.complete([[5, 6, 7, 8]], temperature=0, max_tokens=gen, ignore_eos=True)[0]
print(json.dumps({"launch_s": launch, "prefill_tok_s": prefill, "decode_tok_s": out.decode_tokens_per_s,
                  "weights": llm.weights}))
"""


TRAINFER_STREAMS = r"""
import json, sys, time
from trainfer import LLM
from trainfer.infer.sampling import SamplingParams
path, streams, prompt, gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = LLM.load(path, kv_cache_gb=1.5)  # room for 16 x (128 + 33) tokens of the 1.7B and 8B shapes
engine = llm.engine
engine.run([[1, 2, 3]], [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)])  # warm
params = SamplingParams(max_tokens=gen + 1, temperature=0, ignore_eos=True)
for s in range(streams):  # distinct prompts: nothing shared through the prefix cache
    engine.add_request(f"s{s}", [(7 * i + 13 * s + 3) % 40000 + 100 for i in range(prompt)], params)
start, started, after, running = time.perf_counter(), set(), 0, None
while engine.requests:
    events = engine.step()
    if running is not None:
        after += len(events)
    started |= {e.request_id for e in events}
    if running is None and len(started) == streams:
        running = time.perf_counter()  # every stream has its first token: from here on, batched decode alone
end = time.perf_counter()
print(json.dumps({"prefill_tok_s": streams * prompt / (running - start), "decode_tok_s": after / (end - running),
                  "total_s": end - start}))
"""


def streams_trainfer(path: Path, streams: int, prompt: int, gen: int) -> dict:
    """`streams` prompts of `prompt` tokens, `gen` new tokens each, decoded together by trainfer's engine: tokens
    emitted once every stream has its first, over that time (what llama-batched-bench's S_TG measures)."""
    out, _, _ = peak_rss([sys.executable, "-c", TRAINFER_STREAMS, str(path), str(streams), str(prompt), str(gen)])
    return json.loads(out.strip().splitlines()[-1])


def streams_llama(bin_dir: Path, path: Path, streams: int, prompt: int, gen: int) -> dict:
    """The same by llama-batched-bench (S_TG: tokens after the prefill of all prompts, over that time)."""
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(path), "-t", "2", "-c", str(streams * (prompt + gen)),
           "-npp", str(prompt), "-ntg", str(gen), "-npl", str(streams), "--output-format", "jsonl"]  # fmt: skip
    out, _, _ = peak_rss(cmd)
    return parse_batched_bench(out)


def peak_rss(cmd: list[str]) -> tuple[str, float, int]:
    """stdout, wall seconds and peak RSS (bytes) of a child process (its own rusage)."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"{cmd[0]} failed ({status}): {err.decode()[-2000:]}")
    return out.decode(), time.time() - start, usage.ru_maxrss * 1024


def round_trainfer(path: Path, prompt: int, gen: int) -> dict:
    cmd = [sys.executable, "-c", TRAINFER_RUN, repr(time.time()), str(path), str(prompt), str(gen)]
    out, wall, rss = peak_rss(cmd)
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_gib": rss / GIB}


def round_llama(bin_dir: Path, path: Path, prompt: int, gen: int) -> dict:
    """llama-bench: prefill `prompt` and decode `gen` once each (its own process: peak RSS and load time included
    in the wall; launch to first token is timed as a 1-token generation run)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(path), "-t", "2", "-p", str(prompt), "-n", str(gen), "-r", "1"]
    out, _, rss = peak_rss([*cmd, "-o", "json"])
    rows = parse_llama_bench(out)
    first = [str(bin_dir / "llama-bench"), "-m", str(path), "-t", "2", "-p", "0", "-n", "1", "-r", "1", "-o", "json"]
    _, launch, _ = peak_rss(first)
    return {
        "launch_s": launch,
        "prefill_tok_s": next(r["avg_ts"] for r in rows if r["n_prompt"]),
        "decode_tok_s": next(r["avg_ts"] for r in rows if r["n_gen"]),
        "peak_rss_gib": rss / GIB,
    }


def chunk_scores(model, tokens: list[int], n_ctx: int, bos: int | None) -> tuple[list[float], list[int]]:
    """llama-perplexity's scoring, reproduced: the tokens in chunks of n_ctx (the first token of each replaced by BOS
    when the vocabulary adds one), each chunk scored on its second half only (the logits at first .. n_ctx - 2 for
    first = n_ctx / 2). The negative log-likelihoods and the argmax at every scored position."""
    import torch
    import torch.nn.functional as F

    first, nll, top1 = n_ctx // 2, [], []
    for i in range(len(tokens) // n_ctx):
        chunk = torch.tensor(tokens[i * n_ctx : (i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        with torch.inference_mode():
            logits = model(chunk[None])[0, first : n_ctx - 1].float()
        nll += F.cross_entropy(logits, chunk[first + 1 :], reduction="none").tolist()
        top1 += logits.argmax(-1).tolist()
    return nll, top1


QUALITY_RUN = r"""
import json, math, sys
sys.path.insert(0, sys.argv[2])
from sizes import chunk_scores
from trainfer import LLM
path, job = sys.argv[1], json.loads(open(sys.argv[3]).read())
out = {}
for dtype in ("auto", "float32"):  # the file's blocks as they are; the same file dequantized, fp32 throughout
    llm = LLM.load(path, dtype=dtype, kv_cache_gb=0.1)
    nll, top1 = chunk_scores(llm.model, job["tokens"], job["n_ctx"], job["bos"])
    out[dtype] = {"ppl": math.exp(sum(nll) / len(nll)), "top1": top1, "weights": llm.weights}
print(json.dumps(out))
"""


def agreement(a: list[int], b: list[int]) -> float:
    assert len(a) == len(b)
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def llama_server_top1(bin_dir: Path, path: Path, text: str, n_ctx: int, chunks: int) -> dict:
    """llama.cpp's own tokens of the text (as llama-perplexity tokenizes it) and llama-server's greedy next token
    (its n_probs top-1) at every position llama-perplexity scores: one request per position, each prompt the
    previous one plus a token (cache_prompt: one new token evaluated per request)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(bin_dir / "llama-server"), "-m", str(path), "-c", str(2 * n_ctx), "--parallel", "1", "-t", "2",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        with httpx.Client(base_url=url, timeout=300) as http:
            tokens = http.post("/tokenize", json={"content": text, "add_special": True}).raise_for_status().json()
            tokens = tokens["tokens"]
            plain = http.post("/tokenize", json={"content": text, "add_special": False}).raise_for_status().json()
            bos = tokens[0] if len(tokens) == len(plain["tokens"]) + 1 else None
            top1 = []
            for i in range(min(chunks, len(tokens) // n_ctx)):
                chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
                if bos is not None:
                    chunk[0] = bos
                for j in range(n_ctx // 2, n_ctx - 1):
                    body = {"prompt": chunk[: j + 1], "n_predict": 1, "temperature": 0, "samplers": ["temperature"],
                            "n_probs": 1, "cache_prompt": True, "return_tokens": True}  # fmt: skip
                    top1.append(http.post("/completion", json=body).raise_for_status().json()["tokens"][0])
        return {"tokens": tokens, "bos": bos, "top1": top1}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def llama_perplexity(bin_dir: Path, path: Path, text_file: Path, n_ctx: int, chunks: int) -> float:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(path), "-f", str(text_file), "-c", str(n_ctx), "-t", "2"]
    cmd += ["--chunks", str(chunks)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = next(x for x in (out.stdout + out.stderr).splitlines() if "Final estimate: PPL" in x)
    return float(line.split("=")[1].split("+/-")[0])


def quality(bin_dir: Path, peers: Path, chunks: int, n_ctx: int = 512) -> list[dict]:
    """SmolLM2-135M-Instruct's real weights (the F32 GGUF of its Q4_1 file) quantized by llama-quantize to Q4_K_M,
    Q5_K_M and Q6_K. On held-out Shakespeare, scored as llama-perplexity scores (chunks of n_ctx, second halves):
    trainfer running each file in its own blocks, the same file dequantized and computed in fp32, llama-perplexity
    on the file, and top-1 agreement with fp32 and with llama-server; trainfer with bf16 products for the prompt
    (the default) and without (TRAINFER_BF16=0)."""
    from trainfer.compress.quality import held_out_ids
    from trainfer.io.gguf import open_gguf, read_metadata
    from trainfer.io.tokenizer import Tokenizer

    f32 = llama_cpp.quantized_copies(bin_dir, peers)["F32"]
    tok = Tokenizer.from_gguf_metadata(read_metadata(open_gguf(f32)))
    text = tok.decode(held_out_ids(tok, "shakespeare", chunks * n_ctx + 64))
    text_file = peers / "sizes" / "held_out.txt"
    text_file.parent.mkdir(parents=True, exist_ok=True)
    text_file.write_text(text)
    rows = []
    for kind in ("Q4_K_M", "Q5_K_M", "Q6_K"):
        path = peers / f"smollm2-135m-instruct.{kind}.gguf"
        if not path.exists():
            cmd = [str(bin_dir / "llama-quantize"), str(f32), str(path), kind]
            subprocess.run(cmd, check=True, capture_output=True)
        theirs = llama_server_top1(bin_dir, path, text, n_ctx, chunks)
        job = peers / "sizes" / "quality_job.json"
        job.write_text(json.dumps({"tokens": theirs["tokens"][: chunks * n_ctx], "n_ctx": n_ctx, "bos": theirs["bos"]}))
        ppl_llama = llama_perplexity(bin_dir, path, text_file, n_ctx, chunks)
        for bf16 in ("1", "0"):
            env = {**os.environ, "TRAINFER_BF16": bf16}
            cmd = [sys.executable, "-c", QUALITY_RUN, str(path), str(Path(__file__).parent), str(job)]
            out = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
            auto, fp32 = out["auto"], out["float32"]
            row = {"kind": kind, "bf16_products": bf16 == "1", "weights": auto["weights"], "ppl": auto["ppl"],
                   "ppl_fp32": fp32["ppl"], "ppl_llama_perplexity": ppl_llama, "positions": len(auto["top1"]),
                   "top1_agree_fp32": agreement(auto["top1"], fp32["top1"]),
                   "top1_agree_llama_server": agreement(auto["top1"], theirs["top1"]),
                   "fp32_top1_agree_llama_server": agreement(fp32["top1"], theirs["top1"])}  # fmt: skip
            row["ppl_change"] = row["ppl"] / row["ppl_fp32"] - 1
            row["ppl_vs_llama"] = row["ppl"] / ppl_llama - 1
            rows.append(row)
            print(
                f"{kind:7s} bf16 {bf16}: trainfer ppl {row['ppl']:.4f}, same file in fp32 {row['ppl_fp32']:.4f} "
                f"({100 * row['ppl_change']:+.3f}%), llama-perplexity {ppl_llama:.4f} "
                f"({100 * row['ppl_vs_llama']:+.3f}%); top-1 agreement over {row['positions']} positions: "
                f"fp32 {100 * row['top1_agree_fp32']:.2f}%, "
                f"llama-server {100 * row['top1_agree_llama_server']:.2f}% "
                f"(fp32 vs llama-server {100 * row['fp32_top1_agree_llama_server']:.2f}%); weights {row['weights']}"
            )
    return rows


def side_trainfer(path: Path, args: argparse.Namespace) -> dict:
    """One round of trainfer: one stream, prefill, launch, peak RSS (one process), then the streams (another)."""
    row = round_trainfer(path, args.prompt, args.gen)
    if args.streams:
        row |= {f"streams_{k}": v for k, v in streams_trainfer(path, *streams_shape(args)).items()}
    return row


def side_llama(bin_dir: Path, path: Path, args: argparse.Namespace) -> dict:
    row = round_llama(bin_dir, path, args.prompt, args.gen)
    if args.streams:
        extra = streams_llama(bin_dir, path, *streams_shape(args))
        row |= {f"streams_{k}": v for k, v in extra.items() if k != "streams"}
    return row


def streams_shape(args: argparse.Namespace) -> tuple[int, int, int]:
    return args.streams, args.streams_prompt, args.streams_gen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", choices=list(SHAPES))
    ap.add_argument("--kind", action="append", choices=["Q8_0", "Q4_K_M"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--streams", type=int, default=16, help="batched decode: streams (0: skip)")
    ap.add_argument("--streams-prompt", type=int, default=128)
    ap.add_argument("--streams-gen", type=int, default=32)
    ap.add_argument("--quality", action="store_true", help="only the perplexity check on SmolLM2's real weights")
    ap.add_argument("--chunks", type=int, default=8, help="--quality: chunks of 512 tokens (255 scored in each)")
    args = ap.parse_args()
    peers = registry.home() / "peers"
    bin_dir = llama_cpp.build(peers / "llama.cpp")
    if args.quality:
        print(json.dumps(quality(bin_dir, peers, args.chunks)))
        return
    print(describe(environment(2)))
    results = []
    for shape in args.shape or ["1.7b"]:
        files = make_files(bin_dir, peers / "sizes", shape)
        for kind in args.kind or list(files):
            path = files[kind]
            sides = {"trainfer": partial(side_trainfer, path, args)}
            runs = alternate(args.rounds, sides | {"llama.cpp": partial(side_llama, bin_dir, path, args)}, log=print)
            ours, theirs = runs["trainfer"], runs["llama.cpp"]
            row = {"shape": shape, "kind": kind, "file_gib": path.stat().st_size / GIB, "rounds": args.rounds}
            keys = ["decode_tok_s", "prefill_tok_s", "launch_s", "peak_rss_gib"]
            keys += ["streams_decode_tok_s", "streams_prefill_tok_s", "streams_total_s"] if args.streams else []
            for key in keys:  # trainfer / llama.cpp as measured: above 1 is better for speeds, worse for s and GiB
                row[key] = round(statistics.median(a[key] for a in ours), 2)
                row[f"llama_cpp_{key}"] = round(statistics.median(b[key] for b in theirs), 2)
                row[f"{key}_ratio"] = ratio([a[key] for a in ours], [b[key] for b in theirs]).as_list()
            row["weights"] = ours[0]["weights"]
            results.append(row)
            print(f"{shape} {kind} ({row['file_gib']:.2f} GiB, trainfer runs it as {row['weights']}):")
            for key in keys:
                med, lo, hi = row[f"{key}_ratio"]
                print(f"  {key:22s} trainfer {row[key]:8.2f}  llama.cpp {row['llama_cpp_' + key]:8.2f}  "
                      f"ratio {med:.2f} ({lo:.2f}-{hi:.2f})")  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
