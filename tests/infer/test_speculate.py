"""Speculative decoding with n-gram drafts: the lookup, greedy output identical to plain decoding, the rejection
rule's distribution, and the engine's bookkeeping (blocks, budgets, preemption, stops) with guesses in flight."""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chisquare

from tests.conftest import make_hf_model
from trainfer.errors import TrainferError
from trainfer.infer.engine import Engine
from trainfer.infer.sampling import SamplingParams, filter_logits, sample
from trainfer.infer.speculate import ngram_draft
from trainfer.io.loader import load_model
from trainfer.quant.blocks import KINDS
from trainfer.quant.native import extension


def test_ngram_draft_takes_the_longest_suffix_and_its_latest_occurrence():
    assert ngram_draft([1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 5, 2, 3], k=3) == [7, 7, 5]  # "2 3": latest is at 6
    assert ngram_draft([1, 2, 3, 4, 8, 2, 3, 5, 1, 2, 3], k=2) == [4, 8]  # "1 2 3" beats the later "2 3"
    assert ngram_draft([4, 5, 6, 4, 5], k=10) == [6, 4, 5]  # runs to the end of the text
    assert ngram_draft([4, 5, 6, 4], k=3) == []  # a one-token match is too weak by default
    assert ngram_draft([4, 5, 6, 4], k=3, min_ngram=1) == [5, 6, 4]
    assert ngram_draft([1, 2, 3, 4], k=3) == []  # nothing repeats
    assert ngram_draft([1, 2, 1, 2], k=0) == [] and ngram_draft([7], k=3) == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama", vocab_size=64, max_position_embeddings=512).save_pretrained(path)
    return load_model(path)[0]


def engine(model, **kw) -> Engine:
    kw = {"num_blocks": 256, "block_size": 4, "max_num_batched_tokens": 64, **kw}
    return Engine(model, stop_token_ids={2}, **kw)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 64) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


def tokens(results) -> list[list[int]]:
    return [[e.token_id for e in sample] for r in results for sample in r]


GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_greedy_is_the_same_tokens_as_plain_decoding(tiny, k):
    batch = prompts(6)
    plain = tokens(engine(tiny).run(batch, GREEDY))
    spec = engine(tiny, draft="ngram", num_draft_tokens=k)
    got = [tokens(spec.run([p], GREEDY))[0] for p in batch]  # one stream at a time: speculation on
    assert got == plain
    stats = spec.stats()
    assert stats["draft_tokens"] > 50 and 0 < stats["draft_acceptance"] <= 1  # it did guess, and guess right
    assert stats["tokens_per_verify_forward"] > 1
    spec.pool.check_idle()


def test_batched_streams_with_guesses_match_and_free_every_block(tiny):
    batch = prompts(8, seed=1)
    plain = tokens(engine(tiny).run(batch, GREEDY))
    spec = engine(tiny, draft="ngram", speculate_max_seqs=8, max_num_batched_tokens=24)  # guesses cut short too
    assert tokens(spec.run(batch, GREEDY)) == plain
    assert spec.stats()["draft_tokens"] > 0
    spec.pool.check_idle()


def test_preemption_drops_guesses_and_recomputes_the_same_tokens(tiny):
    batch = prompts(4, seed=2)
    plain = tokens(engine(tiny).run(batch, GREEDY))
    spec = engine(tiny, draft="ngram", speculate_max_seqs=4, num_blocks=40)  # too few blocks for all four
    assert tokens(spec.run(batch, GREEDY)) == plain
    assert spec.scheduler.num_preemptions > 0
    spec.pool.check_idle()


def test_max_tokens_stop_tokens_and_logprobs_hold_with_guesses(tiny):
    spec = engine(tiny, draft="ngram", num_draft_tokens=8)
    for max_tokens in (1, 2, 5, 17):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=2)
        events = spec.run(prompts(1, seed=3), params)[0][0]
        assert len(events) == max_tokens and events[-1].finish_reason == "length"
        assert all(e.logprob is not None and len(e.top_logprobs) == 2 for e in events)
    plain = tokens(engine(tiny).run(prompts(1, seed=3), GREEDY))[0]
    stop = plain[10]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    got = tokens(spec.run(prompts(1, seed=3), params))[0]
    assert got == plain[: plain.index(stop) + 1]


