"""LoRA layers: exact at init, and merged weights equal the unmerged adapter."""

from __future__ import annotations

import pytest
import torch

from trainfer.io.loader import load_model
from trainfer.model import lora

TOKENS = torch.tensor([[5, 17, 99, 3, 42, 7, 7, 130, 64, 1]])


def perturbed(model, cfg: lora.LoRAConfig, seed: int = 1):
    """LoRA applied, with B made non-zero (as after training) so the update matters."""
    lora.apply_lora(model, cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B["default"].copy_(torch.randn(m.lora_B["default"].shape, generator=gen) * 0.05)
    return model.eval()


def test_lora_at_init_is_the_base_model_exactly(chat_model):
    model, _ = load_model(chat_model)
    with torch.no_grad():
        before = model(TOKENS)
        lora.apply_lora(model, lora.LoRAConfig(r=4, targets="all"))
        model.train()  # dropout on the adapter's input must not change a zero update either
        after = model(TOKENS)
    assert torch.equal(before, after)
    trainable = lora.trainable_parameters(model)
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_the_unmerged_adapter(chat_model, rslora):
    model, _ = load_model(chat_model)
    perturbed(model, lora.LoRAConfig(r=8, alpha=16, targets="attention,down_proj", rslora=rslora))
    model.double()  # the sharp toy head gives logits of ~50: compare the math, not fp32 rounding
    with torch.no_grad():
        adapted = model(TOKENS)
        merged = lora.merge(model)(TOKENS)
    assert not lora.lora_modules(model)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
