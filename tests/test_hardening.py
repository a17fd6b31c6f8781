"""Regression tests of issue 8 (hardening), each at the level a user notices the fault: HTTP
answers of a real router, a real worker process, a raw WebSocket "worker" where the fault is a
worker's misbehaviour."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from auxot_common import protocol as proto
from tests.conftest import Cluster
from tests.support import http
from tests.support.procs import RouterProcess
from tests.support.scripted_worker import scripted_worker

USER = [{"role": "user", "content": "hi"}]
# 5 failed verifications per address, then one more every 15 s: far slower than Argon2 on 2 cores
SLOW_REFILL = {"AUXOT_AUTH_FAILURE_BURST": "5", "AUXOT_AUTH_FAILURES_PER_MINUTE": "4"}


def chat(router: RouterProcess, body: dict[str, Any], *, headers: dict[str, str] | None = None) -> http.Response:
    return http.post(f"{router.url}/v1/chat/completions", body, headers=headers or router.headers(), timeout=60)


def anthropic(router: RouterProcess, body: dict[str, Any], path: str = "/v1/messages") -> http.Response:
    headers = {"x-api-key": router.keys.api_key, "anthropic-version": "2023-06-01", "Content-Type": "application/json"}
    return http.post(f"{router.url}/api/anthropic{path}", body, headers=headers, timeout=60)


# --- 1. malformed input is a 400 in the API's shape and never reaches a worker ---------------------


def test_malformed_history_and_tools_are_400s_and_the_next_request_is_served(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    worker = fake_cluster.worker(router)
    bad_bodies = [
        {"messages": [*USER, {"role": "assistant", "tool_calls": [{"function": 1}]}, *USER]},
        {
            "messages": USER,
            "tools": [{"function": "x"}],
            "tool_choice": {"type": "function", "function": {"name": "x"}},
        },
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 7}]}]},
    ]
    for body in bad_bodies:
        reply = chat(router, {**body, "max_tokens": 3})
        assert reply.status == 400, reply.body
        assert reply.json()["error"]["type"] == "invalid_request_error"
    assert worker.fake_stats()["requests_started"] == 0  # none of them reached llama-server
    ok = chat(router, {"messages": USER, "max_tokens": 3})
    assert ok.status == 200 and ok.json()["choices"][0]["message"]["content"]


# --- 2. behind a proxy, wrong keys never lock out a known key or a worker ------------------------


def test_wrong_keys_never_lock_out_a_verified_key_or_a_worker(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(**SLOW_REFILL)
    models = f"{router.url}/v1/models"
    assert http.get(models, headers=router.headers()).status == 200  # this key is verified now
    # distinct keys: a wrong key seen before is answered from the cache and costs no Argon2 work
    statuses = [http.get(models, headers={"Authorization": f"Bearer rtr_wrong{i}"}).status for i in range(10)]
    assert set(statuses) == {401, 429} and statuses[-1] == 429  # the address's Argon2 budget is spent
    # the key verified before is still served, from the same address
    assert http.get(models, headers=router.headers()).status == 200
    # a worker from that address (its key not verified yet) is told to wait, not "invalid key",
    # and keeps trying until the budget refills, instead of exiting
    worker = fake_cluster.worker(router, wait=False)
    router.wait_workers(1, timeout=60)
    assert worker.alive()
    assert "refused this worker for now" in worker.log()
    assert chat(router, {"messages": USER, "max_tokens": 2}).status == 200


def test_trusted_proxy_header_names_the_client(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(AUXOT_TRUSTED_PROXIES="127.0.0.0/8", **SLOW_REFILL)
    scanner = {"X-Forwarded-For": "10.0.0.1, 203.0.113.9"}  # the left entry is the client's word
    assert {wrong_key(router, i, scanner) for i in range(10)} == {401, 429}
    assert wrong_key(router, 99, {"X-Forwarded-For": "203.0.113.9"}) == 429
    assert wrong_key(router, 100, {"Fly-Client-IP": "198.51.100.7"}) == 401  # checked, not locked out
    assert wrong_key(router, 101, {"X-Forwarded-For": "10.0.0.1"}) == 401
    # an untrusted peer cannot pick its address: a router trusting nobody ignores the header
    plain = fake_cluster.router("plain", **SLOW_REFILL)
    assert {wrong_key(plain, i, {"X-Forwarded-For": f"192.0.2.{i}"}) for i in range(10)} == {401, 429}
    assert wrong_key(plain, 99, {"X-Forwarded-For": "192.0.2.77"}) == 429


def wrong_key(router: RouterProcess, number: int, headers: dict[str, str]) -> int:
    return http.get(f"{router.url}/v1/models", headers={"Authorization": f"Bearer rtr_wrong{number}", **headers}).status


# --- 1. a job a worker drops silently ends, bounded ------------------------------------------------


async def _silent_worker(router: RouterProcess, jobs: list[proto.Job], *, close_on_job: bool = False) -> None:
    """Connects, takes jobs and never answers them; its heartbeats list no job."""

    async def take(_: aiohttp.ClientWebSocketResponse, job: proto.Job) -> None:
        jobs.append(job)

    await scripted_worker(router, take, report_running=False, close_on_job=close_on_job)


def test_a_job_the_worker_drops_silently_fails_instead_of_waiting_for_the_timeout(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(AUXOT_MAX_ATTEMPTS="2", AUXOT_JOB_TIMEOUT="5m")
    jobs: list[proto.Job] = []

    async def scenario() -> http.Response:
        worker = asyncio.create_task(_silent_worker(router, jobs))
        while router.health()["workers"] < 1:
            await asyncio.sleep(0.05)
        reply = await asyncio.to_thread(chat, router, {"messages": USER, "max_tokens": 2})
        worker.cancel()
        return reply

    reply = asyncio.run(scenario())
    assert reply.status == 502, reply.body
    assert "dropped the job" in reply.json()["error"]["message"]
    assert [job.attempt for job in jobs] == [1, 2]  # retried once, as with a lost worker
    assert all(0 < job.timeout_s <= 300 for job in jobs)  # the time left, not a wall-clock time


def test_count_tokens_answers_at_once_when_its_worker_dies(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    jobs: list[proto.Job] = []

    async def scenario() -> http.Response:
        worker = asyncio.create_task(_silent_worker(router, jobs, close_on_job=True))
        while router.health()["workers"] < 1:
            await asyncio.sleep(0.05)
        body = {"model": "m", "messages": USER}
        # the 10 s client timeout is below the 15 s count timeout: a wait for it fails the test
        reply = await asyncio.to_thread(
            http.post,
            f"{router.url}/api/anthropic/v1/messages/count_tokens",
            body,
            headers={"x-api-key": router.keys.api_key, "Content-Type": "application/json"},
            timeout=10,
        )
        await worker
        return reply

    reply = asyncio.run(scenario())
    assert reply.status == 200 and reply.headers["x-auxot-token-count"] == "estimate"
    assert [job.kind for job in jobs] == ["tokenize"]


# --- 5. size limits are coupled -------------------------------------------------------------------


def test_a_job_larger_than_a_worker_accepts_is_a_413(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(AUXOT_MAX_WS_MESSAGE_BYTES="200000")
    worker = fake_cluster.worker(router)
    reply = chat(router, {"messages": [{"role": "user", "content": "x" * 300_000}], "max_tokens": 2})
    assert reply.status == 413 and "AUXOT_MAX_WS_MESSAGE_BYTES" in reply.json()["error"]["message"]
    # and the worker is still there and serving
    assert chat(router, {"messages": USER, "max_tokens": 2}).status == 200
    assert worker.alive() and router.health()["workers"] == 1


def test_ws_frames_before_the_key_is_verified_are_small(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()

    async def probe() -> aiohttp.WSMessage:
        async with aiohttp.ClientSession() as session, session.ws_connect(router.ws_url) as ws:
            await ws.send_str('{"type":"hello","gpu_key":"' + "a" * (2 * 1024 * 1024) + '"}')
            return await ws.receive(timeout=10)

    reply = asyncio.run(probe())
    assert reply.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert router.health()["status"] == "ok"


# --- 11. keys are never in a command line -------------------------------------------------------


def test_worker_key_from_a_file_and_no_key_in_any_command_line(fake_cluster: Cluster, tmp_path: Path) -> None:
    router = fake_cluster.router()
    key_file = tmp_path / "gpu.key"
    key_file.write_text(router.keys.gpu_key + "\n")
    key_file.chmod(0o600)
    worker = fake_cluster.worker(router, AUXOT_GPU_KEY="", AUXOT_GPU_KEY_FILE=str(key_file))
    assert chat(router, {"messages": USER, "max_tokens": 2}).status == 200
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in [worker.pid, *worker.llama_children()]]
    assert len(commands) == 2
    for command in commands:
        assert router.keys.gpu_key.encode() not in command
        assert b"--api-key" not in command
    # llama-server still wants its own key: a request without it is refused
    assert http.get(f"http://127.0.0.1:{worker.llama_port()}/v1/models").status == 401


# --- 4. text is never duplicated on retry (unit level: the tracker's batch handling) -------------


async def test_tokens_and_worker_loss_in_one_batch_fail_instead_of_requeueing(tmp_path: Path) -> None:
    """The router's own job tracker (a real Router on the embedded store): tokens and the loss of
    their worker in one batch end the stream with an error; the job is never queued again, so
    the caller can never see its text twice."""
    import fakeredis

    from auxot_router import Router, RouterConfig

    config = RouterConfig(
        api_key_hashes=[],
        admin_key_hashes=[],
        keys_file=str(tmp_path / "keys.json"),
        usage_file=str(tmp_path / "usage.json"),
    )
    router = Router(config, fakeredis.FakeAsyncRedis(), server_blocking=False)
    handle = await router.tracker.submit(proto.Job(job_id="j", model=router.model_name, messages=USER, stream=True))
    assert await router.queue.depth(router.model_name) == 1
    for message in (proto.Token("j", "Hel"), proto.Token("j", "lo"), proto.WorkerLost("j", "socket closed")):
        handle.events.put(message)
    batches = [batch async for batch in router.tracker.events(handle, keepalive=60.0)]
    delivered = [m for batch in batches for m in batch]
    assert [type(m) for m in delivered] == [proto.Token, proto.Token, proto.Error]
    assert await router.queue.depth(router.model_name) == 1  # only the first submission: not re-queued


# --- 3. one Argon2 verification per key, however many arrive at once -----------------------------


async def test_concurrent_first_requests_share_one_verification() -> None:
    from auxot_common.auth import FailureLimiter, KeyVerifier, NamedHash, generate_key, hash_key

    key = generate_key("rtr_")
    limiter = FailureLimiter(burst=20, per_minute=1)  # no refill within the test
    verifier = KeyVerifier([NamedHash("k", hash_key(key))], cache_ttl=0.5, limiter=limiter)
    try:
        names = await asyncio.gather(*(verifier.verify(key) for _ in range(16)))
        assert names == ["k"] * 16 and verifier.argon2_runs == 1
        for _ in range(4):  # used more often than the TTL: never verified again
            await asyncio.sleep(0.2)
            assert await verifier.verify(key) == "k"
        assert verifier.argon2_runs == 1
        # a flood of unknown keys from one address is refused without Argon2 once its budget is spent
    finally:
        verifier.close()
    verifier = KeyVerifier([NamedHash("k", hash_key(key))], limiter=limiter)
    try:
        assert await verifier.verify(key) == "k"
        # while the known key stays in use from the same address, and is never refused
        results = []
        for i in range(25):
            results.append(await verifier.authenticate(f"rtr_bad{i}", "198.51.100.1"))
            assert (await verifier.authenticate(key, "198.51.100.1")).name == "k"
        assert verifier.argon2_runs == 1 + 20
        assert results[-1].outcome.value == "limited"
    finally:
        verifier.close()


# --- 8. Anthropic's message_start carries the real prompt size ----------------------------------


def test_message_start_reports_the_prompt_size_before_the_first_token(cluster: Cluster) -> None:
    """Claude Code tracks its context from message_start; with the real llama-server."""
    router = cluster.router()
    cluster.worker(router)
    body = {"model": "m", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "Hello there"}]}
    reply = anthropic(router, body)
    assert reply.status == 200
    events = [
        orjson.loads(line[len(b"data: ") :]) for line in reply.body.split(b"\n") if line.startswith(b"data: ")
    ]
    start = events[0]["message"]["usage"]
    final = next(e for e in events if e["type"] == "message_delta")["usage"]
    prompt_at_start = start["input_tokens"] + start["cache_read_input_tokens"]
    assert prompt_at_start > 0
    assert prompt_at_start == final["input_tokens"] + final["cache_read_input_tokens"]


async def test_a_burst_larger_than_the_redis_pool_waits_instead_of_failing() -> None:
    """redis-py's default pool raises past 100 connections: a burst of a few hundred requests was
    a wall of 503s. The router's pool makes them wait their turn (embedded store here)."""
    from auxot_router import connect_redis

    redis, _ = connect_redis("", max_connections=16)
    results = await asyncio.gather(*(redis.xadd("burst", {"n": i}) for i in range(1000)), return_exceptions=True)
    assert [r for r in results if isinstance(r, Exception)] == []
    assert await redis.xlen("burst") == 1000


def test_hundreds_of_concurrent_requests_all_get_answers(fake_cluster: Cluster) -> None:
    """A burst of 300 concurrent requests through real processes: every one is answered (none
    is turned away by the router's own Redis connection pool)."""
    router = fake_cluster.router(AUXOT_MAX_PARALLEL="32")
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="0")

    async def burst() -> list[int]:
        body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one() -> int:
                async with session.post(
                    f"{router.url}/v1/chat/completions", json=body, headers=router.headers()
                ) as response:
                    await response.read()
                    return response.status

            return await asyncio.gather(*(one() for _ in range(300)))

    statuses = asyncio.run(burst())
    assert statuses.count(200) == 300, sorted(set(statuses))
