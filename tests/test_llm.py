"""The real SmolLM2-135M-Instruct: trainfer against transformers reading the same GGUF."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real

VARIED = (
    "In 1492, Columbus sailed the ocean blue. "
    "def add(a, b):\n    return a + b\n"
    "Photosynthesis converts light energy into chemical energy stored in glucose. "
    "Le chat est sur la table, et il dort profondément. "
    "The mitochondria is the powerhouse of the cell; ATP synthase spins like a motor. "
    "Q: What is 17 * 23? A: 391. "
    "🌍 Climate, economics and history intertwine in surprising ways. "
) * 3


def test_logits_match_transformers_over_hundreds_of_tokens(smollm2, hf_smollm2):
    ref, _ = hf_smollm2
    ids = smollm2.tokenizer.encode(VARIED)
    assert len(ids) > 300
    x = torch.tensor([ids])
    with torch.no_grad():
        want = ref(x).logits[0]
        got = smollm2.model(x)[0]
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() < 1e-3


def _hf_greedy(ref, ids: list[int], n: int) -> list[int]:
    out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_greedy_raw_prompt_matches_transformers(smollm2, hf_smollm2):
    ref, _ = hf_smollm2
    prompt = "The three most important inventions of the industrial revolution were"
    ids = smollm2.tokenizer.encode(prompt)
    want = _hf_greedy(ref, ids, 32)
    events = list(smollm2.stream(ids, max_tokens=32, temperature=0, ignore_eos=True))
    assert [e.token_id for e in events] == want
    assert events[-1].finish_reason == "length"
    # Streamed text is the decode of the ids with special tokens left out (as vLLM does by default).
    assert "".join(e.text for e in events) == smollm2.tokenizer.decode(want, skip_special_tokens=True)


def test_greedy_chat_matches_transformers(smollm2, hf_smollm2):
    ref, _ = hf_smollm2
    messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    ids = smollm2.chat_prompt(messages)
    want = _hf_greedy(ref, ids, 32)
    events = list(smollm2.chat_stream(messages, max_tokens=32, temperature=0, ignore_eos=True))
    assert [e.token_id for e in events] == want
    done = smollm2.chat(messages, max_tokens=200, temperature=0)
    assert done.finish_reason == "stop"  # the model ends its turn with <|im_end|>
    assert done.text.startswith(smollm2.tokenizer.decode(want[:8]))
    assert "<|im_end|>" not in done.text


def test_chat_answers_a_factual_question(smollm2):
    reply = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=30)
    assert "Paris" in reply.text
    assert reply.ttft_s > 0 and reply.decode_tokens_per_s > 0


def test_seeded_sampling_is_reproducible(smollm2):
    a = smollm2.generate("Once upon a time", max_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    b = smollm2.generate("Once upon a time", max_tokens=20, temperature=0.9, top_p=0.95, seed=7)
    c = smollm2.generate("Once upon a time", max_tokens=20, temperature=0.9, top_p=0.95, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_bf16_greedy_stays_on_the_fp32_track(smollm2_path, smollm2):
    from trainfer import LLM

    llm16 = LLM.load("smollm2-135m-instruct", dtype="bfloat16")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert "Paris" in llm16.chat(messages, temperature=0, max_tokens=20).text


def test_hf_export_of_the_real_model_loads_in_transformers(smollm2, tmp_path):
    import transformers

    from trainfer.io.loader import export_hf

    export_hf("smollm2-135m-instruct", tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = smollm2.tokenizer.encode(VARIED[:400])
    assert tok.encode(VARIED[:400], add_special_tokens=False) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits[0], smollm2.model(x)[0], rtol=1e-4, atol=1e-4)
    chat = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    ) == smollm2.tokenizer.apply_chat_template(chat)


def test_batched_greedy_matches_transformers(smollm2, hf_smollm2):
    ref, _ = hf_smollm2
    texts = ["The Eiffel Tower is", "List of prime numbers: 2, 3, 5,", VARIED[:300], "import numpy as np\n"]
    prompts = [smollm2.tokenizer.encode(t) for t in texts]
    want = [_hf_greedy(ref, p, 24) for p in prompts]
    got = smollm2.complete(prompts, max_tokens=24, temperature=0, ignore_eos=True)
    assert [c.token_ids for c in got] == want


def test_prefix_cache_serves_a_repeated_system_prompt(smollm2):
    system = {"role": "system", "content": "You are a concise assistant. " * 20}
    first = smollm2.chat([system, {"role": "user", "content": "Name a fruit."}], temperature=0, max_tokens=8)
    second = smollm2.chat([system, {"role": "user", "content": "Name a color."}], temperature=0, max_tokens=8)
    assert first.cached_prompt_tokens == 0 or first.cached_prompt_tokens < second.cached_prompt_tokens
    assert second.cached_prompt_tokens >= 0.8 * second.prompt_tokens - 16


def test_run_queued_gives_engine_run_results_in_groups(smollm2, monkeypatch, capsys):
    """A dataset job in groups of QUEUED sequences: the same results, in order, as one engine.run."""
    from trainfer import llm as llm_module
    from trainfer.infer.sampling import SamplingParams

    monkeypatch.setattr(llm_module, "QUEUED", 4)  # n=2 samples each: two prompts a group, three groups
    prompts = [smollm2.tokenizer.encode(f"Count to {i}:") for i in range(5)]
    params = [SamplingParams(n=2, max_tokens=4, temperature=0.8, seed=i) for i in range(5)]
    got = smollm2.run_queued(prompts, params, "done")
    want = smollm2.engine.run(prompts, params)
    assert [[[e.token_id for e in s] for s in r] for r in got] == [[[e.token_id for e in s] for s in r] for r in want]
    said = capsys.readouterr().out
    assert "2/5 done" in said and "4/5 done" in said and "5/5 done" in said and "min left" in said
