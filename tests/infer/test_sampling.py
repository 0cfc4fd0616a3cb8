"""Sampling filters against a plain reference on fixed logits, and seeded reproducibility."""

from __future__ import annotations

import pytest
import torch

from trainfer.errors import TrainferError
from trainfer.infer.sampling import SamplingParams, filter_logits, sample


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
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(TrainferError, match=message):
        SamplingParams(**kwargs)
