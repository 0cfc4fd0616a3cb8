"""GGUF import: llama.cpp's single-file format -> a ready model (load_gguf_model), or a config, a float state dict
and a Tokenizer (load_gguf, for training and export).

The header and tensor table are read by io/gguf_file.py over a memory map. For inference the tensors' own blocks are
the weights (quant/ggml.py); converting to another dtype happens one tensor at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from trainfer.errors import TrainferError
from trainfer.io.gguf_file import GGUFFile
from trainfer.io.gguf_file import Tensor as ReaderTensor
from trainfer.io.gguf_rope import llama3_from_factors
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.config import ModelConfig
from trainfer.model.transformer import Transformer
from trainfer.quant import ggml
from trainfer.quant.blocks import QEmbedding, QLinear, quantize_int4, quantize_int8

FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16}

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
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
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
ROPE_FREQS = "rope_freqs.weight"  # not a parameter: Llama-3 RoPE scaling, folded into the config


def open_gguf(path: Path) -> GGUFFile:
    """The file's header and tensor views (io/gguf_file.py). The last one is kept: a load reads it twice (the
    memory check, then the weights), and a changed file (size or time) is read again."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        raise TrainferError(f"no such file: {path}") from None
    return _reader(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _reader(path: Path, size: int, mtime: int) -> GGUFFile:
    return GGUFFile(path)


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    return dict(reader.metadata)


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
    elif meta.get(f"{arch}.rope.scaling.type") == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(get("rope.scaling.factor"))}
        for key, field in (("original_context_length", "original_max_position_embeddings"),
                           ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):  # fmt: skip
            if f"{arch}.rope.scaling.{key}" in meta:
                scaling[field] = (int if field.startswith("original") else float)(get(f"rope.scaling.{key}"))
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
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
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


def read_config(reader: GGUFFile, meta: dict[str, Any]) -> ModelConfig:
    """The model's shape from the metadata and the tensor list (and the rope_freqs values, when present)."""
    freqs = (t for t in reader.tensors if t.name == ROPE_FREQS)
    factors = next((np.asarray(t.data, dtype=np.float32).reshape(-1) for t in freqs), None)
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
        return np.asarray(data, dtype=np.float32).reshape(shape)
    blocks = torch.from_numpy(np.asarray(data).view(np.uint8).reshape(shape[0] if len(shape) == 2 else 1, -1))
    return ggml.dequantize(blocks, qtype).numpy().reshape(shape)


def _rows(t: ReaderTensor) -> tuple[int, int]:
    """(rows, columns) of a weight; a vector is one row."""
    dims = [int(n) for n in reversed(t.shape)]
    return (dims[0], dims[1]) if len(dims) == 2 else (1, dims[0])


def _blocks(t: ReaderTensor) -> torch.Tensor:
    """The tensor's bytes as (rows, row bytes) uint8: a view into the memory-mapped file, no copy."""
    return torch.from_numpy(np.asarray(t.data).view(np.uint8).reshape(_rows(t)[0], -1))


def _permuted_heads(cfg: ModelConfig, gguf_name: str) -> int | None:
    """Llama q/k rows are permuted at convert time: the number of heads to undo it with (None: not permuted)."""
    kind = gguf_name.split(".")[-2] if gguf_name.count(".") >= 2 else ""
    if cfg.arch != "llama" or kind not in ("attn_q", "attn_k"):
        return None
    return cfg.n_heads if kind == "attn_q" else cfg.n_kv_heads


def _float(t: ReaderTensor, cfg: ModelConfig) -> torch.Tensor:
    """The tensor as an fp32 copy (norms, biases, weights asked for as float), q/k rows in Hugging Face order."""
    rows, cols = _rows(t)
    w = dequantize(t.data, t.tensor_type, (rows, cols))
    w = w if len(t.shape) == 2 else w.reshape(cols)
    heads = _permuted_heads(cfg, t.name)
    if heads is not None:
        w = unpermute_rope(w, heads)
    return torch.from_numpy(np.array(w, dtype=np.float32))


