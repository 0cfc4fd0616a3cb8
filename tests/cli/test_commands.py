"""The `trainfer` command as a user runs it: a real subprocess, exit codes, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tiny_model_dir
from tests.io.test_gguf import tiny_hf, write_gguf

TRAINFER = [sys.executable, "-m", "trainfer.cli"]


def run(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*TRAINFER, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def assert_clean_failure(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]  # one clear message, last
    assert sum(line.startswith("error: ") for line in lines) == 1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random model with a byte-level tokenizer: enough for the CLI to run end to end."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def test_generate_and_convert_a_local_model(tiny_dir, tmp_path):
    out = run("generate", str(tiny_dir), "hello", "--max-tokens", "7", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert "7 generated" in out.stderr and "tokens/s" in out.stderr and "TTFT" in out.stderr
    again = run("generate", str(tiny_dir), "hello", "--max-tokens", "7", "--temperature", "0")
    assert again.stdout == out.stdout  # greedy is deterministic
    conv = run("convert", str(tiny_dir), "--to", "hf", str(tmp_path / "out"))
    assert conv.returncode == 0, conv.stderr
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()


def test_unknown_alias_lists_the_known_ones():
    assert_clean_failure(run("generate", "no-such-model", "hi"), "known aliases: smollm2-135m-instruct")
    assert_clean_failure(run("pull", "no-such-model"), "known aliases: smollm2-135m-instruct")


def test_bad_files_fail_cleanly(tmp_path):
    assert_clean_failure(run("generate", str(tmp_path / "missing.gguf"), "hi"), "no such file")
    (tmp_path / "junk.gguf").write_bytes(b"\x00garbage" * 100)
    assert_clean_failure(run("generate", str(tmp_path / "junk.gguf"), "hi"), "corrupt or truncated")
    write_gguf(tmp_path / "m.gguf", tiny_hf())
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 5000])
    assert_clean_failure(run("generate", str(tmp_path / "cut.gguf"), "hi"), "corrupt or truncated")
    write_gguf(tmp_path / "falcon.gguf", tiny_hf(), arch="falcon")
    assert_clean_failure(
        run("chat", str(tmp_path / "falcon.gguf"), "--message", "hi"), "unsupported GGUF architecture 'falcon'"
    )
    (tmp_path / "notes.txt").write_text("hello")
    assert_clean_failure(run("generate", str(tmp_path / "notes.txt"), "hi"), "neither a .gguf file")


def test_bad_flags_fail_cleanly(tiny_dir):
    assert_clean_failure(run("generate", str(tiny_dir), "hi", "--top-p", "0"), "top_p")
    usage = run("generate", str(tiny_dir), "hi", "--max-tokens", "many")
    assert usage.returncode == 2 and "invalid int value" in usage.stderr and "Traceback" not in usage.stderr


def test_a_draft_model_keeps_greedy_output_and_must_share_the_tokenizer(tiny_dir, tmp_path):
    draft = make_tiny_model_dir(tmp_path / "draft")
    args = ("generate", str(tiny_dir), "hello", "--max-tokens", "12", "--temperature", "0")
    plain, spec = run(*args), run(*args, "--draft", str(draft), "--num-draft-tokens", "4")
    assert spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "draft guesses kept" not in plain.stderr and "draft guesses kept" in spec.stderr
    write_gguf(tmp_path / "other.gguf", tiny_hf())
    assert_clean_failure(run(*args, "--draft", str(tmp_path / "other.gguf")), "does not share the model's tokenizer")
    assert_clean_failure(run(*args, "--draft", str(tmp_path / "missing")), "no such")


def test_chat_needs_a_template(tiny_dir):
    assert_clean_failure(run("chat", str(tiny_dir), "--message", "hi"), "no chat template")


def test_models_lists_aliases():
    out = run("models")
    assert out.returncode == 0 and "smollm2-135m-instruct" in out.stdout


@pytest.mark.real
def test_chat_with_the_real_model(smollm2_path):
    out = run("chat", "smollm2-135m-instruct", "--message", "What is the capital of France?", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "finish: stop" in out.stderr


@pytest.mark.real
def test_interactive_chat_keeps_the_conversation(smollm2_path):
    import re

    dialogue = "My name is Alice.\nWhat is my name?\n\n"
    out = run("chat", "smollm2-135m-instruct", "--temperature", "0", "--max-tokens", "12", stdin=dialogue)
    assert out.returncode == 0, out.stderr
    (p1, n1), (p2, _) = [tuple(map(int, m)) for m in re.findall(r"prompt (\d+) tokens, (\d+) generated", out.stderr)]
    # The second prompt holds the first question, the first answer and the new question.
    assert p2 > p1 + n1


def test_prepare_reports_stats_and_fails_cleanly(tmp_path):
    (tmp_path / "c").mkdir()
    for i in range(4):
        (tmp_path / "c" / f"{i}.txt").write_text(f"document number {i} with some words. " * 30)
    out = run("prepare", "--source", str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--tokenizer", "char")
    assert out.returncode == 0, out.stderr
    assert "4 documents (3 train / 1 val)" in out.stdout and "bytes per token" in out.stdout
    assert_clean_failure(
        run("prepare", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")), "no such file"
    )
    assert_clean_failure(
        run("prepare", "--source", str(tmp_path / "c"), "--out", str(tmp_path / "o3"), "--vocab-size", "100000"),
        "larger than this data supports",
    )
    assert not (tmp_path / "o3").exists()  # nothing half-written is left behind
