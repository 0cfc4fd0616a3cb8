"""GGUF export, read back by trainfer's own reader and by transformers' GGUF loader (llama.cpp's greedy parity
is benchmarks/export_gguf.py: it needs a llama.cpp build)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from tests.conftest import SMOLLM2, make_hf_model
from trainfer.cli import main
from trainfer.errors import TrainferError
from trainfer.io.export import export_model
from trainfer.io.gguf import load_gguf, open_gguf
from trainfer.io.gguf_writer import export_gguf, save_gguf
from trainfer.io.loader import build_model, load_checkpoint
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.transformer import rope_frequencies

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = ["hello hell", "<|im_start|>user\nhi 42<|im_end|>", "naïve café 東京 🙂  \n\t x"]


def byte_bpe_tokenizer() -> Tokenizer:
    """GPT-2's byte alphabet, three merges and two control tokens: every part of the GGUF vocabulary keys."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate([*alphabet, "he", "ll", "hell"])}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("l", "l"), ("he", "ll")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # ids 259, 260
    return Tokenizer(backend, bos_token_id=259, eos_token_id=260, chat_template=TEMPLATE, pad_token_id=260)


def model_dir(path: Path, kind: str = "llama", **overrides) -> Path:
    """A tiny random model directory; 264 rows > 261 tokens, so the GGUF vocabulary gets [PAD] entries."""
    make_hf_model(kind, vocab_size=264, **overrides).save_pretrained(path)
    byte_bpe_tokenizer().save(path)
    return path


def logits(cfg, state, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return build_model(cfg, state)(tokens)


TOKENS = torch.randint(0, 264, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("llama", {"head_dim": 32}),  # head_dim * n_heads != dim: key_length in the metadata
        ("qwen2", {}),
    ],
)
def test_f32_export_gives_the_source_logits(tmp_path, kind, overrides):
    src = model_dir(tmp_path / "src", kind, **overrides)
    export_gguf(src, tmp_path / "m.gguf")
    cfg0, state0, _ = load_checkpoint(src)
    cfg, state, _ = load_gguf(tmp_path / "m.gguf")
    assert (cfg.arch, cfg.tie_embeddings, cfg.qkv_bias, cfg.out_bias, cfg.mlp_bias, cfg.head_dim) == (
        cfg0.arch, cfg0.tie_embeddings, cfg0.qkv_bias, cfg0.out_bias, cfg0.mlp_bias, cfg0.head_dim,
    )  # fmt: skip
    names = {t.name for t in open_gguf(tmp_path / "m.gguf").tensors}
    assert ("output.weight" in names) == (not cfg0.tie_embeddings)
    torch.testing.assert_close(logits(cfg, state, TOKENS), logits(cfg0, state0, TOKENS), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "scaling,same_parameters",
    [
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
          "original_max_position_embeddings": 1024}, True),  # two blended frequencies: the parameters come back
        ({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}, False),  # one: other parameters, the same frequencies
        ({"rope_type": "linear", "factor": 2.0}, True),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, True),  # Qwen2.5's setting
        ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
          "beta_slow": 2.0}, True),
    ],
)  # fmt: skip
def test_rope_scaling_survives(tmp_path, scaling, same_parameters):
    cfg0, state0, tok = load_checkpoint(model_dir(tmp_path / "src"))
    cfg0 = cfg0.replace(rope_scaling=scaling)
    save_gguf(tmp_path / "m.gguf", cfg0, state0, tok)
    cfg, state, _ = load_gguf(tmp_path / "m.gguf")
    assert (cfg.rope_scaling == scaling) == same_parameters
    torch.testing.assert_close(rope_frequencies(cfg), rope_frequencies(cfg0), rtol=1e-6, atol=0)
    assert not torch.equal(rope_frequencies(cfg), rope_frequencies(cfg0.replace(rope_scaling=None)))
    positions = torch.arange(24).expand(2, 24) * 40  # far enough apart that the scaled frequencies matter
    with torch.no_grad():
        got = build_model(cfg, state)(TOKENS, positions)
        want = build_model(cfg0, state0)(TOKENS, positions)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,dtype,atol", [("F16", torch.float16, 5e-3), ("BF16", torch.bfloat16, 5e-2)])
def test_16_bit_export_rounds_matrices_only(tmp_path, kind, dtype, atol):
    src = model_dir(tmp_path / "src")
    export_gguf(src, tmp_path / "m.gguf", kind)
    cfg0, state0, _ = load_checkpoint(src)
    cfg, state, _ = load_gguf(tmp_path / "m.gguf")
    for name, w in state0.items():
        want = w.to(dtype).float() if w.ndim == 2 else w  # norms stay F32
        assert torch.equal(state[name], want), name
    torch.testing.assert_close(logits(cfg, state, TOKENS), logits(cfg0, state0, TOKENS), rtol=0, atol=atol)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_export_stores_the_blocks(tmp_path, qtype):
    src = model_dir(tmp_path / "src", intermediate_size=80)  # down_proj rows of 80: not 32-value blocks
    export_gguf(src, tmp_path / "m.gguf", qtype)
    _, state0, _ = load_checkpoint(src)
    _, state, _ = load_gguf(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type for t in open_gguf(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_norm.weight"] == Q.F32 and types["blk.0.ffn_down.weight"] == Q.F16
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == Q[qtype]
    for name, w in state0.items():
        if w.ndim == 1:
            assert torch.equal(state[name], w), name
        elif w.shape[1] % 32:
            assert torch.equal(state[name], w.half().float()), name
        else:  # blocks lie along rows, so llama.cpp's q/k row permutation does not change them
            want = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), Q[qtype]), Q[qtype])
            np.testing.assert_array_equal(state[name].numpy(), want, err_msg=name)


