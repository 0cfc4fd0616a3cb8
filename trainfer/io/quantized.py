"""A quantized model directory: the Hugging Face layout with int8 / int4 weights and their block scales stored
as they are computed, so it loads again without re-quantizing (`trainfer quantize MODEL --to int4 --out DIR`).

    config.json        the model's config plus "quantization_config": {"quant_method": "trainfer", ...}
    model.safetensors  per quantized Linear: `<module>.qweight` (int8 (out, in), or int4 packed two per byte as
                       uint8 (out, in / 2)), `<module>.scales` (fp32, (out, in / 32)) and for int4
                       `<module>.mins` (fp32, (out, in / 32)); other tensors (norms, an untied embedding) as usual
    tokenizer.json, tokenizer_config.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainfer.errors import TrainferError, new_directory
from trainfer.io.hf import config_to_hf, load_state_dict, read_config
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.transformer import Transformer
from trainfer.quant.blocks import BLOCK, QEmbedding, QLinear, weights_kind

FORMATS = {"int8": "q8_0", "int4": "q4_1"}


def is_quantized(path: Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("quantization_config", {}).get("quant_method") == "trainfer"
    except (json.JSONDecodeError, AttributeError):
        return False


def save_quantized(model: Transformer, tokenizer: Tokenizer | None, out_dir: Path) -> Path:
    out_dir = new_directory(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.startswith("embed_tokens.head.") or name == "inv_freq":
            continue  # a tied embedding reads the head's int8 rows; the rope table is rebuilt on load
        tensors[name if name.startswith("lm_head") else f"model.{name}"] = t.detach().clone()  # views: own copies
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    kind = weights_kind(model)
    if kind is None:
        raise TrainferError("the model has no quantized weights to save")
    quant = {"quant_method": "trainfer", "format": FORMATS[kind], "bits": int(kind[3:]), "block_size": BLOCK}
    config = {**config_to_hf(model.cfg, torch.float32), "quantization_config": quant}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save(out_dir)
    return out_dir


def load_quantized(path: Path) -> tuple[Transformer, Tokenizer | None]:
    """The model exactly as saved: each Linear with stored int8 weights becomes a QLinear again."""
    path = Path(path)
    cfg = read_config(path)
    state = load_state_dict(path, None)
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, module in list(model.named_modules()):
        if f"{name}.qweight" not in state:
            continue
        q, scale, mins = state.pop(f"{name}.qweight"), state.pop(f"{name}.scales"), state.pop(f"{name}.mins", None)
        per_byte = 1 if mins is None else 2
        blocks = (module.out_features, module.in_features // BLOCK)
        if q.dtype != (torch.int8 if mins is None else torch.uint8) or scale.dtype != torch.float32:
            raise TrainferError(f"{path}: {name} is neither int8 nor packed int4 weights with fp32 scales")
        if tuple(q.shape) != (module.out_features, module.in_features // per_byte) or scale.shape != blocks:
            raise TrainferError(f"{path}: {name} has shape {tuple(q.shape)}, the config implies another")
        if mins is not None and (mins.dtype != torch.float32 or mins.shape != blocks):
            raise TrainferError(f"{path}: {name}.mins must be fp32 with one value per {BLOCK} weights")
        bias = state.pop(f"{name}.bias", None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QLinear(q, scale, mins, bias))
    if cfg.tie_embeddings:
        if not isinstance(model.lm_head, QLinear):
            raise TrainferError(f"{path}: a tied model needs its quantized lm_head")
        model.embed_tokens = QEmbedding(model.lm_head)
    rest = {k: v.float() for k, v in state.items()}
    expected = {k for k, v in model.state_dict().items() if v.is_meta}
    if rest.keys() != expected:
        raise TrainferError(f"{path}: weights do not match the config: {sorted(expected ^ rest.keys())[:5]}")
    model.load_state_dict(rest, strict=False, assign=True)
    tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    return model.eval(), tok
