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
Then `--streams` (16) requests at once, the four chat questions and HumanEval 150-161, 128 tokens each, with and
without speculation in alternated rounds: every output token over the run's wall time (prefill included), and how
many answers came out identical (speculation stands aside while more than 2 sequences decode).

The peer, in the same rounds (`--no-llama` skips it): llama.cpp's `llama-server` (built from the llama-cpp-python
sdist, benchmarks/llama_cpp.py) on the Q8_0 copy of the same model, one slot, 2 threads, the same prompt token ids,
greedy: once plain and once with its own speculation, the same kind as ours: `--spec-type ngram-simple` (its prompt
lookup, its defaults) for `--draft ngram`, and for a draft model the same draft exported by `trainfer export --to
gguf --type Q8_0` and given as `--model-draft` with `--spec-type draft-simple` (without the type it loads the draft and
never guesses; its draft defaults: 3 guesses a check, as ours). Its decode rate is
ours: tokens after the first over the time after the first, (predicted_n - 1) / predicted_ms of its timings.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402
from serve import free_port, wait_healthy  # noqa: E402

from trainfer import LLM, registry  # noqa: E402
from trainfer.data.sources import human_eval_file  # noqa: E402
from trainfer.infer.engine import Engine  # noqa: E402
from trainfer.infer.sampling import SamplingParams  # noqa: E402
from trainfer.rounds import alternate, describe, environment, ratio  # noqa: E402

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
STREAM_PROBLEMS = range(150, 164)  # with the chat questions, 16 prompts apart from the draft's data


def code_prompts(problems: range = CODE_PROBLEMS) -> list[str]:
    """HumanEval problems as chat requests, worded as the draft's training prompts are (other problems)."""
    with gzip.open(human_eval_file(), "rt") as f:
        rows = [json.loads(line) for line in f]
    return [f"Complete this Python function.\n\n```python\n{rows[i]['prompt']}```" for i in problems]


