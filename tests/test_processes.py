"""Several router processes on one port (``AUXOT_PROCESSES``), sharing one real Redis.

Real processes: the router started as a user starts it, a real ``redis-server``, workers with
the fake llama-server. What a user sees: both processes answer on the one port, every request
is served whichever process it reaches and wherever the workers connected, a crashed process is
replaced, and SIGTERM stops them all cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auxot_common.processes import parse_processes
from tests.conftest import Cluster
from tests.support import http
from tests.support.procs import REPO, Keys, RouterProcess, base_env, pid_alive
from tests.support.redis_server import RedisServer
from tests.support.reliability import TOKEN, chat_body, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def instance_of(router: RouterProcess) -> str:
    """The instance that answers a new connection to the port."""
    return str(router.health()["instance"])


def instances_answering(router: RouterProcess, want: int, timeout: float = 20.0) -> set[str]:
    seen: set[str] = set()

    def enough() -> bool:
        for _ in range(20):
            seen.add(instance_of(router))
        return len(seen) >= want

    wait_for(enough, timeout, f"{want} router processes answering on port {router.port}", interval=0.1)
    return seen


def ask(router: RouterProcess, n: int) -> None:
    for i in range(n):
        reply = http.post(f"{router.url}/v1/chat/completions", chat_body(f"q{i}", stream=False, max_tokens=3),
                          headers=router.headers(), timeout=30)  # fmt: skip
        assert reply.status == 200, reply.body[:500]
        assert reply.json()["choices"][0]["message"]["content"] == TOKEN * 3


def test_processes_setting() -> None:
    assert parse_processes("1") == 1
    assert parse_processes(" 4 ") == 4
    assert 1 <= parse_processes("auto") <= 64
    for bad in ("0", "65", "two", ""):
        with pytest.raises(ValueError):
            parse_processes(bad)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"AUXOT_PROCESSES": "2"}, "needs AUXOT_REDIS_URL"),
        ({"AUXOT_PROCESSES": "2", "AUXOT_REDIS_URL": "redis://127.0.0.1:1/0", "AUXOT_PORT": "0"}, "fixed AUXOT_PORT"),
        ({"AUXOT_PROCESSES": "many"}, "AUXOT_PROCESSES"),
    ],
)
def test_several_processes_without_what_they_need_is_a_one_line_error(
    settings: dict[str, str], message: str, keys: Keys, tmp_path: Path
) -> None:
    env = base_env(AUXOT_API_KEY_HASH=keys.api_hash, AUXOT_ADMIN_KEY_HASH=keys.gpu_hash, **settings)
    done = subprocess.run([sys.executable, str(REPO / "auxot_router.py")], env=env, cwd=tmp_path, check=False,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 1
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_one_port_several_processes_serve_replace_a_crashed_one_and_stop_together(
    redis: RedisServer, fake_cluster: Cluster
) -> None:
    router = fake_cluster.router(AUXOT_PROCESSES="2", AUXOT_REDIS_URL=redis.url, AUXOT_HEALTH_REFRESH="0.25s",
                                 AUXOT_SWEEP_INTERVAL="0.5s", AUXOT_LOG_LEVEL="info")  # fmt: skip
    first = instances_answering(router, 2)
    assert len(children(router.pid)) == 2
    fake_cluster.worker(router, "w1")
    fake_cluster.worker(router, "w2")
    router.wait_workers(2)
    ask(router, 12)  # whichever process each request reaches, and wherever the workers are

    # a process dies: the port keeps answering, and the supervisor starts another
    victim = children(router.pid)[0]
    os.kill(victim, signal.SIGKILL)
    # (connections that reach it while it dies are reset: the kernel drops its listening socket
    # once it is gone, from then on the others take every connection)
    wait_for(lambda: victim not in children(router.pid), 10, "the supervisor to see the killed process")
    ask(router, 4)
    wait_for(lambda: len(children(router.pid)) == 2 and victim not in children(router.pid), 20,
             "a new router process")  # fmt: skip
    after = instances_answering(router, 2)
    assert after - first, "the replacement is a new instance"
    router.wait_workers(2)  # the workers of the dead process reconnected
    ask(router, 8)

    # SIGTERM to the supervisor: every process drains and exits, and so does the supervisor
    pids = children(router.pid)
    started = time.monotonic()
    router.signal(signal.SIGTERM)
    assert router.wait(timeout=40) == 0
    assert time.monotonic() - started < 40
    assert not [pid for pid in pids if pid_alive(pid)]
    assert "a router process exited; starting another" in router.log()
