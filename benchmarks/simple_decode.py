"""Load time and single-stream decode speed of trainfer's simple loop next to transformers, same GGUF.

.venv/bin/python benchmarks/simple_decode.py [--runs 3] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_of, memory_bandwidth_gbs, print_card  # noqa: E402

from trainfer import LLM, registry  # noqa: E402

PROMPT = "The history of the printing press begins in"


def trainfer_decode_rate(llm: LLM, ids: list[int], n: int) -> float:
    """Tokens/s after the first token: (n - 1) / (time of token n - time of token 1)."""
    times = [time.perf_counter() for _ in llm.stream(ids, max_tokens=n, temperature=0, ignore_eos=True)]
    return (n - 1) / (times[-1] - times[0])


def hf_decode_rate(model, ids: list[int], n: int) -> float:
    """Same definition for transformers: time of n tokens minus time of 1 token (its prefill)."""
    x = torch.tensor([ids])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def timed(k: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(x, max_new_tokens=k, min_new_tokens=k, **kw)
        return time.perf_counter() - t

    return (n - 1) / (timed(n) - timed(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    gguf = registry.pull("smollm2-135m-instruct", quiet=True)
    bandwidth = memory_bandwidth_gbs()
    result: dict = {"machine": machine(), "memory_bandwidth_gbs": round(bandwidth, 1), "new_tokens": args.new_tokens}

    # Load times: trainfer cold (GGUF read + dequantize + cache write) and warm (cached safetensors);
    # transformers reading the same GGUF (it dequantizes every time).
    real_home = os.environ.get("TRAINFER_HOME")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRAINFER_HOME"] = tmp
        t = time.perf_counter()
        LLM.load(gguf)
        result["trainfer_load_cold_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        LLM.load(gguf)
        result["trainfer_load_warm_s"] = round(time.perf_counter() - t, 2)
    if real_home is None:
        os.environ.pop("TRAINFER_HOME")
    t = time.perf_counter()
    hf32 = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    result["transformers_load_s"] = round(time.perf_counter() - t, 2)

    rows = [
        ("machine", f"{result['machine']['cpu']}, {result['machine']['threads']} threads"),
        ("memory read bandwidth", f"{bandwidth:.1f} GB/s"),
        ("load: trainfer cold / warm", f"{result['trainfer_load_cold_s']} s / {result['trainfer_load_warm_s']} s"),
        ("load: transformers", f"{result['transformers_load_s']} s"),
    ]
    for dtype in ("float32", "bfloat16"):
        llm = LLM.load(gguf, dtype=dtype)
        ids = llm.tokenizer.encode(PROMPT)
        hf = hf32 if dtype == "float32" else hf32.to(torch.bfloat16)
        ours = median_of(lambda llm=llm, ids=ids: trainfer_decode_rate(llm, ids, args.new_tokens), args.runs)
        peer = median_of(lambda hf=hf, ids=ids: hf_decode_rate(hf, ids, args.new_tokens), args.runs)
        weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
        roofline = bandwidth * 1e9 / weight_bytes
        result[dtype] = {
            "trainfer_tok_s": round(ours, 1),
            "transformers_tok_s": round(peer, 1),
            "ratio": round(ours / peer, 2),
            "roofline_tok_s": round(roofline, 1),
            "fraction_of_roofline": round(ours / roofline, 3),
        }
        rows.append(
            (
                f"decode {dtype} (batch 1)",
                f"trainfer {ours:.1f} tok/s, transformers {peer:.1f} tok/s, ratio {ours / peer:.2f}x, "
                f"roofline {roofline:.0f} tok/s ({100 * ours / roofline:.0f}% reached)",
            )
        )
    print_card("simple decode loop: trainfer vs transformers (SmolLM2-135M, same GGUF)", rows, result)


if __name__ == "__main__":
    main()
