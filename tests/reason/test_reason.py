"""Test-time compute: answer extraction, the vote, shared prefill, the compute account, adaptive stopping."""

from __future__ import annotations

import math

import pytest

from tests.conftest import make_tiny_model_dir
from trainfer.errors import TrainferError
from trainfer.reason.extract import last_line, number, option
from trainfer.reason.strategies import COT, reason, vote


@pytest.mark.parametrize(
    "text,want",
    [("7 + 5 = 12. The answer is 12.", "12"), ("The answer is **1,000.50** dollars", "1000.5"),
     ("first 3 then 4, so 9", "9"), ("answer: -2", "-2"), ("no digits", None), ("The answer is 0.0", "0"),
     ("12 apples; the answer is: about 40 (not 12)", "40")],
)  # fmt: skip
def test_number(text, want):
    assert number(text) == want


@pytest.mark.parametrize("text,want", [("I think (B). The answer is C.", "C"), ("A or B? B", "B"), ("none", None)])
def test_option(text, want):
    assert option(text) == want


def test_last_line():
    assert last_line("work\n\n  42  \n") == "42" and last_line("  ") is None


def test_vote_majority_ties_and_abstentions():
    assert vote(["3", "4", "3", None], [-1, -1, -1, -9]) == ("3", {"3": 2, "4": 1})
    best, votes = vote(["3", "4"], [-5.0, -1.0])  # a tie: the more likely sample's answer wins
    assert best == "4" and votes == {"3": 1, "4": 1}
    assert vote([None, None], [0, 0]) == (None, {})
    best, votes = vote(["3", "4", "4"], [0.0, -10.0, -10.0], weighted=True)  # one confident sample outweighs two
    assert best == "3"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from trainfer import LLM

    return LLM.load(make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), context=512), num_blocks=256)


def test_samples_share_one_prefill_and_the_account_adds_up(tiny):
    before = tiny.engine.scheduler.num_computed_tokens
    r = reason(tiny, "2+2?", "self-consistency", n=6, kind="line", max_tokens=10, chat=False, temperature=1.0)
    c = r.compute
    assert c.processed_tokens == tiny.engine.scheduler.num_computed_tokens - before  # the engine's own count
    prompt = len(tiny.tokenizer.encode(COT["line"].format(question="2+2?")))
    assert len(r.candidates) == 6 and c.samples == 6 and c.generated_tokens == 60
    # the prompt is computed once for all six samples; each sample's tokens but its last are fed back
    assert c.processed_tokens == prompt + 6 * (10 - 1)
    cfg = tiny.model.cfg
    assert c.flops == pytest.approx(
        cfg.forward_flops(c.processed_tokens, 60, (prompt * prompt / 2 + 54 * (prompt + 10 / 2)) / c.processed_tokens)
    )
    # a second call serves the prompt from the prefix cache (all but its last partial block)
    before = tiny.engine.scheduler.num_computed_tokens
    again = reason(tiny, "2+2?", "adaptive", n=4, wave=2, kind="line", max_tokens=4, chat=False, temperature=5.0)
    assert again.compute.cached_prompt_tokens >= 16
    assert again.compute.processed_tokens == tiny.engine.scheduler.num_computed_tokens - before


def test_flops_by_hand(tiny):
    cfg = tiny.model.cfg  # tiny llama: 2 layers, 4 heads x 16, dim 64, vocab 256, untied
    head, body = 256 * 64, cfg.n_params - 2 * 256 * 64
    assert cfg.forward_flops(10, 3, 20.0) == 2 * body * 10 + 2 * head * 3 + 4 * 2 * 4 * 16 * 20.0 * 10


def test_adaptive_stops_early_when_unanimous_and_not_when_split(tiny):
    unanimous = reason(tiny, "q", "adaptive", n=8, wave=2, kind="line", max_tokens=6, chat=False, temperature=0.0)
    assert unanimous.compute.samples == 4 and len(set(unanimous.answers)) == 1  # 4/4 >= 0.6 after two waves
    split = reason(tiny, "q", "adaptive", n=8, wave=2, kind="line", max_tokens=6, chat=False, temperature=5.0)
    assert split.compute.samples == 8  # random bytes: no answer ever leads


