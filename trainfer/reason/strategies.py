"""Test-time compute on the engine: chain-of-thought, self-consistency (fixed or adaptive), best-of-N, and
self-correction, each returning the answer, the candidates, the votes or scores, and the compute it spent.

The engine knows nothing of this module. Samples of one question are one request with `n` samples, so the
prompt is prefilled once (the engine forks the computed blocks); later waves and rounds reuse it through the
prefix cache. A strategy is a generator of such draws (`plan`), so the same code runs on an Engine
(`reason`) and on the server's AsyncEngine; its compute is counted from the draws' events, exactly what the
engine processed (tests/reason compares it with the engine's own counter).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Generator
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
SCORERS = ("logprob", "verifier", "judge")
JUDGE = "{question}\nProposed answer: {answer}\nIs the proposed answer correct? Reply with Yes or No."
JUDGE_TOP = 20  # top tokens of the judge's first reply token searched for yes / no
MAX_SAMPLES = 64


@dataclass
class Compute:
    """What a strategy cost: tokens the model processed (prompt chunks + fed-back samples), prompt tokens served
    from the prefix cache, tokens generated, and FLOPs (2 x non-embedding parameters per processed token, plus
    attention: 4 x layers x heads x head_dim x context per processed token)."""

    processed_tokens: int = 0
    prompt_tokens: int = 0  # over all draws, computed or served from the cache
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


@dataclass
class Draw:
    """One engine request of a strategy: n samples of one prompt (one prefill for all of them)."""

    prompt: list[int]
    n: int
    temperature: float
    max_tokens: int
    seed: int | None
    top: int = 0  # top logprobs wanted for each token (the judge reads its first token's)

    def params(self) -> SamplingParams:
        return SamplingParams(n=self.n, temperature=self.temperature, max_tokens=self.max_tokens, seed=self.seed,
                              logprobs=self.top)  # fmt: skip


@dataclass
class Sample:
    text: str
    logprob: float  # summed over its tokens
    tokens: int
    cached_prompt_tokens: int
    first_top: list[tuple[int, float]] = field(default_factory=list)  # top logprobs at the first token


def samples_of(per_sample_events: list[list]) -> list[Sample]:
    out = []
    for events in per_sample_events:
        tokens = [e for e in events if e.token_id >= 0]
        cached = events[0].cached_prompt_tokens if events else 0
        top = list(tokens[0].top_logprobs) if tokens else []
        text = "".join(e.text for e in events)
        out.append(Sample(text, sum(e.logprob or 0.0 for e in tokens), len(tokens), cached, top))
    return out


def account(compute: Compute, cfg, draw: Draw, samples: list[Sample]) -> None:
    """The draw's processed tokens: the prompt once (minus what the prefix cache served; the n samples fork the
    computed blocks), then each sample's tokens but its last fed back (tests check this against the engine)."""
    generated = sum(s.tokens for s in samples)
    prompt_rows = len(draw.prompt) - min((s.cached_prompt_tokens for s in samples), default=0)
    fed_back = max(0, generated - len(samples))
    processed = prompt_rows + fed_back
    compute.processed_tokens += processed
    compute.prompt_tokens += len(draw.prompt)
    compute.cached_prompt_tokens += len(draw.prompt) - prompt_rows
    compute.generated_tokens += generated
    compute.samples += draw.n
    # keys attended, averaged: a prompt row sees half the prompt, a fed-back token the prompt + half its sample
    per_sample = generated / max(1, len(samples))
    context = (prompt_rows * len(draw.prompt) / 2 + fed_back * (len(draw.prompt) + per_sample / 2)) / max(1, processed)
    compute.flops += cfg.forward_flops(processed, generated, context)


def draw_on(engine, draw: Draw) -> list[Sample]:
    """The synchronous driver: the draw as one request on an Engine, run to completion."""
    return samples_of(engine.run([draw.prompt], [draw.params()])[0])


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


