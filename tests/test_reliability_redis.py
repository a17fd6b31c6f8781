"""Nothing lost, nothing duplicated, with an external Redis (``AUXOT_REDIS_URL``).

A real ``redis-server`` (tests/support/redis_server.py) that the tests kill and restart, and
several router instances sharing it: a Redis outage is a quick, clear 503 and the router heals
by itself; a router crash leaves nothing stuck; a job is served by any instance's worker, never
twice; a draining instance hands its queue to the others.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Cluster
from tests.support import http
from tests.support.procs import RouterProcess
from tests.support.redis_server import RedisServer
from tests.support.reliability import (
    TOKEN,
    Caller,
    await_for,
    chat_body,
    running_on,
    start_routers,
    start_workers_on,
)

pytestmark = pytest.mark.timeout(60)

PREFIX = "auxot:"


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the tests that do not break it; flushed before each (``redis``)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis(shared_redis: RedisServer) -> RedisServer:
    shared_redis.flush()
    return shared_redis


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Private redis-servers for tests that kill or restart them."""
    servers: list[RedisServer] = []

    def make(**options: object) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", **options)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def pending(server: RedisServer) -> int:
    """Entries of the jobs stream delivered to a router instance and not yet finished."""
    reply = server.command("XPENDING", f"{PREFIX}jobs", "workers")
    assert isinstance(reply, list)
    return int(reply[0])  # type: ignore[call-overload]


def stream_length(server: RedisServer) -> int:
    reply = server.command("XLEN", f"{PREFIX}jobs")
    assert isinstance(reply, int)
    return reply


# --- Redis goes away and comes back ---------------------------------------------------------------


@pytest.mark.parametrize("persistent", [False, True], ids=["empty-after-restart", "appendonly"])
async def test_redis_outage_is_a_quick_503_and_the_router_heals(
    fake_cluster: Cluster, make_redis: Callable[..., RedisServer], session: aiohttp.ClientSession, persistent: bool
) -> None:
    """Kill redis-server: callers get a clear 503 (with Retry-After) in well under 5 s, nothing
    hangs, /health says why. Restart it on the same port (with its data, or empty as a cache-only
    Redis comes back): the router serves again by itself, and once it serves, it serves every
    caller (no stragglers failing on connections that died with the old Redis)."""
    server = make_redis(appendonly=persistent)
    router = fake_cluster.router(AUXOT_REDIS_URL=server.url, AUXOT_MAX_PARALLEL="16", AUXOT_HEALTH_REFRESH="0.5s")
    fake_cluster.worker(router)
    caller = Caller(router, session)
    busy = await asyncio.gather(*(caller.call(chat_body(stream=s, max_tokens=2)) for s in (True, False) * 8))
    assert all(r.text == TOKEN * 2 for r in busy)  # (the router's Redis pool now holds several connections)

    server.kill()
    started = time.monotonic()
    plain, streamed, anthropic, health = await asyncio.gather(
        caller.call(chat_body(stream=False), timeout=20),
        caller.call(chat_body(stream=True), timeout=20),
        Caller(router, session, "anthropic").call(chat_body(stream=True), timeout=20),
        asyncio.to_thread(health_when_degraded, router.url),
    )
    for reply in (plain, streamed, anthropic):
        assert reply.status == 503, reply.raw
        assert int(reply.headers["retry-after"]) > 0
        assert reply.elapsed < 5, reply.elapsed
    assert "queue" in plain.json["error"]["message"]
    assert anthropic.json["error"]["type"] == "overloaded_error"
    assert health.status == 503 and health.json()["redis"] == "unreachable"
    assert time.monotonic() - started < 5

    server.start()  # same port
    healed = time.monotonic()

    async def served() -> bool:
        reply = await caller.call(chat_body(stream=True, max_tokens=3), timeout=10)
        return reply.status == 200 and reply.text == TOKEN * 3 and reply.done

    while not await served():
        assert time.monotonic() - healed < 15, router.log()[-3000:]
        await asyncio.sleep(0.2)
    replies = await asyncio.gather(*(caller.call(chat_body(stream=s, max_tokens=3)) for s in (True, False) * 8))
    assert [r.status for r in replies] == [200] * 16, [r.raw[:150] for r in replies if r.status != 200]
    assert all(r.text == TOKEN * 3 for r in replies)
    deadline = time.monotonic() + 3  # /health's view is refreshed in the background
    while router.health()["queue_depth"] != 0:
        assert time.monotonic() < deadline, router.health()
        await asyncio.sleep(0.1)