def test_best_of_n_with_a_verifier_and_bad_settings(tiny):
    r = reason(tiny, "q", "best-of-n", n=4, kind="line", max_tokens=5, chat=False, temperature=5.0,
               verifier=lambda a: a == "never")  # fmt: skip
    assert r.scores == [0.0] * 4
    for bad in [dict(strategy="magic"), dict(n=0), dict(n=65), dict(kind="poem"), dict(wave=9, n=4)]:
        with pytest.raises(TrainferError):
            reason(tiny, "q", **{"strategy": "self-consistency", "chat": False, **bad})


def test_best_of_n_judged_by_the_model(tiny):
    r = reason(tiny, "q", "best-of-n", n=4, kind="line", max_tokens=4, chat=False, temperature=5.0, scorer="judge")
    distinct = {a for a in r.answers if a is not None}
    assert r.compute.samples == 4 + len(distinct)  # one one-token judge draw per distinct answer
    assert all(0 <= s <= 1 for s, a in zip(r.scores, r.answers, strict=True) if a is not None)
    assert r.answer == r.answers[max(range(4), key=lambda i: r.scores[i])]
    with pytest.raises(TrainferError, match="scorer"):
        reason(tiny, "q", "best-of-n", n=2, chat=False, scorer="verifier")  # no verifier function given


def test_yes_share():
    from trainfer.reason.strategies import yes_share

    class Words:
        def decode(self, ids):
            return {1: " Yes", 2: "no", 3: "maybe", 4: "YES"}[ids[0]]

    assert yes_share(Words(), [(1, math.log(0.3)), (2, math.log(0.1)), (3, math.log(0.6))]) == pytest.approx(0.75)
    assert yes_share(Words(), [(1, math.log(0.2)), (4, math.log(0.2)), (2, math.log(0.1))]) == pytest.approx(0.8)
    assert yes_share(Words(), [(3, 0.0)]) == 0.5


def test_direct_and_cot_templates_of_a_task_format(tiny):
    before = tiny.engine.scheduler.num_computed_tokens
    r = reason(tiny, "12+34", "greedy", max_tokens=3, chat=False, direct="{question}=", cot="{question}:")
    assert r.compute.prompt_tokens == len("12+34=")  # byte tokens, no BOS
    r = reason(tiny, "12+34", "cot", max_tokens=3, chat=False, direct="{question}=", cot="{question}:")
    assert r.compute.prompt_tokens == len("12+34:") and tiny.engine.scheduler.num_computed_tokens > before


