"""The model against transformers (same weights, same logits) and its own cached path against itself."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_hf_model
from trainfer.errors import TrainferError
from trainfer.io.loader import load_model
from trainfer.model.config import PRESETS, ModelConfig
from trainfer.model.transformer import Transformer

CASES = {
    "gqa-untied": ("llama", {}),
    "mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "mqa-bias": ("llama", {"num_key_value_heads": 1, "attention_bias": True}),
    "qwen2-bias": ("qwen2", {"tie_word_embeddings": True}),
    "llama3-rope": (
        "llama",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    # YaRN past the original context (16 positions of 40): the frequencies and the scale on cos / sin
    "qwen2-yarn": (
        "qwen2",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    ),
    "llama-yarn-mscale": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 16,
                "mscale": 0.707,
                "mscale_all_dim": 1.0,
                "beta_fast": 16,
                "beta_slow": 2,
            }
        },
    ),  # fmt: skip
    "head-dim-32": ("llama", {"head_dim": 32}),
    "qwen3-qk-norm": ("qwen3", {"head_dim": 32}),
    "mistral": ("mistral", {"sliding_window": None}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    ref = make_hf_model(kind, **overrides)
    ref.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    tokens = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens).logits
        got = model(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_forward_stays_close_to_fp32(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    m32, _ = load_model(tmp_path)
    m16, _ = load_model(tmp_path, dtype="bfloat16")
    assert m16.lm_head.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = m32(tokens), m16(tokens).float()
    assert (a - b).abs().max() < 0.1 * a.abs().max()


@pytest.mark.parametrize("name,low,high", [("tiny", 0.8e6, 1.6e6), ("small", 8e6, 13e6), ("base", 40e6, 60e6)])
def test_presets_have_their_advertised_size(name, low, high):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    counted = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once
    assert counted == cfg.n_params
    assert low <= counted <= high


def test_training_init_is_seeded_and_tied():
    cfg = PRESETS["tiny"]
    a, b = Transformer(cfg), Transformer(cfg)
    a.init_weights(seed=5)
    b.init_weights(seed=5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert a.lm_head.weight is a.embed_tokens.weight


def test_config_rejects_inconsistent_heads():
    with pytest.raises(ValueError, match="n_kv_heads 3 must divide n_heads 4"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(dim=65, n_heads=4)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    from trainfer.io.hf import load_state_dict, read_config
    from trainfer.io.loader import build_model

    make_hf_model("llama").save_pretrained(tmp_path)
    cfg, state = read_config(tmp_path), load_state_dict(tmp_path, torch.float32)
    with pytest.raises(TrainferError, match="has shape"):
        build_model(cfg.replace(hidden_dim=128), state)
    del state["layers.1.mlp.up_proj.weight"]
    with pytest.raises(TrainferError, match="missing"):
        build_model(cfg, state)


def test_rmsnorm_backward_matches_autograd(dtype=torch.float32):
    """The hand-written RMSNorm backward (training) against autograd through the inference formula."""
    from trainfer.model.transformer import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.add_(torch.randn(16, dtype=dtype))
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 16, dtype=dtype)
    norm(x).backward(g)
    got = x.grad.clone(), norm.weight.grad.clone()
    x.grad = norm.weight.grad = None
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    ref.backward(g)
    torch.testing.assert_close(got[0], x.grad)
    torch.testing.assert_close(got[1], norm.weight.grad)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ref)
