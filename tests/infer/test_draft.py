"""Speculation with a draft model: greedy output identical to plain decoding, sampled output distributed as
without (a chi-square against the exact distribution, penalties and filters on), the draft's K/V rolled back
after a rejection, the adaptive number of guesses, pauses below break-even, and a broken draft costing only its
guesses."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

from tests.conftest import make_hf_model
from trainfer.errors import TrainferError
from trainfer.infer.draft import DraftModel
from trainfer.infer.engine import Engine
from trainfer.infer.sampling import SamplingParams, apply_penalties, probabilities, sample
from trainfer.io.loader import load_model

VOCAB = 64


def tiny_model(path, seed: int, **kw):
    kw = {"vocab_size": VOCAB, "max_position_embeddings": 512, **kw}
    make_hf_model("llama", seed=seed, **kw).save_pretrained(path)
    return load_model(path)[0]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("target"), seed=0)


@pytest.fixture(scope="module")
def near(tmp_path_factory, target):
    """A draft that mostly agrees with the target: its weights plus noise (guesses both kept and rejected)."""
    model = tiny_model(tmp_path_factory.mktemp("near"), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std())
    return model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A draft of another shape (one narrow layer): only the vocabulary must match."""
    return tiny_model(tmp_path_factory.mktemp("small"), seed=3, hidden_size=32, num_hidden_layers=1)


def engine(model, pauses: bool = False, **kw) -> Engine:
    """An engine on tiny models; with a draft, it guesses every step unless `pauses` (the break-even pause of
    a same-size draft would stop most guesses these tests check)."""
    kw = {"num_blocks": 256, "block_size": 4, "max_num_batched_tokens": 64, **kw}
    e = Engine(model, stop_token_ids={2}, **kw)
    if e.drafter is not None and not pauses:
        e.drafter.min_rate = 0.0
    return e


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


def tokens(results) -> list[list[int]]:
    return [[e.token_id for e in sample] for r in results for sample in r]


GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("draft", ["near", "small", "target"])
def test_greedy_is_the_same_tokens_as_plain_decoding(target, near, small, draft):
    model = {"near": near, "small": small, "target": target}[draft]
    batch = prompts(6)
    plain = tokens(engine(target).run(batch, GREEDY))
    spec = engine(target, draft=model, num_draft_tokens=4)
    assert [tokens(spec.run([p], GREEDY))[0] for p in batch] == plain  # one stream at a time: speculation on
    stats = spec.stats()
    assert stats["draft_tokens"] > 100
    if draft == "target":  # the model guessing for itself is always right
        assert stats["draft_acceptance"] == 1.0 and stats["tokens_per_verify_forward"] == pytest.approx(5, abs=0.3)
    elif draft == "near":
        assert 0.2 < stats["draft_acceptance"] < 1.0  # both branches of the check ran
    spec.pool.check_idle()
    spec.drafter.pool.check_idle()


def test_batched_streams_preemption_and_short_budgets_match(target, near):
    batch = prompts(8, seed=1)
    plain = tokens(engine(target).run(batch, GREEDY))
    spec = engine(target, draft=near, speculate_max_seqs=8, max_num_batched_tokens=24, num_blocks=60)
    assert tokens(spec.run(batch, GREEDY)) == plain
    assert spec.stats()["draft_tokens"] > 0 and spec.scheduler.num_preemptions > 0
    spec.pool.check_idle()
    spec.drafter.pool.check_idle()


