"""llama.cpp's own weight formats used as they are: a GGUF tensor's blocks (usually a view into the memory-mapped
file) are the weights, read by the native kernels (csrc/ggml_formats.h), never expanded to fp32 as a whole.

Formats with a kernel: F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K (Q4_K_M and Q5_K_M files mix
Q4_K / Q5_K with Q6_K, and fall back to Q5_0 / Q5_1 / Q8_0 where a row is not a multiple of 256). Without the
kernel build, products dequantize the tensor with gguf-py (the reference the kernel is tested against) every call.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as Q
from torch import Tensor, nn

from trainfer.quant.blocks import bf16_products
from trainfer.quant.native import extension

NATIVE = (Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def has_kernel(qtype: Q, cols: int) -> bool:
    """Whether the kernels read this tensor as it is (F16 / BF16 rows are read 32 values at a time)."""
    return qtype in NATIVE and cols % 32 == 0


def kernel_kind(qtype: Q) -> int:
    return 100 + int(qtype)  # the kernel's numbering (csrc/ggml_formats.h)


def row_bytes(qtype: Q, cols: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return cols // block * size


def dequantize(blocks: Tensor, qtype: Q) -> Tensor:
    """(N, row bytes) uint8 blocks -> fp32 (N, K): the kernel where it is built (bit-exact to gguf-py), else gguf-py."""
    ext = extension()
    block, size = GGML_QUANT_SIZES[qtype]
    if ext is not None and has_kernel(qtype, blocks.shape[1] // size * block):
        return ext.dequantize(kernel_kind(qtype), blocks.contiguous(), None, None)
    values = quants.dequantize(blocks.numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(blocks.shape[0], -1)


def linear(x: Tensor, blocks: Tensor, qtype: Q, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ dequantize(blocks)^T (+ bias)."""
    ext = extension()
    if ext is None or x.device.type != "cpu" or x.dtype != torch.float32 or qtype not in NATIVE:
        y = F.linear(x, dequantize(blocks, qtype).to(x.dtype))
        return y if bias is None else y + bias
    if torch.is_grad_enabled() and x.requires_grad:  # training through a frozen GGUF base (LoRA)
        return _LinearGrad.apply(x, blocks, qtype, bias)
    return _native(ext, x, blocks, qtype, bias, not torch.is_grad_enabled() and bf16_products())


def _native(ext, x: Tensor, blocks: Tensor, qtype: Q, bias: Tensor | None, bf16: bool) -> Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return ext.linear(flat, kernel_kind(qtype), blocks, None, None, bias, bf16).reshape(*x.shape[:-1], blocks.shape[0])


class _LinearGrad(torch.autograd.Function):
    """The native product forward; the gradient reaches the input only (grad @ W, one transient fp32 copy of W)."""

    @staticmethod
    def forward(ctx, x, blocks, qtype, bias):
        ctx.save_for_backward(blocks)
        ctx.qtype = qtype
        return _native(extension(), x, blocks, qtype, bias, False)

    @staticmethod
    def backward(ctx, grad):
        (blocks,) = ctx.saved_tensors
        return grad @ dequantize(blocks, ctx.qtype).to(grad.dtype), None, None, None


class GGMLLinear(nn.Module):
    """A Linear whose weights are one GGUF tensor's blocks, as stored (buffers, not parameters: frozen).

    Owns: `blocks` (uint8 (out_features, row bytes)), the ggml type `qtype`, an fp32 `bias` or None."""

    def __init__(self, blocks: Tensor, qtype: Q, in_features: int, bias: Tensor | None = None) -> None:
        super().__init__()
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes(qtype, in_features):
            raise ValueError(f"{qtype.name} blocks of shape {tuple(blocks.shape)} do not hold {in_features} columns")
        self.register_buffer("blocks", blocks)
        self.qtype = Q(qtype)
        self.out_features, self.in_features = blocks.shape[0], in_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @property
    def kind(self) -> str:
        return self.qtype.name

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.blocks, self.qtype, self.bias)


class GGMLEmbedding(nn.Module):
    """Token embeddings read from a GGUF tensor's rows (the LM head's own when the weights are tied)."""

    def __init__(self, table: GGMLLinear) -> None:
        super().__init__()
        self.head = table
        self.register_buffer("_dtype_probe", torch.empty(0), persistent=False)

    @property
    def weight(self) -> Tensor:  # callers read its dtype and device only
        return self._dtype_probe

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.head.blocks.index_select(0, flat.to(self.head.blocks.device)), self.head.qtype)
        return rows.to(ids.device).reshape(*ids.shape, -1)
