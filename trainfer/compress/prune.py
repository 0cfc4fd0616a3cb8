"""Pruning: structured methods that make a model smaller and faster, and unstructured sparsity that does not.

- depth: drop whole blocks, the least important first. Importance is measured on calibration text, either
  by how little a block changes the residual stream (1 - cosine(input, output), ShortGPT's "block influence",
  one forward) or by the loss without the block (one forward per block: slower, closer to what is lost).
- width: narrow every MLP to the same inner width, keeping each layer's most important channels, and/or
  drop whole key-value groups of attention heads (a KV head with its query heads), as Minitron does; channel
  importance is the mean |activation| times the norm of the down-projection column it feeds, head-group
  importance the mean norm of the group's contribution to the attention output.
- sparsity: zero a fraction of each Linear's weights by magnitude or by Wanda's |W| x ||x|| per output row.
  Stored dense and multiplied by dense kernels, it is neither smaller nor faster; the report says so.

The output is a normal model directory (config.json with fewer layers / a narrower MLP / fewer heads, the
weights, the tokenizer, and prune.json saying what was removed and why) that every command loads.

The ratio is a share of the transformer blocks' parameters (embeddings and head excluded: no structured
method here changes them), stated next to the share of all parameters in prune.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainfer.data.sources import load_corpus
from trainfer.errors import TrainferError, new_directory
from trainfer.io.hf import save_hf
from trainfer.io.loader import build_model, load_checkpoint
from trainfer.io.tokenizer import Tokenizer
from trainfer.model.config import ModelConfig
from trainfer.model.transformer import Transformer

METHODS = ("depth", "width", "sparsity")
DEPTH_METRICS = ("influence", "loss")
SPARSITY_METRICS = ("wanda", "magnitude")
ALIGN = 32  # MLP widths stay multiples of this: the native kernels work in 32-element blocks


@dataclass
class Calibration:
    """Windows of token ids the importance scores are measured on."""

    tokens: torch.Tensor  # (n, seq_len)
    source: str

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()


@dataclass
class PruneReport:
    method: str
    metric: str
    ratio: float  # asked for, as a share of block parameters
    params_before: int
    params_after: int
    block_params_before: int
    block_params_after: int
    calibration: dict[str, Any]
    removed: dict[str, Any] = field(default_factory=dict)  # layers / channels / head groups / zeros
    scores: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        cut = 1 - self.params_after / self.params_before
        block_cut = 1 - self.block_params_after / self.block_params_before
        lines = [
            f"{self.method} pruning ({self.metric}): {self.params_before:,} -> {self.params_after:,} parameters "
            f"({cut:.1%} of all, {block_cut:.1%} of the blocks')",
            *(f"removed {k}: {v}" for k, v in self.removed.items()),
            *self.notes,
        ]
        return "\n".join(lines)


def block_params(cfg: ModelConfig) -> int:
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return cfg.n_params - cfg.vocab_size * cfg.dim - head - cfg.dim


# ---- calibration -----------------------------------------------------------------------------------------


def calibration(
    tokenizer: Tokenizer, source: str, n_windows: int = 16, seq_len: int = 256, seed: int = 0
) -> Calibration:
    """Seeded windows of a corpus (a corpus name such as `shakespeare`, a file, a directory or a glob)."""

    docs = load_corpus([source])
    ids = np.concatenate([np.asarray(tokenizer.encode(d.text), dtype=np.int64) for d in docs])
    if len(ids) < seq_len + 1:
        raise TrainferError(f"calibration text {source!r} has {len(ids)} tokens, fewer than one window of {seq_len}")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(len(ids) - seq_len, size=min(n_windows, len(ids) - seq_len), replace=False))
    return Calibration(torch.from_numpy(np.stack([ids[s : s + seq_len] for s in starts])), source)


def batches(cal: Calibration, batch_size: int = 4):
    for i in range(0, len(cal.tokens), batch_size):
        yield cal.tokens[i : i + batch_size]


def forward_with_hooks(model: Transformer, cal: Calibration, hooks: list) -> int:
    """Run the calibration windows through the model with forward `hooks` attached, then remove them (whatever
    happens); the number of tokens seen."""
    count = 0
    try:
        for x in batches(cal):
            model(x)
            count += x.numel()
    finally:
        for h in hooks:
            h.remove()
    return count


@torch.no_grad()
def calibration_loss(model: Transformer, cal: Calibration, skip: int | None = None) -> float:
    """Mean next-token loss on the calibration windows, optionally with block `skip` bypassed."""
    total, count = 0.0, 0
    layers = model.layers
    if skip is not None:
        model.layers = torch.nn.ModuleList(b for i, b in enumerate(layers) if i != skip)
    try:
        for x in batches(cal):
            logits = model(x[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum").item()
            count += x[:, 1:].numel()
    finally:
        model.layers = layers
    return total / count


# ---- importance ------------------------------------------------------------------------------------------


@torch.no_grad()
def block_influence(model: Transformer, cal: Calibration) -> list[float]:
    """Per block, the mean of 1 - cosine(input, output) over calibration tokens: near 0 = the block barely
    changes the residual stream, so removing it costs little."""
    sums = [0.0] * len(model.layers)
    hooks = []
    for i, block in enumerate(model.layers):

        def hook(module, args, out, i=i) -> None:
            sums[i] += (1 - F.cosine_similarity(args[0].float(), out.float(), dim=-1)).sum().item()

        hooks.append(block.register_forward_hook(hook))
    count = forward_with_hooks(model, cal, hooks)
    return [s / count for s in sums]


@torch.no_grad()
def loss_without_each_block(model: Transformer, cal: Calibration) -> list[float]:
    """Per block, the calibration loss with that block bypassed (higher = more important)."""
    return [calibration_loss(model, cal, skip=i) for i in range(len(model.layers))]


@torch.no_grad()
def width_importance(model: Transformer, cal: Calibration) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: MLP channel scores (hidden_dim,) and KV-group scores (n_kv_heads,)."""
    cfg = model.cfg
    channels = [torch.zeros(cfg.hidden_dim) for _ in model.layers]
    groups = [torch.zeros(cfg.n_kv_heads) for _ in model.layers]
    per_group = cfg.n_heads // cfg.n_kv_heads
    hooks = []
    for i, block in enumerate(model.layers):
        mlp, attn = block.mlp, block.self_attn

        def mlp_hook(module, args, out, i=i, mlp=mlp) -> None:
            act = args[0].float().abs().flatten(0, -2).mean(0)  # the down projection's input: silu(gate) * up
            channels[i] += act * mlp.down_proj.weight.float().norm(dim=0)

        def attn_hook(module, args, out, i=i, attn=attn) -> None:
            y = args[0].float()  # o_proj's input (B, T, H * hd)
            w = attn.o_proj.weight.float()  # (dim, H * hd)
            heads = y.view(*y.shape[:-1], cfg.n_heads, cfg.head_dim)
            w_heads = w.view(w.shape[0], cfg.n_heads, cfg.head_dim)
            contrib = torch.einsum("bthd,ohd->btho", heads, w_heads).norm(dim=-1).flatten(0, 1).mean(0)  # (H,)
            groups[i] += contrib.view(cfg.n_kv_heads, per_group).sum(-1)

        hooks.append(mlp.down_proj.register_forward_hook(mlp_hook))
        hooks.append(attn.o_proj.register_forward_hook(attn_hook))
    forward_with_hooks(model, cal, hooks)
    return channels, groups