def plan(tokenizer, cfg, question: str | list[dict], strategy: str = "self-consistency", n: int = 8,
         kind: str = "number", temperature: float = 0.7, max_tokens: int = 256, seed: int | None = 0,
         threshold: float = 0.6, wave: int = 2, verifier: Callable[[str], bool] | None = None, rounds: int = 2,
         chat: bool | None = None, scorer: str | None = None, direct: str = "{question}",
         cot: str | None = None) -> Generator[Draw, list[Sample], Result]:  # fmt: skip
    """A strategy as a generator: it yields the draws it needs, one at a time, receives their samples, and
    returns the Result. Drivers run the draws (reason: an Engine; serve/: the AsyncEngine).

    best-of-n scores its samples by `scorer`: logprob (mean token logprob), verifier (`verifier(text)`, a
    program that checks a sample without the reference answer) or judge (the model itself asked whether each
    distinct answer is correct: P(yes) / (P(yes) + P(no)) at its first reply token). Default: verifier when one
    is given, else logprob. `direct` formats the question for greedy, `cot` for the others (default: the
    chain-of-thought template of `kind`), e.g. for a model trained on a scratchpad format of its own."""
    scorer = scorer or ("verifier" if verifier is not None else "logprob")
    if strategy not in STRATEGIES:
        raise TrainferError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if scorer not in SCORERS or (scorer == "verifier" and verifier is None):
        raise TrainferError(f"scorer must be one of {', '.join(SCORERS)} (verifier needs a verifier function)")
    if kind not in EXTRACTORS:
        raise TrainferError(f"unknown answer kind {kind!r}; choose one of {', '.join(EXTRACTORS)}")
    if not 1 <= n <= MAX_SAMPLES or not 1 <= wave <= n or rounds < 0 or max_tokens < 1:
        raise TrainferError(f"n must be 1..{MAX_SAMPLES}, wave 1..n, rounds >= 0, max_tokens >= 1")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None)) or not isinstance(question, str)
    extract = EXTRACTORS[kind]
    messages = [{"role": "user", "content": question}] if isinstance(question, str) else [dict(m) for m in question]
    if not messages or messages[-1]["role"] != "user":
        raise TrainferError("the conversation must end with a user message to reason about")
    asked = messages[-1]["content"]
    messages[-1]["content"] = (direct if strategy == "greedy" else cot or COT[kind]).format(question=asked)

    def encode(msgs: list[dict]) -> list[int]:
        if chat:
            return tokenizer.encode(tokenizer.apply_chat_template(msgs), add_bos=False)
        return tokenizer.encode(msgs[-1]["content"])

    prompt = encode(messages)
    compute = Compute()

    def draw(p: list[int], k: int, temp: float, s: int | None, tokens: int = max_tokens, top: int = 0):
        d = Draw(p, k, temp, tokens, s, top)
        out = yield d
        account(compute, cfg, d, out)
        return out

    if strategy in ("greedy", "cot"):
        (out,) = yield from draw(prompt, 1, 0.0, seed)
        a = extract(out.text)
        return Result(a, strategy, [out.text], [a], compute=compute)
    if strategy in ("self-consistency", "adaptive"):
        return (yield from _voting(draw, prompt, extract, strategy, n, wave, threshold, temperature, seed, compute))
    if strategy == "best-of-n":
        judge = (tokenizer, encode, messages, asked)
        return (yield from _best_of_n(draw, prompt, extract, scorer, verifier, judge, n, temperature, seed, compute))
    return (yield from _self_correction(draw, encode, prompt, messages, extract, rounds, seed, compute))


def _voting(draw, prompt, extract, strategy, n, wave, threshold, temperature, seed, compute) -> Generator:
    """Self-consistency (n samples, one draw) or adaptive (waves until the leader cannot be overtaken), then a vote."""
    outs: list[Sample] = []
    while len(outs) < n:
        k = n - len(outs) if strategy == "self-consistency" else min(wave, n - len(outs))
        outs += yield from draw(prompt, k, temperature, None if seed is None else seed + len(outs))
        if strategy == "adaptive":
            counts = Counter(a for a in (extract(o.text) for o in outs) if a is not None).most_common(2)
            if counts:
                lead = counts[0][1] - (counts[1][1] if len(counts) > 1 else 0)
                if lead > n - len(outs) or (len(outs) >= 2 * wave and counts[0][1] / len(outs) >= threshold):
                    break  # the leader cannot be overtaken, or holds the threshold share
    answers = [extract(o.text) for o in outs]
    best, votes = vote(answers, [o.logprob for o in outs])
    return Result(best, strategy, [o.text for o in outs], answers, votes, compute=compute)


