"""Tasks with verifiable answers, and `evaluate`: accuracy and compute of a strategy at several budgets.

The project's own generators (no download, any number of fresh problems per seed), asked in English for
instruct models:

    add        a + b with `digits`-digit operands
    chain-sum  a + b + c + d with small operands
    mul        a * b, a with `digits` digits and b one digit
    compare    which of two numbers is larger, as an option letter (A or B)

`add-pad`: addition in the terse format of `worked_corpus`, for models trained from scratch on it (the seed's
"small model + test-time compute vs a larger model" benchmark). Its chain of thought is a scratchpad, one
column per step from the right with its carry; the task also supplies a verifier that checks a scratchpad's
own arithmetic without knowing the reference answer (best-of-N's program verifier).

`rg:NAME`: a reasoning-gym generator (PyPI `reasoning-gym`, procedural, offline), graded by its own
`score_answer`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from trainfer.errors import TrainferError
from trainfer.reason.strategies import reason
from trainfer.train.config import parse_value


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    kind: str  # the extractor that reads answers of this task
    grade: Callable[[str | None], bool] | None = field(default=None, compare=False)  # else exact match
    verify: Callable[[str], bool] | None = field(default=None, compare=False)  # a sample's text, no reference

    def correct(self, answer: str | None) -> bool:
        return self.grade(answer) if self.grade else answer == self.answer


@dataclass(frozen=True)
class Format:
    """How a task's questions are put to the model: greedy answers `direct`, the other strategies `cot`
    (None: the instruct chain-of-thought template of the answer kind); `chat` False feeds raw text."""

    direct: str = "{question}"
    cot: str | None = None
    chat: bool | None = None


TASKS = ("add", "chain-sum", "mul", "compare", "add-pad")
PAD = Format(direct="{question}=", cot="{question}:", chat=False)


def task_format(task: str) -> Format:
    return PAD if task == "add-pad" else Format()


def make(task: str, count: int, seed: int = 0, digits: int = 2) -> list[Problem]:
    if count < 1 or digits < 1:
        raise TrainferError("count and digits must be at least 1")
    if task.startswith("rg:"):
        return reasoning_gym(task[3:], count, seed)
    rng = random.Random(f"{task}-{seed}-{digits}")
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    out = []
    for _ in range(count):
        if task == "add":
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            out.append(Problem(f"What is {a} + {b}?", str(a + b), "number"))
        elif task == "chain-sum":
            xs = [rng.randint(1, 9) for _ in range(4)]
            out.append(Problem(f"What is {' + '.join(map(str, xs))}?", str(sum(xs)), "number"))
        elif task == "mul":
            a, b = rng.randint(lo, hi), rng.randint(2, 9)
            out.append(Problem(f"What is {a} * {b}?", str(a * b), "number"))
        elif task == "compare":
            a, b = rng.sample(range(lo, hi + 1), 2) if hi > lo else (lo, lo + 1)
            out.append(Problem(f"Which is larger? A: {a} B: {b}", "A" if a > b else "B", "option"))
        elif task == "add-pad":
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            out.append(Problem(f"{a}+{b}", str(a + b), "number", verify=lambda text, a=a, b=b: check_pad(a, b, text)))
        else:
            raise TrainferError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} or rg:NAME (reasoning-gym)")
    return out


def scratchpad(a: int, b: int) -> str:
    """The worked solution of a + b: each column from the right as `x+y+carry=sum`, then `;` and the result.
    1234+987 -> "4+7+0=11,3+8+1=12,2+9+1=12,1+0+1=02;2221". Sums have two digits, so every step is as wide and
    the digits a step reads sit at the same distance from it in every problem (easier to learn with RoPE; with
    one-digit sums a small model never learned the lookup in 3M tokens, docs/LOG.md)."""
    steps, carry = [], 0
    for x, y in columns(a, b):
        steps.append(f"{x}+{y}+{carry}={x + y + carry:02d}")
        carry = (x + y + carry) // 10
    return ",".join(steps) + f";{a + b}"


def columns(a: int, b: int) -> list[tuple[int, int]]:
    """The digit pairs of a + b from the right, the shorter operand padded with zeros."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    return [(int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0) for i in range(max(len(xs), len(ys)))]


STEP = re.compile(r"(\d)\+(\d)\+(\d)=(\d+)")


def check_pad(a: int, b: int, text: str) -> bool:
    """Whether a scratchpad for a + b is right by its own steps: the columns are the question's digits, each
    carry comes from the column before, each sum adds up, and the result is read off the columns. It never
    sees the reference answer, only the question (a program verifier, as a test suite is for code)."""
    body, _, result = text.strip().partition(";")
    steps = [tuple(map(int, m)) for m in STEP.findall(body)]
    pairs = columns(a, b)
    if len(steps) != len(pairs) or not result.strip().isdigit():
        return False
    carry, digits = 0, []
    for (x, y, c, s), pair in zip(steps, pairs, strict=True):
        if (x, y, c) != (*pair, carry) or s != x + y + c:
            return False
        digits.append(s % 10)
        carry = s // 10
    read = (str(carry) if carry else "") + "".join(map(str, reversed(digits)))
    return result.strip() == read


