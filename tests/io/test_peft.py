"""The PEFT format both ways, with `peft` itself: what trainfer writes peft loads, and the reverse."""

from __future__ import annotations

import json

import pytest
import torch

from tests.model.test_lora import TOKENS, perturbed
from trainfer.errors import TrainferError
from trainfer.io import peft as peft_format
from trainfer.io.loader import export_hf, load_model
from trainfer.model import lora


def test_peft_loads_our_adapter_and_we_load_peft_s(chat_model, tmp_path):
    """Both directions through peft 0.21 on the Hugging Face export: equal logits to 1e-5."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = lora.LoRAConfig(r=4, alpha=8, dropout=0.0, targets="all", rslora=True)
    ours, _ = load_model(chat_model)
    perturbed(ours, cfg)
    peft_format.save_adapter(tmp_path / "ours", ours, cfg, str(chat_model))
    ours.double()  # fp64 on both sides: the toy's sharp head (logits ~50) would turn fp32 rounding into noise
    hf = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float64)
    theirs = PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(TOKENS).logits, ours(TOKENS), atol=1e-5, rtol=1e-5)

    hf = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float64)
    trained = get_peft_model(hf, LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trained.save_pretrained(tmp_path / "theirs")
    mine, _ = load_model(chat_model)
    peft_format.load_adapter(mine, tmp_path / "theirs")
    mine.double()
    with torch.no_grad():
        torch.testing.assert_close(mine.eval()(TOKENS), trained.eval()(TOKENS).logits, atol=1e-5, rtol=1e-5)
    # and as a model anywhere: the adapter directory loads as its base with the update merged
    state_model, _ = load_model(str(tmp_path / "ours"))
    state_model.double()
    with torch.no_grad():  # merged in fp32 at load: fp32 rounding of the weights, times the sharp head
        torch.testing.assert_close(state_model(TOKENS), ours(TOKENS), atol=1e-4, rtol=1e-5)
    out = export_hf(str(tmp_path / "ours"), tmp_path / "merged")
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()


def test_an_adapter_for_another_model_or_format_is_refused(chat_model, tmp_path):
    model, _ = load_model(chat_model)
    cfg = lora.LoRAConfig(r=4, targets="attention")
    perturbed(model, cfg)
    peft_format.save_adapter(tmp_path / "a", model, cfg, str(chat_model))
    other, _ = load_model(chat_model)
    lora.apply_lora(other, lora.LoRAConfig(r=4, targets="mlp"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(TrainferError, match="use_dora is not supported"):
        peft_format.load_adapter(other, tmp_path / "dora")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(TrainferError, match="'IA3' adapter"):
        peft_format.load_adapter(other, tmp_path / "ia3")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(TrainferError, match="has no adapter_model.safetensors"):
        peft_format.load_adapter(other, tmp_path / "no-weights")
    state = {k: v.clone() for k, v in load_model(chat_model)[0].state_dict().items()}
    state["layers.1.self_attn.o_proj.weight"] = torch.zeros(64, 32)  # another base: other shapes
    with pytest.raises(TrainferError, match="another base model"):
        peft_format.merge_into(state, tmp_path / "a")
    del state["layers.1.self_attn.o_proj.weight"]
    with pytest.raises(TrainferError, match="which the base model does not have"):
        peft_format.merge_into(state, tmp_path / "a")
