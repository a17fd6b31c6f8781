"""Usage per key and UTC day: requests, errors, refusals, prompt/cached/completion tokens, busy
GPU time.

The router adds to an in-memory buffer when a job ends (no I/O per request, none per token) and
flushes it every second:
- :class:`RedisUsage` (``AUXOT_REDIS_URL``): ``HINCRBY`` on ``{p}usage:{key}`` (fields
  ``{day}:{counter}``), the key names in the set ``{p}usage:keys`` and the last use in the hash
  ``{p}usage:last``, all in one pipeline. Every instance adds to the same counters.
- :class:`FileUsage` (embedded): the totals live in memory and are written to ``usage.json`` in
  the data directory (atomically) when they changed, and read back at start, so they survive a
  restart. The ``usage`` command reads that file: it lags the router by at most one flush.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("auxot.usage")

COUNTERS = ("requests", "errors", "rejected", "prompt_tokens", "cached_tokens", "completion_tokens", "gpu_ms")
Totals = dict[str, dict[str, dict[str, int]]]  # key -> day -> counter -> value


def utc_day(now: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC).strftime("%Y-%m-%d")


def rows(totals: Totals, last_used: Mapping[str, float], key: str | None, since: str | None) -> list[dict[str, Any]]:
    """Flat rows ``{key, day, requests, ..., gpu_seconds}`` sorted by day then key."""
    out: list[dict[str, Any]] = []
    for name, days in totals.items():
        if key is not None and name != key:
            continue
        for day, counts in days.items():
            if since is not None and day < since:
                continue
            row: dict[str, Any] = {"key": name, "day": day}
            row.update({c: int(counts.get(c, 0)) for c in COUNTERS if c != "gpu_ms"})
            row["gpu_seconds"] = round(int(counts.get("gpu_ms", 0)) / 1000.0, 3)
            if name in last_used:
                row["last_used"] = last_used[name]
            out.append(row)
    out.sort(key=lambda r: (r["day"], r["key"]))
    return out


class UsageStore(Protocol):
    def add(self, key: str, **counts: int) -> None: ...
    async def flush(self) -> None: ...
    async def query(self, key: str | None = None, since: str | None = None) -> list[dict[str, Any]]: ...
    async def last_used(self) -> dict[str, float]: ...


class _Buffer:
    def __init__(self) -> None:
        self.pending: Totals = {}
        self.last: dict[str, float] = {}

    def add(self, key: str, counts: Mapping[str, int], now: float | None = None) -> None:
        now = time.time() if now is None else now
        day = self.pending.setdefault(key, {}).setdefault(utc_day(now), defaultdict(int))
        for name, value in counts.items():
            if name not in COUNTERS:
                raise ValueError(f"unknown usage counter {name!r}")
            day[name] += int(value)
        self.last[key] = now

    def take(self) -> tuple[Totals, dict[str, float]]:
        pending, last = self.pending, self.last
        self.pending, self.last = {}, {}
        return pending, last


def merge(into: Totals, more: Totals) -> None:
    for key, days in more.items():
        for day, counts in days.items():
            target = into.setdefault(key, {}).setdefault(day, {})
            for name, value in counts.items():
                target[name] = target.get(name, 0) + value


class FileUsage:
    """Embedded mode: totals in memory, persisted to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._buffer = _Buffer()
        self.totals: Totals = {}
        self._last: dict[str, float] = {}
        self._dirty = False
        data = read_usage_file(path)
        self.totals, self._last = data

    def add(self, key: str, **counts: int) -> None:
        self._buffer.add(key, counts)

    def _absorb(self) -> None:
        pending, last = self._buffer.take()
        if pending:
            merge(self.totals, pending)
            self._last.update(last)
            self._dirty = True

    async def flush(self) -> None:
        self._absorb()
        if not self._dirty:
            return
        self._dirty = False
        blob = orjson.dumps({"totals": self.totals, "last_used": self._last})
        try:
            await asyncio.to_thread(_write_atomic, self.path, blob)
        except OSError as exc:
            self._dirty = True
            log.warning("could not write the usage file", extra={"path": str(self.path), "error": str(exc)})

    async def query(self, key: str | None = None, since: str | None = None) -> list[dict[str, Any]]:
        self._absorb()
        return rows(self.totals, self._last, key, since)

    async def last_used(self) -> dict[str, float]:
        self._absorb()
        return dict(self._last)


def read_usage_file(path: Path) -> tuple[Totals, dict[str, float]]:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}, {}
    except orjson.JSONDecodeError:
        log.error("the usage file is unreadable; starting from zero", extra={"path": str(path)})
        return {}, {}
    return dict(data.get("totals", {})), dict(data.get("last_used", {}))


def _write_atomic(path: Path, blob: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(blob)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


class RedisUsage:
    """Shared mode: counters in Redis (see the module docstring)."""

    def __init__(self, redis: Redis, prefix: str = "auxot:") -> None:
        self.redis = redis
        self.prefix = prefix
        self._buffer = _Buffer()

    def add(self, key: str, **counts: int) -> None:
        self._buffer.add(key, counts)

    async def flush(self) -> None:
        pending, last = self._buffer.take()
        if not pending:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.sadd(f"{self.prefix}usage:keys", *pending.keys())
                for key, days in pending.items():
                    for day, counts in days.items():
                        for name, value in counts.items():
                            if value:
                                pipe.hincrby(f"{self.prefix}usage:{key}", f"{day}:{name}", value)
                if last:
                    pipe.hset(f"{self.prefix}usage:last", mapping={k: repr(v) for k, v in last.items()})
                await pipe.execute()
        except RedisError as exc:  # keep the counts for the next flush
            log.warning("could not record usage; will retry", extra={"error": str(exc)})
            for key, days in pending.items():
                for day_counts in days.values():
                    self._buffer.add(key, day_counts, now=last.get(key))

    async def query(self, key: str | None = None, since: str | None = None) -> list[dict[str, Any]]:
        names = (
            [key]
            if key is not None
            else sorted(_text(n) for n in await self.redis.smembers(f"{self.prefix}usage:keys"))
        )  # type: ignore[misc]
        totals: Totals = {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(f"{self.prefix}usage:{name}")
            replies = await pipe.execute()
        for name, fields in zip(names, replies, strict=True):
            for field_name, value in fields.items():
                day, _, counter = _text(field_name).partition(":")
                totals.setdefault(name, {}).setdefault(day, {})[counter] = int(value)
        return rows(totals, await self.last_used(), key, since)

    async def last_used(self) -> dict[str, float]:
        raw: dict[Any, Any] = await self.redis.hgetall(f"{self.prefix}usage:last")  # type: ignore[misc]
        return {_text(k): float(_text(v)) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
