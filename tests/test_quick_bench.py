"""`make bench`'s summary block: a partial run (--only) replaces its rows and keeps the others with their origin."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_quick", ROOT / "benchmarks" / "quick.py")
quick = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quick)


def block(results, utc="2026-12-06 03:11", commit="abc1234") -> str:
    quick.describe = lambda env: "a machine"  # the table's machine line is not under test
    return quick.table(results, {"utc": utc, "commit": commit})


def result(name, status="ok", lines=("figure 1",)):
    return {"name": name, "command": f"benchmarks/{name}.py", "status": status, "wall_s": 10, "lines": list(lines)}


def test_a_partial_run_keeps_the_other_rows_and_says_where_they_come_from():
    old = block([result("sizes", lines=["old sizes"]), result("web_page", "failed (1): Trace\n  File x | y")])
    assert "\n  File" not in old and "x / y" in old  # a multi-line failure stays one table cell
    new = block([result("web_page", lines=["page 1.2 s"])], utc="2026-12-07 10:00", commit="def5678")
    got = quick.merged(old, new)
    rows = [ln for ln in got.splitlines() if ln.startswith("| ") and not ln.startswith("| benchmark")]
    assert [r.split("|")[1].strip() for r in rows] == ["sizes", "web_page"]  # QUICK's order
    assert "old sizes" in rows[0] and "(run of 2026-12-06 03:11 UTC, commit abc1234)" in rows[0]
    assert "page 1.2 s" in rows[1] and "failed" not in rows[1] and "commit def5678" in got.splitlines()[1]


def test_a_full_run_replaces_the_block():
    old = block([result("sizes", lines=["old"])])
    new = block([result("sizes", lines=["new"])], commit="def5678")
    assert quick.merged(old, new) == new
