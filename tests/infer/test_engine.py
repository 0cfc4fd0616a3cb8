"""The continuous-batching engine on a tiny random model: batching, chunking, prefix cache, preemption,
forks, seeds, aborts and block accounting."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from tests.conftest import make_hf_model
from trainfer.errors import TrainferError
from trainfer.infer.async_engine import AsyncEngine
from trainfer.infer.engine import ContextLengthError, Engine
from trainfer.infer.sampling import SamplingParams
from trainfer.io.loader import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama", vocab_size=256, max_position_embeddings=512).save_pretrained(path)
    model, _ = load_model(path)
    return model


def engine(model, **kw) -> Engine:
    kw = {"num_blocks": 256, "block_size": 4, "max_num_batched_tokens": 64, **kw}
    return Engine(model, stop_token_ids={2}, **kw)  # token ids only: no tokenizer


def prompts(n: int, seed: int = 0, shared: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(shared or []) + [rng.randrange(3, 256) for _ in range(rng.randrange(1, 90))] for _ in range(n)]


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def tokens(results) -> list[list[int]]:
    return [[e.token_id for e in r[0]] for r in results]


def alone(model, batch: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [tokens(engine(model).run([p], [params]))[0] for p in batch]


def test_engine_greedy_equals_recomputing_everything(tiny):
    prompt = [5, 17, 99, 3, 42, 8, 250, 61]
    got = tokens(engine(tiny).run([prompt], [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)]))[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(tiny(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt) :]


def test_batch_of_16_with_chunked_prefill_equals_each_alone(tiny):
    batch = prompts(16)
    eng = engine(tiny, max_num_batched_tokens=32)  # most prompts need several chunks
    assert tokens(eng.run(batch, [GREEDY] * 16)) == alone(tiny, batch)
    eng.pool.check_idle()


def test_warm_prefix_cache_gives_the_same_tokens_and_skips_work(tiny):
    shared = list(range(10, 60))  # 50 tokens = 12 full blocks of 4
    batch = prompts(6, seed=1, shared=shared)
    eng = engine(tiny)
    cold = tokens(eng.run(batch, [GREEDY] * 6))
    computed = eng.stats()["computed_tokens"]
    warm_results = eng.run(batch, [GREEDY] * 6)
    assert tokens(warm_results) == cold == alone(tiny, batch)
    assert all(r[0][0].cached_prompt_tokens >= 48 for r in warm_results)
    assert eng.stats()["computed_tokens"] - computed < computed  # the second pass did less work
    assert eng.stats()["prefix_cache_hit_rate"] > 0.4
    eng.pool.forget_prefixes()  # cold again: nothing is found, the tokens are the same
    again = eng.run(batch, [GREEDY] * 6)
    assert tokens(again) == cold and again[0][0][0].cached_prompt_tokens == 0  # later ones share within the run
    assert sum(r[0][0].cached_prompt_tokens for r in again) < sum(r[0][0].cached_prompt_tokens for r in warm_results)
    eng.pool.check_idle()


def test_preemption_under_a_small_pool_gives_the_same_tokens(tiny):
    batch = prompts(16, seed=2)
    eng = engine(tiny, num_blocks=40, max_num_batched_tokens=48)  # 160 slots for 16 sequences of ~60
    got = tokens(eng.run(batch, [GREEDY] * 16))
    assert eng.scheduler.num_preemptions > 0
    assert got == alone(tiny, batch)
    eng.pool.check_idle()


def test_decodes_keep_flowing_while_a_long_prompt_prefills(tiny):
    eng = engine(tiny, max_num_batched_tokens=16)
    eng.add_request("short", [7, 8, 9], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    eng.step()  # prefill the short one
    eng.add_request("long", list(range(3, 203)), SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    steps_with_short = 0
    for _ in range(10):  # the 200-token prompt needs 14 steps at 15 tokens each
        events = eng.step()
        steps_with_short += any(e.request_id == "short" for e in events)
        assert not any(e.request_id == "long" for e in events)
    assert steps_with_short == 10


@pytest.mark.parametrize("seed", [0, 1])
def test_seeded_sampling_ignores_batch_composition(tiny, seed):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    target = [9, 8, 7, 6, 5, 4]
    solo = tokens(engine(tiny).run([target], [params]))[0]
    others = prompts(7, seed=seed)
    mixed = engine(tiny).run(
        [*others[:3], target, *others[3:]],
        [SamplingParams(temperature=1.0)] * 3 + [params] + [SamplingParams(temperature=0.7)] * 4,
    )
    assert tokens(mixed)[3] == solo
    assert (
        solo
        != tokens(
            engine(tiny).run(
                [target], [SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=124, ignore_eos=True)]
            )
        )[0]
    )


def test_n_samples_prefill_once_and_differ(tiny):
    eng = engine(tiny)
    prompt = list(range(3, 43))  # 40 tokens
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=4, ignore_eos=True)
    (samples,) = eng.run([prompt], [params])
    assert len(samples) == 4 and all(len(s) == 8 for s in samples)
    assert len({tuple(e.token_id for e in s) for s in samples}) > 1
    # 40 prompt tokens once, then 4 samples x 7 decode steps (each sample's last token is never fed back)
    assert eng.stats()["computed_tokens"] == 40 + 4 * 7
    # sample i is reproducible on its own: same seed, same index
    (again,) = engine(tiny).run([prompt], [params])
    assert [[e.token_id for e in s] for s in again] == [[e.token_id for e in s] for s in samples]
    eng.pool.check_idle()


def test_abort_frees_every_block(tiny):
    eng = engine(tiny)
    batch = prompts(8, seed=3)
    for i, p in enumerate(batch):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, n=2 if i % 2 else 1))
    for _ in range(6):
        eng.step()
    assert eng.pool.usage > 0
    for i in range(8):
        eng.abort(f"r{i}")
    assert not eng.has_unfinished()
    eng.pool.check_idle()


def test_stops_and_limits(tiny):
    eng = engine(tiny)
    greedy = tokens(eng.run([[7, 7, 7]], [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)]))[0]
    stop_at = greedy[3]
    (res,) = eng.run([[7, 7, 7]], [SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at])])
    assert res[0][-1].finish_reason == "stop"
    assert [e.token_id for e in res[0]] == greedy[: greedy.index(stop_at) + 1]
    long_prompt = list(range(3, 253)) + list(range(3, 253))  # 500 of the 512-token context
    (res,) = eng.run([long_prompt], [SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)])
    assert len(res[0]) == 12 and res[0][-1].finish_reason == "length"  # max_tokens=None: to the context end
    with pytest.raises(ContextLengthError, match=r"maximum context length is 512 tokens.*\(500 in the prompt, 50 in"):
        eng.add_request("too-much", long_prompt, SamplingParams(max_tokens=50))
    with pytest.raises(ContextLengthError, match="maximum context length is 512"):
        eng.add_request("too-long", list(range(3, 253)) * 3, GREEDY)
    with pytest.raises(TrainferError, match="empty"):
        eng.add_request("empty", [], GREEDY)
    eng.pool.check_idle()


class EndsAtThird:
    """An output processor stand-in: every sample's third token ends it, as a stop string in its text would."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.ended: list[int] = []

    def start(self, key, params) -> None:
        self.counts[key] = 0

    def token(self, key, token_id, finish_reason):
        self.counts[key] += 1
        return f"<{token_id}>", "stop" if self.counts[key] == 3 else finish_reason

    def end(self, key) -> None:
        self.ended.append(key)


