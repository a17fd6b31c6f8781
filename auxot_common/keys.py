"""Named keys: API callers, GPU workers and usage admins, with their limits, kept where every
router instance sees them.

A key is shown once when created; the store keeps its Argon2id hash, a short *lookup tag* and
its settings. The tag is the first 12 hex digits of SHA-256 of the key: a key is 256 random bits,
so the tag says nothing usable about it, but it lets the verifier try one Argon2 hash instead of
all of them (with 1,000 keys, trying each would cost a minute per new key).

Backends:
- :class:`FileKeyStore`: a JSON file (``AUXOT_KEYS_FILE``, default ``keys.json`` in the data
  directory, ``AUXOT_DATA_DIR`` or ``~/.auxot``), mode 0600, written atomically under an
  advisory lock (two ``keys`` commands at once lose nothing). Its version is the file's
  ``(mtime_ns, size, inode)``, which a router polls.
- :class:`RedisKeyStore`: one hash ``{p}keys`` (field ``role:name``, value the record's JSON) and
  a counter ``{p}keys:version`` incremented with every change, which a router polls.

A running router polls the version every few seconds (``AUXOT_KEYS_REFRESH``) and reloads on a
change: no restart, no SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis

ROLES = ("api", "gpu", "admin")
ADMIN_KEY_PREFIX = "mgt_"  # usage admins: read /admin/usage, run no jobs
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
LIMIT_FIELDS = ("rpm", "tpm", "concurrency", "daily_tokens")
MAX_PRIORITY = 100


class KeyStoreError(Exception):
    """A key operation that cannot be done; the message is one line for the operator."""


def lookup_tag(key: str) -> str:
    """A short, non-secret index of a key (see the module docstring)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(slots=True)
class KeyRecord:
    """One named key. A limit of None means "the global default"; 0 means "no limit"."""

    name: str
    role: str
    phc: str
    tag: str
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_tokens: int | None = None
    priority: int = 1
    created: float = field(default_factory=time.time)

    @property
    def ident(self) -> str:
        return f"{self.role}:{self.name}"

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def validate_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise KeyStoreError(f"invalid key name {name!r}: letters, digits and _.@- (at most 64, starting alphanumeric)")
    return name


