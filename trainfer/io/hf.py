"""Hugging Face layout both ways: config.json (LlamaConfig/Qwen2Config fields) + safetensors shards.

Only safetensors are read, so loading never executes code from the checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainfer.errors import TrainferError
from trainfer.model.config import ModelConfig

HF_ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": [HF_ARCHS[cfg.arch]],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
    }
    if cfg.arch == "qwen2":
        if cfg.out_bias or cfg.mlp_bias or not cfg.qkv_bias:
            raise TrainferError("Qwen2 checkpoints have bias on q/k/v only; this config cannot be saved as qwen2")
        hf["use_sliding_window"] = False
    else:
        if cfg.qkv_bias != cfg.out_bias:
            raise TrainferError("Llama's attention_bias covers q/k/v and o together; save this model as qwen2")
        hf["attention_bias"] = cfg.qkv_bias
        hf["mlp_bias"] = cfg.mlp_bias
    return hf


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    arch = hf.get("model_type")
    if arch not in HF_ARCHS:
        raise TrainferError(f"unsupported model_type {arch!r} in config.json; supported: {', '.join(HF_ARCHS)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise TrainferError(f"unsupported hidden_act {hf['hidden_act']!r}; Llama-family models use silu")
    n_heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    scaling = hf.get("rope_scaling") or None
    # transformers 5 keeps rope_theta inside rope_parameters; older files keep it at the top.
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return ModelConfig(
        arch="llama" if arch == "mistral" else arch,
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        # Sliding-window attention equals full attention up to the window, so cap the context there.
        max_seq_len=min(hf.get("max_position_embeddings", 2048), hf.get("sliding_window") or 1 << 30),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else bias,
        out_bias=False if arch == "qwen2" else bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=arch == "qwen3",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )


def read_config(path: Path) -> ModelConfig:
    try:
        hf = json.loads((Path(path) / "config.json").read_text())
    except FileNotFoundError:
        raise TrainferError(f"{path} has no config.json: not a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise TrainferError(f"{path}/config.json is not valid JSON: {e}") from None
    try:
        return config_from_hf(hf)
    except KeyError as e:
        raise TrainferError(f"{path}/config.json lacks the field {e}") from None


def load_state_dict(
    path: Path, dtype: torch.dtype | None, each: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, cast to dtype (None: as stored, e.g. int8 weights and their scales).
    `each(name, tensor)`, if given, sees every tensor as it is read (memory-mapped) and returns what to keep
    (None: nothing), so a model can be converted one tensor at a time."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise TrainferError(f"{path} has no model.safetensors (only safetensors weights are loaded, never pickles)")
    state = {}
    for name in files:
        file = (path / name).resolve()
        if file.parent != path.resolve():
            raise TrainferError(f"shard {name!r} in the index points outside {path}")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    t = f.get_tensor(key)
                    t = t if dtype is None else t.to(dtype)
                    name = key.removeprefix("model.")
                    t = t if each is None else each(name, t)
                    if t is not None:
                        state[name] = t
        except FileNotFoundError:
            raise TrainferError(f"missing weight shard {file}") from None
        except (TrainferError, MemoryError):
            raise
        except Exception as e:  # safetensors raises SafetensorError for damaged headers/data
            raise TrainferError(f"cannot read {file} (corrupt or truncated?): {e}") from None
    return state


def save_hf(
    out_dir: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, max_shard_bytes: int = 2 << 30
) -> None:
    """Write config.json and model.safetensors, sharded with an index when larger than max_shard_bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2))
    tensors = {}
    for name, t in state.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # tied: safetensors refuses shared storage, and HF re-ties on load
        key = name if name.startswith("lm_head") else f"model.{name}"
        tensors[key] = t.detach().to(dtype).contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
