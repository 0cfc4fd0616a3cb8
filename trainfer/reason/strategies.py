"""Test-time compute on the engine: chain-of-thought, self-consistency (fixed or adaptive), best-of-N, and
self-correction, each returning the answer, the candidates, the votes or scores, and the compute it spent.

The engine knows nothing of this module. Samples of one question are one request with `n` samples, so the
prompt is prefilled once (the engine forks the computed blocks); later waves and rounds reuse it through the
prefix cache. Compute is read from the engine's own counter of processed tokens, not estimated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from trainfer.errors import TrainferError
from trainfer.infer.sampling import SamplingParams
from trainfer.reason.extract import EXTRACTORS

COT = {
    "number": "{question}\nLet's think step by step, then give the final answer as 'The answer is N.'\n",
    "option": "{question}\nLet's think step by step, then finish with 'The answer is X.' for the option X.\n",
    "line": "{question}\nLet's think step by step, and put the final answer alone on the last line.\n",
}
STRATEGIES = ("greedy", "cot", "self-consistency", "adaptive", "best-of-n", "self-correction")
MAX_SAMPLES = 64


@dataclass
class Compute:
    """What a strategy cost: tokens the model processed (prompt chunks + fed-back samples), prompt tokens served
    from the prefix cache, tokens generated, and FLOPs (2 x non-embedding parameters per processed token, plus
    attention: 4 x layers x heads x head_dim x context per processed token)."""

    processed_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    flops: float = 0.0
    samples: int = 0


@dataclass
class Result:
    answer: str | None
    strategy: str
    candidates: list[str]  # the texts
    answers: list[str | None]  # extracted from each
    votes: dict[str, float] = field(default_factory=dict)
    scores: list[float] = field(default_factory=list)
    compute: Compute = field(default_factory=Compute)


def flops(cfg, processed: int, sampled: int, context: float) -> float:
    """2 x body parameters per processed token, 2 x the LM head per sampled token (prefill rows skip the head),
    and attention over `context` keys on average (QK and AV: 4 x layers x heads x head_dim per key)."""
    head = cfg.vocab_size * cfg.dim
    body = cfg.n_params - head * (1 if cfg.tie_embeddings else 2)
    return (
        2 * body * processed + 2 * head * sampled + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context * processed
    )


def generate(llm, prompt: list[int], n: int, temperature: float, max_tokens: int, seed: int | None,
             compute: Compute) -> list[tuple[str, float]]:  # fmt: skip
    """n samples of one prompt in one request (one prefill): (text, summed logprob) each; compute updated."""
    engine = llm.engine
    before = engine.scheduler.num_computed_tokens
    params = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed, logprobs=0)
    samples = engine.run([prompt], [params])[0]
    processed = engine.scheduler.num_computed_tokens - before
    out = []
    for events in samples:
        tokens = [e for e in events if e.token_id >= 0]
        text = "".join(e.text for e in events)
        out.append((text, sum(e.logprob or 0.0 for e in tokens)))
        compute.generated_tokens += len(tokens)
        compute.cached_prompt_tokens += events[0].cached_prompt_tokens if events else 0
    generated = sum(len([e for e in ev if e.token_id >= 0]) for ev in samples)
    compute.processed_tokens += processed
    compute.samples += n
    # keys attended, averaged: a prompt token sees half the prompt, a sample token the prompt + half its sample
    prompt_rows = max(0, processed - (generated - n))
    context = (prompt_rows * len(prompt) / 2 + (processed - prompt_rows) * (len(prompt) + generated / n / 2)) / max(
        1, processed
    )
    compute.flops += flops(llm.model.cfg, processed, generated, context)
    return out


def vote(answers: list[str | None], logprobs: list[float], weighted: bool = False) -> tuple[str | None, dict]:
    """Majority vote over extracted answers (None abstains); ties go to the answer whose samples have the
    larger summed logprob. Weighted: each sample counts exp(mean-free logprob) instead of 1."""
    import math

    tally: dict[str, float] = Counter()
    mass: dict[str, float] = Counter()
    for a, lp in zip(answers, logprobs, strict=True):
        if a is None:
            continue
        tally[a] += math.exp(lp) if weighted else 1
        mass[a] += lp
    if not tally:
        return None, {}
    best = max(tally, key=lambda a: (tally[a], mass[a]))
    return best, dict(tally)


def reason(llm, question: str, strategy: str = "self-consistency", n: int = 8, kind: str = "number",
           temperature: float = 0.7, max_tokens: int = 256, seed: int | None = 0, threshold: float = 0.6,
           wave: int = 2, verifier: Callable[[str], bool] | None = None, rounds: int = 2,
           chat: bool | None = None) -> Result:  # fmt: skip
    """Answer `question` with a test-time strategy; see the module docstring. `kind` picks the extractor;
    `chat` wraps prompts in the model's chat template (default: when it has one)."""
    if chat is None:
        chat = bool(getattr(llm.tokenizer, "chat_template", None))
    if strategy not in STRATEGIES:
        raise TrainferError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if kind not in EXTRACTORS:
        raise TrainferError(f"unknown answer kind {kind!r}; choose one of {', '.join(EXTRACTORS)}")
    if not 1 <= n <= MAX_SAMPLES or not 1 <= wave <= n or rounds < 0 or max_tokens < 1:
        raise TrainferError(f"n must be 1..{MAX_SAMPLES}, wave 1..n, rounds >= 0, max_tokens >= 1")
    extract = EXTRACTORS[kind]
    text = question if strategy == "greedy" else COT[kind].format(question=question)
    prompt = llm.chat_prompt([{"role": "user", "content": text}]) if chat else llm.tokenizer.encode(text)
    compute = Compute()
    if strategy in ("greedy", "cot"):
        (out,) = generate(llm, prompt, 1, 0.0, max_tokens, seed, compute)
        a = extract(out[0])
        return Result(a, strategy, [out[0]], [a], compute=compute)
    if strategy == "self-consistency":
        outs = generate(llm, prompt, n, temperature, max_tokens, seed, compute)
        answers = [extract(t) for t, _ in outs]
        best, votes = vote(answers, [lp for _, lp in outs])
        return Result(best, strategy, [t for t, _ in outs], answers, votes, compute=compute)
    if strategy == "adaptive":
        outs: list[tuple[str, float]] = []
        while len(outs) < n:
            k = min(wave, n - len(outs))
            outs += generate(llm, prompt, k, temperature, max_tokens, None if seed is None else seed + len(outs),
                             compute)  # fmt: skip
            answers = [extract(t) for t, _ in outs]
            counts = Counter(a for a in answers if a is not None).most_common(2)
            if counts:
                lead = counts[0][1] - (counts[1][1] if len(counts) > 1 else 0)
                if lead > n - len(outs) or (len(outs) >= 2 * wave and counts[0][1] / len(outs) >= threshold):
                    break  # the leader cannot be overtaken, or holds the threshold share
        answers = [extract(t) for t, _ in outs]
        best, votes = vote(answers, [lp for _, lp in outs])
        return Result(best, strategy, [t for t, _ in outs], answers, votes, compute=compute)
    if strategy == "best-of-n":
        outs = generate(llm, prompt, n, temperature, max_tokens, seed, compute)
        answers = [extract(t) for t, _ in outs]
        if verifier is not None:
            scores = [1.0 if a is not None and verifier(a) else 0.0 for a in answers]
        else:  # mean token logprob: the model's own confidence in each whole sample
            lengths = [max(1, len(llm.tokenizer.encode(t, add_bos=False))) for t, _ in outs]
            scores = [lp / k for (_, lp), k in zip(outs, lengths, strict=True)]
        i = max(range(len(outs)), key=lambda j: scores[j])
        return Result(answers[i], strategy, [t for t, _ in outs], answers, scores=scores, compute=compute)
    # self-correction: answer -> critique -> revise, until the critique finds nothing or the answer holds
    (first,) = generate(llm, prompt, 1, 0.0, max_tokens, seed, compute)
    texts, answers = [first[0]], [extract(first[0])]
    for _ in range(rounds):
        critique_q = (
            f"{text}\nA proposed solution:\n{texts[-1]}\nIs it correct? Point out any mistake, or say 'No mistakes.'"
        )
        (crit,) = generate(llm, _prompt(llm, critique_q, chat), 1, 0.0, max_tokens, seed, compute)
        if "no mistake" in crit[0].lower():
            break
        revise_q = f"{text}\nA proposed solution:\n{texts[-1]}\nA critique:\n{crit[0]}\nWrite a corrected solution."
        (rev,) = generate(llm, _prompt(llm, revise_q, chat), 1, 0.0, max_tokens, seed, compute)
        texts.append(rev[0])
        answers.append(extract(rev[0]))
        if answers[-1] == answers[-2]:
            break
    return Result(answers[-1], strategy, texts, answers, compute=compute)


def _prompt(llm, text: str, chat: bool) -> list[int]:
    return llm.chat_prompt([{"role": "user", "content": text}]) if chat else llm.tokenizer.encode(text)