async def test_a_running_stream_survives_a_short_redis_outage(
    fake_cluster: Cluster, make_redis: Callable[..., RedisServer], session: aiohttp.ClientSession
) -> None:
    """Tokens from a worker to a caller on the same instance need no Redis: a stream that is
    running while Redis is down for two seconds (two worker heartbeats) finishes whole."""
    server = make_redis(appendonly=True)
    router = fake_cluster.router(AUXOT_REDIS_URL=server.url)
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="20")
    stream = await Caller(router, session).open(chat_body(stream=True, max_tokens=80)).start()
    await stream.read_until(lambda r: r.text.count(TOKEN) >= 3)
    server.kill()
    await asyncio.sleep(2.5)
    server.start()
    reply = await stream.finish(timeout=20)
    assert reply.errors == [], reply.raw[-300:]
    assert reply.text == TOKEN * 80 and reply.done
    await await_for(lambda: pending(server) == 0 and stream_length(server) == 0, 10, "the job to be finished in Redis")


async def test_password_protected_redis(
    fake_cluster: Cluster, make_redis: Callable[..., RedisServer], session: aiohttp.ClientSession
) -> None:
    """``redis://:password@host`` works; the password shows neither in logs nor in /health; a
    wrong password stops the router at startup with a clear message instead of serving 503s."""
    password = "s3cret-redis-pw"
    server = make_redis(password=password)
    router = fake_cluster.router(AUXOT_REDIS_URL=server.url)
    fake_cluster.worker(router)
    reply = await Caller(router, session).call(chat_body(stream=True, max_tokens=3))
    assert reply.text == TOKEN * 3 and reply.done
    assert password not in http.get(f"{router.url}/health").body.decode()

    wrong = fake_cluster.router("wrong-password", start=False, AUXOT_REDIS_URL=server.url.replace(password, "nope"))
    with pytest.raises((RuntimeError, TimeoutError)):
        wrong.start(timeout=15)
    assert wrong.wait(10) != 0
    assert "auth" in wrong.log().lower() or "password" in wrong.log().lower(), wrong.log()[-2000:]
    for proc in (router, wrong):
        assert password not in proc.log() and "nope@" not in proc.log()