def _best_of_n(draw, prompt, extract, scorer, verifier, judge, n, temperature, seed, compute) -> Generator:
    """n samples scored by the verifier, the model as judge, or their mean token logprob; the best one wins."""
    outs = yield from draw(prompt, n, temperature, seed)
    answers = [extract(o.text) for o in outs]
    if scorer == "verifier":
        scores = [1.0 if a is not None and verifier(o.text) else 0.0 for o, a in zip(outs, answers, strict=True)]
    elif scorer == "judge":  # one one-token draw per distinct answer; the question's prefix comes cached
        tokenizer, encode, messages, asked = judge
        judged = {}
        for a in dict.fromkeys(a for a in answers if a is not None):
            ask = JUDGE.format(question=asked, answer=a)
            (j,) = yield from draw(encode(messages[:-1] + [{"role": "user", "content": ask}]), 1, 0.0, seed, 1,
                                   JUDGE_TOP)  # fmt: skip
            judged[a] = yes_share(tokenizer, j.first_top)
        scores = [judged.get(a, -1.0) for a in answers]
    else:  # mean token logprob: the model's own confidence in each whole sample
        scores = [o.logprob / max(1, o.tokens) for o in outs]
    i = max(range(len(outs)), key=lambda j: scores[j])
    return Result(answers[i], "best-of-n", [o.text for o in outs], answers, scores=scores, compute=compute)


def _self_correction(draw, encode, prompt, messages, extract, rounds, seed, compute) -> Generator:
    """Answer -> critique -> revise, until the critique finds nothing or the answer holds."""
    (first,) = yield from draw(prompt, 1, 0.0, seed)
    texts, answers = [first.text], [extract(first.text)]
    task = messages[-1]["content"]
    for _ in range(rounds):
        ask = f"{task}\nA proposed solution:\n{texts[-1]}\nIs it correct? Point out any mistake, or say 'No mistakes.'"
        (crit,) = yield from draw(encode(messages[:-1] + [{"role": "user", "content": ask}]), 1, 0.0, seed)
        if "no mistake" in crit.text.lower():
            break
        fix = f"{task}\nA proposed solution:\n{texts[-1]}\nA critique:\n{crit.text}\nWrite a corrected solution."
        (rev,) = yield from draw(encode(messages[:-1] + [{"role": "user", "content": fix}]), 1, 0.0, seed)
        texts.append(rev.text)
        answers.append(extract(rev.text))
        if answers[-1] == answers[-2]:
            break
    return Result(answers[-1], "self-correction", texts, answers, compute=compute)


def yes_share(tokenizer, top: list[tuple[int, float]]) -> float:
    """P(yes) / (P(yes) + P(no)) over the top tokens (any case, any leading space); 0.5 if neither shows."""
    import math

    mass = {"yes": 0.0, "no": 0.0}
    for token, lp in top:
        word = tokenizer.decode([token]).strip().lower()
        if word in mass:
            mass[word] += math.exp(lp)
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else 0.5


def reason(llm, question: str | list[dict], strategy: str = "self-consistency", **options) -> Result:
    """Answer with a test-time strategy on the LLM's engine (options as in `plan`)."""
    steps = plan(llm.tokenizer, llm.model.cfg, question, strategy, **options)
    try:
        d = next(steps)
        while True:
            d = steps.send(draw_on(llm.engine, d))
    except StopIteration as done:
        return done.value


def chosen_text(result: Result) -> str:
    """The candidate that carries the result's answer (the first with it), else the last candidate."""
    for text, a in zip(result.candidates, result.answers, strict=True):
        if result.answer is not None and a == result.answer:
            return text
    return result.candidates[-1] if result.candidates else ""
