"""LoRA: low-rank adapters on a frozen model, merged into plain weights on demand (saved and loaded in the PEFT
format by io/peft.py).

    y = W x + (alpha / r) * B (A dropout(x))     (rsLoRA: alpha / sqrt(r)), B starts at zero

so an adapter at init is the base model exactly. Adapters are written as PEFT writes them
(`adapter_config.json` + `adapter_model.safetensors`, keys `base_model.model.model.layers.N....lora_A.weight`),
so `peft.PeftModel.from_pretrained(<the HF export of the base>, RUN)` loads a trainfer adapter and the
reverse. See docs/finetune.md.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from trainfer.errors import TrainferError
from trainfer.model.transformer import Transformer

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGET_SETS = {"attention": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(ATTENTION + MLP))
    rslora: bool = False  # scale alpha / sqrt(r): the update's size stops shrinking as r grows

    def __post_init__(self) -> None:
        items = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        self.targets = list(dict.fromkeys(m for t in items for m in TARGET_SETS.get(t.strip(), (t.strip(),))))
        unknown = [t for t in self.targets if t not in ATTENTION + MLP]
        if unknown or not self.targets:
            raise TrainferError(
                f"unknown LoRA target {unknown[0] if unknown else '(none)'!r}; choose from "
                f"{', '.join(ATTENTION + MLP)} or a set: {', '.join(TARGET_SETS)}"
            )
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise TrainferError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1; got {self.r}, {self.alpha}, "
                                f"{self.dropout}")  # fmt: skip

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


# Serving: per adapter, the flattened rows of this forward that run with it (the rest run the base alone). Set
# by the engine's runner for the length of one forward (`routed`), so it travels with the call and no module is
# changed; None outside the engine: each layer's `active` adapter applies to every row.
ROUTING: ContextVar[dict[str, Tensor] | None] = ContextVar("lora_routing", default=None)


@contextlib.contextmanager
def routed(routing: dict[str, Tensor]):
    token = ROUTING.set(routing)
    try:
        yield
    finally:
        ROUTING.reset(token)


class LoRALinear(nn.Module):
    """A frozen Linear plus one or more named low-rank updates; `active` picks the one in use (None: the base)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: str | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add(self, name: str, r: int, scaling: float, dropout: float, seed: int | None = None) -> None:
        """PEFT's init: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so the update starts at exactly zero."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
        a = (torch.rand(r, self.in_features, generator=gen) * 2 - 1) * bound
        ref = getattr(self.base, "weight", None)
        if ref is None:  # QLinear holds qweight, GGMLLinear blocks
            ref = self.base.qweight if hasattr(self.base, "qweight") else self.base.blocks
        device = ref.device
        self.lora_A[name] = nn.Parameter(a.to(device))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.scaling[name], self.dropout[name] = scaling, dropout
        self.active = name

    def delta(self, name: str) -> Tensor:
        """The update as a dense (out, in) matrix: scaling * B @ A."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        routing = ROUTING.get()
        if routing is not None:
            return self._routed(x, y, routing) if routing else y
        name = self.active
        if name is None:
            return y
        p = self.dropout[name] if self.training else 0.0
        h = nn.functional.dropout(x, p) if p else x
        a, b = self.lora_A[name], self.lora_B[name]
        return y + (h.to(a.dtype) @ a.t() @ b.t()).to(y.dtype) * self.scaling[name]

    def _routed(self, x: Tensor, y: Tensor, routing: dict[str, Tensor]) -> Tensor:
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        for name, rows in routing.items():
            a, b = self.lora_A[name], self.lora_B[name]
            flat_y = flat_y.index_add(0, rows, (flat_x[rows].to(a.dtype) @ a.t() @ b.t()).to(y.dtype),
                                      alpha=self.scaling[name])  # fmt: skip
        return flat_y.view(y.shape)


def lora_modules(model: Transformer) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model for the length of the block: every LoRA layer runs its frozen weight alone (the KL anchor
    of fine-tuning gets the base's logits this way without a second copy of the model)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = [m.active for m in layers]
    for m in layers:
        m.active = None
    try:
        yield
    finally:
        for m, name in zip(layers, saved, strict=True):
            m.active = name


def apply_lora(model: Transformer, cfg: LoRAConfig, name: str = "default", seed: int = 0) -> Transformer:
    """Wrap the target projections (once) and add adapter `name`; every base parameter is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for child in cfg.targets:
                if not hasattr(parent, child):
                    continue
                mod = getattr(parent, child)
                if not isinstance(mod, LoRALinear):
                    mod = LoRALinear(mod)
                    setattr(parent, child, mod)
                mod.add(name, cfg.r, cfg.scaling, cfg.dropout, seed=seed * 100003 + i * 31 + cfg.targets.index(child))
    return model


def set_adapter(model: Transformer, name: str | None) -> None:
    for m in lora_modules(model).values():
        m.active = name if name is None or name in m.lora_A else None


def merge(model: Transformer, name: str = "default") -> Transformer:
    """Fold adapter `name` into the base weights and unwrap: a plain Transformer again."""
    for full, m in lora_modules(model).items():
        base = m.base
        if name in m.lora_A:
            with torch.no_grad():
                base.weight += m.delta(name).to(base.weight.dtype)
        parent, _, child = full.rpartition(".")
        setattr(model.get_submodule(parent), child, base)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def describe(model: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    train = sum(p.numel() for p in trainable_parameters(model))
    return {"trainable": train, "total": total, "share": train / max(1, total)}
