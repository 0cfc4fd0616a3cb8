"""deploy/: the HAProxy set-up for real (Debian's haproxy, two `trainfer serve` replicas sharing a real
redis-server, all on 127.0.0.1), and the Compose and Kubernetes files against their schemas."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serve.conftest import ServerProcess, free_port, start_redis
from tests.serve.test_app import wait_for
from trainfer.serve.loadgen import one_request, run_conversations, run_level

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPLICA_FLAGS = ("--max-num-seqs", "4", "--drain-grace", "3", "--served-model-name", "m")


class Balancer:
    """haproxy -f deploy/haproxy.cfg in the foreground, its addresses from the environment as the file says."""

    def __init__(self, replicas: list[ServerProcess], maxconn: int = 8) -> None:
        exe = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
        if exe is None:
            pytest.fail("haproxy is not installed: `make setup` installs Debian's haproxy package")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "TRAINFER_LB_BIND": f"127.0.0.1:{self.port}",
            "TRAINFER_MAXCONN": str(maxconn),
            **{f"TRAINFER_REPLICA_{i + 1}": f"127.0.0.1:{r.port}" for i, r in enumerate(replicas)},
        }
        cmd = [exe, "-db", "-f", str(DEPLOY / "haproxy.cfg")]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ok = wait_for(lambda: self.replicas_up() == len(replicas), 20)
        assert ok, f"haproxy did not see {len(replicas)} healthy replicas"

    def replicas_up(self) -> int:
        """How many distinct replicas answer through the balancer (requests without an affinity header rotate)."""
        seen = set()
        for _ in range(6):
            try:
                r = httpx.get(self.url + "/v1/models", timeout=2)
            except httpx.HTTPError:
                return 0
            if r.status_code == 200:
                seen.add(r.headers["x-trainfer-replica"])
        return len(seen)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def cluster(long_chat_dir):
    """Redis, two replicas of the tiny 8k-context model sharing it, and HAProxy in front: fresh per test, as
    tests kill replicas."""
    redis, redis_url = start_redis()
    replicas = [ServerProcess(str(long_chat_dir), *REPLICA_FLAGS, "--cache-url", redis_url) for _ in range(2)]
    balancer = Balancer(replicas)
    yield balancer, replicas
    balancer.stop()
    for r in replicas:
        r.stop()
    redis.terminate()
    redis.wait(timeout=10)


def replica_of(balancer: Balancer, replicas: list[ServerProcess], key: str) -> ServerProcess:
    body = {"prompt": f"affinity {key}", "max_tokens": 2, "temperature": 0}
    r = httpx.post(balancer.url + "/v1/completions", json=body, headers={"x-trainfer-affinity": key}, timeout=30)
    assert r.status_code == 200, r.text
    return replicas[int(r.headers["x-trainfer-replica"].removeprefix("replica")) - 1]


def test_affinity_keeps_a_conversation_on_one_replica_and_spreads_the_rest(cluster):
    balancer, replicas = cluster
    owners = {key: replica_of(balancer, replicas, key) for key in (f"conversation-{i}" for i in range(12))}
    assert {r.port for r in owners.values()} == {r.port for r in replicas}  # keys spread over both
    for key, owner in owners.items():
        for _ in range(2):
            assert replica_of(balancer, replicas, key) is owner
    # multi-turn chats through the balancer, one after another: with the header a chat's later turns find their
    # history cached; without it round-robin sends each turn to the other replica than the turn before
    rates = {}
    for affinity in (True, False):
        results = []
        for chat in range(3):
            seed = 10 * affinity + chat
            results += asyncio.run(run_conversations(balancer.url, "m", 1, 3, 30, 8, None, 60, affinity, seed))[0]
        assert all(r.ok for r in results) and len(results) == 9
        rates[affinity] = sum(r.cached_tokens for r in results) / sum(r.prompt_tokens for r in results)
    assert rates[True] > 0.4 and rates[True] > rates[False] + 0.15, rates


def test_kill_9_mid_run_loses_no_plain_request_and_ends_streams_with_an_error(cluster):
    balancer, replicas = cluster
    victim = replicas[0]
    key = next(k for k in (f"k{i}" for i in range(50)) if replica_of(balancer, replicas, k) is victim)
    url = balancer.url + "/v1/completions"
    long = {"prompt": "x", "max_tokens": 1500, "ignore_eos": True, "temperature": 0, "model": "m"}

    async def scenario():
        # a stream pinned to the victim, and plain requests spread over both replicas by the load generator
        stream = asyncio.ensure_future(streamed(url, long, key))
        load = asyncio.ensure_future(
            run_level(balancer.url, "m", [f"p{i}" for i in range(8)], 1500, 8, None, None, 120, stream=False)
        )
        deadline = time.time() + 30
        while victim.metric("trainfer_num_requests_running") < 2 and time.time() < deadline:
            await asyncio.sleep(0.05)  # the stream and at least one plain request are running there
        os.kill(victim.proc.pid, signal.SIGKILL)
        return await stream, await load

    stream, (results, _) = asyncio.run(scenario())
    assert not stream.ok and "without [DONE]" in stream.error, stream
    assert [r.error for r in results if not r.ok] == [], "a plain request was lost"  # retried on the survivor
    assert all(r.output_tokens == 1500 for r in results)
    survivor = replicas[1]
    assert wait_for(lambda: balancer.replicas_up() == 1, 10)
    r = httpx.post(url, json={**long, "max_tokens": 4}, headers={"x-trainfer-affinity": key}, timeout=30)
    assert r.status_code == 200 and r.headers["x-trainfer-replica"] == "replica2", (r.status_code, survivor.port)


async def streamed(url: str, body: dict, key: str):
    """`one_request` with the affinity header, so the stream lands on a known replica."""
    async with httpx.AsyncClient(timeout=120, headers={"x-trainfer-affinity": key}) as http:
        return await one_request(http, url, {**body, "stream": True})


def test_sigterm_drains_behind_the_balancer(cluster):
    """The draining replica finishes what it holds, /health turns 503 at once, the balancer stops sending it
    work, and nothing a client sent in the meantime fails."""
    balancer, replicas = cluster
    leaving = replicas[0]
    key = next(k for k in (f"k{i}" for i in range(50)) if replica_of(balancer, replicas, k) is leaving)
    result = {}
    body = {"prompt": "x", "max_tokens": 2500, "ignore_eos": True, "temperature": 0}

    def held():
        headers = {"x-trainfer-affinity": key}
        result["r"] = httpx.post(balancer.url + "/v1/completions", json=body, headers=headers, timeout=120)

    worker = threading.Thread(target=held)
    worker.start()
    assert wait_for(lambda: leaving.metric("trainfer_num_requests_running") == 1)
    os.kill(leaving.proc.pid, signal.SIGTERM)
    assert wait_for(lambda: httpx.get(leaving.url + "/health", timeout=2).status_code == 503, 5)
    assert httpx.get(leaving.url + "/health", timeout=2).json()["status"] == "draining"
    answered = []
    for i in range(30):  # through the drain: every request answered, by the leaving replica until haproxy sees it
        r = httpx.post(balancer.url + "/v1/completions", json={"prompt": f"q{i}", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200, r.text
        answered.append(r.headers["x-trainfer-replica"])
        time.sleep(0.15)
    assert answered[-8:] == ["replica2"] * 8, answered  # the balancer stopped sending to the leaving one
    worker.join(timeout=120)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 2500
    assert leaving.proc.wait(timeout=30) in (0, -signal.SIGTERM)


def check_compose(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True)


def test_compose_file_is_valid_against_the_compose_spec(tmp_path):
    out = check_compose(DEPLOY / "compose.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["balancer"]["volumes"] == ["./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"]
    compose["services"]["replica1"]["stop_grace_periodd"] = "70s"  # the validator does catch a typo
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(compose))
    assert check_compose(tmp_path / "bad.yaml").returncode != 0


def test_kubernetes_manifests_are_valid_and_use_the_balancer_file():
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    version = kubernetes_validate.latest_version()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator does catch a typo
        kubernetes_validate.validate({**docs[1], "spec": {**docs[1]["spec"], "replicass": 2}}, version, strict=True)
    (replicas,) = [d for d in docs if d["kind"] == "StatefulSet"]
    container = replicas["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "--drain-grace" in container["args"] and container["resources"]["limits"]["memory"]
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["configMapGenerator"][0]["files"] == ["haproxy.cfg"]
