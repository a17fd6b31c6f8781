"""Per-key limits: requests per minute, tokens per minute, concurrent requests, tokens per day.

Requests and tokens per minute use GCRA (the "generic cell rate algorithm", a token bucket kept
as one timestamp per bucket): a bucket of ``limit`` units refills evenly over 60 s, so a key may
burst its whole minute at once and then gets one unit every ``60/limit`` seconds. The state of a
bucket is its *theoretical arrival time* (TAT): the moment it would be full again. That gives
exact ``Retry-After`` and reset times and needs no per-request log.

Tokens are settled when the job ends (prompt + completion): admission only checks that the token
bucket is not empty, so a request may overdraw it by its own size (as OpenAI does) and the next
one waits until the debt is repaid. The daily budget counts tokens per UTC day the same way.
Concurrency is a set of leases with an expiry (a router that dies cannot leak a slot forever).

Two backends with the same algorithm and interface:
- :class:`LocalLimiter`: in-process, for the embedded queue (one router, nobody to share with).
- :class:`RedisLimiter`: one Lua script per admission (one round trip, atomic, Redis' clock, so
  every router instance on one Redis enforces one limit). Settlements are buffered and sent
  in one pipeline every ``flush_interval`` (50 ms): no round trip of their own per request, none
  per token. A freed concurrency slot is seen at most that much later.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("auxot.limits")

WINDOW_S = 60.0
DAY_S = 86400


@dataclass(frozen=True, slots=True)
class Limits:
    """0 means no limit."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    daily_tokens: int = 0

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrency or self.daily_tokens)


@dataclass(slots=True)
class Decision:
    """The answer to one admission, with what the rate-limit headers report.

    ``remaining_*`` are -1 when that limit is off; ``reset_*`` are seconds until the bucket is
    full again; ``retry_after`` is seconds until the refused request could pass.
    """

    allowed: bool
    reason: str = ""  # "requests", "tokens", "concurrency" or "daily_tokens" when refused
    retry_after: float = 0.0
    remaining_requests: int = -1
    reset_requests: float = 0.0
    remaining_tokens: int = -1
    reset_tokens: float = 0.0


def seconds_to_utc_midnight(now: float) -> float:
    return DAY_S - (now % DAY_S)


class Limiter(Protocol):
    async def admit(self, key: str, limits: Limits, lease: str) -> Decision: ...
    def settle(self, key: str, limits: Limits, lease: str, tokens: int) -> None: ...
    async def flush(self) -> None: ...


# === The algorithm, in Python (LocalLimiter) and Lua (RedisLimiter) ===============================


@dataclass(slots=True)
class _KeyState:
    request_tat: float = 0.0
    token_tat: float = 0.0
    day: int = 0
    day_tokens: int = 0
    leases: dict[str, float] = field(default_factory=dict)  # lease id -> expiry


