"""Hugging Face layout: export that transformers loads back with the same logits, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_hf_model
from trainfer.errors import TrainferError
from trainfer.io.hf import load_state_dict, read_config
from trainfer.io.loader import export_hf, load_model


@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("qwen2", {"tie_word_embeddings": True})])
def test_export_round_trips_through_transformers(tmp_path, kind, overrides):
    import transformers

    ref = make_hf_model(kind, **overrides)
    ref.save_pretrained(tmp_path / "src")
    export_hf(tmp_path / "src", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, ref(tokens).logits, rtol=0, atol=0)


def test_sharded_export_loads_in_both(tmp_path):
    import transformers

    from trainfer.io.hf import save_hf

    ref = make_hf_model("llama")
    ref.save_pretrained(tmp_path / "src")
    cfg = read_config(tmp_path / "src")
    save_hf(
        tmp_path / "out", cfg, load_state_dict(tmp_path / "src", torch.float32), torch.float32, max_shard_bytes=20_000
    )
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    ours, _ = load_model(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits)
        torch.testing.assert_close(back(tokens).logits, ref(tokens).logits)


def test_bf16_export_is_bf16(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path / "src")
    export_hf(tmp_path / "src", tmp_path / "out", dtype="bfloat16")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_state_dict(tmp_path / "out", torch.bfloat16).values())


def test_export_refuses_a_non_empty_directory(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(TrainferError, match="not empty"):
        export_hf(tmp_path / "src", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_bad_directories_are_clear_errors(tmp_path):
    with pytest.raises(TrainferError, match="no config.json"):
        read_config(tmp_path)
    make_hf_model("llama").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(TrainferError, match="corrupt or truncated"):
        load_state_dict(tmp_path, torch.float32)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickles are never loaded")
    with pytest.raises(TrainferError, match="only safetensors"):
        load_state_dict(tmp_path, torch.float32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(TrainferError, match="unsupported model_type 'gpt_neox'"):
        read_config(tmp_path)


def test_index_pointing_outside_the_directory_is_refused(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    index = {"weight_map": {"lm_head.weight": "../elsewhere.safetensors"}}
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(TrainferError, match="outside"):
        load_state_dict(tmp_path / "m", torch.float32)
