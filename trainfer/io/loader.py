"""Float weights of any model: an alias, a .gguf file or a Hugging Face directory -> config, state dict, tokenizer
(for training, pruning, distilling and export); and the memory check every load makes first.

For inference, quant/checkpoint.load keeps a GGUF's own blocks instead (io/gguf.load_gguf_model).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainfer import registry
from trainfer.errors import TrainferError
from trainfer.io import peft
from trainfer.io.gguf import load_gguf
from trainfer.io.hf import load_state_dict, read_config, save_hf
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.config import ModelConfig
from trainfer.model.transformer import Transformer

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
    return model.to(device).eval()


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
        cfg, state, tok = load_gguf(path, dtype)  # one tensor at a time, no cache on disk
        return cfg, state, tok
    cfg = read_config(path)
    state = load_state_dict(path, dtype)
    tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    return cfg, state, tok


GIB = 1 << 30
RUNTIME_BYTES = GIB // 2  # the Python/torch process itself and the step's buffers, measured ~0.3-0.5 GiB


def available_memory() -> int | None:
    """Bytes the kernel says a new process can have without swapping (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def weight_bytes(name_or_path: str | os.PathLike[str], dtype: str = "auto") -> int:
    """Memory a model's weights take once loaded as `dtype`, from its header or config (nothing is loaded)."""
    from trainfer.io import gguf

    path = registry.resolve(name_or_path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise TrainferError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
        return gguf.weight_bytes(path, dtype)
    if not (path / "config.json").is_file():
        return 0  # not a model: loading it says why
    if (path / "adapter_config.json").exists():
        base = peft.read_settings(path)["base"]
        return weight_bytes(base, dtype) if base else 0
    if (path / "config.json").exists() and "quantization_config" in (path / "config.json").read_text():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    per = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.125, "int4": 0.75}
    if dtype == "auto":
        from trainfer.quant.checkpoint import read_config_dtype

        dtype = "bfloat16" if read_config_dtype(path) == "bfloat16" else "float32"
    return int(read_config(path).n_params * per.get(str(dtype), 4.0))


def check_memory(name_or_path: str | os.PathLike[str], dtype: str, kv_bytes: int) -> None:
    """Refuse, before loading anything, a model whose weights and KV cache cannot fit in this machine's memory
    (running out halfway would take the whole machine down, or read as a corrupt file)."""
    available = available_memory()
    if available is None:
        return
    weights = weight_bytes(name_or_path, dtype)
    need = weights + kv_bytes + RUNTIME_BYTES
    if need > available:
        raise TrainferError(
            f"not enough memory for {name_or_path}: it needs about {need / GIB:.1f} GiB ({weights / GIB:.1f} GiB of "
            f"weights as {dtype}, {kv_bytes / GIB:.1f} GiB of KV cache, {RUNTIME_BYTES / GIB:.1f} GiB for the "
            f"runtime) and this machine has {available / GIB:.1f} GiB available; try --dtype int4, a smaller "
            "--kv-cache-gb, or close other programs"
        )


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
