"""Named keys, per-key limits, fair shares and usage, end to end: real router and worker
processes (fake llama-server), the official SDKs, the ``keys``/``usage`` commands, and two
routers on a real redis-server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from tests.conftest import Cluster
from tests.support import http
from tests.support.procs import REPO, RouterProcess, WorkerProcess
from tests.support.redis_server import RedisServer

FAST = {"AUXOT_KEYS_REFRESH": "0.2s", "AUXOT_MAX_PARALLEL": "2"}


def cli(router: RouterProcess, *args: str) -> str:
    """Run ``python auxot_router.py ARGS`` with the router's environment; its stdout."""
    done = subprocess.run(
        [sys.executable, str(REPO / "auxot_router.py"), *args],
        check=False,
        env=router.env,
        cwd=router.env["AUXOT_TEST_CWD"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def add_key(router: RouterProcess, name: str, *flags: str) -> str:
    out = cli(router, "keys", "add", name, *flags)
    key = out.strip().splitlines()[-1]
    assert key.startswith(("rtr_", "adm_", "mgt_")) and len(key) > 40
    return key


def oai(router: RouterProcess, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=retries, timeout=60)


def claude(router: RouterProcess, key: str, retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.url, api_key=key, max_retries=retries, timeout=60)


def chat(client: openai.OpenAI, max_tokens: int = 3, text: str = "hi") -> Any:
    return client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": text}], max_tokens=max_tokens
    )


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def works(call: Callable[[], Any]) -> bool:
    try:
        call()
    except (openai.AuthenticationError, anthropic.AuthenticationError):
        return False
    return True


def test_a_new_key_works_at_once_and_a_revoked_one_is_refused(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(**FAST)
    fake_cluster.worker(router)
    key = add_key(router, "alice")
    assert "alice" in cli(router, "keys", "list") and key not in cli(router, "keys", "list")
    eventually(lambda: works(lambda: chat(oai(router, key))), timeout=5)
    message = claude(router, key).messages.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert message.usage.output_tokens == 3
    eventually(lambda: "never" not in cli(router, "keys", "list"))  # last used: recorded with the usage
    cli(router, "keys", "revoke", "alice")
    eventually(lambda: not works(lambda: chat(oai(router, key))), timeout=5)
    with pytest.raises(anthropic.AuthenticationError):
        claude(router, key).messages.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    chat(oai(router, router.keys.api_key))  # the AUXOT_API_KEY_HASH key still works (no limits)


def test_revoking_a_gpu_key_disconnects_its_worker(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(**FAST)
    gpu_key = add_key(router, "rack1", "--gpu")
    eventually(lambda: "rack1" in cli(router, "keys", "list"))
    time.sleep(0.5)  # the router polls the store every 0.2 s
    worker = WorkerProcess(router, fake_cluster.log_dir, model=fake_cluster.model, llama=fake_cluster.llama,
                           name="rack1", gpu_key=gpu_key)  # fmt: skip
    fake_cluster.processes.append(worker)
    worker.start()
    router.wait_workers(1)
    cli(router, "keys", "revoke", "rack1", "--gpu")
    eventually(lambda: router.health()["workers"] == 0, timeout=10)
    worker.wait(30)  # it reconnects, is refused, and gives up
    assert "rejected" in worker.log()


def test_limits_with_the_official_sdks(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(**FAST)
    fake_cluster.worker(router)
    rpm_key = add_key(router, "rpm", "--rpm", "2")
    rpm_claude = add_key(router, "rpm-claude", "--rpm", "1", "--tpm", "100000")
    tpm_key = add_key(router, "tpm", "--tpm", "600")
    conc_key = add_key(router, "conc", "--concurrency", "1")
    daily_key = add_key(router, "daily", "--daily-tokens", "50")
    time.sleep(0.6)

    # requests per minute: headers on every response, 429 rate_limit_exceeded with Retry-After
    first, second = chat(oai(router, rpm_key)), chat(oai(router, rpm_key))
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert [first.headers["x-ratelimit-remaining-requests"], second.headers["x-ratelimit-remaining-requests"]] == [
        "1",
        "0",
    ]
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert "x-auxot-queue-ms" in first.headers
    with pytest.raises(openai.RateLimitError) as refused:
        chat(oai(router, rpm_key))
    response = refused.value.response
    assert response.status_code == 429 and refused.value.code == "rate_limit_exceeded"
    assert 25 <= int(response.headers["retry-after"]) <= 30
    assert response.headers["x-ratelimit-remaining-requests"] == "0"

    # the same on the Anthropic API, in its own shape and headers
    ok = claude(router, rpm_claude).messages.with_raw_response.create(
        model="m", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
    )
    assert ok.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert int(ok.headers["anthropic-ratelimit-tokens-remaining"]) == 100000
    assert ok.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    with pytest.raises(anthropic.RateLimitError) as refused_claude:
        claude(router, rpm_claude).messages.create(
            model="m", max_tokens=3, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused_claude.value.status_code == 429
    assert refused_claude.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(refused_claude.value.response.headers["retry-after"]) >= 50

    # tokens per minute: one request overdraws the budget, the next waits; the SDK's own retry
    # honours Retry-After and succeeds
    big = chat(oai(router, tpm_key), max_tokens=600)
    assert big.parse().usage.total_tokens > 600
    retried = chat(oai(router, tpm_key, retries=2))
    assert retried.parse().choices[0].message.content

    # concurrency: a second request while the first runs is refused with Retry-After: 1
    async def concurrent() -> tuple[int, int, str]:
        headers = {"Authorization": f"Bearer {conc_key}"}
        body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "FAKE:slow_first_token:2"}]}
        async with aiohttp.ClientSession() as session:
            slow = asyncio.ensure_future(session.post(f"{router.url}/v1/chat/completions", json=body, headers=headers))
            await asyncio.sleep(0.8)
            quick = {**body, "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(f"{router.url}/v1/chat/completions", json=quick, headers=headers) as second:
                status, retry = second.status, second.headers.get("Retry-After", "")
            async with await slow as first:
                return first.status, status, retry

    assert asyncio.run(concurrent()) == (200, 429, "1")
    chat(oai(router, conc_key))  # the slot is free again

    # tokens per day: once used up, refused until UTC midnight
    assert chat(oai(router, daily_key), max_tokens=60).parse().usage.total_tokens > 50
    with pytest.raises(openai.RateLimitError) as daily:
        chat(oai(router, daily_key))
    assert int(daily.value.response.headers["retry-after"]) > 0
    assert "Daily token budget" in str(daily.value)

    # the retry of the SDK was refused once, then served: the refusal is counted
    def tpm_row() -> dict[str, Any]:
        rows = orjson.loads(cli(router, "usage", "--key", "tpm", "--json"))
        return rows[0] if rows else {}

    eventually(lambda: tpm_row().get("requests") == 2, timeout=10)
    assert tpm_row()["rejected"] >= 1


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def test_two_routers_on_one_redis_enforce_one_limit(fake_cluster: Cluster, redis_server: RedisServer) -> None:
    shared = {**FAST, "AUXOT_REDIS_URL": redis_server.url, "AUXOT_REDIS_PREFIX": "keys-test:"}
    a = fake_cluster.router("router-a", **shared)
    b = fake_cluster.router("router-b", **shared)
    fake_cluster.worker(a)
    key = add_key(a, "team", "--rpm", "3")  # in Redis: router b sees it too
    eventually(lambda: works(lambda: chat(oai(b, key), max_tokens=1)), timeout=5)  # 1 of 3
    outcomes = []
    for router in (a, b, a, b):
        try:
            chat(oai(router, key), max_tokens=1)
            outcomes.append(200)
        except openai.RateLimitError:
            outcomes.append(429)
    assert outcomes == [200, 200, 429, 429]
    eventually(lambda: orjson.loads(cli(b, "usage", "--key", "team", "--json"))[0]["requests"] == 3, timeout=10)


def test_fair_share_and_queue_position(fake_cluster: Cluster) -> None:
    """Key A queues 100 jobs, then key B one: B starts at the next free slot."""
    router = fake_cluster.router(AUXOT_KEYS_REFRESH="0.2s", AUXOT_MAX_PARALLEL="1", AUXOT_QUEUE_NOTICE="0.1s")
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="10")
    key_a, key_b, key_c = add_key(router, "burst"), add_key(router, "single"), add_key(router, "slow")
    time.sleep(0.6)

    async def scenario() -> tuple[list[float], float, float, bytes, str]:
        url = f"{router.url}/v1/chat/completions"
        body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        done_a: list[float] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one_a() -> None:
                async with session.post(url, json=body, headers={"Authorization": f"Bearer {key_a}"}) as r:
                    await r.read()
                    done_a.append(time.monotonic())

            # a key's first use verifies its Argon2 hash (slow); later ones hit the verifier's cache
            await one_a()
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {key_b}"}) as r:
                assert r.status == 200
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {key_c}"}) as r:
                assert r.status == 200
            done_a.clear()
            # a third caller's slow job holds the only slot, so the others wait for it
            slow_body = {**body, "messages": [{"role": "user", "content": "FAKE:slow_first_token:2"}]}
            slow = asyncio.ensure_future(
                session.post(url, json=slow_body, headers={"Authorization": f"Bearer {key_c}"})
            )
            await asyncio.sleep(0.3)
            burst = [asyncio.ensure_future(one_a()) for _ in range(100)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # all of A's jobs were accepted
                async with session.get(f"{router.url}/health") as h:
                    health = await h.json()
                if health["queue_depth"] + health["active_jobs"] + len(done_a) >= 100:
                    break
                await asyncio.sleep(0.05)
            submitted = time.monotonic()
            stream = {**body, "stream": True}
            started = 0.0
            raw = b""
            async with session.post(url, json=stream, headers={"Authorization": f"Bearer {key_b}"}) as r:
                async for line in r.content:
                    raw += line
                    if line.startswith(b"data:") and not started:
                        started = time.monotonic()  # B's first token: its job runs
                queue_ms = r.headers["x-auxot-queue-ms"]
            for task in burst:
                task.cancel()
            await asyncio.gather(*burst, return_exceptions=True)
            (await slow).close()
        return done_a, submitted, started, raw, queue_ms

    done_a, submitted, started, raw, queue_ms = asyncio.run(scenario())
    a_between = [t for t in done_a if submitted < t < started]
    # B's job got the slot the slow job freed: none of A's 100 jobs went first
    assert len(a_between) <= 1, len(a_between)
    assert len(done_a) < 50  # most of A's burst was still waiting when B finished
    assert b": queued position=1" in raw  # B was told it is next
    assert b"data: [DONE]" in raw
    assert int(queue_ms) >= 0


def test_usage_totals_equal_what_the_clients_were_told(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(**FAST)
    fake_cluster.worker(router)
    key, admin = add_key(router, "acct"), add_key(router, "ops", "--admin")
    time.sleep(0.6)
    prompt = completion = cached = 0
    client = oai(router, key)
    for n in (1, 4, 9):
        usage = chat(client, max_tokens=n, text="the same long prefix " * 5 + str(n)).parse().usage
        prompt += usage.prompt_tokens
        completion += usage.completion_tokens
        cached += usage.prompt_tokens_details.cached_tokens
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "stream"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    last = [chunk for chunk in stream][-1]
    prompt += last.usage.prompt_tokens
    completion += last.usage.completion_tokens
    cached += last.usage.prompt_tokens_details.cached_tokens
    message = claude(router, key).messages.create(model="m", max_tokens=7, messages=[{"role": "user", "content": "x"}])
    prompt += message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    completion += message.usage.output_tokens
    cached += message.usage.cache_read_input_tokens or 0

    def admin_rows() -> list[dict[str, Any]]:
        response = http.get(f"{router.url}/admin/usage?key=acct", headers={"Authorization": f"Bearer {admin}"})
        assert response.status == 200, response.body
        return list(orjson.loads(response.body)["data"])

    eventually(lambda: admin_rows() != [] and admin_rows()[0]["requests"] == 5)
    (row,) = admin_rows()
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (prompt, completion, cached)
    assert row["errors"] == 0 and row["gpu_seconds"] >= 0
    refused = http.get(f"{router.url}/admin/usage", headers={"Authorization": f"Bearer {key}"})
    assert refused.status == 401  # an API key is not an admin key

    # the command reads the same numbers (from the usage file the router writes every second)
    def cli_totals() -> tuple[int, int, int]:
        rows = orjson.loads(cli(router, "usage", "--key", "acct", "--json"))
        return (rows[0]["prompt_tokens"], rows[0]["completion_tokens"], rows[0]["cached_tokens"]) if rows else (0, 0, 0)

    eventually(lambda: cli_totals() == (prompt, completion, cached), timeout=10)


def test_hanging_up_mid_stream_still_counts_against_the_token_budget(fake_cluster: Cluster) -> None:
    """A caller that leaves while its job streams gets no usage report from the worker (the job
    is stopped); the router charges an estimate, so hanging up is no way around a TPM limit."""
    router = fake_cluster.router(AUXOT_KEYS_REFRESH="0.2s", AUXOT_CTX_SIZE="8192")
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="20")
    key = add_key(router, "hangup", "--tpm", "100000")
    time.sleep(0.6)
    client = oai(router, key)
    prompt = "tell me a long story " * 200  # ~4,000 bytes: about 1,000 tokens by the estimate
    stream = client.chat.completions.create(
        model="m", max_tokens=500, stream=True, messages=[{"role": "user", "content": prompt}]
    )
    for index, _chunk in enumerate(stream):
        if index == 3:
            break
    stream.close()  # hang up mid-stream

    def remaining() -> int:
        reply = client.chat.completions.with_raw_response.create(
            model="m", max_tokens=1, messages=[{"role": "user", "content": "hi"}]
        )
        return int(reply.headers["x-ratelimit-remaining-tokens"])

    # the estimate of the abandoned job (>= its prompt) was charged, not zero
    eventually(lambda: remaining() <= 100000 - 900, timeout=10)
