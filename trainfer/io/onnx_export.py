"""ONNX export with a KV cache for decode: the model's own modules behind a contiguous cache, for onnxruntime.

Graph: input_ids (batch, seq) int64 and past_key_i / past_value_i (batch, n_kv_heads, past, head_dim) per
layer -> logits (batch, seq, vocab) and present_key_i / present_value_i (batch, n_kv_heads, past + seq,
head_dim). Positions are past + 0..seq-1 (every row of a batch has the same length: no padding). Prefill
passes past = 0. `trainfer export MODEL --to onnx --out model.onnx`
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from trainfer.errors import TrainferError
from trainfer.io.loader import build_model, load_checkpoint
from trainfer.model.transformer import Transformer

OPSET = 18


class ContiguousCache:
    """An AttentionContext over one contiguous K/V tensor per layer: appends this step's K/V, attends causally."""

    def __init__(self, past: list[tuple[Tensor, Tensor]]) -> None:
        self.past = past  # per layer: (B, KV, P, hd) keys and values
        self.present: list[tuple[Tensor, Tensor]] = []

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        past_k, past_v = self.past[layer]
        k = torch.cat([past_k, k.transpose(1, 2)], dim=2)  # (B, KV, P+T, hd)
        v = torch.cat([past_v, v.transpose(1, 2)], dim=2)
        self.present.append((k, v))
        B, T, H, hd = q.shape
        groups = H // k.size(1)
        q = q.transpose(1, 2).reshape(B, k.size(1), groups * T, hd)  # (B, KV, G*T, hd): heads that share K/V
        scores = q @ k.transpose(2, 3) / math.sqrt(hd)  # (B, KV, G*T, P+T)
        S = k.size(2)
        # Causal over absolute positions: query t sits at P + t and sees keys 0..P+t.
        query_pos = torch.arange(T, device=q.device).repeat(groups) + (S - T)  # (G*T,)
        masked = torch.arange(S, device=q.device)[None, :] > query_pos[:, None]  # (G*T, S)
        scores = scores.masked_fill(masked, float("-inf"))
        y = scores.softmax(-1) @ v  # (B, KV, G*T, hd)
        return y.reshape(B, H, T, hd).transpose(1, 2)  # (B, T, H, hd)


class CachedDecoder(nn.Module):
    """The export wrapper: the Transformer's forward with a ContiguousCache as its attention context."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, *past_kv: Tensor) -> tuple[Tensor, ...]:
        B, T = input_ids.shape
        past = [(past_kv[2 * i], past_kv[2 * i + 1]) for i in range(len(past_kv) // 2)]
        positions = (torch.arange(T, device=input_ids.device) + past_kv[0].size(2)).expand(B, T)
        cache = ContiguousCache(past)
        logits = self.model(input_ids, positions, cache)
        return (logits, *(t for kv in cache.present for t in kv))


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the graph, in order."""
    past = [f"past_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]


def save_onnx(model: Transformer, out: Path) -> Path:
    """Export with dynamic batch, sequence and past lengths (opset 18).

    The TorchScript exporter (dynamo=False): 11 s for SmolLM2 where the torch.export-based one took 30-40 s on
    2 cores (and needs onnxscript), for a graph onnxruntime ran no slower. Tracing records shapes symbolically
    here; the tests run batch, prompt and cache lengths unlike the example's, so a baked-in size would show.
    """
    cfg = model.cfg
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise TrainferError("the ONNX export takes an fp32 model (load it with dtype float32)")
    wrapper = CachedDecoder(model.eval())
    B, T, P = 2, 3, 4  # example sizes: unlike those of any test, so nothing can hide in a baked-in shape
    ids = torch.zeros(B, T, dtype=torch.long)
    past = [torch.zeros(B, cfg.n_kv_heads, P, cfg.head_dim) for _ in range(2 * cfg.n_layers)]
    inputs, outputs = io_names(cfg.n_layers)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes |= {name: {0: "batch", 2: "past"} for name in inputs[1:]}
    axes |= {name: {0: "batch", 2: "past_plus_seq"} for name in outputs[1:]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer warnings on constants
        torch.onnx.export(
            wrapper,
            (ids, *past),
            str(out),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return out


def export_onnx(name_or_path: str | os.PathLike[str], out: Path, base: str | None = None) -> Path:
    """Any model trainfer loads as an fp32 ONNX decoder with KV-cache inputs and outputs."""
    out = Path(out)
    if out.exists():
        raise TrainferError(f"{out} exists; choose a new file name")
    if out.suffix != ".onnx":
        raise TrainferError(f"{out}: an ONNX file name ends in .onnx")
    cfg, state, _ = load_checkpoint(name_or_path, torch.float32, base)
    return save_onnx(build_model(cfg, state), out)
