"""Several models and failures: each model's queue keeps its at-least-once and reclaim
guarantees, with a real ``redis-server`` and real router and worker processes (the fake
llama-server, whose ``FAKE:`` directives slow a job down so that it is caught mid-flight)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import Cluster
from tests.support.procs import RouterProcess
from tests.support.redis_server import RedisServer
from tests.support.reliability import TOKEN, Caller, await_for, chat_body

pytestmark = pytest.mark.timeout(90)

MODELS = ("Tiny-Alpha", "Tiny-Beta")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def models_settings(tmp_path: Path) -> dict[str, str]:
    entries = [
        {
            "id": f"{name.lower()}-q8-0",
            "model_name": name,
            "huggingface_id": f"tiny-org/{name}-GGUF",
            "quantization": "Q8_0",
            "family": "Dense",
            "parameters": "1B",
            "default_context_size": 1024,
            "max_context_size": 4096,
            "vram_requirements_gb": 1.0,
            "capabilities": ["chat"],
            "file_name": f"{name.lower()}.gguf",
        }
        for name in MODELS
    ]
    registry = tmp_path / "registry.json"
    registry.write_bytes(orjson.dumps({"version": "test", "models": entries}))
    return {"AUXOT_REGISTRY_FILE": str(registry), "AUXOT_MODELS": ",".join(MODELS), "AUXOT_MAX_PARALLEL": "1"}


def body(model: str, content: str = "Say tok.") -> dict[str, object]:
    return chat_body(content, stream=True, max_tokens=3) | {"model": model}


def served(reply: object) -> str:
    """The ``model`` of the stream's chunks."""
    for line in reply.raw.split(b"\n"):  # type: ignore[attr-defined]
        if line.startswith(b"data: {"):
            return str(orjson.loads(line[6:])["model"])
    return ""


async def test_per_model_queues_survive_the_dispatching_router_dying(
    fake_cluster: Cluster, redis: RedisServer, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """Callers wait on router "front"; the workers of both models are on router "back". Back
    is SIGKILLed while one job of each model runs there and another of each waits. Front's
    sweeper (or the new back's) reclaims the dead instance's jobs from each model's stream; a new "back" starts on
    the same port, the workers come back, and every caller gets a whole answer from a worker
    of its own model."""
    settings = {
        **models_settings(tmp_path),
        "AUXOT_REDIS_URL": redis.url,
        "AUXOT_DEAD_WORKER_TIMEOUT": "1s",
        "AUXOT_SWEEP_INTERVAL": "0.2s",
        "AUXOT_HEALTH_REFRESH": "0.25s",
    }
    front = fake_cluster.router("front", **settings)
    back = fake_cluster.router("back", **settings)
    workers = {
        name: fake_cluster.worker(
            back, name, AUXOT_WORKER_MODEL=name, AUXOT_RECONNECT_DELAY="0.2s", AUXOT_RECONNECT_MAX_DELAY="0.5s"
        )
        for name in MODELS
    }
    caller = Caller(front, session)
    calls = {
        name: [asyncio.create_task(caller.call(body(name, "FAKE:slow_first_token:5"), timeout=60)) for _ in range(2)]
        for name in MODELS
    }
    for name in MODELS:
        await await_for(lambda name=name: workers[name].fake_stats()["active"] == 1, 10, f"a {name} job to run")
    await await_for(
        lambda: all(front.health()["models"][n]["queue_depth"] == 1 for n in MODELS), 10, "one queued job per model"
    )

    back.signal(signal.SIGKILL)
    back.wait(10)
    again = RouterProcess(back.keys, fake_cluster.log_dir, name="back-again", port=back.port, **settings)
    fake_cluster.processes.append(again)
    again.start()

    for name in MODELS:
        for reply in await asyncio.gather(*calls[name]):
            assert reply.status == 200 and reply.text == TOKEN * 3 and reply.done, reply.raw[-300:]
            assert served(reply) == name
    # each worker ran only its own model's jobs: 2 of its model, plus the rerun of the one cut off
    for name in MODELS:
        assert workers[name].fake_stats()["requests_started"] == 3, name
    # the survivors' sweepers (front's, or the new back's) took the dead instance's jobs
    assert "reclaimed jobs from a dead router instance" in front.log() + again.log()
    health = front.health()
    assert all(health["models"][n]["queue_depth"] == 0 for n in MODELS)


async def test_a_job_whose_only_worker_dies_waits_for_its_own_model(
    fake_cluster: Cluster, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The only Tiny-Alpha worker dies mid-job (before any content). An idle Tiny-Beta worker is
    right there, but the job waits in Tiny-Alpha's queue until another Tiny-Alpha worker comes,
    and runs there."""
    router = fake_cluster.router(**models_settings(tmp_path))
    alpha = fake_cluster.worker(router, "alpha", AUXOT_WORKER_MODEL="Tiny-Alpha")
    beta = fake_cluster.worker(router, "beta", AUXOT_WORKER_MODEL="tiny-beta")
    call = asyncio.create_task(Caller(router, session).call(body("Tiny-Alpha", "FAKE:slow_first_token:3"), timeout=60))
    await await_for(lambda: alpha.fake_stats()["active"] == 1, 10, "the job to run")

    alpha.signal(signal.SIGKILL)
    await await_for(lambda: router.health()["models"]["Tiny-Alpha"]["queue_depth"] == 1, 10, "the job re-queued")
    await asyncio.sleep(1.0)
    assert not call.done()
    assert beta.fake_stats()["requests_started"] == 0  # never on another model's worker
    assert router.health()["models"]["Tiny-Alpha"]["workers"] == 0

    second = fake_cluster.worker(router, "alpha-2", AUXOT_WORKER_MODEL="Tiny-Alpha")
    reply = await call
    assert reply.status == 200 and reply.text == TOKEN * 3 and served(reply) == "Tiny-Alpha"
    assert second.fake_stats()["requests_started"] == 1
    assert beta.fake_stats()["requests_started"] == 0
