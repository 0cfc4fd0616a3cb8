"""The web page on the real model: its weight and load time, the time to first token a user sees in the page
against a plain Python client's on the same request (the page's own overhead), and the README's screenshots.

    .venv/bin/python benchmarks/web_page.py [--out docs/img] [--steps 300]

It trains two short Shakespeare runs (kept under benchmarks/results/web-runs/ for the next time), serves
SmolLM2-135M-Instruct with both runs attached, drives Debian's chromium with Playwright, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tests.serve.conftest import ServerProcess  # noqa: E402
from tests.web.conftest import CHROMIUM_ARGS, chromium_path  # noqa: E402
from trainfer.rounds import describe, environment  # noqa: E402

MODEL = "smollm2-135m-instruct"
QUESTION = "Write a short Python function that reverses a string, with one example."


def train_runs(root: Path, steps: int) -> list[Path]:
    """Two `tiny` runs on Shakespeare that differ in learning rate: the overlay the runs view is for."""
    from trainfer.quickstart import prepared_corpus
    from trainfer.train.config import load_config
    from trainfer.train.trainer import train

    data = prepared_corpus(4096)
    runs = []
    for lr in ("2e-3", "5e-4"):
        run = root / f"tiny-lr{lr}"
        if not (run / "metrics.jsonl").exists() or '"event": "end"' not in (run / "metrics.jsonl").read_text():
            settings = [f"max_steps={steps}", f"eval_every={steps // 6}", "warmup_steps=30", f"lr={lr}",
                        "sample_tokens=40", 'sample_prompt="My lord,"', "probe_passages=16", "progress=false",
                        f"ckpt_every={steps}", "keep_last=1"]  # fmt: skip
            print(f"training {run.name} ({steps} steps)", flush=True)
            train(load_config(None, settings, data=str(data), out_dir=str(run), preset="tiny"))
        runs.append(run)
    return runs


def client_ttft(url: str, body: dict) -> float:
    t0, ttft = time.perf_counter(), None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if (
                ttft is None
                and line.startswith("data: {")
                and json.loads(line[6:])["choices"][0]["delta"].get("content")
            ):
                ttft = time.perf_counter() - t0
    return ttft


def load(url: str, stop: threading.Event) -> None:
    """Streamed chats in a loop (one of several threads) while the vitals view is open."""
    body = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 96, "stream": True}
    while not stop.is_set():
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    runs = train_runs(ROOT / "benchmarks" / "results" / "web-runs", args.steps)
    server = ServerProcess(MODEL, "--run", str(runs[0]), "--run", str(runs[1]), "--max-num-seqs", "16")
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            loads = []
            for _ in range(args.rounds):
                page.goto(server.url + "/#chat")
                page.wait_for_selector("body[data-ready='1']")
                loads.append(page.evaluate(
                    """() => { const n = performance.getEntriesByType("navigation")[0];
                               const r = performance.getEntriesByType("resource");
                               return {interactive: n.domInteractive, load: n.loadEventEnd,
                                       bytes: n.transferSize + r.reduce((a, x) => a + x.transferSize, 0)}; }"""
                ))  # fmt: skip
            rows.append(("first load transferred", f"{loads[0]['bytes'] / 1024:.1f} KiB", "limit 200 KB"))
            interactive, loaded = (statistics.median(x[k] for x in loads) for k in ("interactive", "load"))
            rows.append(("DOM interactive (median)", f"{interactive:.0f} ms", ""))
            rows.append(("load event (median)", f"{loaded:.0f} ms", "limit 1000 ms"))
            # The page's TTFT against a plain client's, alternating, on the same question with a different tag (so
            # neither finds the other's prompt in the prefix cache); distinct seeds keep the response cache out.
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "48")
            in_page, direct = [], []
            for i in range(args.rounds):
                page.click("#new-chat")
                page.fill("#seed", str(1000 + i))
                page.fill("#input", f"Name a colour. ({i})")
                page.press("#input", "Enter")
                page.wait_for_selector(".msg.assistant[data-state='done']", timeout=120_000)
                in_page.append(float(page.locator(".msg.assistant").last.get_attribute("data-ttft-ms")))
                body = {"messages": [{"role": "user", "content": f"Name a colour. [{i}]"}], "max_tokens": 48,
                        "temperature": 0, "seed": 2000 + i, "stream": True}  # fmt: skip
                direct.append(1000 * client_ttft(server.url, body))
            page_ms, client_ms = statistics.median(in_page), statistics.median(direct)
            rows.append(("TTFT in the page (median)", f"{page_ms:.0f} ms", f"bar {250} ms"))
            ratio = f"page/client {page_ms / client_ms:.2f}x"
            rows.append(("TTFT, Python client (median)", f"{client_ms:.0f} ms", ratio))
            # Screenshots for the README: chat, vitals under load, runs.
            page.click("#new-chat")
            page.fill("#temperature", "0.2")
            page.fill("#seed", "0")
            page.fill("#max_tokens", "160")
            page.fill("#input", QUESTION)
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-state='done']", timeout=120_000)
            page.screenshot(path=str(args.out / "ui-chat.png"))
            stop = threading.Event()
            workers = [threading.Thread(target=load, args=(server.url, stop)) for _ in range(8)]
            page.goto(server.url + "/#vitals")
            for w in workers:
                w.start()
            page.wait_for_timeout(25_000)
            page.screenshot(path=str(args.out / "ui-vitals.png"), full_page=True)
            stop.set()
            for w in workers:
                w.join()
            page.goto(server.url + "/#runs")
            page.wait_for_selector("[data-chart='loss'] polyline")
            page.wait_for_timeout(500)
            page.screenshot(path=str(args.out / "ui-runs.png"))
            browser.close()
    finally:
        server.stop()
    print(f"\nthe web page on {MODEL}: {describe(environment())}")
    print(f"{'measure':32} {'value':>12}  note")
    for name, value, note in rows:
        print(f"{name:32} {value:>12}  {note}")
    print(f"screenshots: {', '.join(str(args.out / n) for n in ('ui-chat.png', 'ui-vitals.png', 'ui-runs.png'))}")


if __name__ == "__main__":
    main()
