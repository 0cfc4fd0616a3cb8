"""The one loader: an alias, a training run, a .gguf file, a Hugging Face directory, a PEFT adapter or a
`trainfer quantize` directory ->
- `load`: a model for inference, in the file's own format by default (a GGUF's blocks memory-mapped, int8 /
  int4 quantized one tensor at a time, never a float copy of the whole model);
- `load_checkpoint`: config, float state dict and tokenizer, for training, pruning, distilling and export;
and `resolve` (a name to a local path) and the memory check every load makes first.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from trainfer import registry
from trainfer.errors import TrainferError, new_directory
from trainfer.io import gguf, peft
from trainfer.io.gguf import load_gguf, load_gguf_model
from trainfer.io.hf import load_state_dict, read_config, save_hf
from trainfer.io.quantized import is_quantized, load_quantized
from trainfer.io.run_dir import best_checkpoint
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.config import ModelConfig
from trainfer.model.transformer import Transformer
from trainfer.quant.blocks import BLOCK, quantize_int4, quantize_int8, quantize_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """A local path: a training run directory stands for its best checkpoint; anything else as the registry
    resolves it (an alias, pulled on first use, or a path)."""
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and (path / "checkpoints").is_dir():
        best = best_checkpoint(path)
        if best is None:
            raise TrainferError(f"{path} is a training run without a finished checkpoint yet")
        return best
    return registry.resolve(name_or_path)


def load(name_or_path: str | Path, dtype: str = "auto", device: str = "cpu") -> tuple[Transformer, Tokenizer | None]:
    """Any model for inference. auto: as the file stores it (a GGUF's own blocks, memory-mapped; a Hugging Face
    directory as float32, or bfloat16 when its config says so). float32 / bfloat16: expanded. int8 / int4:
    quantized at load (a GGUF one tensor at a time; its tensors already in that kind keep their blocks). A
    `trainfer quantize` directory loads as it was saved (whatever dtype says)."""
    path = resolve(name_or_path)
    if is_quantized(path):
        model, tok = load_quantized(path)
        return model.to(device), tok
    if path.is_file() and path.suffix == ".gguf":
        log: list[str] = []
        model, tok = load_gguf_model(path, dtype, log)
        for line in log:
            print(f"trainfer: {line}", file=sys.stderr)
        return model.to(device), tok
    if dtype == "auto":
        dtype = "bfloat16" if read_config_dtype(path) == "bfloat16" else "float32"
    if dtype not in ("int8", "int4"):
        return load_model(path, parse_dtype(dtype), device)
    model = load_hf_quantized(path, dtype)
    tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    return model.to(device), tok


def load_hf_quantized(path: Path, kind: str) -> Transformer:
    """A Hugging Face directory (or a float run) quantized one tensor at a time as its safetensors are read: never
    a float copy of the whole model (an 8B model in bf16 is 16 GB; its int4 blocks 4.5 GB)."""
    if peft.is_adapter(path) or not (Path(path) / "config.json").exists():  # an adapter merges into float first
        cfg, state, _ = load_checkpoint(path, "float32")
        return quantize_model(build_model(cfg, state), kind)
    cfg = read_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features % BLOCK == 0}
    given: dict[str, tuple] = {}

    def each(name: str, t: torch.Tensor) -> torch.Tensor | None:
        module = name.removesuffix(".weight")
        if cfg.tie_embeddings and module in ("embed_tokens", "lm_head"):
            if module == "lm_head":
                return None  # the same table as the embedding, which the tied head reads
            module = "lm_head"
        if module not in linears or not name.endswith(".weight"):
            return t.float()
        w = t.float()
        int8 = kind == "int8" or (module == "lm_head" and cfg.tie_embeddings)
        given[module] = (*quantize_int8(w), None) if int8 else quantize_int4(w)
        return None

    state = load_state_dict(path, None, each)
    model.load_state_dict(state, strict=False, assign=True)
    quantize_model(model, kind, given)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left or set(given) != linears:
        missing = left or sorted(linears - set(given))
        raise TrainferError(f"{path}: weights do not match the config: missing {missing[:5]}")
    return model.eval()


def read_config_dtype(path: Path) -> str | None:
    """The torch_dtype (or dtype) a Hugging Face config.json names, if any."""
    config = Path(path) / "config.json"
    try:
        hf = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return hf.get("torch_dtype") or hf.get("dtype")


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
    path = resolve(name_or_path)
    if peft.is_adapter(path):
        base = base or peft.read_settings(path)["base"]
        if not base:
            raise TrainferError(f"{path} is a LoRA adapter that does not name its base model; give the base")
        if peft.is_adapter(resolve(base)):
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

    path = resolve(name_or_path)
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
    out_dir = new_directory(out_dir)
    dtype = parse_dtype(dtype)
    cfg, state, tok = load_checkpoint(name_or_path, dtype, base)
    check_state(cfg, state)
    save_hf(out_dir, cfg, state, dtype)
    if tok is not None:
        tok.save(out_dir)
    return out_dir
