"""The zipapp distribution: one file per role, registry inside, runs with the dependencies installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.support import http
from tests.support.llama_server import free_port
from tests.support.procs import REPO, Keys, Process, base_env


def build(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".venv", ".git", "dist", "__pycache__", "tests", "bench"))
    subprocess.run(
        [str(repo / "scripts" / "build_zipapp.sh")],
        check=True,
        capture_output=True,
        env=base_env(PYTHON=sys.executable),
    )
    return repo / "dist"


def test_zipapps_run_and_carry_the_registry(tmp_path: Path, keys: Keys) -> None:
    dist = build(tmp_path)
    router_pyz, worker_pyz = dist / "auxot-router.pyz", dist / "auxot-worker.pyz"
    def run(*args):
        return subprocess.run(
            [sys.executable, *map(str, args)], capture_output=True, text=True, check=False, cwd=tmp_path
        )
    assert run(router_pyz, "version").stdout.strip() == "auxot-router v0.1.0"
    assert run(worker_pyz, "version").stdout.strip() == "auxot-worker v0.1.0"
    models = orjson.loads(run(router_pyz, "models", "--json", "--search", "Qwen3-Coder-30B-A3B").stdout)
    assert any(m["model_name"] == "Qwen3-Coder-30B-A3B" and m["quantizations"] for m in models)

    port = free_port()
    env = base_env(
        AUXOT_API_KEY_HASH=keys.api_hash,
        AUXOT_ADMIN_KEY_HASH=keys.gpu_hash,
        AUXOT_HOST="127.0.0.1",
        AUXOT_PORT=str(port),
    )
    router = Process(
        [sys.executable, str(router_pyz)], {**env, "AUXOT_TEST_CWD": str(tmp_path)}, tmp_path / "router.log"
    )
    router.start()
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                health = http.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except OSError:
                assert time.monotonic() < deadline, router.log()
                time.sleep(0.05)
        assert health["status"] == "ok" and health["model"] == "Qwen3-Coder-30B-A3B"
    finally:
        router.stop()