def test_cli_reason(tmp_path):
    import json
    import subprocess
    import sys

    model = make_tiny_model_dir(tmp_path / "m", context=512)
    cmd = [sys.executable, "-m", "trainfer.cli", "reason", str(model), "2+2?", "-n", "3", "--kind", "line",
           "--max-tokens", "5", "--json", "--kv-cache-gb", "0.01"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["strategy"] == "self-consistency" and len(out["candidates"]) == 3 and out["compute"]["samples"] == 3
    bad = subprocess.run(cmd[:-3] + ["-n", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "n must be" in bad.stderr and "Traceback" not in bad.stderr


def test_tasks_are_deterministic_and_their_answers_right():
    from trainfer.reason.tasks import TASKS, make

    for task in TASKS:
        a, b = make(task, 5, seed=1), make(task, 5, seed=1)
        assert a == b and a != make(task, 5, seed=2)
    for p in make("add", 20, digits=3) + make("chain-sum", 20) + make("mul", 20):
        assert str(eval(p.question.removeprefix("What is ").rstrip("?"))) == p.answer  # the generator's own sum
    for p in make("compare", 20):
        x, y = (int(t) for t in p.question.replace("A:", "").replace("B:", "").split()[-2:])
        assert p.answer == ("A" if x > y else "B") and p.kind == "option"
    with pytest.raises(TrainferError, match="unknown task"):
        make("poetry", 1)


@pytest.mark.parametrize(
    "a,b,pad",
    [(1234, 987, "4+7+0=11,3+8+1=12,2+9+1=12,1+0+1=02;2221"), (5, 5, "5+5+0=10;10"), (0, 0, "0+0+0=00;0"),
     (99, 1, "9+1+0=10,9+0+1=10;100")],
)  # fmt: skip
def test_scratchpad_and_its_verifier(a, b, pad):
    from trainfer.reason.tasks import check_pad, scratchpad

    assert scratchpad(a, b) == pad and check_pad(a, b, pad) and check_pad(a, b, pad + "\n")
    assert not check_pad(a, b, pad.rsplit(";", 1)[0] + ";" + str(a + b + 1))  # result not read off the steps
    assert not check_pad(b + 1, a, pad)  # steps are not the question's digits
    assert not check_pad(a, b, pad.split(",", 1)[-1]) or "," not in pad  # a column missing
    assert not check_pad(a, b, "") and not check_pad(a, b, pad.replace(";", ""))


def test_verifier_catches_wrong_sums_and_carries():
    from trainfer.reason.tasks import check_pad

    assert check_pad(58, 67, "8+7+0=15,5+6+1=12;125")
    assert not check_pad(58, 67, "8+7+0=15,5+6+0=11;115")  # carry dropped, consistently read off: still wrong
    assert not check_pad(58, 67, "8+7+0=14,5+6+1=12;124")  # a wrong column sum


def test_add_pad_problems_and_corpus():
    from trainfer.reason.tasks import make, scratchpad, task_format, worked_corpus

    problems = make("add-pad", 50, seed=1, digits=4)
    assert all(p.correct(str(eval(p.question))) and p.verify(scratchpad(*map(int, p.question.split("+"))))
               for p in problems)  # fmt: skip
    held = {p.question for p in problems}
    docs = worked_corpus(3000, 0, digits=(4, 4), exclude=held)
    assert docs == worked_corpus(3000, 0, digits=(4, 4), exclude=held)
    questions = {d.split("=")[0].split(":")[0] for d in docs}
    assert not questions & held and 0.4 < sum(":" in d for d in docs) / len(docs) < 0.6
    for d in docs[:200]:
        q, sep, rest = d.partition(":") if ":" in d else d.partition("=")
        a, b = map(int, q.split("+"))
        assert (rest == scratchpad(a, b)) if sep == ":" else rest == str(a + b)
    assert task_format("add-pad").direct == "{question}=" and task_format("add").cot is None


def test_reasoning_gym_tasks_are_graded_by_their_own_scorer():
    from trainfer.reason.tasks import make

    problems = make("rg:chain_sum", 5, seed=3)
    assert problems == make("rg:chain_sum", 5, seed=3) and all(p.kind == "number" for p in problems)
    assert all(p.correct(p.answer) and not p.correct(p.answer + "1") and not p.correct(None) for p in problems)
    easy = make("rg:chain_sum:max_terms=2,max_digits=1", 20, seed=3)
    assert all(p.question.count(" + ") + p.question.count(" - ") == 1 and abs(int(p.answer)) < 19 for p in easy)
    for bad in ["rg:no_such_task", "rg:chain_sum:max_terms", "rg:chain_sum:colour=3"]:
        with pytest.raises(TrainferError, match="rg:|reasoning-gym cannot make"):
            make(bad, 1)


def test_evaluate_accuracy_and_compute_per_budget(tiny):
    from trainfer.reason.tasks import evaluate

    rows = evaluate(tiny, "add", ["greedy", "self-consistency"], [1, 3], count=3, max_tokens=6)
    assert [(r.strategy, r.budget) for r in rows] == [("greedy", 1), ("self-consistency", 1), ("self-consistency", 3)]
    assert all(0 <= r.accuracy <= 1 for r in rows)
    assert rows[2].samples_per_problem == 3 and rows[2].flops_per_problem > rows[1].flops_per_problem