def test_an_output_processor_ends_samples_and_hears_of_every_end(tiny):
    out = EndsAtThird()
    eng = Engine(tiny, output=out, num_blocks=256, block_size=4, max_num_batched_tokens=64)
    res = eng.run(prompts(4, seed=5), SamplingParams(max_tokens=10, temperature=0.8, ignore_eos=True, n=2, seed=1))
    for sample in (s for r in res for s in r):
        assert [e.finish_reason for e in sample] == [None, None, "stop"]
        assert [e.text for e in sample] == [f"<{e.token_id}>" for e in sample]
    assert sorted(out.ended) == sorted(out.counts) and len(out.counts) == 8  # one start and one end per sample
    assert not eng.requests
    eng.pool.check_idle()


def test_logprobs_are_the_model_distribution(tiny):
    eng = engine(tiny)
    prompt = [11, 22, 33]
    (res,) = eng.run([prompt], [SamplingParams(max_tokens=1, temperature=0, logprobs=3, ignore_eos=True)])
    e = res[0][0]
    with torch.no_grad():
        want = tiny(torch.tensor([prompt]))[0, -1].log_softmax(-1)
    assert e.logprob == pytest.approx(float(want.max()), abs=1e-4)
    assert [t for t, _ in e.top_logprobs] == want.topk(3).indices.tolist()


