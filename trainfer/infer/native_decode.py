"""The fast decode path: a whole decode step of the model in one native call (quant/csrc/kernels.cpp, Decoder).

Why: at batch 1 the module path spends more time dispatching ~25 PyTorch ops per layer than streaming the
weights from memory (docs/LOG.md). The runner uses this step whenever every sequence in the batch decodes one
token; prefill chunks and mixed batches take the module path. Both read the same weight tensors: q/k/v and
gate/up are fused into one matrix each at load, and the modules' weights become views into those matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainfer.model.transformer import Transformer
from trainfer.quant.blocks import BLOCK, KINDS, QEmbedding, QLinear
from trainfer.quant.ggml import GGMLEmbedding, GGMLLinear, kernel_kind
from trainfer.quant.native import extension

MAX_ROWS = 16  # beyond this many sequences, dequantize + GEMM (the module path) is faster than the fused tiles


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else torch.cat([p.detach() for p in parts]).contiguous()


def fuse(parent: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    """One matrix for the projections `names` of `parent` (same input, same format); each module keeps a view
    into it as its own weight, so nothing is stored twice. None if they cannot be fused."""
    mods = [getattr(parent, n) for n in names]
    if all(type(m) is nn.Linear for m in mods):
        fused = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=mods[0].bias is not None)
        fused.weight = nn.Parameter(_cat([m.weight for m in mods]), requires_grad=False)
        fused.bias = None if mods[0].bias is None else nn.Parameter(_cat([m.bias for m in mods]), requires_grad=False)
        tensors = ("weight", "bias")
    elif all(isinstance(m, QLinear) for m in mods) and len({m.kind for m in mods}) == 1:
        fused = QLinear(*(_cat([getattr(m, t) for m in mods]) for t in ("qweight", "scales", "mins", "bias")))
        tensors = ("qweight", "scales", "mins", "bias")
    else:
        return None
    start = 0
    for m in mods:
        n = m.out_features
        for t in tensors:
            whole = getattr(fused, t)
            if whole is not None:
                view = whole.narrow(0, start, n)
                setattr(m, t, nn.Parameter(view, requires_grad=False) if isinstance(whole, nn.Parameter) else view)
        start += n
    return fused


def fused_or_stacked(ext, parent: nn.Module, names: tuple[str, ...]):
    """The kernel's one matrix for projections on the same input: fused (fuse()) where they share a trainer-made
    format, else a stack of the matrices as they are (GGUF tensors stay views into the file, whatever their mix of
    formats: Q4_K_M keeps some v projections in Q6_K); None if a projection has no kernel format."""
    mods = [getattr(parent, n) for n in names]
    if any(isinstance(m, GGMLLinear) for m in mods):
        if not all(isinstance(m, (GGMLLinear, QLinear)) or type(m) is nn.Linear for m in mods):
            return None
        return ext.stack([lin(ext, m) for m in mods])
    fused = fuse(parent, names)
    return None if fused is None else lin(ext, fused)


def lin(ext, module: nn.Module):
    """The kernel's view of a Linear, QLinear or GGMLLinear."""
    if isinstance(module, GGMLLinear):
        bias = None if module.bias is None else module.bias.detach()
        return ext.Lin(kernel_kind(module.qtype), module.blocks, None, None, bias)
    if isinstance(module, QLinear):
        return ext.Lin(KINDS[module.kind], module.qweight, module.scales, module.mins, module.bias)
    bias = None if module.bias is None else module.bias.detach()
    return ext.Lin(0, module.weight.detach(), None, None, bias)


def build_decoder(model: Transformer):
    """The native Decoder for this model, or None where it does not apply (no build, not CPU, not fp32
    activations, an input size that is not a multiple of 32)."""
    ext = extension()
    cfg = model.cfg
    if ext is None or model.embed_tokens.weight.device.type != "cpu":
        return None
    if model.embed_tokens.weight.dtype != torch.float32 or cfg.dim % BLOCK or cfg.hidden_dim % BLOCK:
        return None
    if (cfg.n_heads * cfg.head_dim) % BLOCK:
        return None
    lins, norms, qk_norms = [], [], []
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        qkv = fused_or_stacked(ext, attn, ("q_proj", "k_proj", "v_proj"))
        gate_up = fused_or_stacked(ext, mlp, ("gate_proj", "up_proj"))
        if qkv is None or gate_up is None:
            return None
        lins += [qkv, lin(ext, attn.o_proj), gate_up, lin(ext, mlp.down_proj)]
        norms += [block.input_layernorm.weight.detach(), block.post_attention_layernorm.weight.detach()]
        if cfg.qk_norm:
            qk_norms += [attn.q_norm.weight.detach(), attn.k_norm.weight.detach()]
    norms.append(model.norm.weight.detach())
    head = lin(ext, model.lm_head)
    emb = model.embed_tokens
    if isinstance(emb, (QEmbedding, GGMLEmbedding)):
        embed = lin(ext, emb.head)
    else:
        embed = ext.Lin(0, emb.weight.detach(), None, None, None)
    return ext.Decoder(lins, norms, qk_norms, embed, head, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps)