def together(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """All prompts at once (continuous batching): every output token over the run's wall time, and the tokens."""
    start = time.perf_counter()
    results = engine.run(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    outputs = [[e.token_id for e in events[0]] for events in results]
    return sum(len(o) for o in outputs) / (time.perf_counter() - start), outputs


def decode(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Tokens per second from each answer's first token to its last, over the prompts; and the tokens."""
    n, seconds, outputs = 0, 0.0, []
    for ids in prompts:
        events = engine.run([ids], SamplingParams(max_tokens=max_tokens, temperature=0))[0][0]
        n += len(events) - 1
        seconds += events[-1].time - events[0].time
        outputs.append([e.token_id for e in events])
    return n / seconds, outputs


class LlamaServer:
    """A llama-server process on one model file, one slot, until close(); `flags` turn on its speculation."""

    def __init__(self, bin_dir: Path, gguf: Path, flags: list[str]) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "-t", "2", "-c", "4096", "--parallel", "1",
               "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], *flags]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(self.url, self.proc)
        except Exception:
            self.close()
            raise
        self.drafted = self.accepted = 0

    def decode(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        """decode()'s figure from llama-server's timings, and its tokens."""
        n, seconds, outputs = 0, 0.0, []
        for ids in prompts:
            body = {"prompt": ids, "n_predict": max_tokens, "temperature": 0, "cache_prompt": False,
                    "return_tokens": True}  # fmt: skip
            r = httpx.post(self.url + "/completion", json=body, timeout=600)
            r.raise_for_status()
            out = r.json()
            t = out["timings"]
            n += t["predicted_n"] - 1
            seconds += t["predicted_ms"] / 1000
            self.drafted += t.get("draft_n", 0)
            self.accepted += t.get("draft_n_accepted", 0)
            outputs.append(out["tokens"])
        return n / seconds, outputs

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def llama_servers(draft: str, tmp: Path) -> dict[str, LlamaServer]:
    """llama-server plain and with the speculation that matches `draft`, on the Q8_0 copy of the model."""
    peers = registry.home() / "peers"
    bin_dir = llama_cpp.build(peers / "llama.cpp")
    gguf = llama_cpp.quantized_copies(bin_dir, peers)["Q8_0"]
    if draft == "ngram":
        flags = ["--spec-type", "ngram-simple"]
    else:
        exported = tmp / "draft.Q8_0.gguf"
        cmd = [sys.executable, "-m", "trainfer.cli", "export", draft, "--to", "gguf", "--type", "Q8_0", "--out",
               str(exported)]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        flags = ["--model-draft", str(exported), "--spec-type", "draft-simple"]  # without the type it never guesses
    servers = {"llama plain": LlamaServer(bin_dir, gguf, [])}
    try:
        servers["llama spec"] = LlamaServer(bin_dir, gguf, flags)
    except Exception:
        servers["llama plain"].close()
        raise
    return servers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="int8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--num-draft-tokens", type=int, default=None, help="default: the engine's")
    ap.add_argument("--draft", default="ngram", help="ngram, or a draft model (alias, .gguf or directory)")
    ap.add_argument("--workload", action="append", choices=list(WORKLOADS), help="default: all")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-server (no llama.cpp build)")
    ap.add_argument("--streams", type=int, default=16, help="also N requests at once, with and without (0: skip)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        servers = {} if args.no_llama else llama_servers(args.draft, Path(tmp))
        try:
            measure(args, servers)
        finally:
            for server in servers.values():
                server.close()


def measure(args: argparse.Namespace, servers: dict[str, LlamaServer]) -> None:
    """Every workload in alternated rounds: plain and speculative decoding here, and at llama-server if given."""
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

        def peer(label: str, prompts=prompts, max_tokens=max_tokens, outputs=outputs) -> float:
            rate, outputs[label] = servers[label].decode(prompts, max_tokens)
            return rate

        peer_before = {label: (server.drafted, server.accepted) for label, server in servers.items()}
        sides = {"plain": lambda: side("plain"), "spec": lambda: side("spec")}
        sides |= {label: partial(peer, label) for label in servers}
        runs = alternate(args.rounds, sides)
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
        if servers:
            row["llama"] = peer_row(runs, outputs, servers, peer_before)
            print(f"{name}: against llama-server Q8_0, {row['llama']['summary']}", flush=True)
    if args.streams:
        result["streams"] = many_streams(args, llm, engines)
    print(json.dumps(result))


def many_streams(args: argparse.Namespace, llm: LLM, engines: dict[str, Engine]) -> dict:
    """`args.streams` requests at once, chat and code (none in the draft's data), with and without speculation: it
    turns itself off while more than 2 sequences decode, so this shows what the switching costs a busy engine."""
    texts = (WORKLOADS["chat"][0] + code_prompts(STREAM_PROBLEMS))[: args.streams]
    prompts = [llm.chat_prompt([{"role": "user", "content": t}]) for t in texts]
    outputs: dict[str, list[list[int]]] = {}

    def side(label: str) -> float:
        rate, outputs[label] = together(engines[label], prompts, 128)
        return rate

    runs = alternate(args.rounds, {"plain": lambda: side("plain"), "spec": lambda: side("spec")})
    same = sum(a == b for a, b in zip(outputs["plain"], outputs["spec"], strict=True))
    r = ratio(runs["spec"], runs["plain"])
    mid = args.rounds // 2
    print(f"{len(prompts)} streams: speculation {r} plain's aggregate rate ({sorted(runs['spec'])[mid]:.1f} vs "
          f"{sorted(runs['plain'])[mid]:.1f} tokens/s, prefill included); {same} of {len(prompts)} answers "
          f"identical", flush=True)  # fmt: skip
    return {"spec_tok_s": sorted(runs["spec"]), "plain_tok_s": sorted(runs["plain"]), "ratio": r.as_list(),
            "identical": same}  # fmt: skip


def peer_row(runs: dict, outputs: dict, servers: dict[str, LlamaServer], before: dict) -> dict:
    """Our speculative rate against llama-server's plain and speculative rates, and its guesses kept."""
    spec = servers["llama spec"]
    drafted, accepted = spec.drafted - before["llama spec"][0], spec.accepted - before["llama spec"][1]
    vs_plain, vs_spec = ratio(runs["spec"], runs["llama plain"]), ratio(runs["spec"], runs["llama spec"])
    mid = len(runs["spec"]) // 2
    plain_rate, spec_rate = sorted(runs["llama plain"])[mid], sorted(runs["llama spec"])[mid]
    # ours may end with the stop token, which llama-server leaves out
    same = sum(
        b[: len(a)] == a and len(b) - len(a) <= 1 for a, b in zip(outputs["llama spec"], outputs["plain"], strict=True)
    )
    summary = (f"our speculation {vs_plain} its plain decoding ({plain_rate:.1f} tokens/s) and {vs_spec} its own "
               f"speculation ({spec_rate:.1f} tokens/s, {accepted / drafted if drafted else 0:.0%} of {drafted} "
               f"guesses kept); its tokens equal ours on {same} of {len(outputs['plain'])} prompts")  # fmt: skip
    return {
        "plain_tok_s": sorted(runs["llama plain"]),
        "spec_tok_s": sorted(runs["llama spec"]),
        "ours_vs_plain": vs_plain.as_list(),
        "ours_vs_spec": vs_spec.as_list(),
        "acceptance": round(accepted / drafted, 3) if drafted else 0.0,
        "summary": summary,
    }


if __name__ == "__main__":
    main()
