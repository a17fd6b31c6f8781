"""Named key stores (file and Redis), the verifier taking up changes, and usage accounting."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from auxot_common.auth import API_KEY_PREFIX, KeyVerifier, NamedHash, generate_key, hash_key
from auxot_common.keys import FileKeyStore, KeyCache, KeyRecord, KeyStore, KeyStoreError, RedisKeyStore, lookup_tag
from auxot_common.usage import FileUsage, RedisUsage, utc_day
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["file", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    if request.param == "file":
        yield FileKeyStore(tmp_path / "keys.json")
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = Redis.from_url(server.url)
    yield RedisKeyStore(client, f"{tmp_path.name}:")
    await client.aclose()


def record(name: str, role: str = "api", **settings: int | None) -> KeyRecord:
    return KeyRecord(name=name, role=role, phc="$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", tag="abc", **settings)  # type: ignore[arg-type]


async def test_add_set_revoke_and_the_version_a_router_polls(store: KeyStore) -> None:
    cache = KeyCache(store)
    assert await cache.poll() is False  # nothing yet
    await store.add(record("alice", rpm=10))
    await store.add(record("alice", role="gpu"))  # same name, another role: a different key
    with pytest.raises(KeyStoreError, match="exists already"):
        await store.add(record("alice"))
    assert await cache.poll() is True
    assert cache.get("api", "alice") is not None and cache.get("api", "alice").rpm == 10  # type: ignore[union-attr]
    assert await cache.poll() is False
    updated = await store.update("api", "alice", {"rpm": None, "priority": 3})
    assert updated.rpm is None and updated.priority == 3
    assert await cache.poll() is True
    assert await store.remove("api", "alice") is True
    assert await store.remove("api", "alice") is False
    with pytest.raises(KeyStoreError, match="no api key"):
        await store.update("api", "alice", {"rpm": 1})
    assert await cache.poll() is True
    assert [r.ident for r in cache.records.values()] == ["gpu:alice"]


def test_the_keys_file_is_private_and_holds_no_key(tmp_path: Path) -> None:
    key = generate_key(API_KEY_PREFIX)
    store = FileKeyStore(tmp_path / "sub" / "keys.json")
    store._add(KeyRecord(name="bob", role="api", phc=hash_key(key), tag=lookup_tag(key)))
    path = tmp_path / "sub" / "keys.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert key not in path.read_text() and "$argon2id$" in path.read_text()


async def test_the_verifier_takes_up_added_and_revoked_keys() -> None:
    old, new = generate_key(API_KEY_PREFIX), generate_key(API_KEY_PREFIX)
    verifier = KeyVerifier([NamedHash("env", hash_key(old))])
    assert await verifier.verify(new) is None  # cached as invalid
    reissued = NamedHash("team", hash_key(new), lookup_tag(new))
    verifier.replace_hashes([NamedHash("env", hash_key(old)), reissued])
    assert await verifier.verify(new) == "team"
    assert await verifier.verify(old) == "env"
    verifier.replace_hashes([reissued])  # env key revoked: its cached success goes
    assert await verifier.verify(old) is None
    assert await verifier.verify(new) == "team"
    verifier.close()


async def test_usage_in_a_file_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "usage.json"
    usage = FileUsage(path)
    usage.add("alice", requests=1, prompt_tokens=10, completion_tokens=5, gpu_ms=1500)
    usage.add("alice", requests=1, errors=1)
    usage.add("bob", rejected=1)
    await usage.flush()
    again = FileUsage(path)
    rows = await again.query()
    today = utc_day()
    assert [(r["key"], r["day"], r["requests"], r["errors"], r["rejected"]) for r in rows] == [
        ("alice", today, 2, 1, 0),
        ("bob", today, 0, 0, 1),
    ]
    assert rows[0]["gpu_seconds"] == 1.5 and rows[0]["prompt_tokens"] == 10
    assert await again.query(key="bob", since="2999-01-01") == []


async def test_usage_in_redis_adds_up_across_instances(redis_server: RedisServer) -> None:
    a, b = Redis.from_url(redis_server.url), Redis.from_url(redis_server.url)
    try:
        first, second = RedisUsage(a, "u1:"), RedisUsage(b, "u1:")
        first.add("alice", requests=1, completion_tokens=7)
        second.add("alice", requests=2, completion_tokens=3, cached_tokens=4)
        await first.flush()
        await second.flush()
        (row,) = await first.query(key="alice")
        assert (row["requests"], row["completion_tokens"], row["cached_tokens"]) == (3, 10, 4)
        assert "alice" in await second.last_used()
    finally:
        await a.aclose()
        await b.aclose()
