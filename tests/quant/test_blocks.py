"""Int8 (Q8_0-style) and int4 (Q4_1-style) weights: the formats, the native kernel against the PyTorch
reference, GGUF blocks used as they are, and quantized models through the engine."""

from __future__ import annotations

import platform

import pytest
import torch

from tests.conftest import make_hf_model
from trainfer.quant import native
from trainfer.quant.blocks import (
    QLinear,
    dequantize,
    linear_reference,
    pack_int4,
    qlinear,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
    weights_kind,
)
from trainfer.rounds import environment


def test_int8_blocks_round_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(40, 96) * torch.logspace(-3, 2, 96)  # blocks of very different magnitudes
    w[3, :32] = 0  # an all-zero block
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40, 3) and int(q.abs().max()) == 127
    err = (dequantize(q, scale) - w).abs()
    assert (err <= scale.repeat_interleave(32, dim=1) / 2 + 1e-12).all()
    assert scale[3, 0] == 0 and (dequantize(q, scale)[3, :32] == 0).all()
    # a Q8_0 tensor (fp16 scale x int8) comes back as the same integers and scales
    q16 = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    q16[:, 0], q16[:, 32] = 127, -127  # each block reaches +-127, as llama.cpp's quantizer makes it
    d16 = (torch.rand(8, 2) + 0.01).half().float()
    q2, d2 = quantize_int8(dequantize(q16, d16))
    assert torch.equal(q2, q16) and torch.allclose(d2, d16, rtol=1e-6)


def test_int4_blocks_pack_in_ggml_order_and_round_within_half_a_step():
    torch.manual_seed(1)
    values = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.shape == (6, 32) and torch.equal(unpack_int4(packed), values)
    assert int(packed[0, 0]) == int(values[0, 0]) | int(values[0, 16]) << 4  # byte j: element j and j + 16
    w = torch.randn(40, 96) * torch.logspace(-3, 2, 96)
    w[5, 32:64] = 0.25  # a constant block: zero scale, every value is the min
    q, scale, mins = quantize_int4(w)
    assert q.dtype == torch.uint8 and q.shape == (40, 48) and scale.shape == mins.shape == (40, 3)
    err = (dequantize(q, scale, mins) - w).abs()
    assert (err <= scale.repeat_interleave(32, dim=1) / 2 * (1 + 1e-5) + 1e-7).all()
    assert scale[5, 1] == 0 and (dequantize(q, scale, mins)[5, 32:64] == 0.25).all()
    # Q4_1 values (d * q + m with fp16 d, m) come back exactly: requantizing finds the same blocks
    d16, m16 = (torch.rand(8, 2) + 0.01).half().float(), torch.randn(8, 2).half().float()
    q16 = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    q16[:, 0], q16[:, 1], q16[:, 32], q16[:, 33] = 0, 15, 0, 15  # each block spans 0..15
    q2, d2, m2 = quantize_int4(dequantize(pack_int4(q16), d16, m16))
    assert torch.equal(unpack_int4(q2), q16) and torch.allclose(d2, d16, rtol=1e-5) and torch.equal(m2, m16)


def test_the_native_kernel_is_built_on_x86():
    if platform.machine() != "x86_64":
        pytest.skip("the kernel is x86 (AVX2 / AVX-512) only")
    assert native.extension() is not None, "make setup should have built trainfer/quant/_build/trainfer_native.so"


def _quantized(kind, n, k):
    w = torch.randn(n, k)
    return (*quantize_int8(w), None) if kind == "int8" else quantize_int4(w)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "fallback"])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_gradients_flow_to_the_input_through_a_frozen_quantized_weight(kind, use_native, monkeypatch):
    """QLoRA's backward: d/dx of the native product equals d/dx of F.linear(x, dequantize(w)); the weight's
    blocks get none (they are buffers)."""
    if use_native and native.extension() is None:
        pytest.skip("native kernel not built")
    if not use_native:
        monkeypatch.setattr("trainfer.quant.blocks.extension", lambda: None)
    monkeypatch.setenv("TRAINFER_BF16", "0")
    torch.manual_seed(7)
    q, scale, mins = _quantized(kind, 48, 96)
    x = torch.randn(3, 5, 96, requires_grad=True)
    ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(3, 5, 48)
    (qlinear(x, q, scale, mins) * g).sum().backward()
    (linear_reference(ref, q, scale, mins) * g).sum().backward()
    assert torch.allclose(x.grad, ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference takes the plain native path
        assert not qlinear(x, q, scale, mins).requires_grad


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "fallback"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (1, 577, 576), (2, 5, 1536), (3, 64, 96), (4, 7, 64), (5, 33, 64),
                                   (16, 9, 64), (17, 33, 64), (64, 130, 576), (1, 49152, 64)])  # fmt: skip
