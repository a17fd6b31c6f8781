"""Real router and worker processes for end-to-end tests.

Each runs as ``python auxot_router.py`` / ``python auxot_worker.py`` on free ports with its own
environment and a log file, exactly as a user starts them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tests.support import http
from tests.support.llama_server import free_port

REPO = Path(__file__).resolve().parents[2]
FAKE_LLAMA = REPO / "bench" / "fake_llama_server.py"


@dataclass(frozen=True)
class Keys:
    api_key: str
    gpu_key: str
    api_hash: str
    gpu_hash: str


class Process:
    """A child process with a log file; stopping it waits and keeps the exit code."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.env.get("AUXOT_TEST_CWD", str(REPO))
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUXOT_", "FAKE_LLAMA_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class RouterProcess(Process):
    """``python auxot_router.py`` on a free port; ``env`` adds or overrides AUXOT_* settings."""

    def __init__(
        self, keys: Keys, log_dir: Path, name: str = "router", port: int | None = None, **settings: str
    ) -> None:
        self.port = port or free_port()
        defaults = {
            "AUXOT_HOST": "127.0.0.1",
            "AUXOT_PORT": str(self.port),
            "AUXOT_API_KEY_HASH": keys.api_hash,
            "AUXOT_ADMIN_KEY_HASH": keys.gpu_hash,
            "AUXOT_CTX_SIZE": "1024",
            "AUXOT_LOG_LEVEL": "debug",
            "AUXOT_TEST_CWD": str(log_dir),
            "AUXOT_DATA_DIR": str(log_dir / "data"),  # keys and usage files: never the user's ~/.auxot
        }
        env = base_env(**{**defaults, **settings})
        super().__init__([sys.executable, str(REPO / "auxot_router.py")], env, log_dir / f"{name}.log")
        self.keys = keys

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 20.0) -> None:
        super().start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"router exited early:\n{self.log()[-3000:]}")
            try:
                if http.get(f"{self.url}/health", timeout=1).status in (200, 503):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"router not healthy:\n{self.log()[-3000:]}")

    def health(self, *, key: str | None = None) -> dict[str, Any]:
        """``/health`` as a key holder sees it (with ``worker_list``); ``key=""`` sends none."""
        secret = self.keys.api_key if key is None else key
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return dict(orjson.loads(http.get(f"{self.url}/health", headers=headers, timeout=5).body))

    def wait_workers(self, count: int, timeout: float = 60.0, free: int | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            health = self.health()
            if health.get("workers", 0) >= count and (free is None or health.get("available", 0) >= free):
                return health
            time.sleep(0.05)
        raise TimeoutError(f"expected {count} workers, health: {health}\n{self.log()[-3000:]}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys.api_key}", "Content-Type": "application/json"}


class WorkerProcess(Process):
    """``python auxot_worker.py`` against a router, with a real or fake llama-server."""

    def __init__(
        self,
        router: RouterProcess,
        log_dir: Path,
        *,
        model: Path | None,
        llama: Path | None,
        name: str = "worker",
        gpu_key: str | None = None,
        flags: list[str] | None = None,
        **settings: str,
    ) -> None:
        """``model`` / ``llama`` None: no ``--model-path`` / ``--llama-server-path`` (the worker
        downloads them); ``flags`` are appended to the command line."""
        key = gpu_key if gpu_key is not None else router.keys.gpu_key
        # the key in the environment, as the README says: a command line is public in `ps`
        defaults = {"AUXOT_LOG_LEVEL": "debug", "AUXOT_HEARTBEAT_INTERVAL": "1s", "AUXOT_GPU_KEY": key}
        env = base_env(**{**defaults, **settings})
        args = [sys.executable, str(REPO / "auxot_worker.py"), "--router-url", router.ws_url]
        if model is not None:
            args += ["--model-path", str(model)]
        if llama is not None:
            args += ["--llama-server-path", str(llama)]
        super().__init__(args + list(flags or []), env, log_dir / f"{name}.log")

    def llama_children(self) -> list[int]:
        """PIDs of this worker's child processes (its llama-server)."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def llama_port(self) -> int:
        """The port of this worker's llama-server (read from its command line)."""
        for pid in self.llama_children():
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--port" in args:
                return int(args[args.index(b"--port") + 1])
        raise RuntimeError("the worker has no llama-server child with --port")

    def fake_stats(self) -> dict[str, int]:
        """``GET /fake/stats`` of this worker's fake llama-server (no API key needed)."""
        return fake_stats(self.llama_port())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def fake_stats(port: int) -> dict[str, int]:
    """``GET /fake/stats`` of a fake llama-server: requests_started, requests_aborted, ..."""
    return dict(orjson.loads(http.get(f"http://127.0.0.1:{port}/fake/stats", timeout=5).body))
