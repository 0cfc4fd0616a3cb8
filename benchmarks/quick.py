"""`make bench`: a quick version of every benchmark (each a few minutes on 2 cores, ~30-40 in all), then the summary
table at the top of BENCHMARKS.md rewritten with what each printed. The full versions (the commands in each
BENCHMARKS.md section) stay as they are; a quick figure is fewer rounds and requests, so read it as a smoke check
of the full one (does the ratio still hold, does the script still run), not as a replacement for it.

    .venv/bin/python benchmarks/quick.py [--only sizes --only serve ...] [--no-write]

nanoGPT's comparison runs only with NANOGPT=path/to/a/nanoGPT/checkout (it is not on a package registry).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainfer.rounds import describe, environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"

# name -> (arguments after the script, the lines of its output that carry the figures, regexes)
QUICK: dict[str, tuple[list[str], list[str]]] = {
    "sizes": (
        ["--shape", "1.7b", "--kind", "Q4_K_M", "--rounds", "1", "--prompt", "128", "--gen", "32"],
        [r"^\s+(decode_tok_s|prefill_tok_s|streams_decode_tok_s|peak_rss_gib|launch_s) "],
    ),
    "decode": (
        [
            "--dtype",
            "float32",
            "--dtype",
            "int8",
            "--dtype",
            "int4",
            "--no-peers",
            "--runs",
            "1",
            "--concurrency",
            "16",
        ],  # fmt: skip
        [r"^alternated with llama\.cpp", r"^trainfer \w+ / llama\.cpp"],
    ),
    "serve": (
        ["--concurrency", "1", "--concurrency", "16", "--rounds", "1", "--requests", "32", "--out", "{tmp}"],
        [r"^\s+concurrency \d+: trainfer"],
    ),
    "finetune_faq": (["--out", "{tmp}", "--readme", "0"], [r"^(dev|test): median", r"^base:"]),
    "web_page": (["--out", "{tmp}", "--steps", "50", "--rounds", "2"], [r"^(first load|TTFT|load event)"]),
    "export_gguf": (["--tokens", "16", "--types", "F16,Q8_0"], [r"^(F16|Q8_0) "]),
    "soak": (["--requests", "300", "--concurrency", "32"], [r"^\{"]),
    "compress_frontier": (
        ["--out", "{tmp}", "--distill-steps", "10", "--rounds", "1", "--positions", "1024", "--tokens", "64"],
        [r"^(fp32|int8|int4) "],
    ),
    "reason_scaling": (
        [
            "--out",
            "{tmp}",
            "--steps",
            "300",
            "--documents",
            "20000",
            "--count",
            "40",
            "--budgets",
            "1,4",
            "--seeds",
            "0",
        ],  # fmt: skip
        [r"^  (greedy|cot|self-consistency|best-of-n)", r"^large (greedy|cot) "],
    ),
    "deploy": (
        ["--rounds", "1", "--requests", "24", "--conversations", "4", "--turns", "3"],
        [r"^kill -9 mid-run", r"^round \d", r"^affinity / round-robin"],
    ),
    "cascade": (["--out", "{tmp}", "--thresholds", "-0.5", "--no-sync"], [r"^(all edge|all cloud|local-first) "]),
    "finetune_vs_scratch": (["--out", "{tmp}", "--ft-steps", "8", "--evals", "2", "--val-chunks", "2"], [r"^\{"]),
    "nanogpt": (
        ["--nanogpt", "{nanogpt}", "--iters", "300", "--throughput-runs", "1", "--throughput-iters", "50"],
        [r"tokens/s|ms/step"],
    ),
}


def run(name: str, args: list[str], patterns: list[str], limit_s: float) -> dict:
    """One quick benchmark in its own process: status, wall seconds, the lines that carry its figures."""
    if name == "nanogpt" and not os.environ.get("NANOGPT"):
        return {"name": name, "status": "skipped (set NANOGPT to a nanoGPT checkout)", "wall_s": 0, "lines": []}
    with tempfile.TemporaryDirectory() as tmp:
        argv = [a.format(tmp=tmp, nanogpt=os.environ.get("NANOGPT", "")) for a in args]
        cmd = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *argv]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
            status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
            out = proc.stdout
        except subprocess.TimeoutExpired as e:
            status, out = f"over its {limit_s:.0f} s limit", (e.stdout or b"").decode(errors="replace")
        wall = time.perf_counter() - start
    lines = [ln.strip() for ln in out.splitlines() if any(re.search(p, ln) for p in patterns)]
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    return {"name": name, "command": f"benchmarks/{name}.py {shown}", "status": status, "wall_s": wall, "lines": lines}


def table(results: list[dict], env: dict) -> str:
    rows = [
        BEGIN,
        f"Quick versions of every benchmark (`make bench`), {env['utc']} UTC, commit {env['commit']}: {describe(env)}.",
        "Fewer rounds and requests than the sections below: a smoke check of each full figure, not a replacement.",
        "",
        "| benchmark | quick command | status, wall | what it printed |",
        "|---|---|---|---|",
    ]
    for r in results:
        printed = "<br>".join(ln.replace("|", "/")[:220] for ln in r["lines"][:8]) or "-"
        status = f"{' '.join(r['status'].split())[:200]}, {r['wall_s']:.0f} s".replace("|", "/")  # one table cell
        rows.append(f"| {r['name']} | `{r.get('command', '')}` | {status} | {printed} |")
    return "\n".join([*rows, END])


def write(summary: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace the block between the markers (or put it after the introduction, before the first section). A run of
    some benchmarks (--only) replaces their rows and keeps the others, each row with its own date and commit."""
    text = path.read_text()
    if BEGIN in text and END in text:
        old = text[text.index(BEGIN) : text.index(END)]
        summary = merged(old, summary)
        text = text[: text.index(BEGIN)] + summary + text[text.index(END) + len(END) :]
    else:
        first = text.index("\n## ")
        text = text[:first] + "\n\n" + summary + "\n" + text[first:]
    path.write_text(text)