def test_kernel_equals_the_reference(m, n, k, kind, use_native, monkeypatch):
    """Every path (fused tiles for <= 16 rows, dequantize + GEMM beyond, odd N, leading dims) against
    F.linear(x, dequantize(w)): equal up to fp32 summation order."""
    if use_native and native.extension() is None:
        pytest.skip("native kernel not built")
    if not use_native:
        monkeypatch.setattr("trainfer.quant.blocks.extension", lambda: None)
    monkeypatch.setenv("TRAINFER_BF16", "0")  # fp32 throughout: bf16 products have their own test
    torch.manual_seed(m * 1000 + n + k)
    q, scale, mins = _quantized(kind, n, k)
    bias = torch.randn(n)
    x = torch.randn(m, k)
    got, want = qlinear(x, q, scale, mins, bias), linear_reference(x, q, scale, mins) + bias
    assert got.shape == (m, n)
    # one or two rows of int4 on AVX2 take integer products on the input split into two int8 parts (~16 bits)
    split = use_native and native.extension().split_input({"int8": 1, "int4": 2}[kind], m, k)
    tol = 2**-14 * float(want.abs().max()) if split else 1e-5 * (k**0.5) * float(want.abs().max()) / 10
    assert torch.allclose(got, want, rtol=0 if split else 1e-5, atol=tol)
    x3 = torch.randn(2, 3, k)  # leading dimensions are kept
    assert torch.allclose(qlinear(x3, q, scale, mins), linear_reference(x3, q, scale, mins), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_row_gives_the_same_bits_whatever_rows_share_its_pass(kind, monkeypatch):
    """Speculation checks a sequence's guesses as extra rows of one product and keeps tokens only where greedy
    decoding alone would choose them: on AVX-512 the tiles form each row's sums in the same order whatever rows
    share a pass (1-8 rows: passes of 4, then the 1-3 left in one). AVX2's one- and two-row loops differ from its
    tiles in the last bits (test_speculate allows for it)."""
    if native.extension() is None or "avx512f" not in environment()["flags"]:
        pytest.skip("the AVX-512 tiles")
    monkeypatch.setenv("TRAINFER_BF16", "0")  # fp32 products throughout: bf16 beyond 4 rows is another test
    torch.manual_seed(7)
    q, scale, mins = _quantized(kind, 70, 576)
    x = torch.randn(8, 576)
    alone = torch.cat([qlinear(x[i : i + 1], q, scale, mins) for i in range(8)])
    for m in range(2, 9):
        assert torch.equal(qlinear(x[:m], q, scale, mins), alone[:m]), m


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_no_input_rows_give_no_output_rows(kind):
    """The LM head of a prompt chunk that samples nothing gets zero rows (tests/quant/test_ggml.py, the same)."""
    q, scale, mins = _quantized(kind, 37, 576)
    assert qlinear(torch.randn(0, 576), q, scale, mins, torch.randn(37)).shape == (0, 37)


@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (1, 3, 96), (1, 577, 576), (1, 49152, 64), (1, 9, 1536), (2, 5, 96),
                                   (2, 9, 32), (3, 5, 96), (4, 7, 64), (5, 33, 64), (64, 130, 576)])  # fmt: skip
