"""Speculative decoding with n-gram guesses (`--draft ngram`) against plain decoding, same engine, same run.

    .venv/bin/python benchmarks/speculate.py [--dtype int8] [--rounds 5] [--num-draft-tokens 3]

SmolLM2-135M-Instruct, one stream, greedy, on two workloads: **edit** (rewrite a 300-token Python file,
benchmarks/data/edit_task.py.txt, with one function renamed: the answer copies most of its input) and **chat**
(four open questions: little to copy, so what speculation costs when it guesses wrong). Per round each side decodes
every prompt once, the side that starts alternating; the figure is the decode rate (first token to last: prefill is
the same work on both sides), the median of per-round ratios with the min-max. The tokens must be identical (greedy
speculation changes speed, never the text); a difference fails the run. Prints one line per workload, then JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainfer import LLM
from trainfer.infer.engine import Engine
from trainfer.infer.sampling import SamplingParams
from trainfer.rounds import alternate, describe, environment, ratio

MODEL = "smollm2-135m-instruct"
CODE = (Path(__file__).parent / "data" / "edit_task.py.txt").read_text()
WORKLOADS = {
    "edit": (
        [
            f"Rename the function `order_total` to `compute_order_total` everywhere in this file. Output the whole "
            f"file, changed, and nothing else.\n\n```python\n{CODE}```"
        ],  # fmt: skip
        400,
    ),
    "chat": (
        [
            "What causes the seasons on Earth?",
            "Give me three tips for writing clear emails.",
            "Explain what a hash table is to a beginner.",
            "Why do cats purr?",
        ],
        128,
    ),
}


def decode(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Tokens per second from each answer's first token to its last, over the prompts; and the tokens."""
    n, seconds, outputs = 0, 0.0, []
    for ids in prompts:
        events = engine.run([ids], SamplingParams(max_tokens=max_tokens, temperature=0))[0][0]
        n += len(events) - 1
        seconds += events[-1].time - events[0].time
        outputs.append([e.token_id for e in events])
    return n / seconds, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="int8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--num-draft-tokens", type=int, default=None, help="default: the engine's")
    args = ap.parse_args()
    env = environment()
    print(describe(env), flush=True)
    llm = LLM.load(MODEL, dtype=args.dtype, kv_cache_gb=0.25)
    spec_args = {"draft": "ngram"} | ({"num_draft_tokens": args.num_draft_tokens} if args.num_draft_tokens else {})
    engines = {
        "plain": Engine(llm.model, stop_token_ids=llm.tokenizer.stop_token_ids, kv_cache_gb=0.25),
        "ngram": Engine(llm.model, stop_token_ids=llm.tokenizer.stop_token_ids, kv_cache_gb=0.25, **spec_args),
    }
    result = {"environment": env, "args": vars(args), "workloads": {}}
    for name, (texts, max_tokens) in WORKLOADS.items():
        prompts = [llm.chat_prompt([{"role": "user", "content": t}]) for t in texts]
        spec = engines["ngram"]
        before = spec.draft_tokens, spec.accepted_tokens, spec.verify_forwards
        outputs = {}

        def side(label: str, prompts=prompts, max_tokens=max_tokens, outputs=outputs) -> float:
            rate, outputs[label] = decode(engines[label], prompts, max_tokens)
            return rate

        runs = alternate(args.rounds, {"plain": lambda: side("plain"), "ngram": lambda: side("ngram")})
        if outputs["plain"] != outputs["ngram"]:
            raise SystemExit(f"{name}: speculation changed the greedy tokens")
        guessed, kept, forwards = (now - then for now, then in
                                   zip((spec.draft_tokens, spec.accepted_tokens, spec.verify_forwards), before,
                                       strict=True))  # fmt: skip
        r = ratio(runs["ngram"], runs["plain"])
        row = {
            "ngram_tok_s": sorted(runs["ngram"]),
            "plain_tok_s": sorted(runs["plain"]),
            "ratio": r.as_list(),
            "acceptance": round(kept / guessed, 3) if guessed else 0.0,
            "tokens_per_checking_forward": round((kept + forwards) / forwards, 2) if forwards else 0.0,
            "tokens": sum(len(o) for o in outputs["plain"]),
        }
        result["workloads"][name] = row
        print(f"{name}: ngram {r} plain's decode rate ({sorted(runs['ngram'])[args.rounds // 2]:.1f} vs "
              f"{sorted(runs['plain'])[args.rounds // 2]:.1f} tokens/s); {row['acceptance']:.0%} of guesses kept, "
              f"{row['tokens_per_checking_forward']} tokens per checking forward; {row['tokens']} tokens, "
              "identical", flush=True)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
