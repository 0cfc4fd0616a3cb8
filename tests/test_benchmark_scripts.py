"""Every script in benchmarks/ still imports: `make bench` runs them minutes apart, so a renamed helper
(web_page.py importing a function finetune_faq.py no longer had) would otherwise surface only there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))

LOADER = """
import importlib.util, sys
failed = []
for name in sys.argv[1:]:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", f"benchmarks/{name}.py")
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))  # not __main__: nothing runs
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_script_imports():
    assert len(SCRIPTS) >= 10
    done = subprocess.run([sys.executable, "-c", LOADER, *SCRIPTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