def test_fp32_kernel_equals_f_linear(m, n, k):
    """fp32 weights: one or two rows stream each weight row whole (K a multiple of 64 and not), more take the tiles;
    equal to F.linear up to summation order."""
    ext = native.extension()
    if ext is None:
        pytest.skip("native kernel not built")
    torch.manual_seed(m * 1000 + n + k)
    w, bias, x = torch.randn(n, k), torch.randn(n), torch.randn(m, k)
    got, want = ext.linear(x, 0, w, None, None, bias, False), torch.nn.functional.linear(x, w, bias)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * k**0.5)
    assert torch.allclose(ext.linear(x, 0, w, None, None, None, False), x @ w.T, rtol=1e-5, atol=1e-5 * k**0.5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@torch.no_grad()
def test_products_of_more_than_4_rows_run_in_bf16_within_its_rounding(kind, monkeypatch):
    """On CPUs with AVX512_BF16, inference products of more than 4 input rows (batched decode's tiles, prefill's
    GEMM) run in bf16: within bf16's rounding of the fp32 result; up to 4 rows, with TRAINFER_BF16=0, or in a
    forward that records gradients (training) they are fp32."""
    ext = native.extension()
    if ext is None or not ext.bf16_gemm:
        pytest.skip("no bf16 products on this CPU / build")
    torch.manual_seed(7)
    q, scale, mins = _quantized(kind, 301, 576)
    bias = torch.randn(301)
    for m in (4, 5, 16, 17, 64):
        x = torch.randn(m, 576)
        want = linear_reference(x, q, scale, mins) + bias
        monkeypatch.setenv("TRAINFER_BF16", "1")
        got = qlinear(x, q, scale, mins, bias)
        err = float((got - want).abs().max() / want.abs().max())
        if m <= 4:
            assert err < 1e-5, (m, err)
        else:
            assert 1e-5 < err < 1e-2, (m, err)  # visibly bf16, and no worse than bf16
        with torch.enable_grad():
            assert torch.allclose(qlinear(x, q, scale, mins, bias), want, rtol=1e-5, atol=1e-4)
            xg = x.clone().requires_grad_()
            assert torch.allclose(qlinear(xg, q, scale, mins, bias), want, rtol=1e-5, atol=1e-4)
        monkeypatch.setenv("TRAINFER_BF16", "0")
        assert torch.allclose(qlinear(x, q, scale, mins, bias), want, rtol=1e-5, atol=1e-4)


def test_native_kernel_refuses_bad_shapes():
    ext = native.extension()
    if ext is None:
        pytest.skip("native kernel not built")
    q, scale, mins = _quantized("int4", 8, 64)
    with pytest.raises(RuntimeError, match="x"):
        ext.linear(torch.randn(2, 32), 2, q, scale, mins, None, False)
    with pytest.raises(RuntimeError, match="mins"):
        ext.linear(torch.randn(2, 64), 2, q, scale, scale[:, :1].contiguous(), None, False)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ext.linear(torch.randn(2, 48), 0, torch.randn(4, 48), None, None, None, False)


@pytest.fixture(scope="module", params=["int8", "int4"])
def tiny_quantized(tmp_path_factory, request):
    from trainfer.io.loader import load_model

    path = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama", vocab_size=256, hidden_size=64, intermediate_size=96, max_position_embeddings=256,
                  tie_word_embeddings=True).save_pretrained(path)  # fmt: skip
    model, _ = load_model(path)
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}
    return quantize_model(model, request.param), reference


def test_quantize_model_swaps_linears_and_ties_the_embedding(tiny_quantized):
    model, reference = tiny_quantized
    assert isinstance(model.lm_head, QLinear) and isinstance(model.layers[0].mlp.down_proj, QLinear)
    assert model.lm_head.kind == "int8"  # the tied table stays 8-bit under int4 too
    ids = torch.tensor([[5, 17, 99]])
    rows = model.embed_tokens(ids)[0]
    assert torch.allclose(rows, reference["embed_tokens.weight"][ids[0]], atol=float(rows.abs().max()) / 100)


