"""Build llama.cpp's peer tools from the PyPI source package of llama-cpp-python, and make F32/F16/Q8_0/Q4_0
copies of the SmolLM2 GGUF (itself Q4_1) with its quantize tool. Idempotent; ~5 minutes of compiling on 2 cores.

    .venv/bin/python benchmarks/llama_cpp.py        # prints the paths as JSON
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from trainfer import registry

SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-bench", "llama-quantize", "llama-server", "llama-perplexity", "llama-batched-bench")


def build(root: Path) -> Path:
    """The bin/ directory of a Release build of the vendored llama.cpp tree."""
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, SDIST]
        subprocess.run(pip, check=True)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tf:
            tf.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        if not root.exists():
            src.rename(root)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
    flags += cpu_flags()
    subprocess.run(["cmake", "-S", str(root), "-B", str(root / "build"), *flags], check=True)
    subprocess.run(["cmake", "--build", str(root / "build"), "-j2", "--target", *TARGETS], check=True)
    return bin_dir


def cpu_flags() -> list[str]:
    """-march=native, except on CPUs that list AMX: VMs here advertise amx_tile without the kernel granting
    it, and ggml's native build then dies with SIGILL on `tilezero` in every quantized matmul. There,
    build for the vector extensions the CPU lists and leave AMX out (trainfer's kernel does not use it)."""
    cpu = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if "amx_tile" not in cpu:
        return []
    wanted = {"avx": "AVX", "avx2": "AVX2", "bmi2": "BMI2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX512",
              "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16"}  # fmt: skip
    return ["-DGGML_NATIVE=OFF"] + [f"-DGGML_{name}={'ON' if flag in cpu else 'OFF'}" for flag, name in wanted.items()]


def quantized_copies(bin_dir: Path, out: Path) -> dict[str, Path]:
    source = registry.pull("smollm2-135m-instruct")
    paths = {"Q4_1": source}
    for kind in ("F32", "F16", "Q8_0", "Q4_0"):
        target = out / f"smollm2-135m-instruct.{kind}.gguf"
        if not target.exists():
            cmd = [str(bin_dir / "llama-quantize"), "--allow-requantize", str(source), str(target), kind]
            subprocess.run(cmd, check=True, capture_output=True)
        paths[kind] = target
    return paths


def main() -> None:
    peers = registry.home() / "peers"
    peers.mkdir(parents=True, exist_ok=True)
    bin_dir = build(peers / "llama.cpp")
    ggufs = quantized_copies(bin_dir, peers)
    print(json.dumps({"bin": str(bin_dir), "gguf": {k: str(v) for k, v in ggufs.items()}}))


if __name__ == "__main__":
    main()