def validate_settings(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Checked limit/priority changes: limits are None (default) or >= 0, priority 1..100."""
    out: dict[str, Any] = {}
    for name, value in changes.items():
        if name in LIMIT_FIELDS:
            if value is not None and (not isinstance(value, int) or value < 0):
                raise KeyStoreError(
                    f"--{name.replace('_', '-')} must be a whole number >= 0 (0: no limit) or 'default'"
                )
        elif name == "priority":
            if not isinstance(value, int) or not 1 <= value <= MAX_PRIORITY:
                raise KeyStoreError(f"--priority must be a whole number from 1 to {MAX_PRIORITY}")
        else:
            raise KeyStoreError(f"unknown setting {name!r}")
        out[name] = value
    return out


class KeyStore(Protocol):
    async def version(self) -> str: ...
    async def load(self) -> list[KeyRecord]: ...
    async def add(self, record: KeyRecord) -> None: ...
    async def update(self, role: str, name: str, changes: Mapping[str, Any]) -> KeyRecord: ...
    async def remove(self, role: str, name: str) -> bool: ...


def default_data_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get("AUXOT_DATA_DIR") or "~/.auxot").expanduser()


def keys_file_path(env: Mapping[str, str]) -> Path:
    raw = env.get("AUXOT_KEYS_FILE")
    return Path(raw).expanduser() if raw else default_data_dir(env) / "keys.json"


class FileKeyStore:
    """Keys in a JSON file (embedded mode); see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def version(self) -> str:
        return await asyncio.to_thread(self._version)

    def _version(self) -> str:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return "absent"
        return f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"

    async def load(self) -> list[KeyRecord]:
        return await asyncio.to_thread(self._read)

    def _read(self) -> list[KeyRecord]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            data = orjson.loads(raw) if raw.strip() else {}
            return [KeyRecord.from_dict(item) for item in data.get("keys", [])]
        except (orjson.JSONDecodeError, TypeError, AttributeError) as exc:
            raise KeyStoreError(f"{self.path}: not a keys file ({exc})") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[list[KeyRecord]]:
        """Read-modify-write under an exclusive lock; the yielded list is written back atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            records = self._read()
            yield records
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(orjson.dumps({"keys": [asdict(r) for r in records]}, option=orjson.OPT_INDENT_2))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        finally:
            os.close(lock_fd)

    async def add(self, record: KeyRecord) -> None:
        await asyncio.to_thread(self._add, record)

    def _add(self, record: KeyRecord) -> None:
        with self._locked() as records:
            if any(r.ident == record.ident for r in records):
                raise KeyStoreError(f"{record.role} key {record.name!r} exists already")
            records.append(record)

    async def update(self, role: str, name: str, changes: Mapping[str, Any]) -> KeyRecord:
        return await asyncio.to_thread(self._update, role, name, dict(changes))

    def _update(self, role: str, name: str, changes: dict[str, Any]) -> KeyRecord:
        with self._locked() as records:
            for index, record in enumerate(records):
                if record.role == role and record.name == name:
                    records[index] = replace(record, **changes)
                    return records[index]
            raise KeyStoreError(f"no {role} key named {name!r}")

    async def remove(self, role: str, name: str) -> bool:
        return await asyncio.to_thread(self._remove, role, name)

    def _remove(self, role: str, name: str) -> bool:
        with self._locked() as records:
            before = len(records)
            records[:] = [r for r in records if not (r.role == role and r.name == name)]
            return len(records) < before


class RedisKeyStore:
    """Keys in Redis (shared mode); see the module docstring."""

    def __init__(self, redis: Redis, prefix: str = "auxot:") -> None:
        self.redis = redis
        self.hash_key = f"{prefix}keys"
        self.version_key = f"{prefix}keys:version"

    async def version(self) -> str:
        value = await self.redis.get(self.version_key)
        return value.decode() if isinstance(value, bytes) else str(value or "0")

    async def load(self) -> list[KeyRecord]:
        raw: dict[Any, Any] = await self.redis.hgetall(self.hash_key)  # type: ignore[misc]
        return [KeyRecord.from_dict(orjson.loads(value)) for value in raw.values()]

    async def add(self, record: KeyRecord) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self.hash_key, record.ident, record.to_json())
            pipe.incr(self.version_key)
            added, _ = await pipe.execute()
        if not added:
            raise KeyStoreError(f"{record.role} key {record.name!r} exists already")

    async def update(self, role: str, name: str, changes: Mapping[str, Any]) -> KeyRecord:
        ident = f"{role}:{name}"
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:  # optimistic: retry if another change lands between read and write
                try:
                    await pipe.watch(self.hash_key)
                    raw = await pipe.hget(self.hash_key, ident)
                    if raw is None:
                        raise KeyStoreError(f"no {role} key named {name!r}")
                    record = replace(KeyRecord.from_dict(orjson.loads(raw)), **changes)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(self.hash_key, ident, record.to_json())
                    pipe.incr(self.version_key)
                    await pipe.execute()
                    return record
                except Exception as exc:  # WatchError: try again
                    if type(exc).__name__ != "WatchError":
                        raise

    async def remove(self, role: str, name: str) -> bool:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.hash_key, f"{role}:{name}")
            pipe.incr(self.version_key)
            removed, _ = await pipe.execute()
        return bool(removed)


class KeyCache:
    """A router's view of the store: reloaded when the store's version changes.

    ``poll()`` costs one GET (Redis) or one stat (file); it returns True when the records changed.
    A store that cannot be read keeps the last good view (logged by the caller).
    """

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.records: dict[str, KeyRecord] = {}  # by ident
        self._version: str | None = None

    async def poll(self) -> bool:
        version = await self.store.version()
        if version == self._version:
            return False
        records = await self.store.load()
        self._version = version
        fresh = {r.ident: r for r in records if r.role in ROLES}
        changed = fresh != self.records
        self.records = fresh
        return changed

    def of_role(self, role: str) -> list[KeyRecord]:
        return [r for r in self.records.values() if r.role == role]

    def get(self, role: str, name: str) -> KeyRecord | None:
        return self.records.get(f"{role}:{name}")
