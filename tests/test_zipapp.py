"""The distributions as a new user meets them: `make release` zipapps run by a bare Python, and
`pip install .` into a fresh virtualenv."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.support import http
from tests.support.llama_server import free_port
from tests.support.procs import REPO, Process

SOURCE_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "dist", "build", "*.egg-info", "__pycache__", "tests", "bench", ".*_cache"
)
HOST = "linux-aarch64" if platform.machine().lower() in ("aarch64", "arm64") else "linux-x86_64"
OTHER = "linux-x86_64" if HOST == "linux-aarch64" else "linux-aarch64"


def source_copy(tmp: Path) -> Path:
    repo = tmp / "repo"
    shutil.copytree(REPO, repo, ignore=SOURCE_IGNORE)
    return repo


def bare_python(where: Path) -> Path:
    """A virtualenv with nothing installed, not even pip."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(where)
    return where / "bin" / "python"


def bare_env(home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`make release` in a clean copy of the repository (dependencies cached in ~/.cache/auxot)."""
    repo = source_copy(tmp_path_factory.mktemp("release"))
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["make", "release"], cwd=repo, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    yield repo / "dist"


def wait_http(url: str, process: Process, timeout: float = 30) -> http.Response:
    deadline = time.monotonic() + timeout
    while True:
        assert process.alive(), process.log()[-3000:]
        try:
            return http.get(url, timeout=1)
        except OSError:
            assert time.monotonic() < deadline, process.log()[-3000:]
            time.sleep(0.05)


def test_release_lists_checksums_of_every_file(release: Path) -> None:
    sums = dict(line.split()[::-1] for line in (release / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == sorted(
        f"auxot-{role}-linux-{arch}.pyz" for role in ("router", "worker") for arch in ("x86_64", "aarch64")
    )
    for name, digest in sums.items():
        assert hashlib.sha256((release / name).read_bytes()).hexdigest() == digest
        assert (release / name).stat().st_size < 30_000_000


def test_zipapps_serve_on_a_bare_python(release: Path, tmp_path: Path, tiny_model: Path, llama_binary: Path) -> None:
    """Nothing installed, isolated mode, empty HOME: setup, router, worker and a real request."""
    python = bare_python(tmp_path / "bare")
    app_dir, home = tmp_path / "app", tmp_path / "home"
    app_dir.mkdir()
    home.mkdir()
    router_pyz = app_dir / "auxot-router.pyz"
    worker_pyz = app_dir / "auxot-worker.pyz"
    shutil.copy(release / f"auxot-router-{HOST}.pyz", router_pyz)
    shutil.copy(release / f"auxot-worker-{HOST}.pyz", worker_pyz)
    env = bare_env(home)

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), "-I", *map(str, args)], capture_output=True, text=True, env=env, cwd=app_dir, check=False
        )

    assert run(router_pyz, "version").stdout.strip() == "auxot-router v0.1.0"
    assert run(worker_pyz, "version").stdout.strip() == "auxot-worker v0.1.0"
    models = orjson.loads(run(router_pyz, "models", "--json", "--search", "Qwen3-Coder-30B-A3B").stdout)
    assert any(m["model_name"] == "Qwen3-Coder-30B-A3B" and m["quantizations"] for m in models)  # registry inside

    setup = run(router_pyz, "setup")
    assert setup.returncode == 0, setup.stderr
    api_key = re.search(r"API key \(for callers\):\s+(rtr_\S+)", setup.stdout)
    gpu_key = re.search(r"GPU key \(for workers\):\s+(adm_\S+)", setup.stdout)
    hashes = dict(re.findall(r"export (AUXOT_\w+_HASH)='([^']+)'", setup.stdout))
    assert api_key and gpu_key and set(hashes) == {"AUXOT_API_KEY_HASH", "AUXOT_ADMIN_KEY_HASH"}

    port = free_port()
    router_env = bare_env(
        home, AUXOT_HOST="127.0.0.1", AUXOT_PORT=str(port), AUXOT_CTX_SIZE="1024", AUXOT_TEST_CWD=str(app_dir), **hashes
    )
    router = Process([str(python), "-I", str(router_pyz)], router_env, tmp_path / "router.log")
    worker_args = [
        str(python), "-I", str(worker_pyz), "--router-url", f"ws://127.0.0.1:{port}/ws",
        "--model-path", str(tiny_model), "--llama-server-path", str(llama_binary),
    ]  # fmt: skip
    worker_env = bare_env(home, AUXOT_GPU_KEY=gpu_key.group(1), AUXOT_TEST_CWD=str(app_dir))
    worker = Process(worker_args, worker_env, tmp_path / "worker.log")
    router.start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_http(f"{base}/ping", router).body == b"pong"
        assert http.get(f"{base}/health").json()["status"] == "ok"
        assert b"auxot_http_requests_total" in http.get(f"{base}/metrics").body
        worker.start()
        deadline = time.monotonic() + 60
        while http.get(f"{base}/health").json()["workers"] < 1:
            assert worker.alive() and time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.1)
        reply = http.post(
            f"{base}/api/openai/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0},
            headers={"Authorization": f"Bearer {api_key.group(1)}"},
            timeout=60,
        )
        assert reply.status == 200, reply.body
        assert reply.json()["usage"]["completion_tokens"] == 5
        assert "auxot_completion_tokens_total" in http.get(f"{base}/metrics").body.decode()
    finally:
        worker.stop()
        router.stop()


def test_a_wrong_interpreter_or_platform_gets_one_line(release: Path, tmp_path: Path) -> None:
    python = bare_python(tmp_path / "bare")
    env = bare_env(tmp_path)
    other = subprocess.run(
        [str(python), "-I", str(release / f"auxot-router-{OTHER}.pyz"), "version"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert other.returncode == 1 and other.stdout == ""
    assert other.stderr.count("\n") == 1 and other.stderr.startswith("auxot-router: this file runs on CPython 3.11")
    assert OTHER.split("-")[1] in other.stderr and "Traceback" not in other.stderr

    # A build for some other Python version than the one running (only its wheels inside).
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    version = "3.12" if mine != "3.12" else "3.13"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_zipapp.py"), "--platform", HOST, "--python", version,
         "--role", "router", "--out", str(tmp_path / "one")],
        check=True, capture_output=True,
    )  # fmt: skip
    wrong = subprocess.run(
        [str(python), "-I", str(tmp_path / "one" / f"auxot-router-{HOST}.pyz"), "version"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1
    assert f"runs on CPython {version} on Linux" in wrong.stderr and f"this is CPython {mine}" in wrong.stderr


def test_pip_install_gives_both_commands(tmp_path: Path) -> None:
    repo = source_copy(tmp_path)
    venv.EnvBuilder(with_pip=True).create(tmp_path / "venv")
    bin_dir = tmp_path / "venv" / "bin"
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(repo)],
        check=True, capture_output=True,
    )  # fmt: skip
    env = bare_env(tmp_path)
    for command, expected in (("auxot-router", "usage:"), ("auxot-worker", "--gpu-key")):
        result = subprocess.run(
            [str(bin_dir / command), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, check=False
        )
        assert result.returncode == 0 and expected in result.stdout, result.stderr
    models = subprocess.run(
        [str(bin_dir / "auxot-router"), "models", "--json", "--search", "Qwen3-Coder-30B-A3B"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert any(m["model_name"] == "Qwen3-Coder-30B-A3B" for m in orjson.loads(models.stdout))  # the registry came along
