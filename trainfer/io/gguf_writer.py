"""GGUF export: any model trainfer loads -> one llama.cpp file (F32, F16, BF16, Q8_0, Q4_0) with its tokenizer.

Written with the `gguf` package's GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes Llama and
Qwen2 checkpoints (tensor names, q/k row order, rope_freqs for Llama-3 scaling), so llama.cpp, transformers
and trainfer's own reader (io/gguf.py) all load it. `trainfer export MODEL --to gguf --out m.gguf --type Q8_0`
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from trainfer.errors import TrainferError
from trainfer.io import gguf as gguf_reader
from trainfer.io.gguf_rope import llama3_factors
from trainfer.io.gguf_vocab import vocab_metadata
from trainfer.io.loader import check_state, load_checkpoint
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.config import ModelConfig

GGUF_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0}
_FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
}
# llama.cpp's tensor names: the reader's map, turned around (one table for both directions)
_LAYER_NAMES = {ours: theirs for theirs, ours in gguf_reader._LAYER_NAMES.items()}
_TOP_NAMES = {ours: theirs for theirs, ours in gguf_reader._TOP_NAMES.items()}


def gguf_name(name: str) -> str:
    """trainfer parameter name -> llama.cpp tensor name (the inverse of io.gguf.tensor_name)."""
    base, kind = name.rsplit(".", 1)
    if base.startswith("layers."):
        _, i, rest = base.split(".", 2)
        return f"blk.{i}.{_LAYER_NAMES[rest]}.{kind}"
    return f"{_TOP_NAMES[base]}.{kind}"


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's rotary halves interleaved (io.gguf.unpermute_rope undoes it)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """A float32 tensor as stored: norms, biases and other 1-D tensors stay F32 (as in llama.cpp's files);
    a matrix whose rows do not split into 32-value blocks falls back to F16, as convert_hf_to_gguf.py does."""
    if w.ndim < 2 or qtype == Q.F32:
        return w, Q.F32
    if qtype == Q.F16:
        return w.astype(np.float16), Q.F16
    try:
        return gguf.quants.quantize(w, qtype), qtype
    except gguf.QuantError:
        return w.astype(np.float16), Q.F16


def _check_supported(cfg: ModelConfig) -> None:
    if cfg.arch == "qwen2" and (cfg.out_bias or cfg.mlp_bias or not cfg.qkv_bias):
        raise TrainferError("llama.cpp's qwen2 has bias on q/k/v only; this model cannot be written as qwen2")
    if cfg.arch == "qwen2" and cfg.n_heads * cfg.head_dim != cfg.dim:
        raise TrainferError("llama.cpp's qwen2 needs n_heads * head_dim == dim; this model has another head_dim")
    if cfg.arch not in ("llama", "qwen2"):
        raise TrainferError(f"no GGUF export for architecture {cfg.arch!r}; llama and qwen2 are written")
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type", "default"))
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise TrainferError(f"no GGUF export for RoPE scaling {kind!r}; default, linear, llama3 and yarn are written")


def _add_hparams(w: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif scaling.get("rope_type", scaling.get("type")) == "yarn":  # as convert_hf_to_gguf.py writes Qwen2.5's
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings") or cfg.max_seq_len))
        for key, add in (
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            if scaling.get(key):
                add(float(scaling[key]))


def _add_vocab(w: gguf.GGUFWriter, tok: Tokenizer, vocab_size: int) -> None:
    meta = vocab_metadata(tok, vocab_size)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.add_add_eos_token(meta["tokenizer.ggml.add_eos_token"])
    for key, add in [
        ("bos_token_id", w.add_bos_token_id),
        ("eos_token_id", w.add_eos_token_id),
        ("unknown_token_id", w.add_unk_token_id),
        ("padding_token_id", w.add_pad_token_id),
    ]:
        if f"tokenizer.ggml.{key}" in meta:
            add(meta[f"tokenizer.ggml.{key}"])
    if "tokenizer.chat_template" in meta:
        w.add_chat_template(meta["tokenizer.chat_template"])


def save_gguf(
    out: Path,
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    tok: Tokenizer | None,
    qtype: str = "F32",
    name: str = "",
) -> Path:
    """Write one GGUF file (atomically: a temporary file renamed into place)."""
    if qtype not in GGUF_TYPES:
        raise TrainferError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    if tok is None:
        raise TrainferError("this model has no tokenizer (tokenizer.json); a GGUF file must carry one")
    _check_supported(cfg)
    check_state(cfg, state)
    qt, out = GGUF_TYPES[qtype], Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, cfg.arch)
        w.add_name(name or out.stem)
        w.add_file_type(_FILE_TYPES[qt])
        if qt not in (Q.F32, Q.F16):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(w, cfg)
        _add_vocab(w, tok, cfg.vocab_size)
        scaling = cfg.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "llama3":
            factors = llama3_factors(cfg.rope_theta, cfg.head_dim, scaling).astype(np.float32)
            w.add_tensor("rope_freqs.weight", factors)
        for key, t in state.items():
            if key == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied: llama.cpp reuses token_embd when output.weight is absent
            a = t.detach().to(torch.float32).numpy()
            gname = gguf_name(key)
            if cfg.arch == "llama" and gname.split(".")[-2] in ("attn_q", "attn_k"):
                a = permute_rope(a, cfg.n_heads if "attn_q" in gname else cfg.n_kv_heads)
            data, stored = encode_tensor(np.ascontiguousarray(a), qt)
            w.add_tensor(gname, data, raw_dtype=stored if stored not in (Q.F32, Q.F16) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def export_gguf(name_or_path: str | os.PathLike[str], out: Path, qtype: str = "F32", base: str | None = None) -> Path:
    """Any model trainfer loads (alias, .gguf, HF directory, run, adapter merged into its base) as a GGUF file."""
    out = Path(out)
    if out.exists():
        raise TrainferError(f"{out} exists; choose a new file name")
    if out.suffix != ".gguf":
        raise TrainferError(f"{out}: a GGUF file name ends in .gguf")
    cfg, state, tok = load_checkpoint(name_or_path, torch.float32, base)
    return save_gguf(out, cfg, state, tok, qtype, name=Path(str(name_or_path)).name)
