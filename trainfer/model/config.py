"""ModelConfig: the shape of a Llama-family decoder, plus named presets for training from scratch.

One dataclass describes every supported checkpoint (Llama, SmolLM, Mistral-style, Qwen2 with q/k/v bias, Qwen3 with
q/k norms).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None means n_heads (plain multi-head attention)
    head_dim: int | None = None  # None means dim // n_heads
    hidden_dim: int = 1376  # SwiGLU inner width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict[str, float] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2 has bias on q/k/v only
    out_bias: bool = False  # Llama's attention_bias=True also puts one on o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before RoPE
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    arch: str = "llama"  # the Hugging Face model_type this config round-trips to

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads {self.n_kv_heads} must divide n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def n_params(self) -> int:
        """Parameter count without building the model (embedding counted once when tied)."""
        d, h, kv, hd = self.dim, self.n_heads, self.n_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        attn += (h * hd + 2 * kv * hd) * self.qkv_bias + d * self.out_bias + 2 * hd * self.qk_norm
        mlp = 3 * d * self.hidden_dim + (2 * self.hidden_dim + d) * self.mlp_bias
        layer = attn + mlp + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * layer + d + head

    @property
    def matmul_params(self) -> int:
        """The parameters a token multiplies through (an untied embedding is a lookup, not a matmul): what a
        memory-bound decode step reads."""
        return self.n_params - (0 if self.tie_embeddings else self.vocab_size * self.dim)

    # ---- FLOPs: the one home of these formulas (training, the reason/ compute account, the cost model) ----
    def training_flops_per_token(self, seq_len: int) -> float:
        """Forward + backward per token: 6N for the matmuls (an embedding lookup is not one; a tied embedding
        is, as the head) plus attention (PaLM's 12 x L x H x hd x T, as nanoGPT counts)."""
        return 6 * self.matmul_params + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    def forward_flops(self, processed: int, sampled: int, context: float) -> float:
        """Inference: 2 x body parameters per processed token, 2 x the LM head per sampled token (prefill rows
        skip the head), and attention over `context` keys on average (QK and AV: 4 x L x H x hd per key)."""
        head = self.vocab_size * self.dim
        body = self.n_params - head * (1 if self.tie_embeddings else 2)
        attention = 4 * self.n_layers * self.n_heads * self.head_dim * context
        return 2 * body * processed + 2 * head * sampled + attention * processed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """Llama's rule: 2/3 of 4*dim, rounded up so matmuls stay aligned."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _preset(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab: int, seq: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=_swiglu_hidden(dim),
        max_seq_len=seq,
        tie_embeddings=True,
    )


# Sizes for training from scratch; parameter counts are with the default 8k BPE vocabulary.
PRESETS: dict[str, ModelConfig] = {
    "tiny": _preset(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab=4096, seq=256),  # ~1.3M
    "small": _preset(dim=320, n_layers=8, n_heads=8, n_kv_heads=4, vocab=8192, seq=512),  # ~10M
    "base": _preset(dim=640, n_layers=10, n_heads=10, n_kv_heads=5, vocab=8192, seq=1024),  # ~48M
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
