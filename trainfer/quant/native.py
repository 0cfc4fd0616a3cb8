"""The native CPU kernel for int8 (Q8_0-style) weights, built once by `make setup` with the system compiler.

    python -m trainfer.quant.native      # build (or rebuild) it; `make setup` runs this

`q8_linear` uses the built extension when it loads, else the pure-PyTorch reference in blocks.py (same
results up to float summation order). `TRAINFER_NATIVE=0` forces the reference (the tests cover both).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import torch  # noqa: F401  (load libtorch before the extension that links against it)

NAME = "trainfer_q8"
SOURCE = Path(__file__).parent / "csrc" / "q8.cpp"
BUILD_DIR = Path(__file__).parent / "_build"
# -march=native: the kernel is built on the machine that runs it (AVX2 at least; AVX-512 where present).
CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def build(verbose: bool = False) -> ModuleType:
    from torch.utils.cpp_extension import load

    BUILD_DIR.mkdir(exist_ok=True)
    return load(NAME, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                build_directory=str(BUILD_DIR), verbose=verbose)  # fmt: skip


@cache
def extension() -> ModuleType | None:
    """The built kernel, or None (not built, or disabled with TRAINFER_NATIVE=0)."""
    path = BUILD_DIR / f"{NAME}.so"
    if os.environ.get("TRAINFER_NATIVE", "1") == "0" or not path.exists():
        return None
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


if __name__ == "__main__":
    build(verbose="-v" in sys.argv)
    print(f"built {BUILD_DIR / (NAME + '.so')}")