def _admit(state: _KeyState, limits: Limits, lease: str, now: float, lease_ttl: float) -> Decision:
    decision = Decision(allowed=True)
    refusals: list[tuple[str, float]] = []
    new_request_tat = state.request_tat
    if limits.rpm:
        interval = WINDOW_S / limits.rpm
        new_request_tat = max(state.request_tat, now) + interval
        if new_request_tat - now > WINDOW_S + 1e-9:
            refusals.append(("requests", new_request_tat - WINDOW_S - now))
            decision.remaining_requests = 0
            decision.reset_requests = max(state.request_tat - now, 0.0)
        else:
            decision.remaining_requests = math.floor((now + WINDOW_S - new_request_tat) / interval + 1e-9)
            decision.reset_requests = new_request_tat - now
    if limits.tpm:
        interval = WINDOW_S / limits.tpm
        tat = max(state.token_tat, now)
        remaining = math.floor((now + WINDOW_S - tat) / interval + 1e-9)
        decision.remaining_tokens = max(remaining, 0)
        decision.reset_tokens = tat - now
        if remaining < 1:
            refusals.append(("tokens", tat - (now + WINDOW_S - interval)))
    day = int(now // DAY_S)
    if state.day != day:
        state.day, state.day_tokens = day, 0
    if limits.daily_tokens and state.day_tokens >= limits.daily_tokens:
        refusals.append(("daily_tokens", seconds_to_utc_midnight(now)))
    if limits.concurrency:
        for lid in [lid for lid, expiry in state.leases.items() if expiry <= now]:
            del state.leases[lid]
        if len(state.leases) >= limits.concurrency:
            refusals.append(("concurrency", 1.0))
    if refusals:
        reason, retry = max(refusals, key=lambda r: r[1])
        decision.allowed, decision.reason, decision.retry_after = False, reason, max(retry, 0.001)
        return decision
    state.request_tat = new_request_tat if limits.rpm else 0.0
    if limits.concurrency:
        state.leases[lease] = now + lease_ttl
    return decision


def _settle(state: _KeyState, limits: Limits, lease: str, tokens: int, now: float) -> None:
    state.leases.pop(lease, None)
    if limits.tpm and tokens > 0:
        state.token_tat = max(state.token_tat, now) + tokens * WINDOW_S / limits.tpm
    day = int(now // DAY_S)
    if state.day != day:
        state.day, state.day_tokens = day, 0
    state.day_tokens += max(tokens, 0)


class LocalLimiter:
    """In-process limits (embedded mode). ``clock`` is injectable for unit tests."""

    def __init__(self, lease_ttl: float = 600.0, clock: Any = time.time) -> None:
        self._states: dict[str, _KeyState] = {}
        self._lease_ttl = lease_ttl
        self._clock = clock

    async def admit(self, key: str, limits: Limits, lease: str) -> Decision:
        if not limits.any:
            return Decision(allowed=True)
        state = self._states.setdefault(key, _KeyState())
        return _admit(state, limits, lease, self._clock(), self._lease_ttl)

    def settle(self, key: str, limits: Limits, lease: str, tokens: int) -> None:
        if not limits.any:
            return
        _settle(self._states.setdefault(key, _KeyState()), limits, lease, tokens, self._clock())

    async def flush(self) -> None:
        return None


# KEYS[1] state hash, KEYS[2] lease zset; ARGV: rpm, tpm, concurrency, daily, lease, lease_ttl
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm, conc, daily = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local st = redis.call('HMGET', KEYS[1], 'rt', 'tt', 'day', 'dt')
local rt, tt = tonumber(st[1]) or 0, tonumber(st[2]) or 0
local day = math.floor(now / 86400)
local dt = tonumber(st[4]) or 0
if (tonumber(st[3]) or day) ~= day then dt = 0 end
local W = 60.0
local reason, retry = '', 0
local rem_req, reset_req, rem_tok, reset_tok = -1, 0, -1, 0
local new_rt = rt
if rpm > 0 then
  local iv = W / rpm
  new_rt = math.max(rt, now) + iv
  if new_rt - now > W + 1e-9 then
    reason, retry = 'requests', new_rt - W - now
    rem_req, reset_req = 0, math.max(rt - now, 0)
  else
    rem_req, reset_req = math.floor((now + W - new_rt) / iv + 1e-9), new_rt - now
  end
end
if tpm > 0 then
  local iv = W / tpm
  local tat = math.max(tt, now)
  local rem = math.floor((now + W - tat) / iv + 1e-9)
  rem_tok, reset_tok = math.max(rem, 0), tat - now
  if rem < 1 then
    local r = tat - (now + W - iv)
    if r > retry then reason, retry = 'tokens', r end
  end
end
if daily > 0 and dt >= daily then
  local r = 86400 - (now % 86400)
  if r > retry then reason, retry = 'daily_tokens', r end
end
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc and (reason == '' or retry < 1) then reason, retry = 'concurrency', 1 end
end
if reason == '' then
  if rpm > 0 then redis.call('HSET', KEYS[1], 'rt', tostring(new_rt)) end
  redis.call('EXPIRE', KEYS[1], 172800)
  if conc > 0 then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
    redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[6])) + 60)
  end
end
return {reason, tostring(retry), rem_req, tostring(reset_req), rem_tok, tostring(reset_tok)}
"""

# KEYS[1] state hash, KEYS[2] lease zset; ARGV: tpm, tokens, lease
_SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[3])
local st = redis.call('HMGET', KEYS[1], 'tt', 'day', 'dt')
local day = math.floor(now / 86400)
local dt = tonumber(st[3]) or 0
if (tonumber(st[2]) or day) ~= day then dt = 0 end
if tpm > 0 and tokens > 0 then
  redis.call('HSET', KEYS[1], 'tt', tostring(math.max(tonumber(st[1]) or 0, now) + tokens * 60.0 / tpm))
end
redis.call('HSET', KEYS[1], 'day', day, 'dt', dt + tokens)
redis.call('EXPIRE', KEYS[1], 172800)
return 1
"""