def test_logprobs_n_stop_tokens_and_the_prefix_cache_match_plain_decoding(target, near):
    """A request with n = 2 samples, logprobs and a stop token, run twice (the second time its prompt blocks
    come from the target's prefix cache, the draft computing its own): events as without speculation."""
    prompt = prompts(1, seed=11)[0] * 3  # whole blocks to share
    params = SamplingParams(max_tokens=30, temperature=0, n=2, logprobs=3, stop_token_ids=[7])

    def events(e: Engine) -> list:
        return [[(x.token_id, round(x.logprob, 4), [t for t, _ in x.top_logprobs], x.finish_reason) for x in sample]
                for _ in range(2) for sample in e.run([prompt], params)[0]]  # fmt: skip

    spec = engine(target, draft=near, num_draft_tokens=3)
    assert events(spec) == events(engine(target))
    assert spec.pool.prefix_hits > 0 and spec.draft_tokens > 20
    spec.pool.check_idle()
    spec.drafter.pool.check_idle()


def test_guesses_after_a_rollback_equal_a_fresh_drafts(target, near):
    """After a rejection the draft's K/V for the rejected guesses must not be reused: each step's guesses equal
    those of a new draft that reads the same tokens from scratch."""
    spec = engine(target, draft=near, num_draft_tokens=4)
    real, compared = spec.drafter.propose, []

    def propose(items):
        copies = [(replace(s, seq_id=-1, token_ids=list(s.token_ids), draft_probs=[]), room) for s, room in items]
        rejected_before = spec.accepted_tokens < spec.draft_tokens
        real(items)
        for (copy, _), (seq, _) in zip(copies, items, strict=True):
            fresh = DraftModel(near, 4, 1, 512, 4, torch.float32)
            fresh.propose([(copy, seq.drafts)])
            assert copy.token_ids == seq.token_ids
            compared.append(rejected_before)

    spec.drafter.propose = propose
    for prompt in prompts(3, seed=5):
        spec.run([prompt], GREEDY)
    assert sum(compared) > 10


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5, top_p=0.9)]
)
def test_the_rule_with_the_drafts_distribution_keeps_the_target_distribution(params):
    """Guesses drawn from q (uniform, peaked where p is not, close to p), checked with q: tokens follow p."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, generator=gen) * 2
    p = probabilities(logits, params)
    near = probabilities(logits + torch.randn(12, generator=gen) * 0.5, params)
    for q in (torch.full((12,), 1 / 12), torch.softmax(-logits * 2, -1), near):
        n = 20000
        guesses = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
        got = torch.tensor([sample(logits, params, gen, g, q) for g in guesses])
        counts = torch.bincount(got, minlength=12).double()
        keep = p > 0
        assert counts[~keep].sum() == 0
        expected = p[keep].double() / p[keep].double().sum() * n
        assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-3


def exact_distributions(model, prompt: list[int], params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's exact distributions of the first and second sampled tokens, penalties and filters applied."""

    def dist(ids: list[int], out: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1].float()
        return probabilities(apply_penalties(logits, params, torch.tensor(ids), torch.tensor(out)), params)

    first = dist(prompt, [])
    second = sum(first[t] * dist([*prompt, t], [t]) for t in range(VOCAB) if first[t] > 0)
    return first, second


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True),
        SamplingParams(max_tokens=3, temperature=0.8, top_k=12, repetition_penalty=1.3, ignore_eos=True),
    ],
)
def test_sampled_output_keeps_the_target_distribution(tmp_path, params):
    """The second token is a draft's guess, kept or replaced by the rejection rule with the draft's q: over many
    seeds it must follow the target's own distribution, not the draft's. Both models' heads are scaled up: a
    tiny random model's distribution is nearly uniform, where any rule would pass."""
    target, draft = tiny_model(tmp_path / "t", seed=0), tiny_model(tmp_path / "d", seed=4)
    with torch.no_grad():
        target.lm_head.weight.mul_(60)
        draft.lm_head.weight.mul_(60)
    prompt = prompts(1, seed=7)[0]
    _, second = exact_distributions(target, prompt, params)
    _, draft_second = exact_distributions(draft, prompt, params)
    assert (second - draft_second).abs().sum() > 0.5  # the draft is wrong enough for the test to mean something
    assert second.max() > 0.1  # and the target far from uniform
    spec = engine(target, draft=draft, num_draft_tokens=1, speculate_max_seqs=64, num_blocks=1024)
    n, got = 3000, []
    for first in range(0, n, 250):
        batch = [SamplingParams(**{**params.__dict__, "seed": first + i}) for i in range(250)]
        got += [r[0][1].token_id for r in spec.run([prompt] * 250, batch)]
    assert spec.stats()["draft_tokens"] >= n
    counts = torch.bincount(torch.tensor(got), minlength=VOCAB).double()
    expected = second.double() / second.double().sum() * n
    big = expected >= 5  # rare tokens share one bin, so every bin expects enough draws for the test
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_sampled_output_is_reproducible_for_a_seed(target, near):
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=5, ignore_eos=True)
    runs = [tokens(engine(target, draft=near).run(prompts(2, seed=6), params)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_the_number_of_guesses_adapts(target, near, small):
    """A draft that is always right grows to num_draft_tokens; one that is mostly wrong shrinks to 1."""
    for model, want in ((target, 6), (small, 1)):
        spec = engine(target, draft=model, num_draft_tokens=6)
        spec.add_request("r", prompts(1, seed=8)[0], GREEDY)
        ks = []
        while spec.has_unfinished():
            spec.step()
            ks += [m.k for m in spec.drafter.mirrors.values()]
        assert max(set(ks), key=ks.count) == want
        # the per-position counters add up to the totals; a later position is reached only past an earlier one
        assert sum(spec.guessed_at) == spec.draft_tokens and sum(spec.kept_at) == spec.accepted_tokens
        assert spec.guessed_at == sorted(spec.guessed_at, reverse=True)
        assert all(k <= g for k, g in zip(spec.kept_at, spec.guessed_at, strict=True))
        if want == 6:  # the target as its own draft: every guess at every position kept
            assert spec.kept_at == spec.guessed_at and spec.guessed_at[5] > 0
        else:  # it started at 6 guesses and shrank: the 6th position is reached rarely
            assert spec.guessed_at[5] < spec.guessed_at[0] / 4


def test_a_draft_below_break_even_pauses_with_growing_pauses(target, near, small):
    """The small draft (mostly wrong, and cheap: a low break-even bar) pauses its guesses, longer each
    time; the target guessing for itself never does. The tokens stay the plain ones."""
    batch = prompts(1, seed=9)
    params = replace(GREEDY, max_tokens=300)
    plain = tokens(engine(target).run(batch, params))
    for model, pausing in ((small, True), (target, False)):
        spec = engine(target, draft=model, pauses=True, num_draft_tokens=3)
        spec.add_request("r", batch[0], params)
        paused, backoffs, out = 0, set(), []
        while spec.has_unfinished():
            out += [e.token_id for e in spec.step()]
            for m in spec.drafter.mirrors.values():
                paused += m.pause > 0
                backoffs.add(m.backoff)
        assert [out] == plain
        assert (paused > 200) == pausing and (max(backoffs) >= 128) == pausing, (paused, backoffs)
        assert spec.drafter.min_rate == pytest.approx(min(0.9, model.cfg.matmul_params / target.cfg.matmul_params
                                                          + 0.15))  # fmt: skip


def test_a_failing_draft_costs_its_guesses_not_the_request(target, near, monkeypatch):
    spec = engine(target, draft=near)

    def broken(*args, **kwargs):
        raise RuntimeError("draft forward failed")

    monkeypatch.setattr(spec.drafter.runner, "run", broken)
    assert tokens(spec.run(prompts(2, seed=9), GREEDY)) == tokens(engine(target).run(prompts(2, seed=9), GREEDY))
    assert spec.drafter.failures > 0
    spec.pool.check_idle()


def test_a_draft_with_another_vocabulary_is_refused(target, tmp_path):
    other = tiny_model(tmp_path, seed=0, vocab_size=80)
    with pytest.raises(TrainferError, match="share the model's tokenizer"):
        engine(target, draft=other)
