"""Keys, Argon2id hashes and the verifier that keeps hashing off the event loop.

Keys are ``rtr_`` (API callers) or ``adm_`` (GPU workers) followed by the unpadded base64url of
32 random bytes. Only Argon2id PHC hashes are stored (m=65536 KiB, t=3, p=4, the same format as
the Go router and the ``@auxot/cli`` npm tool). Several hashes may be configured per role, each
optionally named (``name:$argon2id$...``), separated by ``;`` or whitespace, so keys can be
rotated.

Verification costs 64 MiB and tens of milliseconds, so :class:`KeyVerifier`
- runs it in a small executor, never on the loop, with at most ``max_concurrent`` at once;
- caches results by SHA-256 of the presented key (never the key itself) in a bounded TTL cache;
- rate-limits failed attempts per client address, so a flood of wrong keys cannot starve the
  executor that real traffic needs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

API_KEY_PREFIX = "rtr_"
GPU_KEY_PREFIX = "adm_"
MAX_KEY_LENGTH = 256  # generated keys are 47 characters; anything far longer is not a key

_HASHER = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=4, hash_len=32, salt_len=16)


def generate_key(prefix: str) -> str:
    """A new key: ``prefix`` + base64url(32 random bytes) without padding."""
    return prefix + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def hash_key(key: str) -> str:
    """The Argon2id PHC string of ``key`` (slow on purpose: call off the event loop)."""
    return _HASHER.hash(key)


def verify_hash(phc: str, key: str) -> bool:
    """True if ``key`` matches the PHC hash. Malformed hashes never match. Constant-time."""
    try:
        return _HASHER.verify(phc, key)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True, slots=True)
class NamedHash:
    name: str
    phc: str
    tag: str = ""  # lookup tag of a stored named key (auxot_common.keys.lookup_tag); "" for env hashes


def parse_hashes(value: str) -> list[NamedHash]:
    """Parse a hash list: entries separated by ``;`` or whitespace, each ``[name:]$argon2id$...``.

    Raises ValueError with a one-line reason for anything that is not an Argon2id PHC string.
    """
    entries: list[NamedHash] = []
    for index, entry in enumerate(value.replace(";", " ").split(), start=1):
        raw = entry.strip("'\"")
        name, sep, phc = raw.partition(":")
        if not sep or name.startswith("$"):
            name, phc = f"key{index}", raw
        phc = phc.strip("'\"")
        parts = phc.split("$")
        if len(parts) != 6 or parts[1] != "argon2id":
            raise ValueError(f"entry {index} is not an Argon2id PHC hash ($argon2id$v=19$m=...$salt$hash)")
        entries.append(NamedHash(name=name, phc=phc))
    return entries


@dataclass(slots=True)
class _CacheEntry:
    name: str | None  # None: the key is known to be invalid
    expires: float


class FailureLimiter:
    """Allows ``burst`` failures per client address, refilled at ``per_minute``; bounded in size."""

    def __init__(self, burst: int = 20, per_minute: float = 30.0, max_clients: int = 10_000) -> None:
        self._burst = float(burst)
        self._rate = per_minute / 60.0
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allowed(self, client: str) -> bool:
        tokens, _ = self._refill(client)
        return tokens >= 1.0

    def record_failure(self, client: str) -> None:
        tokens, now = self._refill(client)
        self._buckets[client] = (max(tokens - 1.0, 0.0), now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)

    def _refill(self, client: str) -> tuple[float, float]:
        now = time.monotonic()
        tokens, last = self._buckets.get(client, (self._burst, now))
        return min(self._burst, tokens + (now - last) * self._rate), now


class KeyVerifier:
    """Verifies presented keys against one role's hashes, off the event loop, with a cache.

    Parameters:
        hashes: the role's configured hashes.
        cache_ttl: seconds a verification result (positive or negative) is reused.
        cache_size: most results kept; the least recently used go first.
        max_concurrent: Argon2 computations at once (each takes 64 MiB).
        executor: where hashing runs; a private 2-thread pool by default.
    """

    def __init__(
        self,
        hashes: Iterable[NamedHash],
        *,
        cache_ttl: float = 300.0,
        cache_size: int = 10_000,
        max_concurrent: int = 2,
        executor: Executor | None = None,
    ) -> None:
        self._hashes = list(hashes)
        self._ttl = cache_ttl
        self._size = cache_size
        self._cache: OrderedDict[bytes, _CacheEntry] = OrderedDict()
        self._executor = executor or ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="argon2")
        self._slots = asyncio.Semaphore(max_concurrent)
        self._generation = 0  # bumped by replace_hashes: an answer computed across it is not cached

    async def verify(self, key: str) -> str | None:
        """The name of the matching hash, or None if the key is invalid."""
        if not key or len(key) > MAX_KEY_LENGTH or not self._hashes:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        now = time.monotonic()
        entry = self._cache.get(digest)
        if entry is not None and entry.expires > now:
            self._cache.move_to_end(digest)
            return entry.name
        generation = self._generation
        async with self._slots:
            loop = asyncio.get_running_loop()
            name = await loop.run_in_executor(self._executor, self._match, key)
        if generation != self._generation:  # the hashes changed meanwhile: answer, but do not remember
            return name if name is None or any(h.name == name for h in self._hashes) else None
        self._cache[digest] = _CacheEntry(name=name, expires=time.monotonic() + self._ttl)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return name

    def replace_hashes(self, hashes: Iterable[NamedHash]) -> None:
        """Use a new set of hashes (a key added, changed or revoked while running).

        Cached answers stay valid for names whose hash did not change; a removed or re-issued
        name's cached successes go, and so do all cached failures (the key may be new).
        """
        fresh = list(hashes)
        old = {h.name: h.phc for h in self._hashes}
        new = {h.name: h.phc for h in fresh}
        stale = {name for name, phc in old.items() if new.get(name) != phc}
        self._hashes = fresh
        self._generation += 1
        for digest, entry in list(self._cache.items()):
            if entry.name is None or entry.name in stale:
                del self._cache[digest]

    def _match(self, key: str) -> str | None:
        found: str | None = None
        candidates = self._hashes
        if any(entry.tag for entry in candidates):  # one Argon2 per stored key, not one per key stored
            tag = hashlib.sha256(key.encode()).hexdigest()[:12]
            candidates = [entry for entry in candidates if not entry.tag or entry.tag == tag]
        for entry in candidates:  # check all, so timing does not tell which entry matched
            if verify_hash(entry.phc, key) and found is None:
                found = entry.name
        return found

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
