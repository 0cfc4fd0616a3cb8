"""Int8 (Q8_0-style) weights: the format, the native kernel against the PyTorch reference, and a
quantized model through the engine."""

from __future__ import annotations

import platform

import pytest
import torch

from tests.conftest import make_hf_model
from trainfer.quant import native
from trainfer.quant.blocks import QLinear, dequantize, q8_linear, q8_linear_reference, quantize, quantize_model


def test_blocks_round_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(40, 96) * torch.logspace(-3, 2, 96)  # blocks of very different magnitudes
    w[3, :32] = 0  # an all-zero block
    q, scale = quantize(w)
    assert q.dtype == torch.int8 and scale.shape == (40, 3) and int(q.abs().max()) == 127
    err = (dequantize(q, scale) - w).abs()
    assert (err <= scale.repeat_interleave(32, dim=1) / 2 + 1e-12).all()
    assert scale[3, 0] == 0 and (dequantize(q, scale)[3, :32] == 0).all()
    # a Q8_0 tensor (fp16 scale x int8) comes back as the same integers and scales
    q16 = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    q16[:, 0], q16[:, 32] = 127, -127  # each block reaches +-127, as llama.cpp's quantizer makes it
    d16 = (torch.rand(8, 2) + 0.01).half().float()
    q2, d2 = quantize(dequantize(q16, d16))
    assert torch.equal(q2, q16) and torch.allclose(d2, d16, rtol=1e-6)


def test_the_native_kernel_is_built_on_x86():
    if platform.machine() != "x86_64":
        pytest.skip("the kernel is x86 (AVX2 / AVX-512) only")
    assert native.extension() is not None, "make setup should have built trainfer/quant/_build/trainfer_q8.so"


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "fallback"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (1, 577, 576), (2, 5, 1536), (7, 64, 96), (8, 33, 64), (9, 33, 64),
                                   (64, 130, 576), (1, 49152, 64)])  # fmt: skip
def test_kernel_equals_the_reference(m, n, k, use_native, monkeypatch):
    if use_native and native.extension() is None:
        pytest.skip("native kernel not built")
    if not use_native:
        monkeypatch.setattr(native, "extension", lambda: None)
        monkeypatch.setattr("trainfer.quant.blocks.extension", lambda: None)
    torch.manual_seed(m * 1000 + n + k)
    q, scale = quantize(torch.randn(n, k))
    x = torch.randn(m, k)
    got, want = q8_linear(x, q, scale), q8_linear_reference(x, q, scale)
    assert got.shape == (m, n)
    # same products, other summation order: equal to fp32 rounding of a length-k dot product
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * (k**0.5) * float(want.abs().max()) / 10)
    x3 = torch.randn(2, 3, k)  # leading dimensions are kept
    assert torch.allclose(q8_linear(x3, q, scale), q8_linear_reference(x3, q, scale), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory):
    from trainfer.io.loader import load_model

    path = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama", vocab_size=256, hidden_size=64, intermediate_size=96, max_position_embeddings=256,
                  tie_word_embeddings=True).save_pretrained(path)  # fmt: skip
    model, _ = load_model(path)
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    return quantize_model(model), reference


def test_quantize_model_swaps_linears_and_ties_the_embedding(tiny_int8):
    model, reference = tiny_int8
    assert isinstance(model.lm_head, QLinear) and isinstance(model.layers[0].mlp.down_proj, QLinear)
    ids = torch.tensor([[5, 17, 99]])
    rows = model.embed_tokens(ids)[0]
    assert torch.allclose(rows, reference["embed_tokens.weight"][ids[0]], atol=float(rows.abs().max()) / 100)


def test_engine_greedy_equals_the_quantized_model_alone(tiny_int8):
    from tests.infer.test_engine import ByteTokenizer
    from trainfer.infer.engine import Engine
    from trainfer.infer.sampling import SamplingParams

    model, _ = tiny_int8
    prompts = [[5, 17, 99, 3], list(range(3, 60)), [200, 201]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = Engine(model, ByteTokenizer(), num_blocks=64, block_size=4, max_num_batched_tokens=32)
    got = [[e.token_id for e in r[0]] for r in engine.run(prompts, [params] * 3)]
    for prompt, tokens in zip(prompts, got, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[len(prompt) :]
    engine.pool.check_idle()


@pytest.mark.real
def test_int8_smollm2_answers_and_tracks_fp32(smollm2):
    from trainfer import LLM

    int8 = LLM.load("smollm2-135m-instruct", dtype="int8", kv_cache_gb=0.1)
    answer = int8.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=20)
    assert "Paris" in answer.text
    text = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. " * 4
    ids = torch.tensor([smollm2.tokenizer.encode(text)])
    with torch.no_grad():
        a, b = smollm2.model(ids)[0].log_softmax(-1), int8.model(ids)[0].log_softmax(-1)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
    nll_a = -a[:-1].gather(1, ids[0, 1:, None]).mean()
    nll_b = -b[:-1].gather(1, ids[0, 1:, None]).mean()
    assert agree > 0.9, agree
    assert float(nll_b.exp() / nll_a.exp()) < 1.02  # perplexity within 2% of fp32


def test_quantize_save_and_load_round_trip(tmp_path):
    """`trainfer quantize` writes int8 as computed; loading it again gives the same tensors and logits."""
    import subprocess
    import sys

    from tests.conftest import make_tiny_model_dir
    from trainfer import LLM
    from trainfer.quant.checkpoint import is_quantized

    src = make_tiny_model_dir(tmp_path / "src", context=128)
    out = tmp_path / "q8"
    cmd = [sys.executable, "-m", "trainfer.cli", "quantize", str(src), "--to", "int8", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert is_quantized(out) and not is_quantized(src)
    direct, loaded = LLM.load(src, dtype="int8", num_blocks=8), LLM.load(out, num_blocks=8)
    assert loaded.weights == "int8"
    a, b = direct.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(direct.model(ids), loaded.model(ids))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "not empty" in again.stderr and "Traceback" not in again.stderr


def test_serve_int8_answers_like_the_library(tmp_path):
    import httpx

    from tests.conftest import make_tiny_model_dir
    from tests.serve.conftest import ServerProcess
    from trainfer import LLM

    src = make_tiny_model_dir(tmp_path / "src", context=128)
    server = ServerProcess(str(src), "--dtype", "int8")
    try:
        body = {"prompt": "hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        got = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    finally:
        server.stop()
    want = LLM.load(src, dtype="int8", num_blocks=16).generate("hello", max_tokens=12, temperature=0, ignore_eos=True)
    assert got == want.text
