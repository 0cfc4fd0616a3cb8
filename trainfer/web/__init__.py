"""The web page: one framework-free page (static/index.html, app.js, app.css; no CDN, no build step) that chats
with the served model over the OpenAI endpoint, charts the server's vitals from /vitals, and plots training
runs from their metrics.jsonl. `trainfer serve` mounts it at /; `trainfer ui RUN_DIR...` serves it for runs
alone (no model).

Run directories are named on the command line only; a client picks one by its index, so no path a client
sends is ever opened.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

STATIC = Path(__file__).parent / "static"
FILES = {"/": "index.html", "/ui/app.js": "app.js", "/ui/app.css": "app.css"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
ROUTES = {*FILES, "/ui/info", "/ui/runs", "/ui/run"}  # for the server's per-endpoint request counts
MAX_RECORDS = 5000  # per answer; the page asks again from `next` until it has them all


class RunSource:
    """One run directory's metrics.jsonl, parsed again only when the file changed (the page polls it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._key: tuple[int, int] | None = None
        self._rows: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return self.path.resolve().name

    def rows(self) -> list[dict[str, Any]]:
        metrics = self.path / "metrics.jsonl"
        try:
            st = metrics.stat()
        except OSError:
            return []  # not written yet: a run that has just started
        key = (st.st_mtime_ns, st.st_size)
        if key != self._key:
            self._rows = parse_metrics(metrics.read_bytes())
            self._key = key
        return self._rows

    def summary(self, i: int) -> dict[str, Any]:
        rows = self.rows()
        start = next((r for r in rows if r.get("event") == "start"), {})
        return {
            "id": i,
            "name": self.name,
            "path": str(self.path),
            "records": len(rows),
            "config": start.get("config", {}),
            "params": start.get("params"),
            "finished": bool(rows) and rows[-1].get("event") == "end",  # the trainer's last record
        }


def parse_metrics(data: bytes) -> list[dict[str, Any]]:
    """metrics.jsonl's records; a line torn by a crash (or still being written) is skipped."""
    rows = []
    for line in data.splitlines():
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(r, dict) and isinstance(r.get("step"), int):
            rows.append({k: finite(v) for k, v in r.items()})
    return rows


def finite(v: Any) -> Any:
    """A diverged run logs NaN / Infinity, which Python writes but a browser's JSON.parse refuses: null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def add_routes(app: FastAPI, runs: list[Path], info: dict[str, Any]) -> None:
    """The page's files and its run endpoints, on an app that may or may not serve a model."""
    app.state.runs = [RunSource(p) for p in runs]
    app.state.info = {**info, "runs": len(runs)}
    for route in FILES:
        app.get(route, include_in_schema=False)(static_file)
    app.get("/ui/info", include_in_schema=False)(ui_info)
    app.get("/ui/runs", include_in_schema=False)(list_runs)
    app.get("/ui/run", include_in_schema=False)(run_records)


def create_ui_app(runs: list[Path]) -> FastAPI:
    """`trainfer ui`: the page for training runs only."""
    app = FastAPI(title="trainfer ui")
    add_routes(app, runs, {"model": None, "auth": False})
    app.get("/health", include_in_schema=False)(health)
    return app


async def health() -> dict[str, str]:
    return {"status": "ok"}


async def static_file(request: Request) -> Response:
    name = FILES[request.url.path]
    body = (STATIC / name).read_bytes()
    # no-cache: the browser revalidates, so a page upgraded with the package is never stale
    return Response(body, media_type=TYPES[Path(name).suffix], headers={"cache-control": "no-cache"})


async def ui_info(request: Request) -> dict[str, Any]:
    return request.app.state.info


async def list_runs(request: Request) -> dict[str, Any]:
    return {"runs": [r.summary(i) for i, r in enumerate(request.app.state.runs)]}


async def run_records(request: Request, i: int, after: int = 0) -> Response:
    """Records `after` onwards (the page polls with the `next` it got); `reset` when the file shrank (a resumed
    run rewrites the lines past its checkpoint), so the page starts over."""
    runs: list[RunSource] = request.app.state.runs
    if not 0 <= i < len(runs):
        body = {"error": {"message": f"no run {i}: this page serves {len(runs)}", "type": "not_found_error"}}
        return Response(json.dumps(body), 404, media_type="application/json")
    rows = runs[i].rows()
    reset = after > len(rows) or after < 0
    start = 0 if reset else after
    part = rows[start : start + MAX_RECORDS]
    body = {"run": runs[i].summary(i), "records": part, "next": start + len(part), "reset": reset}
    return Response(json.dumps(body, default=str), media_type="application/json")


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "metrics.jsonl").is_file()