def _weight_module(t: ReaderTensor, cfg: ModelConfig, dtype: str, int8: bool, log: list[str]) -> nn.Module:
    """The Linear for one weight tensor as `dtype` asks: auto keeps the file's blocks in place (a format without a
    kernel becomes int8, logged), int8 / int4 convert this one tensor (the file's own Q8_0 / Q4_0 / Q4_1 blocks
    exactly), float32 / bfloat16 expand it. `int8`: keep int8 under int4 (a tied embedding / LM head)."""
    rows, cols = _rows(t)
    heads = _permuted_heads(cfg, t.name)
    qtype = t.tensor_type
    if dtype == "auto" and qtype == Q.F32:
        w = torch.from_numpy(np.asarray(t.data, dtype=np.float32).reshape(rows, cols))
        return _nn_linear(torch.from_numpy(unpermute_rope(w.numpy(), heads)) if heads else w)
    if dtype == "auto" and ggml.has_kernel(qtype, cols):
        blocks = _blocks(t)
        if heads is not None:  # whole rows of blocks change places (a copy of q / k only)
            blocks = torch.from_numpy(np.ascontiguousarray(unpermute_rope(blocks.numpy(), heads)))
            t.release()
        return ggml.GGMLLinear(blocks, qtype, cols)
    if dtype == "auto" and qtype in (Q.F16, Q.BF16):  # rows that are not 32-value blocks: exact as fp32
        return _nn_linear(_float(t, cfg))
    if dtype == "auto":
        log.append(f"{t.name}: {qtype.name} has no native kernel; converted to int8 (Q8_0-style blocks)")
    if dtype in ("auto", "int8", "int4"):
        kind = "int8" if dtype == "auto" or int8 else dtype
        exact = _own_blocks(t, kind)
        if exact is not None:
            parts = (a if heads is None or a is None else unpermute_rope(a, heads) for a in exact)
            return QLinear(*(None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in parts))
        w = _float(t, cfg)
        return QLinear(*quantize_int8(w), None) if kind == "int8" else QLinear(*quantize_int4(w))
    return _nn_linear(_float(t, cfg).to(FLOATS[dtype]))


def _nn_linear(w: torch.Tensor) -> nn.Linear:
    with torch.device("meta"):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(w)  # trainable, as build_model's are (cost advise times a training step)
    return lin


def _fp16(pairs: np.ndarray) -> np.ndarray:
    """(..., 2) bytes -> (...) fp32 values of little-endian fp16 (a block's d or m)."""
    return pairs.copy().view(np.float16)[..., 0].astype(np.float32)