def test_the_prefix_cache_holds_only_checked_tokens(tiny):
    """A block published while guesses were in flight must hold the tokens that were kept: a later prompt
    equal to the output reuses those blocks and must continue exactly as a cold run would."""
    spec = engine(tiny, draft="ngram")
    prompt = prompts(1, seed=4)[0]
    out = tokens(spec.run([prompt], GREEDY))[0]
    follow = prompt + out
    warm = tokens(spec.run([follow], GREEDY))[0]
    assert spec.pool.prefix_hits > 0
    assert warm == tokens(engine(tiny).run([follow], GREEDY))[0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
    ],
)
def test_the_rejection_rule_keeps_the_distribution(params):
    """Whatever is guessed (likely, unlikely or filtered out), the token drawn is distributed as p."""
    logits = torch.randn(12, generator=torch.Generator().manual_seed(0)) * 2
    p = filter_logits(logits - logits.max(), params.temperature, params.top_k, params.top_p).softmax(-1)
    gen = torch.Generator().manual_seed(1)
    n = 6000
    for guess in (int(p.argmax()), int(p.argmin()), 7):
        counts = torch.bincount(torch.tensor([sample(logits, params, gen, guess) for _ in range(n)]), minlength=12)
        keep = p > 0
        assert counts[~keep].sum() == 0
        expected = p[keep].double() / p[keep].double().sum() * n
        assert chisquare(counts[keep].double().numpy(), expected.numpy()).pvalue > 1e-3


def test_greedy_accepts_exactly_the_argmax():
    logits = torch.tensor([0.1, 3.0, 2.0])
    greedy = SamplingParams(temperature=0)
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, greedy, gen, 1) == 1 and sample(logits, greedy, gen, 2) == 1


def test_sampled_output_is_reproducible_for_a_seed(tiny):
    params = SamplingParams(max_tokens=30, temperature=0.8, seed=5, ignore_eos=True)
    runs = [tokens(engine(tiny, draft="ngram").run(prompts(2, seed=6), params)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_bad_settings_are_refused(tiny):
    with pytest.raises(TrainferError, match="unknown draft"):
        engine(tiny, draft="eagle")
    with pytest.raises(TrainferError, match="num_draft_tokens"):
        engine(tiny, draft="ngram", num_draft_tokens=0)


EDIT = (
    "Rewrite this Python function with the variable `total` renamed to `acc`. Output only the code.\n\n"
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"
)


@pytest.mark.real
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_greedy_on_smollm2_is_the_same_tokens_with_and_without_guesses(smollm2_path, dtype):
    """The quantized native step checks several rows at once; with guesses it keeps the products of a lone
    decode step, so the tokens match those of plain decoding exactly (bf16 products would not)."""
    from trainfer import LLM

    llm = LLM.load(smollm2_path, dtype=dtype, kv_cache_gb=0.1)
    ids = llm.chat_prompt([{"role": "user", "content": EDIT}])
    params = SamplingParams(max_tokens=64, temperature=0, logprobs=0)
    plain = llm.engine.run([ids], params)[0][0]
    # the cache type LLM.load gave llm.engine
    spec = Engine(llm.model, stop_token_ids=llm.tokenizer.stop_token_ids, draft="ngram", num_draft_tokens=5,
                  kv_cache_gb=0.1, kv_dtype="fp16")  # fmt: skip
    got = spec.run([ids], params)[0][0]
    assert [e.token_id for e in got] == [e.token_id for e in plain]
    # the same arithmetic, not only the same argmax (a near-tie would show a drift only now and then); on AVX2 one
    # and two rows take loops of their own (int8's rows_q8, int4's split input), whose sums differ from the tiles'
    # in the last bits: 1.7e-4 (int8) and 4.7e-4 (int4) measured there
    avx2_rows = extension() is not None and extension().split_input(KINDS["int4"], 1, 576)
    tol = 1e-3 if avx2_rows else 1e-4
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, plain, strict=True)) < tol
    assert spec.stats()["draft_acceptance"] > 0.3  # the answer copies its input: most guesses hold
