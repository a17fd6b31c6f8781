"""Shared fixtures: keys, the tiny model, the real llama-server binary, router/worker processes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import settings

from auxot_common.auth import API_KEY_PREFIX, GPU_KEY_PREFIX, generate_key, hash_key
from tests.support.llama_server import llama_server_binary
from tests.support.procs import FAKE_LLAMA, Keys, RouterProcess, WorkerProcess
from tests.support.reliability import Reaper
from tests.support.tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def keys() -> Keys:
    api_key, gpu_key = generate_key(API_KEY_PREFIX), generate_key(GPU_KEY_PREFIX)
    return Keys(api_key=api_key, gpu_key=gpu_key, api_hash=hash_key(api_key), gpu_hash=hash_key(gpu_key))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    return llama_server_binary()


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """Processes a reliability test signals; cleaned up whatever the test did."""
    r = Reaper()
    yield r
    r.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session with a fresh connection per request (no pooled connection survives a kill)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        yield s


@pytest.fixture(scope="session")
def fake_llama() -> Path:
    return FAKE_LLAMA


class Cluster:
    """Routers and workers started by one test; everything is stopped at the end."""

    def __init__(self, keys: Keys, log_dir: Path, model: Path, llama: Path) -> None:
        self.keys = keys
        self.log_dir = log_dir
        self.model = model
        self.llama = llama
        self.processes: list[RouterProcess | WorkerProcess] = []

    def router(self, name: str = "router", *, start: bool = True, **settings: str) -> RouterProcess:
        router = RouterProcess(self.keys, self.log_dir, name=name, **settings)
        self.processes.append(router)
        if start:
            router.start()
        return router

    def worker(
        self,
        router: RouterProcess,
        name: str = "worker",
        *,
        llama: Path | None = None,
        wait: bool = True,
        **settings: str,
    ) -> WorkerProcess:
        worker = WorkerProcess(router, self.log_dir, model=self.model, llama=llama or self.llama, name=name, **settings)
        self.processes.append(worker)
        before = router.health().get("workers", 0)
        worker.start()
        if wait:
            router.wait_workers(before + 1)
        return worker

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@pytest.fixture
def cluster(
    keys: Keys, tmp_path: Path, tiny_model: Path, llama_binary: Path, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """Real processes with the real llama-server and the tiny model."""
    c = Cluster(keys, tmp_path, tiny_model, llama_binary)
    yield c
    c.stop()
    _dump_logs_on_failure(request, c)


@pytest.fixture
def fake_cluster(keys: Keys, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Real router and worker processes with the fake llama-server (timing and fault injection)."""
    model = tmp_path / "fake.gguf"
    model.write_bytes(b"GGUF fake model for the fake llama-server")
    c = Cluster(keys, tmp_path, model, FAKE_LLAMA)
    yield c
    c.stop()
    _dump_logs_on_failure(request, c)


def _dump_logs_on_failure(request: pytest.FixtureRequest, c: Cluster) -> None:
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for process in c.processes:
            print(f"===== {process.log_path.name}\n{process.log()[-4000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


# Property-based tests: a fixed example budget, derandomized, so CI runs the same examples every
# time (HYPOTHESIS_PROFILE=dev for a longer random search locally).
settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