def test_tokenizer_and_chat_template_survive(tmp_path):
    export_gguf(model_dir(tmp_path / "src"), tmp_path / "m.gguf")
    _, _, tok = load_gguf(tmp_path / "m.gguf")
    ref = byte_bpe_tokenizer()
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hello")[0] == 258  # "hell": the merges apply
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.add_bos) == (259, 260, 260, False)
    assert tok.chat_template == TEMPLATE
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages)
    meta = {k: v for k, v in open_gguf(tmp_path / "m.gguf").metadata.items() if k.startswith("tok")}
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.merges"] == ["h e", "l l", "he ll"]
    assert meta["tokenizer.ggml.tokens"][261:] == ["[PAD261]", "[PAD262]", "[PAD263]"]
    assert meta["tokenizer.ggml.token_type"][258:] == [1, 3, 3, 5, 5, 5]


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_reads_the_f32_export(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    src = model_dir(tmp_path / "src", tie_word_embeddings=tied)
    export_gguf(src, tmp_path / "out" / "m.gguf")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="m.gguf", dtype=torch.float32).eval()
    cfg0, state0, _ = load_checkpoint(src)
    with torch.no_grad():
        want = ref(TOKENS).logits
    torch.testing.assert_close(logits(cfg0, state0, TOKENS), want, rtol=0, atol=1e-5)


def test_what_cannot_be_written_is_refused(tmp_path):
    cfg, state, tok = load_checkpoint(model_dir(tmp_path / "src"))
    with pytest.raises(TrainferError, match="no tokenizer"):
        save_gguf(tmp_path / "a.gguf", cfg, state, None)
    with pytest.raises(TrainferError, match="unknown GGUF type 'Q5_K'"):
        save_gguf(tmp_path / "a.gguf", cfg, state, tok, "Q5_K")
    with pytest.raises(TrainferError, match="bias on q/k/v only"):
        save_gguf(tmp_path / "a.gguf", cfg.replace(arch="qwen2"), state, tok)
    chars = HFTokenizer(models.WordLevel(vocab={"a": 0, "b": 1}, unk_token="a"))
    with pytest.raises(TrainferError, match="byte-level BPE"):
        save_gguf(tmp_path / "a.gguf", cfg, state, Tokenizer(chars, bos_token_id=None, eos_token_id=None))
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))  # nothing half-written


@pytest.mark.parametrize("to,name", [("gguf", "m.gguf"), ("onnx", "m.onnx"), ("hf", "hf")])
def test_a_quantized_directory_is_refused_by_every_export(tmp_path, to, name):
    from trainfer.io.loader import load
    from trainfer.io.quantized import save_quantized

    save_quantized(*load(model_dir(tmp_path / "src"), "int8"), tmp_path / "q8")
    with pytest.raises(TrainferError, match="trainfer quantize"):
        export_model(tmp_path / "q8", to, tmp_path / name)
    assert not (tmp_path / name).exists()


def test_cli_export_gguf(tmp_path, capsys):
    src = model_dir(tmp_path / "src")
    assert main(["export", str(src), "--to", "gguf", "--out", str(tmp_path / "m.gguf"), "--type", "Q8_0"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m.gguf")
    assert {t.tensor_type for t in open_gguf(tmp_path / "m.gguf").tensors} == {Q.F32, Q.Q8_0}
    assert main(["export", str(src), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "exists" in err and len(err.strip().splitlines()) == 1


def test_the_llama_cpp_benchmark_counts_agreement_right():
    """benchmarks/export_gguf.py's two counts (its llama.cpp run itself needs a llama.cpp build)."""
    path = Path(__file__).parents[2] / "benchmarks" / "export_gguf.py"
    spec = importlib.util.spec_from_file_location("export_gguf", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.first_divergence([1, 2, 3], [1, 2, 3]) is None and bench.equal_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert bench.first_divergence([1, 2, 3], [1, 5, 3]) == 1 and bench.equal_prefix([1, 2, 3], [1, 5, 3]) == 1
    assert bench.first_divergence([1, 2], [1, 2, 3]) == 2 and bench.equal_prefix([1, 2], [1, 2, 3]) == 2  # stopped
    assert bench.first_divergence([], [4]) == 0 and bench.equal_prefix([7], [4]) == 0


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_path, tmp_path_factory):
    return export_gguf(SMOLLM2, tmp_path_factory.mktemp("gguf") / "smollm2.F32.gguf")


@pytest.mark.real
def test_smollm2_f32_export_round_trips(smollm2, smollm2_f32):
    cfg, state, tok = load_gguf(smollm2_f32)
    ids = smollm2.tokenizer.encode("The capital of France is Paris, and 12 + 30 = 42.")
    with torch.no_grad():
        torch.testing.assert_close(
            build_model(cfg, state)(torch.tensor([ids])), smollm2.model(torch.tensor([ids])), rtol=0, atol=1e-5
        )
    for text in [*TEXTS, "def f(x):\n    return x ** 2  # 🙂"]:
        assert tok.encode(text) == smollm2.tokenizer.encode(text), text
    assert tok.chat_template == smollm2.tokenizer.chat_template
    assert (tok.bos_token_id, tok.eos_token_id) == (smollm2.tokenizer.bos_token_id, smollm2.tokenizer.eos_token_id)


@pytest.mark.real
def test_transformers_reads_the_smollm2_f32_export(smollm2, smollm2_f32):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smollm2_f32.parent, gguf_file=smollm2_f32.name, dtype=torch.float32)
    ids = torch.tensor([smollm2.tokenizer.encode("The capital of France is Paris, and 12 + 30 = 42.")])
    with torch.no_grad():
        want, got = ref.eval()(ids).logits, smollm2.model(ids)
    # Two implementations sum in different orders: equal to fp32 rounding over 30 layers, same argmax.
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
