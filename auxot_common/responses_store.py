"""Stored Responses (``store: true``) in Redis, so ``previous_response_id`` and
``GET /responses/{id}`` work on every router instance that shares the Redis.

Each response is one key, ``{prefix}response:{id}``, holding the response object and the
conversation it continues (its input items and its output), with a TTL. A record larger than
the size bound is not stored (the reply says ``store: false``); the TTL bounds the total.
"""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from auxot_common.protocol import JSONObject


class ResponseStore:
    """``redis``: the router's client; ``ttl``: seconds a response is kept; ``max_bytes``: the
    largest record stored."""

    def __init__(self, redis: Redis, prefix: str, *, ttl: float, max_bytes: int) -> None:
        self._redis = redis
        self._prefix = f"{prefix}response:"
        self._ttl = max(1, int(ttl))
        self._max_bytes = max_bytes

    async def put(self, response: JSONObject, history: list[JSONObject]) -> bool:
        """Store a finished response; False when it is over the size bound."""
        record = orjson.dumps({"response": response, "history": history})
        if len(record) > self._max_bytes:
            return False
        await self._redis.set(self._prefix + str(response["id"]), record, ex=self._ttl)
        return True

    async def get(self, response_id: str) -> dict[str, Any] | None:
        raw = await self._redis.get(self._prefix + response_id)
        if raw is None:
            return None
        record = orjson.loads(raw)
        return record if isinstance(record, dict) else None

    async def delete(self, response_id: str) -> bool:
        return bool(await self._redis.delete(self._prefix + response_id))
