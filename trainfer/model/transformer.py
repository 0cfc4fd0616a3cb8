"""The Llama-family decoder shared by training and inference: embeddings, RMSNorm, RoPE, GQA, SwiGLU.

No file or network I/O here. Parameter names follow Hugging Face's Llama layout (minus the `model.`
prefix) so that checkpoints map one to one.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainfer.model.config import ModelConfig


class AttentionContext(Protocol):
    """What inference passes to the model: stores this step's K/V and attends over the cached ones."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, T, H, hd), k/v (B, T, KV, hd) for the new tokens -> attention output (B, T, H, hd)."""
        ...


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward: 6 ops instead of autograd's ~12, ~40% less time per norm on CPU."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        xn = (xf * r).to(x.dtype)
        ctx.save_for_backward(xn, weight, r)
        return weight * xn

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, None]:
        xn, weight, r = ctx.saved_tensors
        gw = (g * xn).flatten(0, -2).sum(0).to(weight.dtype)
        gxn = (g * weight).float()
        xf = xn.float()
        gx = r * (gxn - xf * (gxn * xf).mean(-1, keepdim=True))
        return gx.to(xn.dtype), gw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32 whatever the weights are: bf16 sums of squares lose too much.
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNormFn.apply(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


ROPE_SCALINGS = ("default", "linear", "llama3", "yarn")


def rope_frequencies(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies (head_dim/2,), with the scaling the config asks for (linear, Llama-3's, YaRN's). Always
    computed on the CPU: under the loaders' meta device they would be empty (and meta ops import torch._dynamo)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    sc = cfg.rope_scaling
    if not sc:
        return inv_freq
    kind = rope_scaling_kind(sc)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / sc["factor"]
    if kind == "yarn":
        return yarn_frequencies(inv_freq, cfg, sc)
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(in_band, mid, scaled)


def rope_scaling_kind(sc: dict) -> str:
    kind = sc.get("rope_type", sc.get("type", "llama3"))
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_SCALINGS)}")
    return kind


def yarn_frequencies(inv_freq: Tensor, cfg: ModelConfig, sc: dict) -> Tensor:
    """YaRN (Qwen2.5's long-context setting, arXiv 2309.00071): frequencies that turn fewer than beta_slow times
    over the original context are divided by `factor` (interpolated), those turning more than beta_fast times are
    kept, a linear ramp over the dimensions between; as transformers computes them."""
    hd, base, factor = cfg.head_dim, cfg.rope_theta, sc["factor"]
    old_len = sc.get("original_max_position_embeddings") or cfg.max_seq_len
    fast, slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dimension whose frequency turns `rotations` times over old_len
        return hd * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(fast), dim_of(slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    ramp = ((torch.arange(hd // 2, dtype=torch.float32, device="cpu") - low) / ((high - low) or 0.001)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (frequency kept), 0: interpolate (divided by factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def rope_attention_factor(cfg: ModelConfig) -> float:
    """YaRN's scale on cos and sin (so on attention logits, squared): 0.1 ln(factor) + 1, or the config's own."""
    sc = cfg.rope_scaling
    if not sc or rope_scaling_kind(sc) != "yarn":
        return 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = sc["factor"], sc.get("mscale"), sc.get("mscale_all_dim")
    return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (x1, x2) halves: x*cos + (-x2, x1)*sin, with the minus folded into `sin` (see Transformer.rope).

    x (B, T, H, hd); cos/sin (B, T, 1, hd). roll + addcmul is 2 ops where chunk/neg/cat/mul/add are 6.
    """
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d, hd = cfg.dim, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=cfg.out_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.norm_eps), RMSNorm(hd, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, KV, hd)
        if hasattr(self, "q_norm"):  # Qwen3: each head normalized before its rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx is None:  # training / full-sequence scoring: plain causal attention
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)  # (B, T, H, hd)
        else:
            y = ctx.attend(self.layer, q, k, v)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # nn.Embedding's own init (normal_) on the meta device, where the loaders build a model before filling it,
        # imports torch._dynamo: ~1 s of every launch. Same values elsewhere.
        weight = torch.empty(cfg.vocab_size, cfg.dim)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=weight)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.rope_scale = rope_attention_factor(cfg)

    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Fresh weights for training from scratch (GPT-2 style, residual projections scaled down)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                s = (
                    std / math.sqrt(2 * self.cfg.n_layers)
                    if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else std
                )
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * s)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sign-folded sin (-sin, sin) (B, T, 1, hd) for positions (B, T), in fp32 then cast."""
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # (B, T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        cos = torch.cat((cos, cos), dim=-1).unsqueeze(2)  # (B, T, 1, hd)
        sin = torch.cat((-sin, sin), dim=-1).unsqueeze(2)
        return cos.to(dtype), sin.to(dtype)

    def hidden_states(
        self, tokens: Tensor, positions: Tensor | None = None, ctx: AttentionContext | None = None
    ) -> Tensor:
        """Final-norm hidden states (B, T, dim): what the LM head and a trainer's fused loss consume."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)  # (B, T, dim)
        cos, sin = self.rope(positions, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, ctx)
        return self.norm(x)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, ctx: AttentionContext | None = None) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab). Without ctx: causal attention over the given tokens."""
        return self.lm_head(self.hidden_states(tokens, positions, ctx))
