"""The continuous-batching engine on a tiny random model: batching, chunking, prefix cache, preemption,
forks, seeds, aborts and block accounting."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from tests.conftest import make_hf_model
from trainfer.errors import TrainferError
from trainfer.infer.engine import AsyncEngine, Engine
from trainfer.infer.sampling import SamplingParams
from trainfer.io.loader import load_model


class ByteTokenizer:
    """Stand-in tokenizer over raw bytes so the tiny random model can stream text."""

    stop_token_ids = {2}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama", vocab_size=256, max_position_embeddings=512).save_pretrained(path)
    model, _ = load_model(path)
    return model


def engine(model, **kw) -> Engine:
    kw = {"num_blocks": 256, "block_size": 4, "max_num_batched_tokens": 64, **kw}
    return Engine(model, ByteTokenizer(), **kw)


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
    (res,) = eng.run([long_prompt], [SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)])
    assert len(res[0]) == 12 and res[0][-1].finish_reason == "length"
    with pytest.raises(TrainferError, match="context holds 512"):
        eng.add_request("too-long", list(range(3, 253)) * 3, GREEDY)
    with pytest.raises(TrainferError, match="empty"):
        eng.add_request("empty", [], GREEDY)
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
