"""One entry point for exports, behind `trainfer export` and `trainfer convert`: a model to GGUF, ONNX or HF.

trainfer export smollm2-135m-instruct --to gguf --out smollm2.Q8_0.gguf --type Q8_0
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainfer.errors import TrainferError
from trainfer.io.gguf_writer import export_gguf
from trainfer.io.loader import export_hf

FORMATS = ("gguf", "onnx", "hf")
_HF_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def export_model(
    name_or_path: str | os.PathLike[str], to: str, out: Path, type: str = "F32", base: str | None = None
) -> Path:
    """Write any model trainfer loads as `to`: gguf (F32, F16, BF16, Q8_0 or Q4_0, for llama.cpp), onnx (F32, with
    KV-cache inputs and outputs, for onnxruntime) or hf (F32, F16 or BF16 safetensors, for transformers and vLLM)."""
    if to == "gguf":
        return export_gguf(name_or_path, Path(out), type, base)
    if to == "onnx":
        if type != "F32":
            raise TrainferError(f"the ONNX export is F32 only (got --type {type})")
        from trainfer.io.onnx_export import export_onnx  # torch.onnx and onnx load only when asked

        return export_onnx(name_or_path, Path(out), base)
    if to == "hf":
        if type not in _HF_DTYPES:
            raise TrainferError(
                f"the hf export writes {', '.join(_HF_DTYPES)} safetensors (got --type {type}); for int8 / int4 "
                "directories use `trainfer quantize`"
            )
        return export_hf(name_or_path, Path(out), _HF_DTYPES[type], base)
    raise TrainferError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
