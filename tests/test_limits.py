"""Per-key limits: GCRA request/token buckets, daily budget, concurrency leases, headers; the
in-process limiter with a fake clock and the Redis one (Lua) on a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from auxot_common.limits import (
    Decision,
    Limits,
    LocalLimiter,
    RedisLimiter,
    openai_duration,
    ratelimit_headers,
    resolve_limits,
)
from tests.support.redis_server import RedisServer


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_rpm_allows_a_full_minute_at_once_then_one_per_interval() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    limits = Limits(rpm=3)
    answers = [await limiter.admit("a", limits, f"l{i}") for i in range(4)]
    assert [a.allowed for a in answers] == [True, True, True, False]
    assert [a.remaining_requests for a in answers[:3]] == [2, 1, 0]
    assert answers[3].reason == "requests"
    assert answers[3].retry_after == pytest.approx(20.0)
    clock.now += 19.9
    assert not (await limiter.admit("a", limits, "x")).allowed
    clock.now += 0.2
    assert (await limiter.admit("a", limits, "y")).allowed
    # another key has its own bucket
    assert (await limiter.admit("b", limits, "z")).allowed


async def test_tpm_is_settled_at_the_end_and_one_request_may_overdraw() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock=clock)
    limits = Limits(tpm=600)  # 10 tokens a second
    first = await limiter.admit("a", limits, "l1")
    assert first.allowed and first.remaining_tokens == 600
    limiter.settle("a", limits, "l1", 620)  # 20 more than the budget
    refused = await limiter.admit("a", limits, "l2")
    assert not refused.allowed and refused.reason == "tokens"
    assert refused.remaining_tokens == 0
    assert refused.retry_after == pytest.approx(2.1)  # 20 tokens of debt plus one token, at 10/s
    clock.now += 2.1
    again = await limiter.admit("a", limits, "l3")
    assert again.allowed and again.remaining_tokens == 1


async def test_concurrency_counts_leases_until_settled() -> None:
    limiter = LocalLimiter(clock=Clock())
    limits = Limits(concurrency=2)
    assert (await limiter.admit("a", limits, "l1")).allowed
    assert (await limiter.admit("a", limits, "l2")).allowed
    third = await limiter.admit("a", limits, "l3")
    assert not third.allowed and third.reason == "concurrency" and third.retry_after == 1.0
    limiter.settle("a", limits, "l1", 5)
    assert (await limiter.admit("a", limits, "l3")).allowed


async def test_a_refused_request_consumes_nothing() -> None:
    limiter = LocalLimiter(clock=Clock())
    limits = Limits(rpm=10, concurrency=1)
    assert (await limiter.admit("a", limits, "l1")).allowed
    for i in range(20):  # all refused for concurrency: the request bucket must not drain
        assert not (await limiter.admit("a", limits, f"x{i}")).allowed
    limiter.settle("a", limits, "l1", 0)
    assert (await limiter.admit("a", limits, "l2")).remaining_requests == 8


async def test_daily_budget_resets_at_utc_midnight() -> None:
    clock = Clock(86400 * 20000 + 86400 - 100)  # 100 s before a UTC midnight
    limiter = LocalLimiter(clock=clock)
    limits = Limits(daily_tokens=50)
    assert (await limiter.admit("a", limits, "l1")).allowed
    limiter.settle("a", limits, "l1", 60)
    refused = await limiter.admit("a", limits, "l2")
    assert refused.reason == "daily_tokens" and refused.retry_after == pytest.approx(100)
    clock.now += 100
    assert (await limiter.admit("a", limits, "l3")).allowed


def test_key_limits_fall_back_to_the_global_defaults() -> None:
    defaults = Limits(rpm=60, tpm=1000, concurrency=4, daily_tokens=0)
    assert resolve_limits({"rpm": None, "tpm": 0, "concurrency": 2}, defaults) == Limits(60, 0, 2, 0)
    assert resolve_limits({}, defaults) == defaults


def test_headers_in_each_apis_format() -> None:
    decision = Decision(allowed=False, reason="requests", retry_after=1.2, remaining_requests=0, reset_requests=61.0,
                        remaining_tokens=900, reset_tokens=0.02)  # fmt: skip
    limits = Limits(rpm=60, tpm=1000)
    openai = ratelimit_headers(decision, limits, anthropic=False, now=0.0)
    assert openai == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m1s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "20ms",
        "retry-after": "2",
        "retry-after-ms": "1200",
    }
    anthropic = ratelimit_headers(decision, limits, anthropic=True, now=0.0)
    assert anthropic["anthropic-ratelimit-requests-remaining"] == "0"
    assert anthropic["anthropic-ratelimit-requests-reset"] == "1970-01-01T00:01:01Z"
    assert anthropic["anthropic-ratelimit-tokens-remaining"] == "900"
    assert openai_duration(6 * 60) == "6m0s" and openai_duration(3723) == "1h2m3s"
    assert ratelimit_headers(Decision(allowed=True), Limits(), anthropic=False) == {}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


async def test_two_redis_limiters_enforce_one_limit(redis_server: RedisServer) -> None:
    a, b = Redis.from_url(redis_server.url), Redis.from_url(redis_server.url)
    try:
        first, second = RedisLimiter(a, "t1:"), RedisLimiter(b, "t1:")
        limits = Limits(rpm=5, concurrency=3)
        answers = [await (first if i % 2 else second).admit("k", limits, f"l{i}") for i in range(6)]
        assert [x.allowed for x in answers] == [True, True, True, False, False, False]
        assert answers[3].reason == "concurrency"
        first.settle("k", limits, "l0", 10)  # buffered, then one pipeline
        first.settle("k", limits, "l1", 10)
        await first.flush()
        allowed = [await second.admit("k", limits, f"m{i}") for i in range(3)]
        assert [x.allowed for x in allowed] == [True, True, False]
        assert allowed[1].remaining_requests == 0 and allowed[2].reason == "requests"
        assert 11.5 < allowed[2].retry_after <= 12.0  # 60/5 s until the next request
    finally:
        await a.aclose()
        await b.aclose()


async def test_redis_tokens_and_daily_budget(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        limiter = RedisLimiter(client, "t2:")
        limits = Limits(tpm=600, daily_tokens=1000)
        assert (await limiter.admit("k", limits, "l1")).remaining_tokens == 600
        limiter.settle("k", limits, "l1", 620)
        await limiter.flush()
        refused = await limiter.admit("k", limits, "l2")
        assert refused.reason == "tokens" and 1.9 < refused.retry_after <= 2.1
        limiter.settle("k", limits, "lx", 500)
        await limiter.flush()
        daily = await limiter.admit("k", Limits(daily_tokens=1000), "l3")
        assert daily.reason == "daily_tokens" and daily.retry_after > 0
    finally:
        await client.aclose()