def _own_blocks(t: ReaderTensor, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """A tensor already in the requested kind, in trainfer's int8 / int4 layout (quant/blocks.py) without a
    dequantize-requantize round trip: Q8_0 for int8, Q4_0 / Q4_1 for int4. fp16 scales widen exactly to fp32;
    Q4_0's values q * d - 8 d are Q4_1's with m = -8 d. None for any other type."""
    wanted = {"int8": (Q.Q8_0,), "int4": (Q.Q4_0, Q.Q4_1)}[kind]
    if t.tensor_type not in wanted:
        return None
    rows, cols = _rows(t)
    raw = np.asarray(t.data).reshape(rows, cols // 32, -1)
    d = _fp16(raw[..., 0:2])
    if t.tensor_type == Q.Q8_0:
        return raw[..., 2:].copy().view(np.int8).reshape(rows, cols), d, None
    if t.tensor_type == Q.Q4_1:
        return raw[..., 4:].reshape(rows, cols // 2), d, _fp16(raw[..., 2:4])
    return raw[..., 2:].reshape(rows, cols // 2), d, -8 * d


def weight_bytes(path: Path, dtype: str = "auto") -> int:
    """Memory the weights take once loaded as `dtype` (auto: the file's own size, plus any format converted)."""
    per_weight = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.125, "int4": 0.75}
    total = 0
    for t in open_gguf(Path(path)).tensors:
        if len(t.shape) < 2:
            total += int(t.n_elements) * 4
        elif dtype == "auto":
            native = ggml.has_kernel(t.tensor_type, int(t.shape[0])) or t.tensor_type == Q.F32
            total += int(t.n_bytes) if native else int(t.n_elements * 1.125)
        else:
            total += int(t.n_elements * per_weight[dtype])
    return total


def load_gguf_model(path: Path, dtype: str = "auto", log: list[str] | None = None) -> tuple[Transformer, Tokenizer]:
    """A GGUF file as a ready model, one tensor at a time. With dtype auto the weights stay the file's blocks,
    memory-mapped copy-on-write (the file is never written); nothing becomes fp32 unless asked. `log` collects
    the tensors converted."""
    log = [] if log is None else log
    path = Path(path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    cfg = read_config(reader, meta)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.named_parameters())
    seen = set()
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        name = tensor_name(t.name)
        if name not in expected:
            raise TrainferError(f"{path}: tensor {t.name} does not belong to a {cfg.arch} model of this config")
        want = tuple(expected[name].shape)
        if _rows(t) != (want if len(want) == 2 else (1, want[0])) or len(t.shape) != len(want):
            got = tuple(int(n) for n in reversed(t.shape))
            raise TrainferError(f"{path}: tensor {t.name} has shape {got}, the model's config implies {want}")
        seen.add(name)
        module_name, _, leaf = name.rpartition(".")
        if module_name == "embed_tokens":
            model.embed_tokens = _embedding(t, cfg, dtype, log)
        elif leaf == "weight" and not module_name.endswith("norm"):
            old = model.get_submodule(module_name)
            module = _weight_module(t, cfg, dtype, module_name == "lm_head" and cfg.tie_embeddings, log)
            module.bias = old.bias  # on meta until its own tensor comes
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
        else:  # norms and biases: small, fp32 copies
            value = _float(t, cfg).to(FLOATS.get(dtype, torch.float32))  # a bf16 model is bf16 throughout
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(value))
    missing = sorted(n for n in expected if n not in seen and not (n == "lm_head.weight" and cfg.tie_embeddings))
    if missing:
        raise TrainferError(f"{path}: the file lacks tensors {missing[:5]} of a {cfg.arch} model")
    if cfg.tie_embeddings:
        model.lm_head = _tied_head(model.embed_tokens)
    return model.eval(), tokenizer


def _embedding(t: ReaderTensor, cfg: ModelConfig, dtype: str, log: list[str]) -> nn.Module:
    """The token table: the file's blocks read row by row (auto), int8 rows (int8 / int4), or a float table."""
    if dtype in FLOATS or (dtype == "auto" and t.tensor_type == Q.F32):
        if dtype == "auto":
            table = torch.from_numpy(np.asarray(t.data, dtype=np.float32).reshape(cfg.vocab_size, cfg.dim))
        else:
            table = _float(t, cfg).to(FLOATS[dtype])
        return nn.Embedding.from_pretrained(table, freeze=False)
    table = _weight_module(t, cfg, dtype, True, log)
    return ggml.GGMLEmbedding(table) if isinstance(table, ggml.GGMLLinear) else QEmbedding(table)


def _tied_head(embedding: nn.Module) -> nn.Module:
    """The LM head of a tied model: the embedding's own table (no second copy)."""
    if isinstance(embedding, (ggml.GGMLEmbedding, QEmbedding)):
        return embedding.head
    return _nn_linear(embedding.weight)


def load_gguf(
    path: Path, dtype: torch.dtype = torch.float32, progress: Callable[[int, int], None] | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, a float state dict (Hugging Face names and row order) and the tokenizer: for training, pruning,
    distilling and export, which need float weights. One tensor is expanded at a time."""
    reader = open_gguf(Path(path))
    meta = read_metadata(reader)
    cfg = read_config(reader, meta)
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    state: dict[str, torch.Tensor] = {}
    for i, t in enumerate(reader.tensors):
        if t.name == ROPE_FREQS:
            continue
        try:
            state[tensor_name(t.name)] = _float(t, cfg).to(dtype)
        except (TrainferError, MemoryError):
            raise
        except Exception as e:
            raise TrainferError(f"cannot decode tensor {t.name} of {path} (corrupt or truncated?): {e}") from None
        if progress:
            progress(i + 1, len(reader.tensors))
    return cfg, state, tokenizer
