"""Aliases and the cache: resolution rules and refusing a file whose hash is not the recorded one."""

from __future__ import annotations

import dataclasses

import pytest

from trainfer import registry
from trainfer.errors import TrainferError


def test_resolve_paths_and_aliases(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINFER_HOME", str(tmp_path / "home"))
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert registry.resolve(tmp_path / "m.gguf") == tmp_path / "m.gguf"
    assert registry.resolve("smollm2-135m-instruct", download=False) == (
        tmp_path / "home" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    with pytest.raises(TrainferError, match="no such file"):
        registry.resolve(str(tmp_path / "absent.gguf"))
    with pytest.raises(TrainferError, match="known aliases"):
        registry.resolve("llama-9000")
    assert registry.cached_models() == [("smollm2-135m-instruct", None)]


@pytest.mark.real
def test_pull_refuses_a_file_with_the_wrong_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINFER_HOME", str(tmp_path))
    bad = dataclasses.replace(registry.ALIASES["smollm2-135m-instruct"], sha256="0" * 64)
    monkeypatch.setitem(registry.ALIASES, "smollm2-135m-instruct", bad)
    with pytest.raises(TrainferError, match="refusing to use it"):
        registry.pull("smollm2-135m-instruct", quiet=True)
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert list(folder.iterdir()) == []  # nothing half-written or unverified is left behind


@pytest.mark.real
def test_pull_is_idempotent_and_records_the_hash(smollm2_path):
    import json

    assert registry.pull("smollm2-135m-instruct", quiet=True) == smollm2_path
    manifest = json.loads((smollm2_path.parent / "manifest.json").read_text())
    assert manifest["sha256"] == registry.sha256_of(smollm2_path) == registry.ALIASES["smollm2-135m-instruct"].sha256