def test_async_engine_streams_and_aborts_departed_readers(tiny):
    eng = engine(tiny)
    front = AsyncEngine(eng)

    async def read(rid, prompt, params, limit=None):
        out = []
        async for e in front.generate(rid, prompt, params):
            out.append(e.token_id)
            if limit and len(out) >= limit:
                break  # the reader leaves: the engine must abort the request
        return out

    async def main():
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        return await asyncio.gather(read("a", [5, 6, 7], GREEDY), read("b", [8, 9], long, limit=3))

    try:
        a, b = asyncio.run(main())
        assert a == alone(tiny, [[5, 6, 7]])[0] and len(b) == 3
        for _ in range(50):  # the engine thread notices the abort within a step
            if not eng.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.01))
        assert not eng.has_unfinished()
        eng.pool.check_idle()
    finally:
        front.shutdown()


# ---- hardening: one sequence's trouble stays its own ---------------------------------------------


def test_extreme_but_valid_sampling_values_run_beside_others(tiny):
    """A temperature or repetition penalty of 1e-40 used to make NaN probabilities and fail the whole step."""
    batch = prompts(4, seed=7)
    extreme = [
        SamplingParams(max_tokens=12, temperature=1e-40, ignore_eos=True, seed=1),
        SamplingParams(max_tokens=12, temperature=0.8, repetition_penalty=1e-40, ignore_eos=True, seed=2),
        SamplingParams(max_tokens=12, temperature=1.0, repetition_penalty=1e30, ignore_eos=True, seed=3),
        GREEDY,
    ]
    results = engine(tiny).run(batch, extreme)
    assert all(r[0][-1].finish_reason == "length" and len(r[0]) == 12 for r in results)
    assert tokens(results)[0] == alone(tiny, batch[:1])[0]  # a tiny temperature is greedy
    assert tokens(results)[3] == alone(tiny, batch[3:])[0]


def test_seeds_near_the_top_of_the_range_and_per_sample_streams(tiny):
    prompt = [4, 5, 6, 7]

    def draw(seed, n):
        params = SamplingParams(max_tokens=10, temperature=1.0, seed=seed, n=n, ignore_eos=True)
        return [[e.token_id for e in s] for s in engine(tiny).run([prompt], [params])[0]]

    top = draw(2**64 - 1, 3)  # seed + index used to overflow inside the step
    assert len(top) == 3 and all(len(s) == 10 for s in top)
    assert draw(-(2**63), 2)[0] == draw(-(2**63), 1)[0]
    assert draw(100, 2)[1] != draw(101, 1)[0]  # sample 1 of seed s is not sample 0 of seed s + 1
    with pytest.raises(TrainferError, match="seed must be in"):
        SamplingParams(seed=2**64)


def test_a_failing_sample_fails_only_its_sequence(tiny, monkeypatch):
    import trainfer.infer.engine as engine_module

    batch = prompts(3, seed=8)
    want = alone(tiny, batch)
    poisoned = SamplingParams(max_tokens=12, temperature=0.5, top_k=13, ignore_eos=True)
    real_sample = engine_module.sample

    def sample(logits, params, generator, draft=None, draft_probs=None):
        if params.top_k == 13:
            raise RuntimeError("boom")
        return real_sample(logits, params, generator, draft, draft_probs)

    monkeypatch.setattr(engine_module, "sample", sample)
    eng = engine(tiny)
    results = eng.run(batch + [batch[0]], [GREEDY] * 3 + [poisoned])
    assert tokens(results[:3]) == want
    (failed,) = results[3]
    assert failed[0].finish_reason == "error" and "boom" in failed[0].error
    eng.pool.check_idle()


def test_a_forward_that_raises_is_retried_per_sequence(tiny, monkeypatch):
    eng = engine(tiny)
    batch = prompts(3, seed=9)
    want = alone(tiny, batch)
    real_run = eng.runner.run

    def run(batch_, rows):
        if any(seq.request_id == "bad" for seq, _ in batch_):
            raise RuntimeError("kernel failed")
        return real_run(batch_, rows)

    monkeypatch.setattr(eng.runner, "run", run)
    for i, p in enumerate(batch):
        eng.add_request(f"ok{i}", p, GREEDY)
    eng.add_request("bad", batch[0], GREEDY)
    out: dict[str, list] = {}
    while eng.has_unfinished():
        for e in eng.step():
            out.setdefault(e.request_id, []).append(e)
    assert [[e.token_id for e in out[f"ok{i}"]] for i in range(3)] == want
    assert [e.finish_reason for e in out["bad"]] == ["error"] and "kernel failed" in out["bad"][0].error
    eng.pool.check_idle()


