"""The rooms' arrows (pyproject.toml's import-linter contract) hold, and the check can see a broken one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def lint(*args: str) -> subprocess.CompletedProcess:
    if not LINT.exists() and shutil.which("lint-imports") is None:
        pytest.fail("lint-imports is missing: `make setup` installs import-linter with the dev extras")
    exe = str(LINT) if LINT.exists() else "lint-imports"
    return subprocess.run([exe, "--no-cache", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_room_imports_only_the_rooms_below_it():
    done = lint()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
    assert "Contracts: 1 kept, 0 broken." in done.stdout


def test_the_contract_sees_an_upward_import(tmp_path):
    """The same check with two rooms swapped (infer above serve) must fail, naming a real import."""
    config = tmp_path / "swapped.ini"
    config.write_text(
        "[importlinter]\nroot_package = trainfer\n\n[importlinter:contract:swapped]\nname = swapped\ntype = layers\n"
        "layers =\n    trainfer.infer\n    trainfer.serve\n"
    )
    done = lint(str(config))
    assert done.returncode != 0 and "trainfer.serve" in done.stdout and "-> trainfer.infer" in done.stdout
