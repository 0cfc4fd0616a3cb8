"""Decode benchmark: trainfer's engine next to transformers and llama.cpp (llama-bench) in one run.

.venv/bin/python benchmarks/decode.py [--no-llama-cpp] [extra `trainfer bench decode` flags]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402

from trainfer import registry  # noqa: E402
from trainfer.cli import main as trainfer_main  # noqa: E402


def main() -> int:
    args = sys.argv[1:]
    if "--no-llama-cpp" in args:
        args.remove("--no-llama-cpp")
    else:
        peers = registry.home() / "peers"
        peers.mkdir(parents=True, exist_ok=True)
        bin_dir = llama_cpp.build(peers / "llama.cpp")
        ggufs = llama_cpp.quantized_copies(bin_dir, peers)
        args += ["--llama-bench", str(bin_dir / "llama-bench")]
        args += [f"--llama-gguf={k}={v}" for k, v in ggufs.items()]
    return trainfer_main(["bench", "decode", *args])


if __name__ == "__main__":
    sys.exit(main())