def merged(old: str, new: str) -> str:
    """The new block, plus the old block's rows of benchmarks the new run did not include (in QUICK's order), each
    kept row saying which run it comes from."""

    def rows(block: str) -> dict[str, str]:
        cells = (line.split("|") for line in block.splitlines() if line.startswith("| "))
        return {c[1].strip(): "|".join(c) for c in cells if c[1].strip() in QUICK}

    fresh, kept = rows(new), rows(old)
    if not set(kept) - set(fresh):
        return new
    origin = re.search(r"\), (.+?) UTC, commit (\w+)", old)
    since = f" (run of {origin[1]} UTC, commit {origin[2]})" if origin else " (an earlier run)"
    for name in set(kept) - set(fresh):
        cells = kept[name].split("|")
        cells[3] = cells[3].rstrip() + since + " "
        fresh[name] = "|".join(cells)
    lines = [ln for ln in new.splitlines() if not (ln.startswith("| ") and ln.split("|")[1].strip() in QUICK)]
    at = next(i for i, ln in enumerate(lines) if ln.startswith("|---"))
    return "\n".join([*lines[: at + 1], *(fresh[name] for name in QUICK if name in fresh), *lines[at + 1 :]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=list(QUICK), help="run only these (repeatable)")
    ap.add_argument("--limit-s", type=float, default=900, help="each benchmark's time limit")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    env = environment()
    print(describe(env), flush=True)
    results = []
    for name in args.only or list(QUICK):
        r = run(name, *QUICK[name], args.limit_s)
        print(f"{name}: {r['status']}, {r['wall_s']:.0f} s", *r["lines"], sep="\n  ", flush=True)
        results.append(r)
    summary = table(results, env)
    if not args.no_write:
        write(summary)
    print(summary)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
