"""GGUF import on small files written here with the `gguf` package, the way llama.cpp's converter does."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tests.conftest import make_hf_model
from trainfer.errors import TrainferError
from trainfer.io.gguf import load_gguf
from trainfer.io.loader import build_model

BYTES = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [chr(c) for c in range(174, 256)]
# GPT-2's byte alphabet is 256 printable characters; the remaining bytes map past U+0100.
BYTE_TOKENS = BYTES + [chr(256 + i) for i in range(256 - len(BYTES))]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py row order for q/k (what the loader must undo)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path,
    hf_model,
    qtype: Q = Q.F32,
    arch: str = "llama",
    drop: str | None = None,
    encode=None,
    feed_forward_length: int | None = None,
) -> None:
    """`encode(gguf name, array) -> (blocks, type, dequantized)` writes each matrix its own way and sets the model's
    weight to what the file holds; `feed_forward_length` overrides the metadata (an inconsistent file)."""
    cfg = hf_model.config
    tokens = SPECIALS + BYTE_TOKENS
    vocab = len(tokens)
    assert vocab >= cfg.vocab_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(feed_forward_length or cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)  # Qwen3's 128 is not hidden / heads
    w.add_value_length(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens[: cfg.vocab_size])
    w.add_token_types([3] * len(SPECIALS) + [1] * (cfg.vocab_size - len(SPECIALS)))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in hf_model.state_dict().items():
        base, kind = name.rsplit(".", 1)
        if base.startswith("model.layers."):
            _, _, i, rest = base.split(".", 3)
            gname = f"blk.{i}.{per_layer[rest]}.{kind}"
        else:
            gname = f"{names[base]}.{kind}"
        if gname == drop or (cfg.tie_word_embeddings and gname == "output.weight"):
            continue
        a = t.numpy().astype(np.float32)
        heads = cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads
        permuted = arch == "llama" and gname.split(".")[-2] in ("attn_q", "attn_k")
        if permuted:
            a = permute(a, heads)
        if a.ndim == 2 and encode is not None:
            raw, raw_type, values = encode(gname, a)
            w.add_tensor(gname, raw, raw_dtype=raw_type)
            values = unpermute(values, heads) if permuted else values
            with torch.no_grad():
                t.copy_(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))
        elif a.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf(**overrides):
    # hidden/intermediate sizes that are multiples of 32 so every block type fits the rows.
    return make_hf_model("llama", vocab_size=96, hidden_size=64, intermediate_size=128, **overrides)


@pytest.mark.parametrize("tied", [False, True])
def test_f32_gguf_gives_the_reference_logits(tmp_path, tied):
    ref = tiny_hf(tie_word_embeddings=tied)
    write_gguf(tmp_path / "m.gguf", ref)
    cfg, state, tok = load_gguf(tmp_path / "m.gguf")
    assert cfg.tie_embeddings == tied and cfg.n_kv_heads == 2
    model = build_model(cfg, state)
    tokens = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, rtol=1e-5, atol=1e-5)
    assert tok.encode("<|im_start|>hi") == [1, *tok.encode("hi")]  # control tokens stay whole


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_weights_dequantize_exactly(tmp_path, qtype):
    ref = tiny_hf()
    write_gguf(tmp_path / "m.gguf", ref, qtype)
    _, state, _ = load_gguf(tmp_path / "m.gguf")
    w = ref.state_dict()["model.layers.0.mlp.down_proj.weight"].numpy()
    expected = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
    np.testing.assert_array_equal(state["layers.0.mlp.down_proj.weight"].numpy(), expected)
    q = state["layers.1.self_attn.q_proj.weight"]  # permuted then unpermuted: near the original rows
    bound = {Q.F16: 1e-3, Q.BF16: 1e-2}.get(qtype, 0.2) * ref.state_dict()[
        "model.layers.1.self_attn.q_proj.weight"
    ].abs().max()
    assert (q - ref.state_dict()["model.layers.1.self_attn.q_proj.weight"]).abs().max() <= bound


def hand_blocks(qtype: Q, rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of 32 written byte by byte from llama.cpp's ggml-common.h layouts, and the values they stand for,
    computed here without gguf-py (the reference the other tests use): a check that does not trust it."""
    raw, values = [], []
    for _ in range(rows * 2):  # two blocks per row of 64
        d = np.float16(rng.choice([0.5, 0.25, -0.125, 2.0]))
        m = np.float16(rng.choice([0.0, -1.0, 0.75]))
        if qtype == Q.Q8_0:
            q = rng.integers(-128, 128, 32).astype(np.int8)
            raw.append(np.concatenate([np.frombuffer(d.tobytes(), np.uint8), q.view(np.uint8)]))
            values.append(np.float32(d) * q)
            continue
        q = rng.integers(0, 32 if qtype == Q.Q5_0 else 16, 32)
        nibbles = ((q[:16] & 15) | ((q[16:] & 15) << 4)).astype(np.uint8)  # element j low, element j + 16 high
        head = np.frombuffer(d.tobytes(), np.uint8)
        if qtype == Q.Q4_0:
            raw.append(np.concatenate([head, nibbles]))
            values.append(np.float32(d) * (q - 8))
        elif qtype == Q.Q4_1:
            raw.append(np.concatenate([head, np.frombuffer(m.tobytes(), np.uint8), nibbles]))
            values.append(np.float32(d) * q + np.float32(m))
        else:  # Q5_0: the fifth bits of the 32 elements in a little-endian uint32 between d and the nibbles
            qh = np.uint32(sum(int(b >> 4) << j for j, b in enumerate(q)))
            raw.append(np.concatenate([head, np.frombuffer(qh.tobytes(), np.uint8), nibbles]))
            values.append(np.float32(d) * (q - 16))
    return np.stack(raw).reshape(rows, -1), np.stack(values).astype(np.float32).reshape(rows, 64)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0])