def test_forks_respect_max_num_seqs_and_a_full_pool(tiny):
    prompt = list(range(3, 21))  # 18 tokens: 4 full blocks of 4 and a partial one
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=4, ignore_eos=True)
    (want,) = engine(tiny).run([prompt], [params])
    eng = engine(tiny, max_num_seqs=2)
    eng.add_request("r", prompt, params)
    got: list[list[int]] = [[] for _ in range(4)]
    while eng.has_unfinished():
        for e in eng.step():
            got[e.index].append(e.token_id)
        assert len(eng.scheduler.running) <= 2
    assert got == [[e.token_id for e in s] for s in want]
    # No block free for the copy of the partial block: the children wait and recompute, same tokens.
    eng = engine(tiny, num_blocks=5)
    (tight,) = eng.run([prompt], [SamplingParams(max_tokens=1, temperature=1.0, seed=11, n=4, ignore_eos=True)])
    assert [s[0].token_id for s in tight] == [s[0].token_id for s in want]
    eng.pool.check_idle()


def test_penalties_in_the_engine_equal_a_plain_loop(tiny):
    prompt = [5, 5, 9, 12, 5, 40]
    params = SamplingParams(
        max_tokens=15,
        temperature=0,
        presence_penalty=1.5,
        frequency_penalty=0.7,
        repetition_penalty=1.8,
        ignore_eos=True,
    )
    got = tokens(engine(tiny).run([prompt], [params]))[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(15):
            logits = tiny(torch.tensor([ids]))[0, -1].tolist()
            out = ids[len(prompt) :]
            for t in set(ids):
                logits[t] = logits[t] / 1.8 if logits[t] > 0 else logits[t] * 1.8
            for t in set(out):
                logits[t] -= 0.7 * out.count(t) + 1.5
            ids.append(max(range(len(logits)), key=logits.__getitem__))
    assert got == ids[len(prompt) :]
    assert got != alone(tiny, [prompt], SamplingParams(max_tokens=15, temperature=0, ignore_eos=True))[0]


def test_prompt_logprobs_score_every_prompt_token(tiny):
    prompt = list(range(30, 100))  # 70 tokens: two chunks at a budget of 64
    with torch.no_grad():
        logp = tiny(torch.tensor([prompt]))[0].log_softmax(-1)
    want = [float(logp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    eng = engine(tiny)
    eng.run([prompt], [GREEDY])  # warm the prefix cache: scoring must still compute every position
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2, n=2, seed=0)
    (samples,) = eng.run([prompt], [params])
    for s in samples:
        scored = s[0].prompt_logprobs
        assert [lp for lp, _ in scored] == pytest.approx(want, abs=1e-4)
        assert [t for t, _ in scored[5][1]] == logp[5].topk(2).indices.tolist()
    eng.pool.check_idle()


def test_block_hashes_are_a_sha256_chain():
    import hashlib
    from array import array

    from trainfer.infer.kv_cache import block_hash

    first = block_hash(None, [1, 2, 3, 4])
    assert first == hashlib.sha256(array("q", [1, 2, 3, 4]).tobytes()).digest()
    assert block_hash(first, [5, 6, 7, 8]) == hashlib.sha256(first + array("q", [5, 6, 7, 8]).tobytes()).digest()
    assert block_hash(first, [5, 6, 7, 8]) != block_hash(block_hash(None, [1, 2, 3, 5]), [5, 6, 7, 8])


def test_a_users_context_cap_limits_the_engine_not_the_model(tiny):
    eng = engine(tiny, max_model_len=32)
    assert eng.max_model_len == 32 and tiny.cfg.max_seq_len == 512
    with pytest.raises(ContextLengthError, match="maximum context length is 32 tokens"):
        eng.add_request("long", list(range(3, 30)), SamplingParams(max_tokens=8))
    (res,) = eng.run([list(range(3, 30))], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))
    assert len(res[0]) == 32 - 27 and res[0][-1].finish_reason == "length"  # to the cap, not the model's 512
