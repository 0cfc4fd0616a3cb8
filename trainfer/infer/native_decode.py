"""The fast decode path: a whole decode step of the model in one native call (quant/csrc/kernels.cpp, Decoder).

Why: at batch 1 the module path spends more time dispatching ~25 PyTorch ops per layer than streaming the
weights from memory (docs/LOG.md). The runner sends decoding sequences here, MAX_ROWS rows a step, and prefill
chunks through the module path. Both read the same weight tensors.

`prepare` (called by `LLM.load` on the model it loaded, never by the engine on a model it is handed) fuses q/k/v
and gate/up into one matrix each, the modules' weights becoming views into those matrices, and splits fp32
Linears for small batches. `build_decoder` reads a prepared model's fused matrices, or stacks the separate ones
of a model that was not prepared (the same math; for int4 ~7% slower, docs/LOG.md), and changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainfer.model.transformer import Transformer
from trainfer.quant.blocks import BLOCK, KINDS, QEmbedding, QLinear
from trainfer.quant.ggml import GGMLEmbedding, GGMLLinear, kernel_kind
from trainfer.quant.native import extension

MAX_ROWS = 16  # rows per native step (the fused tiles' limit); the runner splits more into several steps


class SplitLinear(nn.Module):
    """A Linear whose small-batch matmuls run as `parts` row blocks in one bmm.

    Measured on the 2-core dev machine: PyTorch runs a (1..8, K) x (K, N) fp32 matmul on one thread, while a
    bmm over two (N/2, K) halves uses both: 1.3-1.7x faster for every SmolLM2 projection and the LM head
    (docs/LOG.md). Same Parameters as the wrapped Linear, so weights (and tying) are shared, not copied.
    """

    def __init__(self, linear: nn.Linear, parts: int, max_rows: int = 16) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.parts, self.max_rows = parts, max_rows
        self.out_features, self.in_features = linear.weight.shape

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        n, k = self.weight.shape
        flat = x.reshape(1, rows, k).expand(self.parts, rows, k)
        y = torch.bmm(flat, self.weight.view(self.parts, n // self.parts, k).transpose(1, 2))  # (P, rows, N/P)
        y = y.transpose(0, 1).reshape(*x.shape[:-1], n)
        return y if self.bias is None else y + self.bias


def split_linears(model: nn.Module, parts: int) -> None:
    """Swap every Linear whose rows divide evenly for a SplitLinear (in place; inference only)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.weight.shape[0] % parts == 0:
                setattr(module, name, SplitLinear(child, parts))


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


FUSED = {("q_proj", "k_proj", "v_proj"): "fused_qkv", ("gate_proj", "up_proj"): "fused_gate_up"}


def prepare(model: Transformer) -> Transformer:
    """Fuse each layer's q/k/v and gate/up where they share a trainer-made format (kept as `fused_qkv` and
    `fused_gate_up` beside them), and split fp32 Linears for small batches when there are threads to split for.
    In place: for a model its loader owns, before adapters are added (an adapter wraps the prepared modules)."""
    for block in model.layers:
        for parent, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj")), (block.mlp, ("gate_proj", "up_proj"))):
            fused = fuse(parent, names)
            if fused is not None:
                object.__setattr__(parent, FUSED[names], fused)  # not a submodule: no second copy in state_dict
    parts = torch.get_num_threads()
    # bf16 small-batch matmuls have their own GEMV path, which the split did not beat (docs/LOG.md).
    weight = model.embed_tokens.weight
    if weight.device.type == "cpu" and parts > 1 and weight.dtype == torch.float32:
        split_linears(model, parts)
    return model


def fused_or_stacked(ext, parent: nn.Module, names: tuple[str, ...]):
    """The kernel's one matrix for projections on the same input: the fused one `prepare` made, else a stack of
    the matrices as they are (GGUF tensors stay views into the file, whatever their mix of formats: Q4_K_M keeps
    some v projections in Q6_K); None if a projection has no kernel format."""
    fused = parent.__dict__.get(FUSED[names])
    if fused is not None:
        return lin(ext, fused)
    mods = [getattr(parent, n) for n in names]
    if not all(isinstance(m, (GGMLLinear, QLinear, SplitLinear)) or type(m) is nn.Linear for m in mods):
        return None
    return ext.stack([lin(ext, m) for m in mods])


def lin(ext, module: nn.Module):
    """The kernel's view of a Linear, QLinear or GGMLLinear."""
    if isinstance(module, GGMLLinear):
        bias = None if module.bias is None else module.bias.detach()
        return ext.Lin(kernel_kind(module.qtype), module.blocks, None, None, bias)
    if isinstance(module, QLinear):
        return ext.Lin(KINDS[module.kind], module.qweight, module.scales, module.mins, module.bias)
    bias = None if module.bias is None else module.bias.detach()  # nn.Linear or its SplitLinear: one weight
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