async def test_router_crash_leaves_nothing_stuck(
    fake_cluster: Cluster, make_redis: Callable[..., RedisServer], session: aiohttp.ClientSession
) -> None:
    """SIGKILL a router holding a running job and two queued ones (persistent Redis, restarted
    too). A new router instance on the same port: the worker comes back by itself, the dead
    instance's pending job is reclaimed by the sweeper, the queued jobs are run or dropped, and
    nothing is left behind: queue depth 0, XPENDING empty, new requests served."""
    server = make_redis(appendonly=True)
    settings = {"AUXOT_REDIS_URL": server.url, "AUXOT_DEAD_WORKER_TIMEOUT": "1s", "AUXOT_SWEEP_INTERVAL": "0.2s"}
    router = fake_cluster.router(AUXOT_MAX_PARALLEL="1", **settings)
    worker = fake_cluster.worker(router, AUXOT_RECONNECT_DELAY="0.2s", AUXOT_RECONNECT_MAX_DELAY="1s")
    caller = Caller(router, session)
    calls = [asyncio.create_task(caller.call(chat_body("FAKE:slow_first_token:5", stream=True, max_tokens=3)))]
    await await_for(lambda: worker.fake_stats()["active"] == 1, 10, "the first job to run")
    calls += [asyncio.create_task(caller.call(chat_body(stream=s, max_tokens=3))) for s in (False, True)]
    await await_for(lambda: router.health()["queue_depth"] == 2, 10, "two queued jobs")
    # the running job, and the two queued ones read ahead into the router's fair backlog (still
    # pending on it: the sweeper must reclaim all three)
    assert pending(server) == 3

    router.signal(signal.SIGKILL)
    router.wait(10)
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        assert isinstance(outcome, aiohttp.ClientError), outcome  # their router is gone: they know at once
    server.kill()
    server.start()
    assert stream_length(server) == 3 and pending(server) == 3  # the jobs survived the Redis restart

    again = RouterProcess(router.keys, fake_cluster.log_dir, name="router-again", port=router.port, **settings)
    fake_cluster.processes.append(again)
    again.start()
    await asyncio.to_thread(again.wait_workers, 1, 15)
    await await_for(lambda: pending(server) == 0 and stream_length(server) == 0, 15, "the old jobs to be settled")
    await await_for(lambda: again.health()["queue_depth"] == 0, 5, "/health's background view to catch up")
    reply = await Caller(again, session).call(chat_body(stream=True, max_tokens=4))
    assert reply.text == TOKEN * 4 and reply.done
    stats = worker.fake_stats()
    assert stats["requests_started"] <= 4  # each job at most once: 3 old ones + the new one
    assert pending(server) == 0 and stream_length(server) == 0


# --- several routers on one Redis -----------------------------------------------------------------


