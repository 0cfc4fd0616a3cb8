"""llama.cpp runs trainfer's GGUF exports: SmolLM2 written as F32 / F16 / Q8_0 / Q4_0 by io/gguf_writer.py, decoded
greedily by llama-server next to trainfer's greedy on the same prompts; prints tokens equal and first divergence.

    .venv/bin/python benchmarks/export_gguf.py [--tokens 32] [--types F32,F16,Q8_0,Q4_0] [--keep DIR]
    .venv/bin/python benchmarks/export_gguf.py --model runs/faq --types F32     # a fine-tuned or pruned model

Two references per file: trainfer on the original model in fp32 (what an export must reproduce), and trainfer
on the exported file itself (the same rounded weights, so what is left is llama.cpp's arithmetic). llama.cpp is
built once from the llama-cpp-python sdist (benchmarks/llama_cpp.py, ~5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import llama_cpp  # noqa: E402
from serve import free_port, wait_healthy  # noqa: E402

from trainfer import LLM, registry  # noqa: E402
from trainfer.io.gguf import load_gguf  # noqa: E402
from trainfer.io.gguf_writer import export_gguf  # noqa: E402
from trainfer.io.loader import build_model  # noqa: E402
from trainfer.rounds import describe, environment  # noqa: E402

MODEL = "smollm2-135m-instruct"
RAW_PROMPTS = [
    "The capital of France is",
    "The three most important inventions of the industrial revolution were",
    "def fibonacci(n):\n",
]
CHAT_QUESTIONS = ["What is the capital of France?", "Give me three tips for learning to program."]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two generations differ (one stopping earlier counts), None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def equal_prefix(a: list[int], b: list[int]) -> int:
    """Tokens generated identically before the first difference."""
    d = first_divergence(a, b)
    return len(a) if d is None else d


def prompts(llm: LLM) -> tuple[list[str], list[str]]:
    """The prompt texts (chat questions rendered with the model's template, if it has one) and their labels."""
    questions = CHAT_QUESTIONS if llm.tokenizer.chat_template else []
    chats = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    labels = [p.replace("\n", "\\n") for p in RAW_PROMPTS] + [f"chat: {q}" for q in questions]
    return RAW_PROMPTS + chats, labels


def trainfer_greedy(llm: LLM, texts: list[str], n: int) -> list[list[int]]:
    return [llm.generate(t, max_tokens=n, temperature=0).token_ids for t in texts]


def llama_cpp_greedy(bin_dir: Path, gguf: Path, texts: list[str], n: int) -> tuple[list[list[int]], list[list[int]]]:
    """llama-server's own tokenization of each prompt and its greedy tokens (temperature 0: argmax only)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "-c", "1024", "--parallel", "1",
           "-t", str(torch.get_num_threads()), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc)
        tokenized, generated = [], []
        for text in texts:
            r = httpx.post(url + "/tokenize", json={"content": text, "add_special": False, "parse_special": True})
            tokenized.append(r.raise_for_status().json()["tokens"])
            body = {"prompt": text, "n_predict": n, "temperature": 0, "samplers": ["temperature"],
                    "cache_prompt": False, "return_tokens": True}  # fmt: skip
            done = httpx.post(url + "/completion", json=body, timeout=300).raise_for_status().json()
            # llama.cpp returns the end-of-generation token it stopped on; trainfer's token_ids leave it out.
            generated.append(done["tokens"][:-1] if done.get("stop_type") == "eos" else done["tokens"])
        return tokenized, generated
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--types", default="F32,F16,Q8_0,Q4_0")
    ap.add_argument("--model", default=MODEL, help="any model trainfer loads (default SmolLM2-135M-Instruct)")
    ap.add_argument("--keep", type=Path, help="write the GGUF files here and keep them (default: a temporary folder)")
    args = ap.parse_args()
    peers = registry.home() / "peers"
    peers.mkdir(parents=True, exist_ok=True)
    bin_dir = llama_cpp.build(peers / "llama.cpp")
    llm = LLM.load(args.model)
    texts, labels = prompts(llm)
    reference = trainfer_greedy(llm, texts, args.tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        for kind in args.types.split(","):
            path = folder / f"{Path(args.model).name}.{kind}.gguf"
            path.unlink(missing_ok=True)
            t0 = time.perf_counter()
            export_gguf(args.model, path, kind)
            export_s = time.perf_counter() - t0
            cfg, state, tok = load_gguf(path)
            same_file = trainfer_greedy(LLM(build_model(cfg, state), tok), texts, args.tokens)
            tokenized, theirs = llama_cpp_greedy(bin_dir, path, texts, args.tokens)
            size_mb = round(path.stat().st_size / 1e6)
            for i, text in enumerate(texts):
                rows.append({
                    "type": kind, "prompt": i, "size_mb": size_mb, "export_s": round(export_s, 1),
                    "same_prompt_tokens": tokenized[i] == llm.tokenizer.encode(text),
                    "tokens": len(theirs[i]),
                    "equal_vs_fp32": equal_prefix(theirs[i], reference[i]),
                    "first_divergence_vs_fp32": first_divergence(theirs[i], reference[i]),
                    "equal_vs_same_file": equal_prefix(theirs[i], same_file[i]),
                    "first_divergence_vs_same_file": first_divergence(theirs[i], same_file[i]),
                })  # fmt: skip
    print_table(rows, labels, args.tokens, args.model)
    print(json.dumps({"model": args.model, "environment": environment(), "rows": rows}))
    return 0


def print_table(rows: list[dict], labels: list[str], n: int, model: str) -> None:
    print(f"\nllama.cpp (llama-server, {llama_cpp.SDIST}) greedy on trainfer's GGUF exports of {model}, "
          f"{n} tokens; {describe(environment())}")  # fmt: skip
    print("equal = llama.cpp's tokens identical to trainfer's before the first divergence (- = none), out of those")
    print("llama.cpp generated; against trainfer fp32 on the original model, and against trainfer on the exported")
    print("file itself (its rounded weights, dequantized to fp32)\n")
    print(f"{'type':5} {'MB':>4} {'prompt':42} {'same prompt ids':>15} {'equal vs fp32':>14} {'diverge':>7} "
          f"{'equal vs file':>13} {'diverge':>7}")  # fmt: skip
    for r in rows:
        label = labels[r["prompt"]]
        label = label if len(label) <= 42 else label[:39] + "..."
        d1, d2 = r["first_divergence_vs_fp32"], r["first_divergence_vs_same_file"]
        print(f"{r['type']:5} {r['size_mb']:>4} {label:42} {str(r['same_prompt_tokens']):>15} "
              f"{r['equal_vs_fp32']:>8}/{r['tokens']:<5} {'-' if d1 is None else d1:>7} "
              f"{r['equal_vs_same_file']:>7}/{r['tokens']:<5} {'-' if d2 is None else d2:>7}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
