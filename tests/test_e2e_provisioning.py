"""End to end: a worker that provisions itself and stays up.

Real router and worker processes. A local fake Hugging Face (tests/fake_hf.py, in a thread)
serves the tiny model and a llama.cpp "release" archive holding the llama-server binary that the
suite builds; the router resolves its model from a small registry file that points there.
"""

from __future__ import annotations

import asyncio
import io
import os
import platform
import signal
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from auxot_common.llama_binary import LLAMA_CPP_TAG, select_asset
from tests.conftest import Cluster
from tests.fake_hf import FakeHF
from tests.support import http
from tests.support.llama_server import LlamaServer
from tests.support.procs import FAKE_LLAMA, RouterProcess, WorkerProcess, pid_alive

REPO_ID = "tiny-org/Tiny-GGUF"
PROMPT = [{"role": "user", "content": "Say something."}]
# Two GPUs as `nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version
# --format=csv,noheader,nounits` prints them.
H100_X2 = "0, NVIDIA H100 80GB HBM3, 81559, 81003, 550.54.15\n1, NVIDIA H100 80GB HBM3, 81559, 80741, 550.54.15\n"


class ThreadedHF:
    """A FakeHF running on its own event loop in a thread, for tests that drive processes."""

    def __init__(self) -> None:
        self.hf = FakeHF()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FakeHF:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.hf.start(), self._loop).result(10)
        return self.hf

    def __exit__(self, *_exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.hf.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture(scope="module")
def release_archive(llama_binary: Path) -> tuple[str, bytes]:
    """(asset name, bytes): the built llama-server packed the way llama.cpp releases are."""
    name = select_asset(platform.system(), platform.machine(), "cpu")
    assert name is not None, "no CPU release asset for this platform"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        tar.add(llama_binary, arcname="build/bin/llama-server")
    return name, buffer.getvalue()


@pytest.fixture(scope="module")
def hf(tiny_model: Path, release_archive: tuple[str, bytes]) -> Iterator[FakeHF]:
    with ThreadedHF() as fake:
        data = tiny_model.read_bytes()
        fake.add_file(REPO_ID, "tiny-Q8_0.gguf", data)
        fake.add_file(REPO_ID, "F16/tiny-F16-00001-of-00002.gguf", data)  # (llama-server is given shard 1)
        fake.add_file(REPO_ID, "F16/tiny-F16-00002-of-00002.gguf", b"second shard")
        fake.add_release_asset(LLAMA_CPP_TAG, *release_archive)
        yield fake


@pytest.fixture(autouse=True)
def _fresh_hf(request: pytest.FixtureRequest) -> Iterator[None]:
    if "hf" not in request.fixturenames:
        yield
        return
    fake: FakeHF = request.getfixturevalue("hf")
    fake.throttle_bps = None
    fake.reset_counters()
    yield
    fake.throttle_bps = None


def registry_file(tmp_path: Path) -> Path:
    """One model, "Tiny", in two quantizations: Q8_0 (fits anywhere) and a split F16 that the
    router only picks for a worker with plenty of VRAM."""

    def entry(quant: str, file_name: str, vram: float) -> dict[str, object]:
        return {
            "id": f"tiny-{quant.lower().replace('_', '-')}", "model_name": "Tiny", "huggingface_id": REPO_ID,
            "quantization": quant, "family": "Dense", "parameters": "8B", "default_context_size": 1024,
            "max_context_size": 4096, "vram_requirements_gb": vram, "capabilities": ["chat"], "file_name": file_name,
        }  # fmt: skip

    path = tmp_path / "registry.json"
    models = [entry("Q8_0", "tiny-Q8_0.gguf", 8.0), entry("F16", "F16/tiny-F16-00001-of-00002.gguf", 16.0)]
    path.write_bytes(orjson.dumps({"version": "test", "models": models}))
    return path


def tiny_router(cluster: Cluster, tmp_path: Path, **settings: str) -> RouterProcess:
    return cluster.router(AUXOT_REGISTRY_FILE=str(registry_file(tmp_path)), AUXOT_MODEL="Tiny", **settings)


def empty_path(tmp_path: Path) -> Path:
    """A PATH with nothing on it: no nvidia-smi, vulkaninfo, ... of the host's."""
    path = tmp_path / "bin"
    path.mkdir(exist_ok=True)
    return path


def new_worker(
    cluster: Cluster,
    router: RouterProcess,
    name: str = "worker",
    *,
    model: Path | None = None,
    llama: Path | None = None,
    flags: list[str] | None = None,
    start: bool = True,
    **settings: str,
) -> WorkerProcess:
    worker = WorkerProcess(router, cluster.log_dir, model=model, llama=llama, name=name, flags=flags, **settings)
    cluster.processes.append(worker)
    if start:
        worker.start()
    return worker


def provisioning_env(tmp_path: Path, hf: FakeHF) -> dict[str, str]:
    """A machine with nothing on it: an empty home (so ~/.auxot is empty) and an empty PATH."""
    return {
        "HOME": str(tmp_path / "home"),
        "PATH": str(empty_path(tmp_path)),
        "HF_ENDPOINT": hf.base_url,
        "AUXOT_LLAMA_ASSET_URL": hf.releases_url,
    }


def chat(router: RouterProcess, max_tokens: int = 5) -> http.Response:
    body = {"messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    return http.post(f"{router.url}/v1/chat/completions", body, headers=router.headers(), timeout=60)


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_no_workers(router: RouterProcess) -> None:
    wait_for(lambda: router.health()["workers"] == 0, 15, "the worker to leave")


def fake_llama_wrapper(directory: Path, condition: str = "true") -> Path:
    """The fake llama-server started through /bin/sh with an absolute Python (PATH may be
    empty). When the shell ``condition`` on ``$args`` (every argument, space-padded) fails it
    exits like llama.cpp out of GPU memory instead."""
    script = directory / "llama-server"
    script.write_text(
        "#!/bin/sh\n"
        f'args=" $* "\nif {condition}; then exec "{sys.executable}" "{FAKE_LLAMA}" "$@"; fi\n'
        "echo 'ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9216.00 MiB on device 0: "
        "cudaMalloc failed: out of memory' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    return script


# --- provisioning ----------------------------------------------------------------------------------


def test_bare_worker_downloads_everything_and_serves(
    cluster: Cluster, tmp_path: Path, hf: FakeHF, tiny_model: Path
) -> None:
    """Only --gpu-key and --router-url: the worker fetches llama-server and the model, serves,
    and a restart uses both caches without downloading again."""
    router = tiny_router(cluster, tmp_path)
    worker = new_worker(cluster, router, **provisioning_env(tmp_path, hf))
    health = router.wait_workers(1, timeout=120)
    resp = chat(router)
    assert resp.status == 200, resp.body
    answer = resp.json()["choices"][0]
    assert answer["message"]["content"] and answer["finish_reason"] == "length"

    auxot = tmp_path / "home" / ".auxot"
    assert (auxot / "models" / "tiny-org_Tiny-GGUF" / "tiny-Q8_0.gguf").read_bytes() == tiny_model.read_bytes()
    binaries = list((auxot / "llama-server").glob(f"{LLAMA_CPP_TAG}-cpu-*/llama-server"))
    assert len(binaries) == 1 and os.access(binaries[0], os.X_OK)
    info = health["worker_list"][0]
    assert (info["model"], info["ctx_size"], info["total_slots"], info["gpus"]) == ("tiny-Q8_0", 1024, 2, [])
    assert hf.seen("GET", "/releases/") and hf.seen("GET", "/cdn/")

    worker.stop()
    wait_no_workers(router)
    hf.reset_counters()
    worker.start()
    router.wait_workers(1, timeout=60)
    assert chat(router).status == 200
    assert not hf.seen("GET", "/releases/") and not hf.seen("GET", "/cdn/"), hf.requests


def test_gpu_report_reaches_the_router_and_picks_the_quantization(cluster: Cluster, tmp_path: Path, hf: FakeHF) -> None:
    """nvidia-smi reports two H100s: /health lists them, and the router picks the F16 variant
    (split in two files) that fits their memory instead of the default Q8_0."""
    env = provisioning_env(tmp_path, hf)
    nvidia_smi = Path(env["PATH"]) / "nvidia-smi"
    nvidia_smi.write_text(f"#!/bin/sh\nprintf '{H100_X2}'\n")
    nvidia_smi.chmod(0o755)
    router = tiny_router(cluster, tmp_path)
    new_worker(cluster, router, llama=fake_llama_wrapper(tmp_path), **env)
    info = router.wait_workers(1, timeout=60)["worker_list"][0]
    assert [(g["name"], g["vram_total_mb"], g["backend"]) for g in info["gpus"]] == [
        ("NVIDIA H100 80GB HBM3", 81559, "cuda")
    ] * 2
    repo = tmp_path / "home" / ".auxot" / "models" / "tiny-org_Tiny-GGUF"
    assert sorted(p.name for p in (repo / "F16").iterdir() if p.suffix == ".gguf") == [
        "tiny-F16-00001-of-00002.gguf", "tiny-F16-00002-of-00002.gguf",
    ]  # fmt: skip
    assert not (repo / "tiny-Q8_0.gguf").exists()
    assert info["model"] == "tiny-F16-00001-of-00002"
    assert chat(router).status == 200


def test_interrupted_download_resumes(cluster: Cluster, tmp_path: Path, hf: FakeHF, tiny_model: Path) -> None:
    """SIGTERM mid-download exits 0 and keeps the partial file; so does SIGKILL; each restart
    asks only for the missing bytes, and the finished file is the model."""
    data = tiny_model.read_bytes()
    router = tiny_router(cluster, tmp_path)
    worker = new_worker(cluster, router, llama=cluster.llama, start=False, **provisioning_env(tmp_path, hf))
    partial = tmp_path / "home" / ".auxot" / "models" / "tiny-org_Tiny-GGUF" / "tiny-Q8_0.gguf.partial"

    def size() -> int:
        return partial.stat().st_size if partial.exists() else 0

    hf.throttle_bps = 250_000
    offsets = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        before = size()
        hf.reset_counters()
        worker.start()
        wait_for(lambda b=before: size() > b + 120_000, 30, "download progress")
        worker.signal(sig)
        code = worker.wait(timeout=15)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        gets = hf.seen("GET", "/cdn/")
        assert [g.range for g in gets] == ([f"bytes={before}-"] if before else [None])
        offsets.append(size())
        assert before < offsets[-1] < len(data)
    hf.throttle_bps = None
    hf.reset_counters()
    worker.start()
    router.wait_workers(1, timeout=60)
    assert [g.range for g in hf.seen("GET", "/cdn/")] == [f"bytes={offsets[-1]}-"]
    assert hf.bytes_sent == len(data) - offsets[-1]
    assert (partial.parent / "tiny-Q8_0.gguf").read_bytes() == data
    assert not partial.exists()
    assert chat(router).status == 200


def test_model_missing_upstream_is_reported(cluster: Cluster, tmp_path: Path, hf: FakeHF) -> None:
    """A registry entry whose file is missing upstream: the worker says so and exits 1."""
    registry = tmp_path / "missing.json"
    entry = orjson.loads(registry_file(tmp_path).read_bytes())["models"][0] | {"file_name": "absent-Q8_0.gguf"}
    registry.write_bytes(orjson.dumps({"version": "test", "models": [entry]}))
    router = cluster.router(AUXOT_REGISTRY_FILE=str(registry), AUXOT_MODEL="Tiny")
    worker = new_worker(cluster, router, llama=cluster.llama, **provisioning_env(tmp_path, hf))
    assert worker.wait(timeout=30) == 1
    assert "absent-Q8_0.gguf" in worker.log() and "404" in worker.log()


def test_no_prebuilt_llama_server_prints_the_build_command(cluster: Cluster, tmp_path: Path, hf: FakeHF) -> None:
    """An NVIDIA driver too old for every CUDA release build: the worker prints the command that
    builds llama-server from source and exits 1, before it downloads any model."""
    env = provisioning_env(tmp_path, hf)
    nvidia_smi = Path(env["PATH"]) / "nvidia-smi"
    nvidia_smi.write_text("#!/bin/sh\nprintf '0, Tesla K80, 11441, 11300, 470.82.01\\n'\n")
    nvidia_smi.chmod(0o755)
    router = tiny_router(cluster, tmp_path)
    worker = new_worker(cluster, router, **env)
    assert worker.wait(timeout=30) == 1
    assert 'EXTRA_CMAKE="-DGGML_CUDA=ON" scripts/build_llama_server.sh' in worker.log()
    assert "--llama-server-path" in worker.log()
    assert not hf.seen("GET", "/cdn/") and not hf.seen("GET", "/releases/")


# --- staying up ----------------------------------------------------------------------------------


def test_killed_llama_server_is_restarted(cluster: Cluster) -> None:
    """SIGKILL llama-server: zero slots at the router at once, then llama-server is back and
    serves; SIGKILL the worker: its llama-server goes with it (no orphan holding the GPU)."""
    router = cluster.router(AUXOT_MAX_PARALLEL="2")
    worker = cluster.worker(router)
    assert chat(router).status == 200
    (first,) = worker.llama_children()
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: router.health()["total_slots"] == 0, 10, "zero slots while llama-server is down")
    health = router.wait_workers(1, timeout=30, free=2)
    assert health["total_slots"] == 2
    resp = chat(router)
    assert resp.status == 200 and resp.json()["choices"][0]["message"]["content"]
    (second,) = worker.llama_children()
    assert second != first
    assert "llama-server recovered" in worker.log()

    assert worker.proc is not None
    worker.proc.kill()
    worker.wait(timeout=10)
    wait_for(lambda: not pid_alive(second), 10, "llama-server to die with its worker")


def test_crash_limit_makes_the_worker_exit(fake_cluster: Cluster) -> None:
    """AUXOT_LLAMA_MAX_RESTARTS=0: the first crash ends the worker with exit code 1 (a service
    manager restarts it) instead of leaving a broken worker connected."""
    router = fake_cluster.router()
    worker = fake_cluster.worker(router, AUXOT_LLAMA_MAX_RESTARTS="0")
    (child,) = worker.llama_children()
    os.kill(child, signal.SIGKILL)
    assert worker.wait(timeout=20) == 1
    assert "AUXOT_LLAMA_MAX_RESTARTS=0" in worker.log()
    wait_no_workers(router)


def test_out_of_memory_dials_down(fake_cluster: Cluster, tmp_path: Path) -> None:
    """A llama-server that only fits one slot of 4096 tokens: asked for 3 x 16384, the worker
    comes up with 1 x 4096 and says so to the router."""
    router = fake_cluster.router(AUXOT_MAX_PARALLEL="3", AUXOT_CTX_SIZE="16384")
    picky = fake_llama_wrapper(tmp_path, 'case "$args" in *" --ctx-size 4096 --parallel 1 "*) true;; *) false;; esac')
    worker = fake_cluster.worker(router, llama=picky)
    info = router.health()["worker_list"][0]
    assert (info["total_slots"], info["ctx_size"]) == (1, 4096)
    assert worker.log().count("retrying with less memory") == 4
    assert "reduced settings" in worker.log()
    assert chat(router).status == 200


def test_backend_url_serves_with_a_running_server(fake_cluster: Cluster, tmp_path: Path, tiny_model: Path) -> None:
    """--backend-url: no download and no llama-server of the worker's own; slots and context
    come from the server; when it stops answering the router is told zero slots."""
    router = fake_cluster.router()
    with LlamaServer(
        tiny_model, parallel=3, ctx_size=3072, api_key="backend-secret", log_path=tmp_path / "backend.log"
    ) as backend:
        flags = ["--backend-url", f"{backend.base_url}/v1", "--backend-api-key", "backend-secret"]
        worker = new_worker(fake_cluster, router, flags=flags, HOME=str(tmp_path / "home"))
        info = router.wait_workers(1, timeout=30)["worker_list"][0]
        assert (info["backend"], info["total_slots"], info["ctx_size"], info["model"]) == ("llama.cpp", 3, 1024, "tiny")
        resp = chat(router)
        assert resp.status == 200 and resp.json()["choices"][0]["message"]["content"]
        assert worker.llama_children() == []
        assert not (tmp_path / "home" / ".auxot").exists()
    wait_for(lambda: router.health()["total_slots"] == 0, 15, "zero slots once the backend is gone")


def test_sighup_reload_sends_policy_update_and_the_worker_applies_it(fake_cluster: Cluster) -> None:
    """Changing the router's settings and sending SIGHUP reaches connected workers as a
    policy_update: the worker restarts its llama-server with the new slots and re-announces."""
    env_file = fake_cluster.log_dir / ".env"
    env_file.write_text("AUXOT_MAX_PARALLEL=2\n")
    router = fake_cluster.router()
    fake_cluster.worker(router)
    assert router.health()["total_slots"] == 2
    env_file.write_text("AUXOT_MAX_PARALLEL=3\n")
    router.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while router.health()["total_slots"] != 3:
        assert time.monotonic() < deadline, router.log()[-2000:]
        time.sleep(0.1)
    assert "policy update sent" in router.log()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert http.post(f"{router.url}/v1/chat/completions", body, headers=router.headers()).status == 200

    env_file.write_text("AUXOT_MODEL=no-such-model-anywhere\n")  # an invalid reload changes nothing
    router.signal(signal.SIGHUP)
    time.sleep(0.5)
    assert router.alive() and router.health()["total_slots"] == 3
    assert "reload refused" in router.log()
