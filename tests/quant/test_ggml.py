"""GGUF block formats read in place (quant/ggml.py, csrc/ggml_formats.h), against gguf-py's dequantization and
transformers' logits on a small model written in a mix of the formats people download."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from tests.conftest import make_hf_model
from tests.io.test_gguf import write_gguf
from trainfer import LLM
from trainfer.errors import TrainferError
from trainfer.quant import ggml
from trainfer.quant.native import extension

TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16]
# offsets of each format's fp16 scale fields inside a block: random bytes there could be inf / NaN
FP16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q5_0: (0,), Q.Q4_1: (0, 2), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2),
               Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82), Q.Q3_K: (108,)}  # fmt: skip


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """(rows, row bytes) of valid blocks: every quant / sub-scale / high-bit byte random, the fp16 scales finite."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    if qtype == Q.F16:
        return rng.normal(0, scale, (rows, cols)).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        f32 = rng.normal(0, scale, (rows, cols)).astype(np.float32)
        return (f32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    unit = scale / {Q.Q4_K: 64 * 8, Q.Q5_K: 64 * 16, Q.Q6_K: 64 * 32, Q.Q2_K: 64, Q.Q3_K: 128}.get(qtype, 8)
    for off in FP16_FIELDS[qtype]:
        d = (rng.uniform(0.5, 1.5, (rows, cols // block)) * unit).astype(np.float16)
        raw[..., off : off + 2] = d[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact_to_gguf_py(qtype, monkeypatch):
    raw = random_blocks(qtype, 6, 512, seed=int(qtype))
    want = gguf.quants.dequantize(raw, qtype).reshape(6, 512)
    got = ggml.dequantize(torch.from_numpy(raw), qtype).numpy()
    if extension() is not None:
        assert ext_used(qtype)
    np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(ggml, "extension", lambda: None)  # the PyTorch/numpy fallback gives the same
    np.testing.assert_array_equal(ggml.dequantize(torch.from_numpy(raw), qtype).numpy(), want)


def ext_used(qtype: Q) -> bool:
    return ggml.has_kernel(qtype, 512)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 17, 64])
def test_products_equal_the_dequantized_weights(qtype, rows, monkeypatch):
    """One row (decode), a few (batched decode: in-register tiles up to 4, a dequantized tile buffer up to 16) and
    many (prefill: dequantize + GEMM); fp32 products, so equal up to summation order. Odd output sizes and a
    bias cover the tile edges."""
    monkeypatch.setenv("TRAINFER_BF16", "0")
    n, k = 37, 512
    raw = torch.from_numpy(random_blocks(qtype, n, k, seed=rows))
    w = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype).reshape(n, k))
    x, bias = torch.randn(rows, k), torch.randn(n)
    with torch.inference_mode():
        got = ggml.GGMLLinear(raw, qtype, k, bias)(x)
    want = F.linear(x.double(), w.double(), bias.double()).float()
    # a few rows of some formats take integer dot products on inputs split into two int8 parts (~16 bits)
    split = extension() is not None and extension().split_input(ggml.kernel_kind(qtype), rows, k)
    tol = 2**-14 if split else 1e-5
    torch.testing.assert_close(got, want, rtol=0, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_no_input_rows_give_no_output_rows(qtype):
    """A prompt chunk that samples nothing sends zero rows through the LM head: an empty result, not a read of
    rows that are not there (on AVX2 that segfaulted the Q6_K head of every Q4_K_M file on prompts over 512)."""
    raw = torch.from_numpy(random_blocks(qtype, 37, 512))
    with torch.inference_mode():
        y = ggml.GGMLLinear(raw, qtype, 512, torch.randn(37))(torch.randn(0, 512))
    assert y.shape == (0, 37)


@pytest.mark.skipif(extension() is None or not extension().bf16_gemm, reason="bf16 products need AVX512_BF16")
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q4_0, Q.F16])
@pytest.mark.parametrize("rows", [5, 16, 17])
def test_bf16_products_round_like_bf16(qtype, rows):
    """More than 4 rows in bf16: AMX tiles where the CPU has them (else vdpbf16ps tiles up to 16 rows, torch's GEMM
    beyond). Weights and inputs rounded to bf16, sums in fp32: equal to that reference up to summation order
    (37 outputs: a full 32-row pass of AMX tiles, then a partial one of 5 rows)."""
    n, k = 37, 512
    raw = torch.from_numpy(random_blocks(qtype, n, k, seed=rows))
    w = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype).reshape(n, k))
    x, bias = torch.randn(rows, k), torch.randn(n)
    with torch.inference_mode():
        got = ggml.GGMLLinear(raw, qtype, k, bias)(x)
    want = F.linear(x.bfloat16().double(), w.bfloat16().double(), bias.double()).float()
    err = float((got - want).abs().max() / want.abs().max())
    # the tiles' sums and outputs stay fp32 (measured ~1e-7); without AMX, 17 rows go to torch's bf16 GEMM, which
    # also rounds its output to bf16 (~1e-3)
    assert err < (1e-6 if rows <= 16 or extension().amx() else 4e-3), err


