"""ONNX export, run by onnxruntime: logits against trainfer's for a prefill and for decode steps over the KV
cache, and a greedy loop on onnxruntime against trainfer's own greedy generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.conftest import SMOLLM2, make_tiny_model_dir
from trainfer import LLM
from trainfer.cli import main
from trainfer.io.onnx_export import export_onnx, io_names


def empty_cache(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past keys/values (a prefill), shaped from the graph's own inputs."""
    return {
        i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_")
    }


def run(session, ids: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One forward: logits, and the presents renamed as the next step's pasts."""
    outs = session.run(None, {"input_ids": ids, **cache})
    names = [o.name for o in session.get_outputs()]
    present = {n.replace("present_", "past_"): a for n, a in zip(names[1:], outs[1:], strict=True)}
    return outs[0], present


def onnx_greedy(session, prompt: list[int], max_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding on onnxruntime alone: prefill once, then one token per step through the KV cache."""
    logits, cache = run(session, np.array([prompt], dtype=np.int64), empty_cache(session, 1))
    out: list[int] = []
    while len(out) < max_tokens:
        out.append(int(logits[0, -1].argmax()))
        if out[-1] in stop:
            break
        logits, cache = run(session, np.array([[out[-1]]], dtype=np.int64), cache)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model, its LLM and its ONNX export (exported once: ~5 s)."""
    d = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    path = export_onnx(d, d.parent / "tiny.onnx")
    return d, LLM.load(d), ort.InferenceSession(str(path))


def test_graph_names_and_dynamic_axes(tiny):
    _, llm, session = tiny
    inputs, outputs = io_names(llm.model.cfg.n_layers)
    assert [i.name for i in session.get_inputs()] == inputs
    assert inputs[:3] == ["input_ids", "past_key_0", "past_value_0"]
    assert [o.name for o in session.get_outputs()] == outputs and outputs[0] == "logits"
    assert session.get_inputs()[0].shape == ["batch", "seq"]
    assert session.get_inputs()[1].shape[0] == "batch" and isinstance(session.get_inputs()[1].shape[2], str)


def test_prefill_and_decode_logits_match_trainfer(tiny):
    _, llm, session = tiny
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = llm.model(ids).numpy()  # (2, 12, vocab): the full sequence without a cache
    logits, cache = run(session, ids[:, :5].numpy(), empty_cache(session, 2))  # prefill 5
    np.testing.assert_allclose(logits, want[:, :5], rtol=0, atol=1e-4)
    assert cache["past_key_0"].shape == (2, llm.model.cfg.n_kv_heads, 5, llm.model.cfg.head_dim)
    logits, cache = run(session, ids[:, 5:8].numpy(), cache)  # a 3-token chunk on top of the cache
    np.testing.assert_allclose(logits, want[:, 5:8], rtol=0, atol=1e-4)
    for t in range(8, 12):  # decode steps, one token each
        logits, cache = run(session, ids[:, t : t + 1].numpy(), cache)
        np.testing.assert_allclose(logits[:, 0], want[:, t], rtol=0, atol=1e-4)
    assert cache["past_value_1"].shape[2] == 12


def test_greedy_loop_on_onnxruntime_equals_trainfer(tiny):
    _, llm, session = tiny
    for prompt in ["Once upon a time", "To be, or not to be"]:
        want = llm.generate(prompt, max_tokens=24, temperature=0).token_ids
        assert len(want) == 24 and len(set(want)) > 1  # the tiny tokenizer has no end-of-text token
        got = onnx_greedy(session, llm.tokenizer.encode(prompt), 24, llm.tokenizer.stop_token_ids)
        assert got == want, prompt


def test_cli_export_onnx(tiny, tmp_path, capsys):
    d, llm, _ = tiny
    out = tmp_path / "m.onnx"
    assert main(["export", str(d), "--to", "onnx", "--out", str(out), "--type", "F16"]) == 1
    assert capsys.readouterr().err.strip() == "error: the ONNX export is F32 only (got --type F16)"
    assert main(["export", str(d), "--to", "hf", "--out", str(tmp_path / "hf"), "--type", "Q8_0"]) == 1
    assert "trainfer quantize" in capsys.readouterr().err
    assert main(["export", str(d), "--to", "onnx", "--out", str(tmp_path / "m.txt")]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not out.exists()


@pytest.mark.real
def test_smollm2_onnx_greedy_equals_trainfer(smollm2, smollm2_path, tmp_path):
    path = export_onnx(SMOLLM2, tmp_path / "smollm2.onnx")
    session = ort.InferenceSession(str(path))
    ids = smollm2.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        want = smollm2.model(torch.tensor([ids])).numpy()
    np.testing.assert_allclose(run(session, np.array([ids]), empty_cache(session, 1))[0], want, rtol=0, atol=1e-4)
    expected = smollm2.generate("The capital of France is", max_tokens=8, temperature=0).token_ids
    assert onnx_greedy(session, ids, 8, smollm2.tokenizer.stop_token_ids) == expected
    assert Path(path).stat().st_size > 500e6  # the weights are inside the one file
