"""The PEFT LoRA adapter format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's for a Llama-family model, `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`
((r, in)) and `...lora_B.weight` ((out, r)); the update is W + scaling * B @ A with scaling = alpha / r
(alpha / sqrt(r) under rsLoRA). What peft writes, trainfer reads, and the reverse (tests/io/test_peft.py).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from trainfer.errors import TrainferError
from trainfer.model.lora import LoRAConfig, apply_lora, lora_modules
from trainfer.model.transformer import Transformer

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model.model."  # PeftModel > LlamaForCausalLM > LlamaModel
KEY = re.compile(re.escape(PREFIX) + r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight")
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file() and not (Path(path) / "config.json").is_file()


def read_settings(path: str | Path) -> dict[str, Any]:
    """r, alpha, dropout, targets, rslora and the base model an adapter names; refuses what it cannot apply."""
    path = Path(path)
    try:
        raw = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainferError(f"cannot read {path / CONFIG_NAME}: {e}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise TrainferError(f"{path} holds a {raw.get('peft_type')!r} adapter; trainfer reads LoRA adapters")
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save") or raw.get("fan_in_fan_out"):
        raise TrainferError(f"{path}: LoRA with bias, modules_to_save or fan_in_fan_out is not supported")
    for key in ("rank_pattern", "alpha_pattern", "use_dora", "layers_to_transform"):
        if raw.get(key):
            raise TrainferError(f"{path}: {key} is not supported")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str) or any(t not in MODULES for t in targets):
        raise TrainferError(f"{path}: target_modules must list some of {', '.join(MODULES)}, got {targets!r}")
    try:
        r, alpha = int(raw["r"]), float(raw["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise TrainferError(f"{path}/{CONFIG_NAME} needs numeric r and lora_alpha") from None
    if r < 1 or alpha <= 0:
        raise TrainferError(f"{path}: r must be >= 1 and lora_alpha > 0")
    rslora = bool(raw.get("use_rslora", False))
    return {
        "r": r,
        "alpha": alpha,
        "dropout": float(raw.get("lora_dropout") or 0.0),
        "targets": list(targets),
        "rslora": rslora,
        "scaling": alpha / (math.sqrt(r) if rslora else r),
        "base": str(raw.get("base_model_name_or_path") or ""),
    }


def read_weights(path: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """{module name as trainfer names it ("layers.0.self_attn.q_proj"): (A, B)} in fp32."""
    path = Path(path)
    try:
        state = load_file(str(path / WEIGHTS_NAME))
    except FileNotFoundError:
        raise TrainferError(f"{path} has no {WEIGHTS_NAME}") from None
    except Exception as e:  # safetensors' own error for damaged files
        raise TrainferError(f"cannot read {path / WEIGHTS_NAME} (corrupt or truncated?): {e}") from None
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in state.items():
        m = KEY.fullmatch(key)
        if m is None:
            raise TrainferError(f"{path}: unexpected tensor {key!r} in a LoRA adapter")
        pairs.setdefault(m[1], {})[m[2]] = t.float()
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise TrainferError(f"{path}: {name} has {sorted(ab)} but needs both lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.size(0) != b.size(1):
            raise TrainferError(f"{path}: {name} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}")
        out[name] = (a, b)
    if not out:
        raise TrainferError(f"{path}: the adapter holds no LoRA weights")
    return out


def write(out_dir: Path, weights: dict[str, tuple[Tensor, Tensor]], settings: dict[str, Any], base: str) -> None:
    """The two files as peft's save_pretrained writes them (the config keys its LoraConfig reads)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in weights.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": settings["r"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"],
        "target_modules": sorted(settings["targets"]),
        "use_rslora": settings["rslora"],
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def merge_into(state: dict[str, Tensor], path: str | Path) -> dict[str, Tensor]:
    """A model state dict (trainfer names, float) with the adapter at `path` folded into its weights."""
    scaling = read_settings(path)["scaling"]
    for name, (a, b) in read_weights(path).items():
        key = f"{name}.weight"
        if key not in state:
            raise TrainferError(f"{path}: the adapter targets {name}, which the base model does not have")
        w = state[key]
        if tuple(w.shape) != (b.size(0), a.size(1)):
            raise TrainferError(f"{path}: {name} is {tuple(w.shape)} in the base, the adapter makes it "
                                f"{(b.size(0), a.size(1))}: another base model?")  # fmt: skip
        state[key] = (w.float() + scaling * (b @ a)).to(w.dtype) if w.is_floating_point() else w
    return state


# ---- adapters on a model ------------------------------------------------------------------------------


def settings(cfg: LoRAConfig) -> dict[str, Any]:
    return {"r": cfg.r, "alpha": cfg.alpha, "dropout": cfg.dropout, "targets": cfg.targets, "rslora": cfg.rslora}


def save_adapter(out_dir: Path, model: Transformer, cfg: LoRAConfig, base: str, name: str = "default") -> None:
    weights = {full: (m.lora_A[name], m.lora_B[name]) for full, m in lora_modules(model).items() if name in m.lora_A}
    write(out_dir, weights, settings(cfg), base)


def read_adapter_config(path: Path) -> tuple[LoRAConfig, str]:
    """The LoRA settings and the base model an adapter directory names (PEFT's or ours)."""
    s = read_settings(path)
    return LoRAConfig(s["r"], s["alpha"], s["dropout"], s["targets"], s["rslora"]), s["base"]


def load_adapter(model: Transformer, path: Path, name: str = "default") -> Transformer:
    """Add the adapter saved at `path` to `model` under `name`; every target must be present with its shape."""
    cfg, _ = read_adapter_config(path)
    weights = read_weights(path)
    apply_lora(model, cfg, name)
    modules = {n: m for n, m in lora_modules(model).items() if name in m.lora_A}
    if set(weights) != set(modules):
        extra, missing = sorted(set(weights) - set(modules)), sorted(set(modules) - set(weights))
        raise TrainferError(f"{path}: the adapter's modules do not match its target_modules on this model "
                            f"(unexpected {extra[:3]}, missing {missing[:3]})")  # fmt: skip
    for full, (a, b) in weights.items():
        m = modules[full]
        for t, param in ((a, m.lora_A[name]), (b, m.lora_B[name])):
            if tuple(t.shape) != tuple(param.shape):
                raise TrainferError(f"{path}: {full} has {tuple(t.shape)}, this model needs {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(t)
    return model
