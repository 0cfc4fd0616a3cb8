"""Sampling filters against a plain reference on fixed logits, and seeded reproducibility."""

from __future__ import annotations

import pytest
import torch

from trainfer.errors import TrainferError
from trainfer.infer.sampling import SamplingParams, apply_penalties, filter_logits, sample


def reference_keep(logits: list[float], temperature: float, top_k: int, top_p: float) -> set[int]:
    """Which token ids survive, computed the slow obvious way."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = order[:top_k] if top_k else order
    probs = torch.tensor([scaled[i] for i in keep]).softmax(0).tolist()
    kept, mass = [], 0.0
    for i, p in zip(keep, probs, strict=True):
        if mass >= top_p:
            break
        kept.append(i)
        mass += p
    return set(kept)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.5), (1.3, 5, 0.8), (0.5, 0, 0.9)]
)
def test_filters_match_reference(temperature, top_k, top_p):
    logits = [2.0, -1.0, 0.5, 3.0, 0.1, -2.0, 1.5, 0.0]
    out = filter_logits(torch.tensor(logits), temperature, top_k, top_p)
    kept = {i for i, x in enumerate(out.tolist()) if x != float("-inf")}
    assert kept == reference_keep(logits, temperature, top_k, top_p)
    # survivors keep their temperature-scaled values, so relative probabilities are unchanged
    for i in kept:
        assert out[i].item() == pytest.approx(logits[i] / temperature)


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.6])
def test_min_p_matches_reference(min_p):
    logits = [2.0, -1.0, 0.5, 3.0, 0.1, -2.0, 1.5, 0.0]
    probs = torch.tensor(logits).softmax(0).tolist()
    want = {i for i, p in enumerate(probs) if p >= min_p * max(probs)}
    out = filter_logits(torch.tensor(logits), 1.0, 0, 1.0, min_p)
    assert {i for i, x in enumerate(out.tolist()) if x != float("-inf")} == want


def test_penalties_match_reference():
    logits = [1.0, -1.0, 2.0, 0.5, -0.5, 3.0]
    prompt, output = [0, 1], [2, 2, 3, 2]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3)
    want = list(logits)
    for t in set(prompt + output):  # repetition: divide positive, multiply negative, once per seen token
        want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
    for t in set(output):  # OpenAI: frequency per occurrence, presence once
        want[t] -= 0.25 * output.count(t) + 0.5
    got = apply_penalties(torch.tensor(logits), p, torch.tensor(prompt + output), torch.tensor(output))
    assert got.tolist() == pytest.approx(want)


def test_no_penalties_leave_logits_alone():
    logits = torch.tensor([1.0, 2.0, 3.0])
    p = SamplingParams()
    assert not p.uses_penalties
    assert torch.equal(apply_penalties(logits, p, torch.tensor([0, 1]), torch.tensor([1])), logits)


def test_top_p_always_keeps_the_best_token():
    out = filter_logits(torch.tensor([10.0, 0.0, 0.0]), 1.0, 0, 0.01)
    assert out.tolist()[0] == 10.0 and out.isinf().sum() == 2


def test_greedy_and_seeded_sampling():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert sample(logits, SamplingParams(temperature=0), torch.Generator()) == int(logits.argmax())
    p = SamplingParams(temperature=1.0, seed=3)
    a = [sample(logits, p, g) for g in [p.generator()] for _ in range(50)]
    b = [sample(logits, p, g) for g in [p.generator()] for _ in range(50)]
    assert a == b and len(set(a)) > 10  # same seed, same draws; and they really vary


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    p = SamplingParams(temperature=1.0, seed=0)
    g = p.generator()
    counts = torch.bincount(torch.tensor([sample(logits, p, g) for _ in range(4000)]), minlength=3) / 4000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"n": 0}, "n must be"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 17}, "n must be in \\[1, 16\\]"),
        ({"stop": ["x"] * 17}, "at most 16 stop strings"),
        ({"stop": ["x" * 257]}, "1 to 256 characters"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(TrainferError, match=message):
        SamplingParams(**kwargs)


def test_extreme_values_never_make_nan_probabilities():
    logits = torch.tensor([1.0, 3.0, -2.0, 2.9])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams(temperature=1e-40), gen) == 1  # greedy, not inf / 1e-40
    assert sample(logits, SamplingParams(temperature=2e-5), gen) == 1  # just above greedy: one-hot, no NaN
    penalized = apply_penalties(
        logits, SamplingParams(repetition_penalty=1e-40), torch.tensor([0, 3]), torch.tensor([])
    )
    assert torch.isinf(penalized).any()  # 1 / 1e-40 overflows ...
    assert sample(penalized, SamplingParams(temperature=0.7, top_p=0.5), gen) in (0, 3)  # ... and still samples
    with pytest.raises(TrainferError, match="no finite logits"):
        sample(torch.full((4,), float("nan")), SamplingParams(temperature=1.0), gen)


def test_greedy_skips_a_nan_logit_and_fails_only_when_nothing_is_finite():
    gen = torch.Generator().manual_seed(0)
    greedy = SamplingParams(temperature=0)
    assert sample(torch.tensor([float("nan"), 1.0, 5.0, float("nan")]), greedy, gen) == 2
    assert sample(torch.tensor([0.5, 1.0, 5.0, 4.0])[1:], greedy, gen) == 1  # a view: index within the row
    with pytest.raises(TrainferError, match="no finite logits"):
        sample(torch.full((4,), float("nan")), greedy, gen)
