"""GGUF import: llama.cpp's single-file format -> ModelConfig, a state dict and a Tokenizer.

Metadata and tensors are read with the `gguf` package; quantized blocks are dequantized with its
numpy kernels, then cast to the requested dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, quants

from trainfer.errors import TrainferError
from trainfer.io.gguf_rope import llama3_from_factors
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.config import ModelConfig

SUPPORTED_ARCHS = ("llama", "qwen2")
SUPPORTED_TYPES = {
    Q.F32,
    Q.F16,
    Q.BF16,
    Q.Q8_0,
    Q.Q4_0,
    Q.Q4_1,
    Q.Q5_0,
    Q.Q5_1,
    Q.Q2_K,
    Q.Q3_K,
    Q.Q4_K,
    Q.Q5_K,
    Q.Q6_K,
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
ROPE_FREQS = "rope_freqs.weight"  # not a parameter: Llama-3 RoPE scaling, folded into the config


def open_gguf(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except FileNotFoundError:
        raise TrainferError(f"no such file: {path}") from None
    except Exception as e:  # the reader raises ValueError/IndexError/etc. on damaged files
        raise TrainferError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e}") from None


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    meta = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = fld.contents()
    return meta


def config_from_metadata(
    meta: dict[str, Any], tensor_names: set[str], rope_factors: np.ndarray | None = None
) -> ModelConfig:
    """`rope_factors`: the data of the `rope_freqs` tensor, which llama.cpp writes for Llama-3 RoPE scaling."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise TrainferError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    if ROPE_FREQS in tensor_names and rope_factors is None:
        raise TrainferError("this GGUF has per-frequency RoPE factors (rope_freqs) that were not read")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise TrainferError(f"GGUF metadata lacks {arch}.{key}")
        return value

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or dim // n_heads)
    rope_theta = float(get("rope.freq_base", 10000.0))
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif rope_factors is not None:
        scaling = llama3_from_factors(rope_theta, head_dim, rope_factors)
    return ModelConfig(
        arch=arch,
        vocab_size=int(meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        hidden_dim=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_seq_len=int(get("context_length", 2048)),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        out_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )


def tensor_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> trainfer/Hugging Face parameter name (without the `model.` prefix)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise TrainferError(f"unexpected tensor {gguf_name!r} in GGUF file")


def read_config(reader: GGUFReader, meta: dict[str, Any]) -> ModelConfig:
    """The model's shape from the metadata and the tensor list (and the rope_freqs values, when present)."""
    factors = next((np.asarray(t.data, dtype=np.float32) for t in reader.tensors if t.name == ROPE_FREQS), None)
    return config_from_metadata(meta, {t.name for t in reader.tensors}, factors)


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time row order for q/k (it interleaves each head's two rotary halves)."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def dequantize(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """Raw tensor data of a GGUF tensor -> float32 array in PyTorch order (rows, cols)."""
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise TrainferError(f"unsupported GGUF tensor type {qtype.name}; supported: {names}")
    if qtype == Q.F32:
        out = np.asarray(data, dtype=np.float32)
    elif qtype == Q.F16:
        out = np.asarray(data).view(np.float16).astype(np.float32)
    else:
        out = quants.dequantize(np.asarray(data), qtype)
    return out.reshape(shape)


def _fp16(pairs: np.ndarray) -> np.ndarray:
    """(..., 2) bytes -> (...) fp32 values of little-endian fp16 (a block's d or m)."""
    return pairs.copy().view(np.float16)[..., 0].astype(np.float32)


def native_blocks(path: Path, kind: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The file's own quantized blocks, for tensors already in the requested kind (Q8_0 for int8; Q4_0 / Q4_1
    for int4; the tied embedding also as Q8_0 for int4): {parameter name: (q, scales, mins or None)} in
    trainfer's layout (quant/blocks.py), no dequantize-requantize round trip. fp16 scales widen exactly to
    fp32; Q4_0's values q * d - 8 d are Q4_1's with m = -8 d (exact as well)."""
    reader = open_gguf(Path(path))
    meta = read_metadata(reader)
    cfg = read_config(reader, meta)
    wanted = {"int8": {Q.Q8_0}, "int4": {Q.Q4_0, Q.Q4_1}}[kind]
    out = {}
    for t in reader.tensors:
        tied_embedding = kind == "int4" and t.name == "token_embd.weight" and cfg.tie_embeddings
        if not (t.tensor_type in wanted or (tied_embedding and t.tensor_type == Q.Q8_0)):
            continue
        rows, cols = (int(n) for n in reversed(t.shape))
        raw = np.asarray(t.data).reshape(rows, cols // 32, -1)
        d = _fp16(raw[..., 0:2])
        if t.tensor_type == Q.Q8_0:
            q, m = raw[..., 2:].copy().view(np.int8).reshape(rows, cols), None
        elif t.tensor_type == Q.Q4_1:
            q, m = raw[..., 4:].reshape(rows, cols // 2), _fp16(raw[..., 2:4])
        else:
            q, m = raw[..., 2:].reshape(rows, cols // 2), -8 * d
        if cfg.arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):  # rows permuted at convert time
            heads = cfg.n_heads if "attn_q" in t.name else cfg.n_kv_heads
            q, d = unpermute_rope(q, heads), unpermute_rope(d, heads)
            m = None if m is None else unpermute_rope(m, heads)
        name = tensor_name(t.name).removesuffix(".weight")
        if name == "embed_tokens":  # tied: the head's blocks (an untied embedding stays a float table)
            if not cfg.tie_embeddings:
                continue
            name = "lm_head"
        out[name] = tuple(None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in (q, d, m))
    return out


def load_gguf(
    path: Path, dtype: torch.dtype = torch.float32, progress: Callable[[int, int], None] | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    reader = open_gguf(Path(path))
    meta = read_metadata(reader)
    cfg = read_config(reader, meta)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    state: dict[str, torch.Tensor] = {}
    for i, t in enumerate(reader.tensors):
        if t.name == ROPE_FREQS:
            continue
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first
        try:
            w = dequantize(t.data, t.tensor_type, shape)
        except TrainferError:
            raise
        except Exception as e:
            raise TrainferError(f"cannot decode tensor {t.name} of {path} (corrupt or truncated?): {e}") from None
        name = tensor_name(t.name)
        if cfg.arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            w = unpermute_rope(w, cfg.n_heads if "attn_q" in t.name else cfg.n_kv_heads)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)  # a writable copy
        if progress:
            progress(i + 1, len(reader.tensors))
    return cfg, state, tokenizer
