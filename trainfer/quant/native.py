"""trainfer's native CPU kernels (csrc/kernels.cpp), built once by `make setup` with the system compiler.

    python -m trainfer.quant.native      # build (or rebuild) it; `make setup` runs this

What they do: products with fp32 / int8 / int4 weights, and one whole decode step (infer/native_decode.py).
Without the build, the same math runs in PyTorch (quant/blocks.py, the module path of the runner; equal up
to float summation order). `TRAINFER_NATIVE=0` forces the PyTorch path (the tests cover both).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import torch  # noqa: F401  (load libtorch before the extension that links against it)

NAME = "trainfer_native"
SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
BUILD_DIR = Path(__file__).parent / "_build"
# -march=native: the kernel is built on the machine that runs it (AVX2 at least; AVX-512 where present).
# -ffp-contract=off: a multiply and an add written apart stay apart (the GGUF formats dequantize bit-exactly as
# gguf-py does); the FMAs the kernels want are written as FMAs.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]


def build(verbose: bool = False) -> ModuleType:
    from torch.utils.cpp_extension import load

    BUILD_DIR.mkdir(exist_ok=True)
    # torch rebuilds when the source or the flags change, not a header: the headers' hash goes into the flags
    headers = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(SOURCE.parent.glob("*.h")))).hexdigest()[:16]
    cflags = [*CFLAGS, f"-DTRAINFER_HEADERS={headers}"]
    return load(NAME, [str(SOURCE)], extra_include_paths=[str(SOURCE.parent)], extra_cflags=cflags,
                extra_ldflags=["-fopenmp"], build_directory=str(BUILD_DIR), verbose=verbose)  # fmt: skip


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