def test_blocks_decode_to_what_the_format_says(qtype):
    from trainfer.io.gguf import dequantize

    raw, values = hand_blocks(qtype, np.random.default_rng(int(qtype)), rows=5)
    np.testing.assert_array_equal(dequantize(raw, qtype, (5, 64)), values)


@pytest.mark.parametrize("qtype,block", [(Q.Q4_K, 144), (Q.Q6_K, 210)])
def test_k_quant_blocks_reach_the_model_in_the_right_place(tmp_path, qtype, block):
    """gguf has no K-quant encoder, so write random blocks (with sane fp16 scales) and check the plumbing."""
    rng = np.random.default_rng(0)
    rows, cols = 8, 256
    raw = rng.integers(0, 256, size=(rows, block), dtype=np.uint8)
    scale = np.full(rows, 0.01, dtype=np.float16).view(np.uint8).reshape(rows, 2)
    if qtype == Q.Q4_K:
        raw[:, 0:2], raw[:, 2:4] = scale, scale  # d and dmin lead the block
    else:
        raw[:, -2:] = scale  # d closes the block
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from trainfer.io.gguf import dequantize, open_gguf

    t = open_gguf(tmp_path / "k.gguf").tensors[0]
    out = dequantize(t.data, t.tensor_type, (rows, cols))
    np.testing.assert_array_equal(out, gguf.quants.dequantize(raw, qtype).reshape(rows, cols))
    assert np.isfinite(out).all() and out.std() > 0


def test_unsupported_architecture_is_named(tmp_path):
    ref = tiny_hf()
    write_gguf(tmp_path / "m.gguf", ref, arch="gpt2")
    with pytest.raises(TrainferError, match="unsupported GGUF architecture 'gpt2'"):
        load_gguf(tmp_path / "m.gguf")


def test_unsupported_tensor_type_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 66), dtype=np.uint8), raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from trainfer.io.gguf import dequantize, open_gguf

    t = open_gguf(tmp_path / "iq.gguf").tensors[0]
    with pytest.raises(TrainferError, match="unsupported GGUF tensor type IQ2_XXS"):
        dequantize(t.data, t.tensor_type, (4, 256))


def test_truncated_and_garbage_files_are_clear_errors(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_hf())
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    for name in ("cut.gguf", "junk.gguf"):
        with pytest.raises(TrainferError, match="corrupt or truncated"):
            load_gguf(tmp_path / name)


def test_missing_tensor_is_reported(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_hf(), drop="blk.1.ffn_up.weight")
    cfg, state, _ = load_gguf(tmp_path / "m.gguf")
    with pytest.raises(TrainferError, match="missing"):
        build_model(cfg, state)
