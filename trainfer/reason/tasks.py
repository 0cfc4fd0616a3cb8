"""Procedural tasks with verifiable answers (the project's own generators: no download, any number of fresh
problems per seed), and `evaluate`: accuracy and compute of a strategy at several budgets.

    add        a + b with `digits`-digit operands
    chain-sum  a + b + c + d with small operands
    mul        a * b, a with `digits` digits and b one digit
    compare    which of two numbers is larger, as an option letter (A or B)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from trainfer.errors import TrainferError


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    kind: str  # the extractor that reads answers of this task


def make(task: str, count: int, seed: int = 0, digits: int = 2) -> list[Problem]:
    if count < 1 or digits < 1:
        raise TrainferError("count and digits must be at least 1")
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
        else:
            raise TrainferError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return out


TASKS = ("add", "chain-sum", "mul", "compare")


@dataclass
class BudgetRow:
    strategy: str
    budget: int
    accuracy: float
    samples_per_problem: float
    tokens_per_problem: float  # tokens the model processed
    flops_per_problem: float


def evaluate(llm, task: str, strategies: list[str], budgets: list[int], count: int = 20, seed: int = 0,
             digits: int = 2, max_tokens: int = 96, temperature: float = 0.7) -> list[BudgetRow]:  # fmt: skip
    """Each strategy at each budget (n samples; greedy and cot ignore it) on the same `count` problems."""
    from trainfer.reason.strategies import reason

    problems = make(task, count, seed, digits)
    rows = []
    for strategy in strategies:
        for budget in budgets if strategy not in ("greedy", "cot") else [1]:
            right = samples = processed = flops = 0
            llm.engine.pool.forget_prefixes()  # each (strategy, budget) pass starts from the same cold cache
            for i, p in enumerate(problems):
                r = reason(llm, p.question, strategy, n=budget, kind=p.kind, max_tokens=max_tokens,
                           temperature=temperature, seed=seed * 1000 + i, wave=min(2, budget))  # fmt: skip
                right += r.answer == p.answer
                samples += r.compute.samples
                processed += r.compute.processed_tokens
                flops += r.compute.flops
            rows.append(BudgetRow(strategy, budget, right / count, samples / count, processed / count, flops / count))
    return rows


def plot(rows: list[BudgetRow], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for strategy in dict.fromkeys(r.strategy for r in rows):
        mine = [r for r in rows if r.strategy == strategy]
        ax.plot([r.flops_per_problem for r in mine], [r.accuracy for r in mine], "o-", label=strategy)
        for r in mine:
            ax.annotate(str(r.budget), (r.flops_per_problem, r.accuracy), fontsize=8)
    ax.set(xscale="log", xlabel="inference FLOPs per problem", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