async def test_a_router_without_workers_serves_through_another_routers_worker(
    fake_cluster: Cluster, redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    """Router A has no worker, router B has one: A's callers are served by B's worker, the tokens
    relayed through Redis, streaming or not, OpenAI or Anthropic; a caller of A who hangs up
    frees B's worker at once; /health on either instance shows the whole cluster."""
    a, b = start_routers(fake_cluster, ["router-a", "router-b"], AUXOT_REDIS_URL=redis.url, AUXOT_MAX_PARALLEL="1")
    worker_b = fake_cluster.worker(b, "worker-b", FAKE_LLAMA_TOKENS_PER_SEC="200")
    caller = Caller(a, session)
    streamed, plain, anthropic = await asyncio.gather(
        caller.call(chat_body(stream=True, max_tokens=30)),
        caller.call(chat_body(stream=False, max_tokens=30)),
        Caller(a, session, "anthropic").call(chat_body(stream=True, max_tokens=30)),
    )
    assert streamed.text == TOKEN * 30 and streamed.done and streamed.finish_reasons == ["length"]
    assert plain.status == 200 and plain.text == TOKEN * 30
    assert anthropic.text == TOKEN * 30 and anthropic.done and anthropic.finish_reasons == ["max_tokens"]
    assert worker_b.fake_stats()["requests_completed"] == 3
    await await_for(lambda: a.health()["workers"] == 1, 5, "A's /health to see B's worker (a background view)")
    health_a = a.health()
    assert health_a["workers"] == 1 and health_a["worker_list"][0]["instance"] == b.health()["instance"]

    # Callers of A hang up: the one running on B's worker is aborted there at once, and the one
    # still queued (B's worker has one slot) is dropped when B takes it, never reaching llama-server.
    stream = await caller.open(chat_body(stream=True, max_tokens=2000)).start()
    await stream.read_until(lambda r: r.text.count(TOKEN) >= 5)
    leaver = asyncio.create_task(caller.call(chat_body(stream=False, max_tokens=3)))
    await await_for(lambda: a.health()["queue_depth"] == 1, 5, "the second job to be queued")
    leaver.cancel()
    await asyncio.sleep(0.3)  # A records that its caller left
    before = worker_b.fake_stats()
    stream.close()
    await await_for(
        lambda: worker_b.fake_stats()["requests_aborted"] == before["requests_aborted"] + 1, 5, "the abort on B"
    )
    reply = await caller.call(chat_body(stream=True, max_tokens=3))
    assert reply.text == TOKEN * 3 and reply.done
    stats = worker_b.fake_stats()
    assert stats["requests_started"] == before["requests_started"] + 1, stats  # the new request only
    await await_for(lambda: a.health()["queue_depth"] == 0, 5, "/health's background view to catch up")

    fake_cluster.worker(a, "worker-a")
    for router in (a, b):
        await await_for(lambda r=router: r.health()["workers"] == 2, 5, "/health's background view to catch up")
        health = router.health()
        assert health["workers"] == 2 and health["total_slots"] == 2, health
        assert {w["instance"] for w in health["worker_list"]} == {a.health()["instance"], b.health()["instance"]}


async def test_health_shows_another_instances_load_within_a_refresh_not_a_heartbeat(
    fake_cluster: Cluster, redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    """Workers heartbeat every 10 s (the default), yet router A's /health shows the job running on
    router B's worker, and the job waiting behind it, within a refresh or two: no phantom queue."""
    settings = {"AUXOT_REDIS_URL": redis.url, "AUXOT_MAX_PARALLEL": "1", "AUXOT_HEALTH_REFRESH": "0.5s"}
    a, b = start_routers(fake_cluster, ["router-a", "router-b"], **settings)
    worker_b = fake_cluster.worker(b, "worker-b", AUXOT_HEARTBEAT_INTERVAL="10s", FAKE_LLAMA_TOKENS_PER_SEC="25")
    await await_for(lambda: a.health()["workers"] == 1, 5, "A's /health to see B's worker")
    caller = Caller(b, session)
    running = asyncio.create_task(caller.call(chat_body(stream=True, max_tokens=200), timeout=30))
    await await_for(lambda: running_on([worker_b]) is not None, 5, "the job to run")
    waiting = asyncio.create_task(caller.call(chat_body(stream=False, max_tokens=3), timeout=30))

    def a_sees_one_running_one_waiting() -> bool:
        health = a.health()
        return health["active_jobs"] == 1 and health["queue_depth"] == 1

    await await_for(a_sees_one_running_one_waiting, 4, "A's /health to show B's running and waiting jobs")
    assert a.health()["worker_list"][0]["active_jobs"] == 1
    running.cancel()
    assert (await waiting).text == TOKEN * 3
    await await_for(lambda: a.health()["active_jobs"] == 0 and a.health()["queue_depth"] == 0, 4, "A to see it idle")


async def test_two_routers_and_their_sweepers_never_run_a_job_twice(
    fake_cluster: Cluster, redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    """Two instances, each with a worker, sweepers every 0.1 s, a dead-instance timeout shorter
    than many jobs: every request is answered exactly once and llama-server saw each job once."""
    settings = {"AUXOT_REDIS_URL": redis.url, "AUXOT_DEAD_WORKER_TIMEOUT": "1s", "AUXOT_SWEEP_INTERVAL": "0.1s"}
    routers = start_routers(fake_cluster, ["router-a", "router-b"], AUXOT_MAX_PARALLEL="3", **settings)
    rate = {"FAKE_LLAMA_TOKENS_PER_SEC": "40"}
    workers = start_workers_on(fake_cluster, [(r, f"worker-{n}", rate) for r, n in zip(routers, "ab", strict=True)])
    bodies = []
    for i in range(16):
        slow = i % 4 == 0  # runs longer than the dead-instance timeout
        content = "FAKE:slow_first_token:1.3" if slow else "Say tok."
        bodies.append((routers[i % 2], chat_body(content, stream=i % 3 != 0, max_tokens=10)))
    replies = await asyncio.gather(*(Caller(r, session).call(body, timeout=40) for r, body in bodies))
    for reply in replies:
        assert reply.status == 200 and reply.text == TOKEN * 10, reply.raw[-300:]
    stats = [w.fake_stats() for w in workers]
    assert sum(s["requests_started"] for s in stats) == 16, stats
    assert sum(s["requests_completed"] for s in stats) == 16, stats
    assert all(s["requests_started"] > 0 for s in stats)  # both instances' workers took part
    assert pending(redis) == 0 and stream_length(redis) == 0
    for router in routers:
        assert "re-queueing" not in router.log() and "reclaimed" not in router.log()


async def test_draining_router_finishes_its_stream_and_hands_its_queue_to_the_other(
    fake_cluster: Cluster, redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    """SIGTERM router A while two streams of A's callers run (one on each instance's worker) and
    a third job of A's waits in the queue: the streams complete, A refuses new requests, A's
    queued job is served by B's worker (A reads no new jobs while draining), and A exits cleanly."""
    settings = {"AUXOT_REDIS_URL": redis.url, "AUXOT_MAX_PARALLEL": "1", "AUXOT_HEALTH_REFRESH": "0.25s"}
    a = fake_cluster.router("router-a", AUXOT_SHUTDOWN_GRACE="20s", **settings)
    b = fake_cluster.router("router-b", **settings)
    rate = {"FAKE_LLAMA_TOKENS_PER_SEC": "25"}
    worker_a, worker_b = start_workers_on(fake_cluster, [(a, "worker-a", rate), (b, "worker-b", rate)])
    caller = Caller(a, session)
    # 4 s streams: the third job stays queued long enough to be seen, on a loaded machine too
    streams = [asyncio.create_task(caller.call(chat_body(stream=True, max_tokens=100), timeout=30)) for _ in range(2)]
    await await_for(lambda: running_on([worker_a]) and running_on([worker_b]), 10, "both workers to be busy")
    queued = asyncio.create_task(caller.call(chat_body(stream=False, max_tokens=3), timeout=30))
    await await_for(lambda: a.health()["queue_depth"] == 1, 3, "A's third job to be queued")

    a.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    try:
        refused: int | None = (await caller.call(chat_body(stream=False), timeout=5)).status
    except aiohttp.ClientError:
        refused = None  # the listener is closed
    assert refused in (None, 503)

    for task in streams:
        reply = await task
        assert reply.status == 200 and reply.errors == [] and reply.text == TOKEN * 100 and reply.done
    reply = await queued
    assert reply.status == 200 and reply.text == TOKEN * 3
    assert worker_a.fake_stats()["requests_started"] == 1  # A's worker took nothing new while draining
    assert worker_b.fake_stats()["requests_started"] == 2
    assert await asyncio.to_thread(a.wait, 20) == 0
    assert pending(redis) == 0 and stream_length(redis) == 0


async def test_draining_router_lets_its_worker_finish_another_routers_stream(
    fake_cluster: Cluster, redis: RedisServer, session: aiohttp.ClientSession
) -> None:
    """Router A's worker streams a job whose caller is on router B; SIGTERM A: B's caller still
    gets the whole answer (A waits for the jobs its workers run, not only for its own callers)."""
    settings = {"AUXOT_REDIS_URL": redis.url, "AUXOT_MAX_PARALLEL": "1"}
    a = fake_cluster.router("router-a", AUXOT_SHUTDOWN_GRACE="20s", **settings)
    b = fake_cluster.router("router-b", **settings)
    fake_cluster.worker(a, "worker-a", FAKE_LLAMA_TOKENS_PER_SEC="25")
    stream = await Caller(b, session).open(chat_body(stream=True, max_tokens=40)).start()
    await stream.read_until(lambda r: r.text.count(TOKEN) >= 3)
    a.signal(signal.SIGTERM)
    reply = await stream.finish(timeout=20)
    assert reply.errors == [], reply.raw[-300:]
    assert reply.text == TOKEN * 40 and reply.done
    assert await asyncio.to_thread(a.wait, 20) == 0


def health_when_degraded(url: str, within: float = 4.0) -> Any:
    """/health serves a view refreshed in the background (no Redis call per probe): it reports
    the outage within a refresh interval, or at once after a caller met it."""
    deadline = time.monotonic() + within
    while True:
        reply = http.get(f"{url}/health", timeout=5)
        if reply.status == 503 or time.monotonic() > deadline:
            return reply
        time.sleep(0.1)
