"""Pruning: exact cases built by hand (a block that adds nothing, dead MLP channels, a silent head group),
shapes that every loader accepts (transformers too), sparsity counted, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_tiny_model_dir
from trainfer.compress.prune import block_params, depth_plan, prune, width_plan
from trainfer.io.loader import load_model

TEXT = "the quick brown fox jumps over the lazy dog; " * 40


@pytest.fixture
def corpus(tmp_path) -> str:
    (tmp_path / "cal.txt").write_text(TEXT)
    return str(tmp_path / "cal.txt")


def edit_weights(model_dir: Path, edit) -> Path:
    file = next(model_dir.glob("*.safetensors"))
    state = load_file(file)
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(file), metadata={"format": "pt"})
    return model_dir


def logits(path, ids) -> torch.Tensor:
    model, _ = load_model(path)
    with torch.no_grad():
        return model(ids)


IDS = torch.tensor([[5, 17, 33, 90, 120, 7, 64, 201, 3, 44]])


def test_dropping_a_block_that_adds_nothing_changes_nothing(tmp_path, corpus):
    model = make_tiny_model_dir(tmp_path / "m", context=512)

    def silence_block_1(s):
        s["model.layers.1.self_attn.o_proj.weight"].zero_()
        s["model.layers.1.mlp.down_proj.weight"].zero_()

    edit_weights(model, silence_block_1)
    report = prune(str(model), tmp_path / "out", "depth", ratio=0.5, data=corpus, seq_len=64)
    assert report.removed["blocks"] == [1] and report.scores["per_block"][1] == pytest.approx(0, abs=1e-6)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1
    torch.testing.assert_close(logits(tmp_path / "out", IDS), logits(model, IDS), atol=1e-5, rtol=1e-5)
    assert report.scores["calibration_loss_after"] == pytest.approx(report.scores["calibration_loss_before"])
    # by loss: the same block, found by bypassing each in turn
    loss = prune(str(model), tmp_path / "out2", "depth", ratio=0.5, metric="loss", data=corpus, seq_len=64)
    assert loss.removed["blocks"] == [1]


def test_width_pruning_drops_dead_channels_and_silent_head_groups_first(tmp_path, corpus):
    model = make_tiny_model_dir(tmp_path / "m", context=512)  # dim 64, hidden 96, 4 heads in 2 KV groups

    def kill(s):
        for i in range(2):
            s[f"model.layers.{i}.mlp.down_proj.weight"][:, 10:42] = 0  # 32 channels that reach nothing
            s[f"model.layers.{i}.self_attn.o_proj.weight"][:, 32:64] = 0  # heads 2, 3 = KV group 1

    edit_weights(model, kill)
    report = prune(str(model), tmp_path / "out", "width", ratio=0.39, kv_heads=1, data=corpus, seq_len=64)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["num_attention_heads"]) == (64, 1, 2)
    assert report.scores["kv_groups_kept_per_layer"] == [[0], [0]]
    torch.testing.assert_close(logits(tmp_path / "out", IDS), logits(model, IDS), atol=1e-5, rtol=1e-5)
    # the pruned directory is a plain Hugging Face model: transformers computes the same logits
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS).logits, logits(tmp_path / "out", IDS), atol=1e-5, rtol=1e-5)


def test_plans_reach_the_ratio(tmp_path):
    from trainfer.io.hf import read_config

    cfg = read_config(make_tiny_model_dir(tmp_path / "m"))
    assert depth_plan(cfg, 0.5) == 1
    hidden, kv = width_plan(cfg, 0.3, None)
    assert hidden % 32 == 0 and kv == cfg.n_kv_heads
    after = block_params(cfg.replace(hidden_dim=hidden))
    assert after <= 0.7 * block_params(cfg) < block_params(cfg.replace(hidden_dim=hidden + 32))
    with pytest.raises(Exception, match="keep at least one"):
        depth_plan(cfg, 0.99)


def test_sparsity_zeroes_each_row_and_says_it_is_not_smaller(tmp_path, corpus):
    model = make_tiny_model_dir(tmp_path / "m", context=512)
    reports = {}
    for metric in ("wanda", "magnitude"):
        reports[metric] = prune(str(model), tmp_path / metric, "sparsity", 0.5, metric=metric, data=corpus, seq_len=64)
        pruned, _ = load_model(tmp_path / metric)
        for lin in (m for m in pruned.layers.modules() if isinstance(m, torch.nn.Linear)):
            assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all()
        assert (
            "no faster" in reports[metric].summary() and reports[metric].params_after == reports[metric].params_before
        )
    a, _ = load_model(tmp_path / "wanda")
    b, _ = load_model(tmp_path / "magnitude")
    assert not torch.equal(a.layers[0].mlp.up_proj.weight, b.layers[0].mlp.up_proj.weight)  # Wanda weighs inputs


def test_cli(tmp_path, corpus):
    model = make_tiny_model_dir(tmp_path / "m", context=512)
    run = [sys.executable, "-m", "trainfer.cli", "prune", str(model)]
    ok = subprocess.run([*run, "--out", str(tmp_path / "o"), "--data", corpus, "--seq-len", "64", "--ratio", "0.5"],
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "calibration loss" in ok.stdout and (tmp_path / "o" / "prune.json").exists()
    gen = subprocess.run([sys.executable, "-m", "trainfer.cli", "generate", str(tmp_path / "o"), "hello",
                          "--max-tokens", "4"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    for bad, says in ((["--ratio", "1.5"], "between 0 and 1"), (["--method", "width", "--kv-heads", "9"], "kv-heads")):
        r = subprocess.run([*run, "--out", str(tmp_path / "x"), "--data", corpus, *bad], capture_output=True, text=True)
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr


@pytest.mark.real
def test_smollm2_pruned_by_width_runs_everywhere(smollm2_path, tmp_path):
    """The real model, narrowed (MLP and one KV head group): it loads, generates, and transformers agrees."""
    import transformers

    from trainfer import LLM

    report = prune("smollm2-135m-instruct", tmp_path / "p", "width", 0.5, kv_heads=2, n_windows=2, seq_len=64)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["num_attention_heads"]) == (672, 2, 6)
    assert report.block_params_after <= 0.5 * report.block_params_before
    llm = LLM.load(str(tmp_path / "p"))
    assert llm.generate("The king", max_tokens=8, temperature=0, ignore_eos=True).completion_tokens == 8
    ids = torch.tensor([llm.tokenizer.encode("To be, or not to be")])
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), ref(ids).logits, atol=2e-4, rtol=1e-4)
