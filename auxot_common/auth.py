"""Keys, Argon2id hashes and the verifier that keeps hashing off the event loop.

Keys are ``rtr_`` (API callers) or ``adm_`` (GPU workers) followed by the unpadded base64url of
32 random bytes. Only Argon2id PHC hashes are stored (m=65536 KiB, t=3, p=4, the same format as
the Go router and the ``@auxot/cli`` npm tool). Several hashes may be configured per role, each
optionally named (``name:$argon2id$...``), separated by ``;`` or whitespace, so keys can be
rotated.

Verification costs 64 MiB and tens of milliseconds, so :class:`KeyVerifier`
- runs it in a small executor, never on the loop, with at most ``max_concurrent`` at once;
- caches results by SHA-256 of the presented key (never the key itself) in a bounded TTL cache
  that keeps a key in use warm;
- verifies each key once at a time, and limits the Argon2 work spent on unknown keys per
  client address, so a flood of wrong keys never delays a known key.
"""

from __future__ import annotations

import asyncio
import base64
import enum
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

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again (0 if it may now)."""
        tokens, _ = self._refill(client)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate if self._rate > 0 else 60.0

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


class Outcome(enum.Enum):
    VALID = "valid"
    INVALID = "invalid"
    LIMITED = "limited"  # not checked: this client's Argon2 budget for unknown keys is spent


@dataclass(frozen=True, slots=True)
class AuthResult:
    outcome: Outcome
    name: str | None = None  # the matching hash's name when VALID
    retry_after: float = 0.0  # when LIMITED


class KeyVerifier:
    """Verifies presented keys against one role's hashes, off the event loop, with a cache.

    What it limits is Argon2 work on keys it does not know, never requests with a known key:
    - a key verified once is answered from the cache, and its entry stays warm while it is used
      (its expiry moves with every use), so neither a flood of other keys nor the TTL ever puts
      it back in line behind Argon2;
    - one verification per key at a time (single flight): concurrent first requests with the
      same key share one result;
    - a key not in the cache costs Argon2 work, allowed per client by the failure limiter; only
      a verified mismatch is recorded as a failure (a refusal by the limiter is not);
    - at most ``max_pending`` distinct unknown keys wait for verification at once; beyond that
      new unknown keys are refused as LIMITED instead of queueing without bound.

    Parameters:
        hashes: the role's configured hashes.
        cache_ttl: seconds a result is reused; a valid key's entry is renewed on every use.
        cache_size: most results kept; the least recently used go first.
        max_concurrent: Argon2 computations at once (each takes 64 MiB).
        max_pending: distinct keys waiting for or in verification at once.
        limiter: per-client budget of failed verifications (shared by roles); a private one
            by default.
        executor: where hashing runs; a private pool of ``max_concurrent`` threads by default.
    """

    def __init__(
        self,
        hashes: Iterable[NamedHash],
        *,
        cache_ttl: float = 300.0,
        cache_size: int = 10_000,
        max_concurrent: int = 2,
        max_pending: int = 256,
        limiter: FailureLimiter | None = None,
        executor: Executor | None = None,
    ) -> None:
        self._hashes = list(hashes)
        self._ttl = cache_ttl
        self._size = cache_size
        self._max_pending = max_pending
        self._cache: OrderedDict[bytes, _CacheEntry] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[str | None]] = {}
        self.limiter = limiter or FailureLimiter()
        self._executor = executor or ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="argon2")
        self._slots = asyncio.Semaphore(max_concurrent)
        self.argon2_runs = 0  # verifications computed (for tests and diagnostics)
        self._generation = 0  # bumped by replace_hashes: an answer computed across it is not cached

    async def verify(self, key: str) -> str | None:
        """The name of the matching hash, or None if the key is invalid (no client limit)."""
        result = await self.authenticate(key, None)
        return result.name

    async def authenticate(self, key: str, client: str | None) -> AuthResult:
        """Check ``key`` for ``client`` (None: not limited). See the class doc for the rules."""
        if not key or len(key) > MAX_KEY_LENGTH or not self._hashes:
            return AuthResult(Outcome.INVALID)
        digest = hashlib.sha256(key.encode()).digest()
        now = time.monotonic()
        entry = self._cache.get(digest)
        if entry is not None and entry.expires > now:
            self._cache.move_to_end(digest)
            if entry.name is not None:
                entry.expires = now + self._ttl  # warm while used
                return AuthResult(Outcome.VALID, entry.name)
            return AuthResult(Outcome.INVALID)
        running = self._inflight.get(digest)
        if running is not None:  # someone is verifying this key already: share the answer
            name = await asyncio.shield(running)
            return AuthResult(Outcome.VALID, name) if name is not None else AuthResult(Outcome.INVALID)
        if client is not None and not self.limiter.allowed(client):
            return AuthResult(Outcome.LIMITED, retry_after=max(self.limiter.retry_after(client), 1.0))
        if len(self._inflight) >= self._max_pending:
            return AuthResult(Outcome.LIMITED, retry_after=1.0)
        # a task of its own: a first caller that goes away does not cancel the others' answer
        task = asyncio.ensure_future(self._verify_once(key, digest))
        self._inflight[digest] = task
        name = await asyncio.shield(task)
        if name is None:
            if client is not None:
                self.limiter.record_failure(client)
            return AuthResult(Outcome.INVALID)
        return AuthResult(Outcome.VALID, name)

    async def _verify_once(self, key: str, digest: bytes) -> str | None:
        try:
            generation = self._generation
            name = await self._compute(key)
            if generation != self._generation:  # the hashes changed meanwhile: answer, but do not remember
                return name if name is None or any(h.name == name for h in self._hashes) else None
            self._remember(digest, name)
            return name
        finally:
            self._inflight.pop(digest, None)

    async def _compute(self, key: str) -> str | None:
        async with self._slots:
            self.argon2_runs += 1
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._match, key)

    def _remember(self, digest: bytes, name: str | None) -> None:
        self._cache[digest] = _CacheEntry(name=name, expires=time.monotonic() + self._ttl)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)

    def forget_all(self) -> None:
        """Drop every cached result (after the configured hashes changed)."""
        self._cache.clear()

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
