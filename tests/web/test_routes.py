"""The page's run endpoints (no browser): records paged and polled incrementally, a rewritten file, NaN, bad ids."""

from __future__ import annotations

import json
import subprocess
import sys

from fastapi.testclient import TestClient

from trainfer.web import MAX_RECORDS, create_ui_app, parse_metrics


def write(path, rows, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_records_are_polled_from_where_the_page_left_off(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "event": "start", "config": {"lr": 0.001}}] + [
        {"step": s, "loss": 3.0 - s / 10} for s in range(1, 6)
    ]
    write(run / "metrics.jsonl", rows, '{"step": 6, "loss": 2.')  # a line still being written
    client = TestClient(create_ui_app([run, tmp_path / "empty"]))
    listing = client.get("/ui/runs").json()["runs"]
    assert [r["name"] for r in listing] == ["run", "empty"] and listing[0]["config"] == {"lr": 0.001}
    assert listing[0]["records"] == 6 and not listing[0]["finished"]
    got = client.get("/ui/run", params={"i": 0}).json()
    assert got["records"] == rows and got["next"] == 6 and not got["reset"]
    # the run goes on: the torn line is completed, a NaN loss arrives, then the trainer's end record
    write(
        run / "metrics.jsonl",
        rows + [{"step": 6, "loss": 2.4}],
        '{"step": 7, "loss": NaN}\n{"step": 7, "event": "end"}\n',
    )
    more = client.get("/ui/run", params={"i": 0, "after": 6}).json()
    assert more["records"] == [{"step": 6, "loss": 2.4}, {"step": 7, "loss": None}, {"step": 7, "event": "end"}]
    assert more["next"] == 9 and more["run"]["finished"]
    # a resumed run rewrites the lines past its checkpoint: the file shrank, so the page starts over
    write(run / "metrics.jsonl", rows[:3])
    again = client.get("/ui/run", params={"i": 0, "after": 9}).json()
    assert again["reset"] and again["records"] == rows[:3] and again["next"] == 3
    assert client.get("/ui/run", params={"i": 1}).json()["records"] == []  # not started yet
    missing = client.get("/ui/run", params={"i": 2})
    assert missing.status_code == 404 and "no run 2" in missing.json()["error"]["message"]
    assert client.get("/ui/run", params={"i": "../etc"}).status_code == 422  # an index, never a path
    assert client.get("/ui/info").json() == {"model": None, "auth": False, "runs": 2}


def test_long_runs_are_paged(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write(run / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in range(MAX_RECORDS + 10)])
    client = TestClient(create_ui_app([run]))
    first = client.get("/ui/run", params={"i": 0}).json()
    rest = client.get("/ui/run", params={"i": 0, "after": first["next"]}).json()
    assert len(first["records"]) == MAX_RECORDS and len(rest["records"]) == 10


def test_parse_metrics_skips_what_is_not_a_record():
    data = b'{"step": 1, "loss": Infinity}\n[1, 2]\n{"loss": 1}\n{"step": "2"}\n\xff\xfe\n{"step": 3}\n'
    assert parse_metrics(data) == [{"step": 1, "loss": None}, {"step": 3}]


def test_ui_cli_refuses_what_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "missing", tmp_path / "file"):
        r = subprocess.run([sys.executable, "-m", "trainfer.cli", "ui", str(bad)], capture_output=True, text=True)
        assert r.returncode != 0 and "not a directory" in r.stderr and "Traceback" not in r.stderr


def test_serving_a_run_directory_charts_it_too(run_dirs):
    """`trainfer serve RUN_DIR`: the run's best checkpoint answers, and the page lists the run itself."""
    import httpx

    from tests.serve.conftest import ServerProcess

    server = ServerProcess(str(run_dirs[0]))
    try:
        assert httpx.get(server.url + "/ui/info", timeout=10).json()["runs"] == 1
        runs = httpx.get(server.url + "/ui/runs", timeout=10).json()["runs"]
        assert runs[0]["name"] == run_dirs[0].name and runs[0]["finished"]
        body = {"prompt": "the", "max_tokens": 4}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["usage"]["completion_tokens"]
    finally:
        server.stop()