def worked_corpus(count: int, seed: int, digits: tuple[int, int] = (1, 6), worked_share: float = 0.5,
                  exclude: set[str] = frozenset()) -> list[str]:  # fmt: skip
    """Training documents for `add-pad`: `a+b=sum` (direct) or `a+b:scratchpad` (worked), operands of
    `digits[0]..digits[1]` digits each; `exclude` holds questions kept out (the held-out problems)."""
    rng = random.Random(f"pad-corpus-{seed}")
    out = []
    while len(out) < count:
        a, b = (rng.randint(0, 10 ** rng.randint(*digits) - 1) for _ in range(2))
        if f"{a}+{b}" in exclude:
            continue
        out.append(f"{a}+{b}:{scratchpad(a, b)}" if rng.random() < worked_share else f"{a}+{b}={a + b}")
    return out


def reasoning_gym(spec: str, count: int, seed: int) -> list[Problem]:
    """Problems of a reasoning-gym dataset, graded by the dataset's own `score_answer` (1.0 = right). `spec` is
    NAME or NAME:key=value,... with the dataset's config, e.g. chain_sum:max_terms=2,max_digits=1."""
    try:
        import reasoning_gym
    except ImportError:
        raise TrainferError("rg: tasks need reasoning-gym (pip install reasoning-gym==0.1.25)") from None

    name, _, options = spec.partition(":")
    config = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise TrainferError(f"rg:{spec}: expected key=value, got {item!r}")
        config[key.strip()] = parse_value(value.strip())  # as --set reads values: 2, 0.5, true, a word
    try:
        ds = reasoning_gym.create_dataset(name, size=count, seed=seed, **config)
    except Exception as e:  # its registry raises a bare error for an unknown name
        raise TrainferError(f"reasoning-gym cannot make {spec!r}: {e}") from None
    out = []
    for entry in ds:
        answer = str(entry["answer"])
        kind = "number" if re.fullmatch(r"-?\d+(\.\d+)?", answer) else "line"
        grade = lambda a, entry=entry: a is not None and ds.score_answer(a, entry) >= 1.0  # noqa: E731
        out.append(Problem(entry["question"], answer, kind, grade=grade))
    return out


@dataclass
class BudgetRow:
    strategy: str
    budget: int
    accuracy: float
    samples_per_problem: float
    tokens_per_problem: float  # tokens the model processed
    flops_per_problem: float
    label: str = ""  # the strategy's name in tables and plots (e.g. "best-of-n (verifier)")


def evaluate(llm, task: str, strategies: list[str], budgets: list[int], count: int = 20, seed: int = 0,
             digits: int = 2, max_tokens: int = 96, temperature: float = 0.7, scorer: str = "logprob",
             problems: list[Problem] | None = None, fmt: Format | None = None) -> list[BudgetRow]:  # fmt: skip
    """Each strategy at each budget (n samples; greedy and cot ignore it) on the same `count` problems.
    best-of-n scores by `scorer`: logprob, verifier (the task's program; add-pad has one) or judge. `fmt`: how
    the questions are asked (default: the task's own; grpo's benchmark asks every strategy as it trained)."""

    problems = problems or make(task, count, seed, digits)
    fmt = fmt or task_format(task)
    rows = []
    for strategy in strategies:
        label = f"best-of-n ({scorer})" if strategy == "best-of-n" else strategy
        for budget in budgets if strategy not in ("greedy", "cot") else [1]:
            right = samples = processed = flops = 0
            llm.engine.pool.forget_prefixes()  # each (strategy, budget) pass starts from the same cold cache
            for i, p in enumerate(problems):
                if strategy == "best-of-n" and scorer == "verifier" and p.verify is None:
                    raise TrainferError(f"task {task!r} has no verifier; use --scorer logprob or judge")
                r = reason(llm, p.question, strategy, n=budget, kind=p.kind, max_tokens=max_tokens,
                           temperature=temperature, seed=seed * 1000 + i, wave=min(2, budget), scorer=scorer,
                           verifier=p.verify, direct=fmt.direct, cot=fmt.cot, chat=fmt.chat)  # fmt: skip
                right += p.correct(r.answer)
                samples += r.compute.samples
                processed += r.compute.processed_tokens
                flops += r.compute.flops
            n = len(problems)
            rows.append(BudgetRow(strategy, budget, right / n, samples / n, processed / n, flops / n, label))
    return rows


def plot(rows: list[BudgetRow], path, title: str, references: dict[str, tuple[float, float]] | None = None) -> None:
    """Accuracy against inference FLOPs per problem, one line per strategy (label); `references` draws
    a star at (FLOPs, accuracy) with a horizontal line (e.g. a larger model's greedy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label in dict.fromkeys(r.label or r.strategy for r in rows):
        mine = [r for r in rows if (r.label or r.strategy) == label]
        ax.plot([r.flops_per_problem for r in mine], [r.accuracy for r in mine], "o-", label=label)
        for r in mine:
            ax.annotate(str(r.budget), (r.flops_per_problem, r.accuracy), fontsize=8)
    for name, (acc, flops) in (references or {}).items():
        ax.axhline(acc, ls="--", color="gray", lw=1)
        ax.plot([flops], [acc], "k*", ms=10)
        ax.annotate(name, (flops, acc), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xscale="log", xlabel="inference FLOPs per problem", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