def test_engine_greedy_equals_the_quantized_model_alone(tiny_quantized):
    from trainfer.infer.engine import Engine
    from trainfer.infer.sampling import SamplingParams

    model, _ = tiny_quantized
    prompts = [[5, 17, 99, 3], list(range(3, 60)), [200, 201]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = Engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=32)
    got = [[e.token_id for e in r[0]] for r in engine.run(prompts, [params] * 3)]
    for prompt, tokens in zip(prompts, got, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[len(prompt) :]
    engine.pool.check_idle()


@pytest.mark.real
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_smollm2_answers_and_tracks_fp32(smollm2, kind):
    from trainfer import LLM

    quantized = LLM.load("smollm2-135m-instruct", dtype=kind, kv_cache_gb=0.1)
    assert quantized.weights == kind
    answer = quantized.chat(
        [{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=20
    )
    assert "Paris" in answer.text
    text = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. " * 4
    ids = torch.tensor([smollm2.tokenizer.encode(text)])
    with torch.no_grad():
        a, b = smollm2.model(ids)[0].log_softmax(-1), quantized.model(ids)[0].log_softmax(-1)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean()
    nll_a = -a[:-1].gather(1, ids[0, 1:, None]).mean()
    nll_b = -b[:-1].gather(1, ids[0, 1:, None]).mean()
    assert agree > 0.9, agree
    assert float(nll_b.exp() / nll_a.exp()) < 1.02  # perplexity within 2% of fp32


@pytest.mark.real
def test_gguf_blocks_are_used_as_they_are(smollm2, smollm2_path, monkeypatch):
    """SmolLM2's file is Q4_1 (every Linear) + Q8_0 (the tied embedding). auto keeps those blocks as they are in the
    file; int4 converts them to trainfer's layout exactly. Either way the weights equal the fp32 dequantization
    exactly, and the logits do up to summation order."""
    from trainfer import LLM
    from trainfer.quant import ggml

    monkeypatch.setenv("TRAINFER_BF16", "0")  # fp32 products: bf16's rounding has its own test
    int4 = LLM.load(smollm2_path, dtype="int4", kv_cache_gb=0.1)
    auto = LLM.load(smollm2_path, kv_cache_gb=0.1)
    assert int4.model.lm_head.mins is None and auto.weights == "Q4_1+Q8_0"
    for name in ("layers.0.self_attn.q_proj", "layers.29.mlp.down_proj", "lm_head"):
        want = smollm2.model.get_submodule(name).weight
        mod = int4.model.get_submodule(name)
        assert torch.equal(dequantize(mod.qweight, mod.scales, mod.mins), want), name
        raw = auto.model.get_submodule(name)
        assert isinstance(raw, ggml.GGMLLinear) and torch.equal(ggml.dequantize(raw.blocks, raw.qtype), want), name
    ids = torch.tensor([smollm2.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        a = smollm2.model(ids)
        for other in (int4, auto):
            b = other.model(ids)
            assert torch.allclose(a, b, atol=1e-4 * float(a.abs().max()))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantize_save_and_load_round_trip(tmp_path, kind):
    """`trainfer quantize` writes the blocks as computed; loading them again gives the same tensors and logits."""
    import subprocess
    import sys

    from tests.conftest import make_tiny_model_dir
    from trainfer import LLM
    from trainfer.io.quantized import is_quantized

    src = make_tiny_model_dir(tmp_path / "src", context=128)
    out = tmp_path / kind
    cmd = [sys.executable, "-m", "trainfer.cli", "quantize", str(src), "--to", kind, "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert is_quantized(out) and not is_quantized(src)
    direct, loaded = LLM.load(src, dtype=kind, num_blocks=8), LLM.load(out, num_blocks=8)
    assert loaded.weights == kind
    a, b = direct.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(direct.model(ids), loaded.model(ids))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "not empty" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_serve_quantized_answers_like_the_library(tmp_path, kind):
    import httpx

    from tests.conftest import make_tiny_model_dir
    from tests.serve.conftest import ServerProcess
    from trainfer import LLM

    src = make_tiny_model_dir(tmp_path / "src", context=128)
    server = ServerProcess(str(src), "--dtype", kind)
    try:
        body = {"prompt": "hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        got = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    finally:
        server.stop()
    want = LLM.load(src, dtype=kind, num_blocks=16).generate("hello", max_tokens=12, temperature=0, ignore_eos=True)
    assert got == want.text


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("tied", [False, True])
def test_a_hugging_face_model_quantizes_one_tensor_at_a_time(tmp_path, kind, tied):
    """int8 / int4 from safetensors, converted as each tensor is read: the same blocks and logits as quantizing the
    whole fp32 model, a tied head in int8 read by the embedding too."""
    from trainfer.io.loader import load, load_model

    hf = make_hf_model("llama", vocab_size=96, hidden_size=64, intermediate_size=128, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path / "m")
    model, _ = load(tmp_path / "m", kind)
    whole = quantize_model(load_model(tmp_path / "m")[0], kind)
    assert weights_kind(model) == kind and model.lm_head.kind == ("int8" if tied else kind)
    for (name, a), (_, b) in zip(model.state_dict().items(), whole.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert torch.equal(model(ids), whole(ids))
