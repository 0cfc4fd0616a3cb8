"""One entry point for weights: an alias, a .gguf file or a Hugging Face directory -> model + tokenizer.

A GGUF is dequantized once and cached as an fp32 Hugging Face directory under $TRAINFER_HOME/converted
(keyed by the file's sha256), because the `gguf` reader and numpy dequantization take seconds while
memory-mapped safetensors load in well under one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from trainfer import registry
from trainfer.errors import TrainferError
from trainfer.io import peft
from trainfer.io.gguf import load_gguf
from trainfer.io.hf import load_state_dict, read_config, save_hf
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.config import ModelConfig
from trainfer.model.transformer import Transformer, rope_frequencies

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise TrainferError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """Raise unless the state dict has exactly the config's tensors, in its shapes; returns the model on meta."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected - {"lm_head.weight"}
    if missing or unexpected:
        hint = ""
        if any(k.endswith(".qweight") for k in unexpected):
            hint = " (int8/int4 blocks of `trainfer quantize`: use the model it was made from)"
        raise TrainferError(
            f"weights do not match the config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            + hint
        )
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        want = model.get_parameter(name).shape
        if t.shape != want:
            raise TrainferError(f"tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(want)}")
    return model


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> Transformer:
    """Transformer from a state dict, without paying for a random init that would be overwritten."""
    model = check_state(cfg, state)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the shared Parameter
    model.inv_freq = rope_frequencies(cfg)  # buffers are not in the state dict; the meta one is empty
    return model.to(device).eval()


def _gguf_cache_dir(path: Path) -> Path:
    return registry.home() / "converted" / registry.sha256_of(path)[:20]


def _convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF to an fp32 HF directory in the cache (atomically) and return it."""
    out = _gguf_cache_dir(path)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=0, desc=f"dequantize {path.name}", unit="tensor", disable=None) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        cfg, state, tok = load_gguf(path, torch.float32, progress)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        save_hf(tmp, cfg, state, torch.float32)
        tok.save(tmp)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():  # a concurrent writer may have won the rename
            raise
    return out


def load_checkpoint(
    name_or_path: str | os.PathLike[str], dtype: str | torch.dtype = "float32", base: str | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """Config, weights and tokenizer of any model; a LoRA adapter (a PEFT directory or a LoRA fine-tune's run)
    loads as its base with the adapter merged in (`base` overrides the base the adapter names)."""
    dtype = parse_dtype(dtype)
    path = registry.resolve(name_or_path)
    if peft.is_adapter(path):
        base = base or peft.read_settings(path)["base"]
        if not base:
            raise TrainferError(f"{path} is a LoRA adapter that does not name its base model; give the base")
        if peft.is_adapter(registry.resolve(base)):
            raise TrainferError(f"the base of {path} is itself an adapter ({base}); merge that one first")
        cfg, state, tok = load_checkpoint(base, torch.float32)
        state = peft.merge_into(state, path)
        return cfg, {k: v.to(dtype) for k, v in state.items()}, tok
    if base is not None:
        raise TrainferError(f"{path} is not a LoRA adapter (no adapter_config.json); a base applies to adapters only")
    if path.is_file():
        if path.suffix != ".gguf":
            raise TrainferError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
        path = _convert_gguf(path)
    cfg = read_config(path)
    state = load_state_dict(path, dtype)
    tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    return cfg, state, tok


def load_model(
    name_or_path: str | os.PathLike[str], dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> tuple[Transformer, Tokenizer | None]:
    cfg, state, tok = load_checkpoint(name_or_path, dtype)
    return build_model(cfg, state, device), tok


def export_hf(
    name_or_path: str | os.PathLike[str], out_dir: Path, dtype: str | torch.dtype = "float32", base: str | None = None
) -> Path:
    """Write any loadable model as a Hugging Face directory that `transformers` (and vLLM) can load; an adapter
    is written merged into its base (`trainfer merge`)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TrainferError(f"{out_dir} exists and is not empty; choose a new directory")
    dtype = parse_dtype(dtype)
    cfg, state, tok = load_checkpoint(name_or_path, dtype, base)
    check_state(cfg, state)
    save_hf(out_dir, cfg, state, dtype)
    if tok is not None:
        tok.save(out_dir)
    return out_dir
