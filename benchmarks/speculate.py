"""Speculative decoding (`--draft ngram` or a draft model) against plain decoding, same engine, same run.

    .venv/bin/python benchmarks/speculate.py [--draft ngram|MODEL] [--dtype int8] [--rounds 5] [--num-draft-tokens K]

SmolLM2-135M-Instruct, one stream, greedy, on three workloads: **edit** (rewrite a 300-token Python file,
benchmarks/data/edit_task.py.txt, with one function renamed: the answer copies most of its input), **chat** (four
open questions) and **code** (three HumanEval functions to complete, problems 150-152). A draft model made from
benchmarks/data/draft_prompts.jsonl (docs/engine.md's recipe) never saw these: its prompts are other questions
and HumanEval 0-119. Per round each side decodes every prompt once, the side that starts alternating; the figure
is the decode rate (first token to last: prefill is the same work on both sides; the draft's own catch-up on the
prompt counts, as it falls after the first token), the median of per-round ratios with the min-max. The tokens must
be identical (greedy speculation changes speed, never the text); a difference fails the run. Also printed: the
share of guesses kept at each position (1st guess of a check, 2nd, ...). One line per workload, then JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from trainfer import LLM
from trainfer.data.sources import human_eval_file
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
    "code": ([], 200),  # filled in main(): HumanEval 150-152
}
CODE_PROBLEMS = range(150, 153)


def code_prompts() -> list[str]:
    """HumanEval problems as chat requests, worded as the draft's training prompts are (other problems)."""
    with gzip.open(human_eval_file(), "rt") as f:
        rows = [json.loads(line) for line in f]
    return [f"Complete this Python function.\n\n```python\n{rows[i]['prompt']}```" for i in CODE_PROBLEMS]


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
    ap.add_argument("--draft", default="ngram", help="ngram, or a draft model (alias, .gguf or directory)")
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS), help="default: all")
    args = ap.parse_args()
    env = environment()
    print(describe(env), flush=True)
    WORKLOADS["code"] = (code_prompts(), WORKLOADS["code"][1])
    spec_args = {"draft": args.draft} | ({"num_draft_tokens": args.num_draft_tokens} if args.num_draft_tokens else {})
    llm = LLM.load(MODEL, dtype=args.dtype, kv_cache_gb=0.25, kv_dtype="fp16", **spec_args)
    engines = {  # both sides on the CLI's default KV cache (fp16)
        "plain": Engine(llm.model, stop_token_ids=llm.tokenizer.stop_token_ids, kv_cache_gb=0.25, kv_dtype="fp16"),
        "spec": llm.engine,  # LLM.load loaded the draft model, checked against the tokenizer
    }
    result = {"environment": env, "args": vars(args), "workloads": {}}
    for name in args.workload or list(WORKLOADS):
        texts, max_tokens = WORKLOADS[name]
        prompts = [llm.chat_prompt([{"role": "user", "content": t}]) for t in texts]
        spec = engines["spec"]
        before = spec.draft_tokens, spec.accepted_tokens, spec.verify_forwards
        at_before = list(spec.guessed_at), list(spec.kept_at)
        outputs = {}

        def side(label: str, prompts=prompts, max_tokens=max_tokens, outputs=outputs) -> float:
            rate, outputs[label] = decode(engines[label], prompts, max_tokens)
            return rate

        runs = alternate(args.rounds, {"plain": lambda: side("plain"), "spec": lambda: side("spec")})
        if outputs["plain"] != outputs["spec"]:
            raise SystemExit(f"{name}: speculation changed the greedy tokens")
        guessed, kept, forwards = (now - then for now, then in
                                   zip((spec.draft_tokens, spec.accepted_tokens, spec.verify_forwards), before,
                                       strict=True))  # fmt: skip
        guessed_at = [now - then for now, then in zip(spec.guessed_at, at_before[0], strict=True)]
        kept_at = [now - then for now, then in zip(spec.kept_at, at_before[1], strict=True)]
        r = ratio(runs["spec"], runs["plain"])
        row = {
            "spec_tok_s": sorted(runs["spec"]),
            "plain_tok_s": sorted(runs["plain"]),
            "ratio": r.as_list(),
            "acceptance": round(kept / guessed, 3) if guessed else 0.0,
            "tokens_per_checking_forward": round((kept + forwards) / forwards, 2) if forwards else 0.0,
            "kept_at_position": [round(k / g, 3) if g else None for k, g in zip(kept_at, guessed_at, strict=True)],
            "tokens": sum(len(o) for o in outputs["plain"]),
        }
        result["workloads"][name] = row
        at = ", ".join("-" if a is None else f"{a:.0%}" for a in row["kept_at_position"])
        print(f"{name}: speculation {r} plain's decode rate ({sorted(runs['spec'])[args.rounds // 2]:.1f} vs "
              f"{sorted(runs['plain'])[args.rounds // 2]:.1f} tokens/s); {row['acceptance']:.0%} of guesses kept "
              f"(by position: {at}), {row['tokens_per_checking_forward']} tokens per checking forward; "
              f"{row['tokens']} tokens, identical", flush=True)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
