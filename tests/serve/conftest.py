"""Real server processes on 127.0.0.1 (and a real redis-server) for the HTTP tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_tiny_model_dir

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, *flags: str, env: dict | None = None, command: str = "serve") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "trainfer.cli", command, model, *flags, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy in 120 s")

    @classmethod
    def ui(cls, *runs: str) -> ServerProcess:
        """`trainfer ui RUN...`: the web page for training runs, no model."""
        return cls(runs[0], *runs[1:], command="ui")

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    """A tiny random model with a byte-level tokenizer and a chat template: a server that starts in seconds."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tinychat"), CHAT_TEMPLATE, context=256)


@pytest.fixture(scope="session")
def smollm2_server(smollm2_path):
    server = ServerProcess("smollm2-135m-instruct", "--max-num-seqs", "8")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def long_chat_dir(tmp_path_factory) -> Path:
    """The same tiny model with an 8k context, for generations that run for seconds."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tinylong"), CHAT_TEMPLATE, context=8192)


def start_redis() -> tuple[subprocess.Popen, str]:
    """A private redis-server on a free port: (process, redis:// URL)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: .ci/run installs Debian's redis-server package")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def redis_url():
    proc, url = start_redis()
    yield url
    proc.terminate()
    proc.wait(timeout=10)
