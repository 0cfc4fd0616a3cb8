"""Weight-only quantized formats, in llama.cpp's block layouts (32 values along the input dimension per block):

    int8  Q8_0-style: q int8, one fp32 scale s per block, w = q * s (s = max |w| / 127)
    int4  Q4_1-style: q 0..15 packed two per byte, a scale s and a min m per block, w = q * s + m
          (s = (max - min) / 15, m = min); llama.cpp's Q4_0 is the case m = -8 s, so both load exactly.
          Byte j of a block holds element j in its low nibble and element j + 16 in its high one (ggml's order).

`quantize_model(model, "int8" | "int4")` swaps every Linear whose input size is a multiple of 32 for a
`QLinear`; the tied embedding reads the head's rows. With int4, the tied embedding / LM head stays int8 (as
llama.cpp's Q4 files keep it at 8 bits or more: one table serves both the input and every output logit).
Products run on the native kernels (native.py), or without them on the PyTorch reference here.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainfer.quant.native import extension

BLOCK = 32
KINDS = {"float32": 0, "int8": 1, "int4": 2}  # the kernel's numbering


def _blocks(w: Tensor) -> Tensor:
    n, k = w.shape
    assert k % BLOCK == 0, f"input size {k} is not a multiple of {BLOCK}"
    return w.detach().float().reshape(n, k // BLOCK, BLOCK)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> (int8 (N, K), fp32 scales (N, K // 32))."""
    blocks = _blocks(w)
    scale = blocks.abs().amax(-1) / 127
    q = torch.where(scale[..., None] > 0, blocks / scale[..., None].clamp_min(1e-30), 0).round().clamp(-127, 127)
    return q.to(torch.int8).reshape(w.shape).contiguous(), scale.contiguous()