# ---- the plans: which shape reaches the ratio -------------------------------------------------------------


def depth_plan(cfg: ModelConfig, ratio: float) -> int:
    """Blocks to drop so that at least `ratio` of the block parameters go (at least one block stays)."""
    drop = math.ceil(round(ratio * cfg.n_layers, 6))
    if not 1 <= drop < cfg.n_layers:
        raise TrainferError(f"ratio {ratio} would drop {drop} of {cfg.n_layers} blocks; keep at least one")
    return drop


def width_plan(cfg: ModelConfig, ratio: float, kv_heads: int | None) -> tuple[int, int]:
    """(hidden_dim, n_kv_heads) that remove about `ratio` of the block parameters: the head groups asked for
    (or all of them), then the MLP width that makes up the rest, a multiple of ALIGN."""
    kv = cfg.n_kv_heads if kv_heads is None else kv_heads
    if not 1 <= kv <= cfg.n_kv_heads:
        raise TrainferError(f"--kv-heads must be in 1..{cfg.n_kv_heads}, got {kv}")
    target = (1 - ratio) * block_params(cfg)
    attn_cfg = cfg.replace(n_kv_heads=kv, n_heads=cfg.n_heads // cfg.n_kv_heads * kv, hidden_dim=0)
    room = target - block_params(attn_cfg)  # what the MLPs may keep
    per_channel = cfg.n_layers * (3 * cfg.dim + 2 * cfg.mlp_bias)
    hidden = int(room // per_channel) // ALIGN * ALIGN
    if not ALIGN <= hidden <= cfg.hidden_dim:
        raise TrainferError(
            f"ratio {ratio} with {kv} KV head groups leaves an MLP width of {hidden} "
            f"(must be {ALIGN}..{cfg.hidden_dim})"
        )
    return hidden, kv


# ---- applying a plan to a state dict -----------------------------------------------------------------------


def drop_blocks(cfg: ModelConfig, state: dict[str, torch.Tensor], drop: list[int]) -> tuple[ModelConfig, dict]:
    keep = [i for i in range(cfg.n_layers) if i not in set(drop)]
    out = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for new, old in enumerate(keep):
        prefix = f"layers.{old}."
        out.update({f"layers.{new}.{k[len(prefix) :]}": v for k, v in state.items() if k.startswith(prefix)})
    return cfg.replace(n_layers=len(keep)), out


def narrow(
    cfg: ModelConfig, state: dict[str, torch.Tensor], channels: list[torch.Tensor], hidden: int,
    groups: list[torch.Tensor], kv: int,
) -> tuple[ModelConfig, dict, dict[str, Any]]:  # fmt: skip
    """Keep each layer's `hidden` best MLP channels and `kv` best KV groups (in their original order)."""
    out = dict(state)
    per_group, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    kept_groups = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        ch = channels[i].topk(hidden).indices.sort().values
        for name in ("gate_proj", "up_proj"):
            out[p + f"mlp.{name}.weight"] = state[p + f"mlp.{name}.weight"][ch].contiguous()
            if cfg.mlp_bias:
                out[p + f"mlp.{name}.bias"] = state[p + f"mlp.{name}.bias"][ch].contiguous()
        out[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"][:, ch].contiguous()
        g = groups[i].topk(kv).indices.sort().values
        kept_groups.append(g.tolist())
        kv_rows = torch.cat([torch.arange(j * hd, (j + 1) * hd) for j in g.tolist()])
        q_heads = [j * per_group + h for j in g.tolist() for h in range(per_group)]
        q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_heads])
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            out[p + f"self_attn.{name}.weight"] = state[p + f"self_attn.{name}.weight"][rows].contiguous()
            if cfg.qkv_bias:
                out[p + f"self_attn.{name}.bias"] = state[p + f"self_attn.{name}.bias"][rows].contiguous()
        out[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"][:, q_rows].contiguous()
    new = cfg.replace(hidden_dim=hidden, n_kv_heads=kv, n_heads=per_group * kv, head_dim=hd)
    return new, out, {"kv_groups_kept_per_layer": kept_groups}


@torch.no_grad()
def sparsify(model: Transformer, cal: Calibration | None, sparsity: float, metric: str) -> dict[str, int]:
    """Zero `sparsity` of every block Linear's weights, row by row (Wanda's comparison group), in place."""
    norms: dict[str, torch.Tensor] = {}
    hooks = []
    linears = {n: m for n, m in model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    if metric == "wanda":
        if cal is None:
            raise TrainferError("Wanda needs calibration text")
        sq: dict[str, torch.Tensor] = {n: torch.zeros(m.in_features) for n, m in linears.items()}

        for name, lin in linears.items():

            def hook(module, args, out, name=name) -> None:
                sq[name] += args[0].float().pow(2).flatten(0, -2).sum(0)

            hooks.append(lin.register_forward_hook(hook))
        forward_with_hooks(model, cal, hooks)
        norms = {n: s.sqrt() for n, s in sq.items()}
    zeros = total = 0
    for name, lin in linears.items():
        w = lin.weight
        score = w.abs().float() * (norms[name] if metric == "wanda" else 1.0)
        k = int(w.shape[1] * sparsity)
        if k:
            idx = score.topk(k, dim=1, largest=False).indices
            w.scatter_(1, idx, 0.0)
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"zeroed": zeros, "of": total}


# ---- the command --------------------------------------------------------------------------------------------


def prune(
    model: str,
    out: str | Path,
    method: str = "depth",
    ratio: float = 0.25,
    metric: str | None = None,
    kv_heads: int | None = None,
    data: str = "shakespeare",
    n_windows: int = 16,
    seq_len: int = 256,
    seed: int = 0,
) -> PruneReport:
    """Prune `model` and write the result to `out` (a new directory)."""
    metric = _check_method(method, metric, ratio)
    out = new_directory(out)
    cfg, state, tok = load_checkpoint(model, torch.float32)
    if tok is None:
        raise TrainferError(f"{model} has no tokenizer: calibration text needs one")
    net = build_model(cfg, state).eval()
    cal = calibration(tok, data, n_windows, min(seq_len, cfg.max_seq_len), seed)
    report = PruneReport(
        method, metric, ratio, cfg.n_params, cfg.n_params, block_params(cfg), block_params(cfg),
        {"source": data, "windows": len(cal.tokens), "seq_len": cal.tokens.shape[1], "seed": seed},
    )  # fmt: skip
    report.scores["calibration_loss_before"] = calibration_loss(net, cal)
    if method == "depth":
        new_cfg, new_state = _prune_depth(cfg, state, net, cal, ratio, metric, report)
    elif method == "width":
        new_cfg, new_state = _prune_width(cfg, state, net, cal, ratio, kv_heads, report)
    else:
        new_cfg, new_state = _prune_sparsity(cfg, net, cal, ratio, metric, report)
    pruned = build_model(new_cfg, new_state).eval()
    report.scores["calibration_loss_after"] = calibration_loss(pruned, cal)
    if method != "sparsity":
        report.params_after, report.block_params_after = new_cfg.n_params, block_params(new_cfg)
    weights = {k: v for k, v in pruned.state_dict().items() if not (new_cfg.tie_embeddings and k == "lm_head.weight")}
    save_hf(out, new_cfg, weights, torch.float32)
    tok.save(out)
    (out / "prune.json").write_text(json.dumps({"model": str(model), **asdict(report)}, indent=2))
    return report


def _check_method(method: str, metric: str | None, ratio: float) -> str:
    """The metric to use (the method's default when none is named); refused before a model is loaded, so a
    typo costs nothing."""
    if method not in METHODS:
        raise TrainferError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    metric = metric or {"depth": "influence", "width": "activation", "sparsity": "wanda"}[method]
    allowed = {"depth": DEPTH_METRICS, "width": ("activation",), "sparsity": SPARSITY_METRICS}[method]
    if metric not in allowed:
        raise TrainferError(f"{method} pruning measures importance by {', '.join(allowed)}; got {metric!r}")
    if not 0 < ratio < 1:
        raise TrainferError(f"--ratio must be between 0 and 1 (a share of the block parameters), got {ratio}")
    return metric


def _prune_depth(
    cfg: ModelConfig, state: dict[str, torch.Tensor], net: Transformer, cal: Calibration, ratio: float, metric: str,
    report: PruneReport,
) -> tuple[ModelConfig, dict]:  # fmt: skip
    """Drop the least important blocks; every block's score goes in the report, so a user can see how close the
    call was."""
    drop_n = depth_plan(cfg, ratio)
    scores = block_influence(net, cal) if metric == "influence" else loss_without_each_block(net, cal)
    drop = sorted(np.argsort(scores)[:drop_n].tolist())
    report.scores["per_block"] = [round(s, 6) for s in scores]
    report.removed["blocks"] = drop
    return drop_blocks(cfg, state, drop)


def _prune_width(
    cfg: ModelConfig, state: dict[str, torch.Tensor], net: Transformer, cal: Calibration, ratio: float,
    kv_heads: int | None, report: PruneReport,
) -> tuple[ModelConfig, dict]:  # fmt: skip
    """Narrow every MLP and drop KV head groups: the shape is planned from the ratio first, so the scores only
    choose which channels and groups stay."""
    hidden, kv = width_plan(cfg, ratio, kv_heads)
    channels, groups = width_importance(net, cal)
    new_cfg, new_state, kept = narrow(cfg, state, channels, hidden, groups, kv)
    report.removed["mlp_channels_per_layer"] = f"{cfg.hidden_dim - hidden} of {cfg.hidden_dim}"
    report.removed["kv_head_groups_per_layer"] = f"{cfg.n_kv_heads - kv} of {cfg.n_kv_heads}"
    report.scores.update(kept)
    return new_cfg, new_state


def _prune_sparsity(
    cfg: ModelConfig, net: Transformer, cal: Calibration, ratio: float, metric: str, report: PruneReport
) -> tuple[ModelConfig, dict]:
    """Zero weights in place; the report notes that nothing got smaller or faster, since a user reading "25%
    pruned" would expect both."""
    zeros = sparsify(net, cal if metric == "wanda" else None, ratio, metric)
    report.removed["weights_zeroed"] = f"{zeros['zeroed']:,} of {zeros['of']:,} block weights"
    report.notes.append(
        "stored dense: the directory is as large as before, and dense kernels run it no faster; "
        "the zeros pay only with a sparse format or kernel, which trainfer does not have"
    )
    return cfg, {k: v.detach() for k, v in net.state_dict().items()}
