"""A quantized model directory: the Hugging Face layout with int8 weights and their block scales stored as
they are computed, so it loads again without re-quantizing (`trainfer quantize MODEL --to int8 --out DIR`).

    config.json        the model's config plus "quantization_config": {"quant_method": "trainfer", ...}
    model.safetensors  `<module>.qweight` (int8, (out, in)) and `<module>.scales` (fp32, (out, in / 32)) for
                       each quantized Linear; other tensors (norms, an untied embedding) as usual
    tokenizer.json, tokenizer_config.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainfer.errors import TrainferError
from trainfer.io.hf import config_to_hf, load_state_dict, read_config
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.transformer import Transformer, rope_frequencies
from trainfer.quant.blocks import BLOCK, QEmbedding, QLinear

QUANT_CONFIG = {"quant_method": "trainfer", "format": "q8_0", "bits": 8, "block_size": BLOCK}


def is_quantized(path: Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("quantization_config", {}).get("quant_method") == "trainfer"
    except (json.JSONDecodeError, AttributeError):
        return False


def save_quantized(model: Transformer, tokenizer: Tokenizer | None, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise TrainferError(f"{out_dir} exists and is not empty; choose a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.startswith("embed_tokens.head.") or name == "inv_freq":
            continue  # a tied embedding reads the head's int8 rows; the rope table is rebuilt on load
        tensors[name if name.startswith("lm_head") else f"model.{name}"] = t.detach().contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {**config_to_hf(model.cfg, torch.float32), "quantization_config": QUANT_CONFIG}
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
        q, scale = state.pop(f"{name}.qweight"), state.pop(f"{name}.scales")
        if q.dtype != torch.int8 or scale.shape != (q.shape[0], q.shape[1] // BLOCK):
            raise TrainferError(f"{path}: {name} is not int8 weights with one scale per {BLOCK} values")
        if (q.shape[0], q.shape[1]) != (module.out_features, module.in_features):
            raise TrainferError(f"{path}: {name} has shape {tuple(q.shape)}, the config implies another")
        bias = state.pop(f"{name}.bias", None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QLinear(q, scale.float(), bias))
    if cfg.tie_embeddings:
        if not isinstance(model.lm_head, QLinear):
            raise TrainferError(f"{path}: a tied model needs its int8 lm_head")
        model.embed_tokens = QEmbedding(model.lm_head)
    rest = {k: v.float() for k, v in state.items()}
    expected = {k for k, v in model.state_dict().items() if v.is_meta}
    if rest.keys() != expected:
        raise TrainferError(f"{path}: weights do not match the config: {sorted(expected ^ rest.keys())[:5]}")
    model.load_state_dict(rest, strict=False, assign=True)
    model.inv_freq = rope_frequencies(cfg)
    tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    return model.eval(), tok