def quantize_int4(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(N, K) float -> (packed uint8 (N, K // 2), fp32 scales, fp32 mins (N, K // 32)), as llama.cpp's Q4_1."""
    blocks = _blocks(w)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    scale = (hi - lo) / 15
    q = torch.where(scale[..., None] > 0, (blocks - lo[..., None]) / scale[..., None].clamp_min(1e-30), 0)
    return pack_int4(q.round().clamp(0, 15).to(torch.uint8).reshape(w.shape)), scale.contiguous(), lo.contiguous()


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) uint8 in 0..15 -> (N, K // 2): per block, byte j = element j | element j + 16 << 4."""
    n, k = q.shape
    b = q.reshape(n, k // BLOCK, BLOCK)
    return (b[..., :16] | (b[..., 16:] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    n, half = packed.shape
    b = packed.reshape(n, half // 16, 16)
    return torch.cat((b & 0x0F, b >> 4), dim=-1).reshape(n, half * 2)


def dequantize(q: Tensor, scale: Tensor, mins: Tensor | None = None) -> Tensor:
    """int8 (q, scale) or int4 (packed q, scale, mins) -> fp32 (N, K)."""
    if mins is None:
        return (q.float().reshape(*scale.shape, BLOCK) * scale[..., None]).reshape(q.shape)
    values = unpack_int4(q).float().reshape(*scale.shape, BLOCK)
    return (values * scale[..., None] + mins[..., None]).reshape(q.shape[0], -1)


def linear_reference(x: Tensor, q: Tensor, scale: Tensor, mins: Tensor | None = None) -> Tensor:
    """The plain PyTorch definition the native kernel is tested against (it dequantizes every call)."""
    return F.linear(x, dequantize(q, scale, mins))


def qlinear(x: Tensor, q: Tensor, scale: Tensor, mins: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ dequantize(q, scale, mins)^T (+ bias) -> (..., N), on the native kernel when it is built."""
    ext = extension()
    if ext is None or x.device.type != "cpu" or x.dtype != torch.float32:
        y = linear_reference(x, q, scale, mins).to(x.dtype)
        return y if bias is None else y + bias
    if not torch.is_grad_enabled():  # inference
        return _native_linear(ext, x, q, scale, mins, bias, bf16_products())
    # a forward that records gradients is training's: fp32 stays fp32 there (see bf16_products)
    if x.requires_grad:  # training through a frozen quantized base (QLoRA)
        return _QLinearGrad.apply(x, q, scale, mins, bias)
    return _native_linear(ext, x, q, scale, mins, bias, False)


class _QLinearGrad(torch.autograd.Function):
    """The native product forward; backward passes the gradient to the input only (the quantized weight is
    frozen): grad_x = grad_y @ dequantize(W), one transient fp32 copy of the weight per call."""

    @staticmethod
    def forward(ctx, x, q, scale, mins, bias):
        ctx.save_for_backward(q, scale, mins)
        return _native_linear(extension(), x, q, scale, mins, bias, False)

    @staticmethod
    def backward(ctx, grad):
        q, scale, mins = ctx.saved_tensors
        return grad @ dequantize(q, scale, mins).to(grad.dtype), None, None, None, None


def _native_linear(
    ext, x: Tensor, q: Tensor, scale: Tensor, mins: Tensor | None, bias: Tensor | None, bf16: bool
) -> Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    kind = KINDS["int8" if mins is None else "int4"]
    return ext.linear(flat, kind, q, scale, mins, bias, bf16).reshape(*x.shape[:-1], q.shape[0])


def bf16_products() -> bool:
    """Whether int8 / int4 products of more than 4 input rows (batched decode, prefill) may run in bf16 (weights
    and inputs rounded to bf16, fp32 sums): on CPUs with AVX512_BF16 the dot products are twice as wide and the
    prefill GEMM ~4.7x faster than fp32's, at a rounding cost measured by `trainfer quantize --report`
    (docs/LOG.md). Up to 4 rows (single-stream decode) products are always fp32, and so are those of a forward
    that records gradients (a float32 QLoRA run on the tiny test model diverged with bf16 products: its loss at
    init moved by 0.6 nats). TRAINFER_BF16=0 keeps every product fp32."""
    return os.environ.get("TRAINFER_BF16", "1") != "0"


class QLinear(nn.Module):
    """A Linear with block-quantized weights (buffers, not parameters: inference only)."""

    def __init__(self, q: Tensor, scale: Tensor, mins: Tensor | None = None, bias: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scale)
        self.register_buffer("mins", mins)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.out_features = q.shape[0]
        self.in_features = scale.shape[1] * BLOCK

    @property
    def kind(self) -> str:
        return "int8" if self.mins is None else "int4"

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str = "int8") -> QLinear:
        if kind == "int8":
            return cls(*quantize_int8(linear.weight), None, linear.bias)
        return cls(*quantize_int4(linear.weight), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return qlinear(x, self.qweight, self.scales, self.mins, self.bias)


class QEmbedding(nn.Module):
    """An embedding read from quantized rows (shared with the LM head when the weights are tied)."""

    def __init__(self, head: QLinear) -> None:
        super().__init__()
        self.head = head

    @property
    def weight(self) -> Tensor:  # callers read its dtype and device only
        return self.head.scales

    def forward(self, ids: Tensor) -> Tensor:
        h = self.head
        flat = ids.reshape(-1)
        rows = dequantize(h.qweight[flat], h.scales[flat], None if h.mins is None else h.mins[flat])
        return rows.reshape(*ids.shape, -1)


def quantize_model(model: nn.Module, kind: str = "int8", given: dict[str, tuple] | None = None) -> nn.Module:
    """Swap Linears (input size a multiple of 32) for QLinear in place; a tied embedding reads the head's rows,
    kept int8 even when the rest is int4 (see the module docstring). `given`: {module name: (q, scales, mins)}
    blocks to use as they are (a GGUF's own, io/gguf.native_blocks) instead of quantizing that Linear."""
    if kind not in ("int8", "int4"):
        raise ValueError(f"kind must be int8 or int4, not {kind!r}")
    given = given or {}
    tied = model.lm_head.weight is model.embed_tokens.weight
    for prefix, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Linear) and child.in_features % BLOCK == 0:
                if full in given:
                    q, scale, mins = given[full]
                    if (q.shape[0], scale.shape[1] * BLOCK) != tuple(child.weight.shape):
                        raise ValueError(f"{full}: given blocks of shape {tuple(q.shape)} do not fit the Linear")
                    setattr(module, name, QLinear(q, scale, mins, child.bias))
                    continue
                head = tied and child is model.lm_head
                setattr(module, name, QLinear.from_linear(child, "int8" if head else kind))
    if tied and isinstance(model.lm_head, QLinear):
        model.embed_tokens = QEmbedding(model.lm_head)
    return model


def weights_kind(model: nn.Module) -> str | None:
    """int4 if any Linear is int4, else int8 if any is int8, else the GGUF formats the weights are kept in (e.g.
    "Q4_K+Q6_K"), else None (float weights)."""
    kinds = {m.kind for m in model.modules() if isinstance(m, QLinear)}
    ggml = sorted({m.qtype.name for m in model.modules() if hasattr(m, "qtype")})
    return "int4" if "int4" in kinds else "int8" if kinds else "+".join(ggml) if ggml else None
