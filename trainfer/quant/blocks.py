"""Int8 weights in Q8_0's layout: blocks of 32 values along the input dimension, one fp32 scale each
(scale = max |w| / 127, q = round(w / scale)), as llama.cpp's Q8_0 (whose fp16 scales load exactly).

`quantize_model(model)` swaps every Linear whose input size is a multiple of 32 (and the tied embedding)
for a `QLinear`; the matmul runs on the native kernel (native.py) or, without it, on the reference here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainfer.quant.native import extension

BLOCK = 32


def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> (int8 (N, K), fp32 scales (N, K // 32)); K must be a multiple of 32."""
    n, k = w.shape
    assert k % BLOCK == 0, f"input size {k} is not a multiple of {BLOCK}"
    blocks = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    scale = blocks.abs().amax(-1) / 127
    q = torch.where(scale[..., None] > 0, blocks / scale[..., None].clamp_min(1e-30), 0).round().clamp(-127, 127)
    return q.to(torch.int8).reshape(n, k).contiguous(), scale.contiguous()


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    n, k = q.shape
    return (q.float().reshape(n, k // BLOCK, BLOCK) * scale[..., None]).reshape(n, k)


def q8_linear_reference(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """The plain PyTorch definition the native kernel is tested against (it dequantizes every call)."""
    return F.linear(x, dequantize(q, scale))


def q8_linear(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x (..., K) fp32 @ dequantize(q, scale)^T -> (..., N)."""
    ext = extension()
    if ext is None or x.device.type != "cpu" or x.dtype != torch.float32:
        return q8_linear_reference(x, q, scale).to(x.dtype)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return ext.q8_linear(flat, q, scale).reshape(*x.shape[:-1], q.shape[0])


class QLinear(nn.Module):
    """A Linear with int8 block-quantized weights (buffers, not parameters: inference only)."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.out_features, self.in_features = q.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QLinear:
        q, scale = quantize(linear.weight)
        return cls(q, scale, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = q8_linear(x, self.qweight, self.scales)
        return y if self.bias is None else y + self.bias


class QEmbedding(nn.Module):
    """An embedding read from int8 rows (shared with the LM head when the weights are tied)."""

    def __init__(self, head: QLinear) -> None:
        super().__init__()
        self.head = head

    @property
    def weight(self) -> Tensor:  # callers read its dtype and device only
        return self.head.scales

    def forward(self, ids: Tensor) -> Tensor:
        q, scale = self.head.qweight[ids], self.head.scales[ids]  # (..., K), (..., K // 32)
        return (q.float().unflatten(-1, (-1, BLOCK)) * scale[..., None]).flatten(-2)


def quantize_model(model: nn.Module) -> nn.Module:
    """Swap Linears (input size a multiple of 32) for QLinear in place; a tied embedding reads the head's rows."""
    tied = model.lm_head.weight is model.embed_tokens.weight
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % BLOCK == 0:
                setattr(module, name, QLinear.from_linear(child))
    if tied and isinstance(model.lm_head, QLinear):
        model.embed_tokens = QEmbedding(model.lm_head)
    return model