class RedisLimiter:
    """Limits shared by every router instance on one Redis (see the module docstring)."""

    def __init__(self, redis: Redis, prefix: str = "auxot:", lease_ttl: float = 600.0, flush_interval: float = 0.05):
        self.redis = redis
        self.prefix = prefix
        self._lease_ttl = lease_ttl
        self._flush_interval = flush_interval
        self._admit = redis.register_script(_ADMIT_LUA)
        self._settle = redis.register_script(_SETTLE_LUA)
        self._pending: list[tuple[str, int, int, str]] = []  # (key, tpm, tokens, lease)
        self._flusher: asyncio.Task[None] | None = None

    def _keys(self, key: str) -> list[str]:
        return [f"{self.prefix}rl:{key}", f"{self.prefix}rl:{key}:leases"]

    async def admit(self, key: str, limits: Limits, lease: str) -> Decision:
        if not limits.any:
            return Decision(allowed=True)
        args: list[int | float | str] = [
            limits.rpm,
            limits.tpm,
            limits.concurrency,
            limits.daily_tokens,
            lease,
            self._lease_ttl,
        ]
        reply: Any = await self._admit(keys=self._keys(key), args=args)
        reason = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        return Decision(
            allowed=not reason,
            reason=reason,
            retry_after=max(float(reply[1]), 0.001) if reason else 0.0,
            remaining_requests=int(reply[2]),
            reset_requests=float(reply[3]),
            remaining_tokens=int(reply[4]),
            reset_tokens=float(reply[5]),
        )

    def settle(self, key: str, limits: Limits, lease: str, tokens: int) -> None:
        if not limits.any:
            return
        self._pending.append((key, limits.tpm, max(tokens, 0), lease))
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(self._flush_interval)
            await self.flush()
        finally:
            self._flusher = None

    async def flush(self) -> None:
        """Send buffered settlements in one pipeline; on a Redis error they are kept for later."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, tpm, tokens, lease in batch:
                    await self._settle(keys=self._keys(key), args=[tpm, tokens, lease], client=pipe)
                await pipe.execute()
        except RedisError as exc:
            log.warning("could not settle rate limits; will retry", extra={"jobs": len(batch), "error": str(exc)})
            self._pending = batch + self._pending


# === Resolving a key's limits, and the headers each SDK reads =====================================


def resolve_limits(own: dict[str, int | None], defaults: Limits) -> Limits:
    """A key's own limits (None: the global default) over the defaults."""

    def pick(name: str) -> int:
        value = own.get(name)
        return int(getattr(defaults, name)) if value is None else int(value)

    return Limits(rpm=pick("rpm"), tpm=pick("tpm"), concurrency=pick("concurrency"), daily_tokens=pick("daily_tokens"))


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1.0:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _rfc3339(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ratelimit_headers(
    decision: Decision, limits: Limits, *, anthropic: bool, now: float | None = None
) -> dict[str, str]:
    """The rate-limit headers of a response (both on successes and on 429s); only for limits
    that are on. ``retry-after``/``retry-after-ms`` only on refusals."""
    now = time.time() if now is None else now
    headers: dict[str, str] = {}
    if anthropic:
        if limits.rpm:
            headers["anthropic-ratelimit-requests-limit"] = str(limits.rpm)
            headers["anthropic-ratelimit-requests-remaining"] = str(max(decision.remaining_requests, 0))
            headers["anthropic-ratelimit-requests-reset"] = _rfc3339(now + decision.reset_requests)
        if limits.tpm:
            headers["anthropic-ratelimit-tokens-limit"] = str(limits.tpm)
            headers["anthropic-ratelimit-tokens-remaining"] = str(max(decision.remaining_tokens, 0))
            headers["anthropic-ratelimit-tokens-reset"] = _rfc3339(now + decision.reset_tokens)
    else:
        if limits.rpm:
            headers["x-ratelimit-limit-requests"] = str(limits.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(decision.remaining_requests, 0))
            headers["x-ratelimit-reset-requests"] = openai_duration(decision.reset_requests)
        if limits.tpm:
            headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(decision.remaining_tokens, 0))
            headers["x-ratelimit-reset-tokens"] = openai_duration(decision.reset_tokens)
    if not decision.allowed:
        headers["retry-after"] = str(max(math.ceil(decision.retry_after), 1))
        headers["retry-after-ms"] = str(max(math.ceil(decision.retry_after * 1000), 1))
    return headers


REFUSAL_MESSAGES = {
    "requests": "Rate limit reached for requests per minute (limit {rpm}) on this API key",
    "tokens": "Rate limit reached for tokens per minute (limit {tpm}) on this API key",
    "concurrency": "Too many concurrent requests (limit {concurrency}) on this API key",
    "daily_tokens": "Daily token budget ({daily_tokens} tokens) of this API key is used up",
}


def refusal_message(decision: Decision, limits: Limits) -> str:
    text = REFUSAL_MESSAGES.get(decision.reason, "Rate limit reached on this API key").format(
        rpm=limits.rpm, tpm=limits.tpm, concurrency=limits.concurrency, daily_tokens=limits.daily_tokens
    )
    return f"{text}. Please try again in {decision.retry_after:.1f}s."