# The tensors of the mixed model, and the format each is written in (K-quants need rows of 256).
MIX = {"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q8_0, "ffn_gate": Q.Q4_0,
       "ffn_up": Q.Q5_1, "ffn_down": Q.Q6_K, "token_embd": Q.Q4_1, "output": Q.Q5_0}  # fmt: skip


def mixed_model(path, arch: str = "llama", tied: bool = False, mix: dict[str, Q] | None = None):
    """A transformers model whose weights are exactly the dequantized blocks of a GGUF written at `path`, each
    tensor in the format MIX gives it (layer 1's MLP as F16 / BF16), the way a Q4_K_M file mixes them."""
    hf = make_hf_model(arch, vocab_size=96, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    blocks = {}

    def types(gname: str, a: np.ndarray):
        kind = gname.split(".")[-2]
        qtype = {**MIX, **(mix or {})}[kind]
        if gname.startswith("blk.1.ffn"):
            qtype = Q.F16 if kind != "ffn_up" else Q.BF16
        raw = random_blocks(qtype, a.shape[0], a.shape[1], seed=len(blocks))
        blocks[gname] = raw
        return raw, qtype, gguf.quants.dequantize(raw, qtype).reshape(a.shape)

    write_gguf(path, hf, arch=arch, encode=types)
    return hf


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)])
def test_a_mixed_format_gguf_gives_transformers_logits(tmp_path, arch, tied, monkeypatch):
    """auto keeps every tensor in its file format; the module path (prefill) and the native decode step (the
    engine, stacked q/k/v of three formats) both give the reference's logits / greedy tokens."""
    monkeypatch.setenv("TRAINFER_BF16", "0")
    hf = mixed_model(tmp_path / "m.gguf", arch, tied)
    llm = LLM.load(tmp_path / "m.gguf", kv_cache_gb=0.05)
    attn = llm.model.layers[0].self_attn
    assert [type(m).__name__ for m in (attn.q_proj, attn.k_proj, attn.v_proj)] == ["GGMLLinear"] * 3
    assert {attn.q_proj.kind, attn.k_proj.kind, attn.v_proj.kind} == {"Q4_K", "Q5_K", "Q6_K"}
    ids = torch.tensor([[5, 17, 33, 8, 90, 41, 12, 7]])
    with torch.no_grad():
        want = hf(ids).logits
        got = llm.model(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = llm.complete([ids[0].tolist()], temperature=0, max_tokens=12, ignore_eos=True)[0]
    assert llm.engine.runner.decoder is not None
    assert out.token_ids == ref[0, ids.shape[1] :].tolist()


def test_formats_without_a_kernel_become_int8_and_say_so(tmp_path, monkeypatch, capsys):
    """Q2_K / Q3_K (no native kernel): converted to int8 blocks at load, one line on stderr each; the logits stay
    within int8's rounding of the reference's."""
    monkeypatch.setenv("TRAINFER_BF16", "0")
    hf = mixed_model(tmp_path / "m.gguf", mix={"ffn_gate": Q.Q2_K, "ffn_up": Q.Q3_K})
    llm = LLM.load(tmp_path / "m.gguf", kv_cache_gb=0.05)
    mlp = llm.model.layers[0].mlp
    assert (mlp.gate_proj.kind, mlp.up_proj.kind, mlp.down_proj.kind) == ("int8", "int8", "Q6_K")
    err = capsys.readouterr().err
    assert "blk.0.ffn_gate.weight: Q2_K has no native kernel; converted to int8" in err and "Q3_K" in err
    ids = torch.tensor([[5, 17, 33, 8, 90, 41, 12, 7]])
    with torch.no_grad():
        want, got = hf(ids).logits, llm.model(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))


def test_a_truncated_or_inconsistent_gguf_is_a_one_line_error(tmp_path):
    mixed_model(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(TrainferError, match="corrupt or truncated"):
        LLM.load(tmp_path / "cut.gguf", kv_cache_gb=0.05)
    hf = make_hf_model("llama", vocab_size=96, hidden_size=64, intermediate_size=128)
    write_gguf(tmp_path / "wrong.gguf", hf, feed_forward_length=96)  # the metadata disagrees with the tensors
    with pytest.raises(TrainferError, match="the model's config implies"):
        LLM.load(tmp_path / "wrong.gguf", kv_cache_gb=0.05)


def test_a_model_that_cannot_fit_is_refused_before_loading(tmp_path, monkeypatch):
    from trainfer.io import loader

    mixed_model(tmp_path / "m.gguf")
    monkeypatch.setattr(loader, "available_memory", lambda: 200 << 20)
    with pytest.raises(TrainferError, match=r"needs about .* GiB .* this machine has 0\.2 GiB available"):
        LLM.load(tmp_path / "m.gguf", kv_cache_gb=0.05)
