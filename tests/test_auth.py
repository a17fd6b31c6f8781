"""Tests for keys, Argon2id hashes, the cached off-loop verifier and the failure limiter."""

from __future__ import annotations

import asyncio
import base64
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from auxot_common import auth
from auxot_common.auth import (
    API_KEY_PREFIX,
    GPU_KEY_PREFIX,
    MAX_KEY_LENGTH,
    FailureLimiter,
    KeyVerifier,
    NamedHash,
    generate_key,
    hash_key,
    parse_hashes,
    verify_hash,
)

PHC_PREFIX = "$argon2id$v=19$m=65536,t=3,p=4$"
B64 = r"[A-Za-z0-9+/]+"  # PHC salt and hash: standard base64 without padding


@dataclass(frozen=True)
class KeyPair:
    key: str
    phc: str


@pytest.fixture(scope="module")
def alice() -> KeyPair:
    key = generate_key(API_KEY_PREFIX)
    return KeyPair(key, hash_key(key))


@pytest.fixture(scope="module")
def bob() -> KeyPair:
    key = generate_key(API_KEY_PREFIX)
    return KeyPair(key, hash_key(key))


class CountingVerify:
    """Stands in for ``auth.verify_hash``; counts calls (thread-safe: it runs in the executor)."""

    def __init__(self, inner: Callable[[str, str], bool]) -> None:
        self.inner = inner
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, phc: str, key: str) -> bool:
        with self._lock:
            self.calls += 1
        return self.inner(phc, key)


def fake_verify(phc: str, key: str) -> bool:
    """A fast stand-in: the "hash" of key k is ``fake$k``."""
    return phc == f"fake${key}"


# --- keys and hashes ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [API_KEY_PREFIX, GPU_KEY_PREFIX])
def test_generate_key_format(prefix: str) -> None:
    keys = {generate_key(prefix) for _ in range(50)}
    assert len(keys) == 50  # random
    for key in keys:
        assert re.fullmatch(re.escape(prefix) + r"[A-Za-z0-9_-]{43}", key), key
        assert len(key) == 47
        raw = base64.urlsafe_b64decode(key[len(prefix) :] + "=")
        assert len(raw) == 32


def test_prefixes() -> None:
    assert API_KEY_PREFIX == "rtr_"
    assert GPU_KEY_PREFIX == "adm_"


def test_hash_key_is_argon2id_phc_with_the_go_parameters(alice: KeyPair, bob: KeyPair) -> None:
    for phc in (alice.phc, bob.phc):
        assert phc.startswith(PHC_PREFIX)
        salt, digest = phc[len(PHC_PREFIX) :].split("$")
        assert re.fullmatch(B64, salt)
        assert re.fullmatch(B64, digest)
        assert len(base64.b64decode(salt + "==")) == 16
        assert len(base64.b64decode(digest + "==")) == 32
    assert alice.phc != bob.phc


def test_same_key_hashes_differently_each_time(alice: KeyPair) -> None:
    """A random salt per hash; both hashes verify."""
    second = hash_key(alice.key)
    assert second != alice.phc
    assert verify_hash(second, alice.key)


def test_verify_hash(alice: KeyPair, bob: KeyPair) -> None:
    assert verify_hash(alice.phc, alice.key) is True
    assert verify_hash(alice.phc, bob.key) is False
    assert verify_hash(alice.phc, alice.key + "x") is False


@pytest.mark.parametrize(
    "phc",
    [
        "",
        "not a hash",
        "$argon2id$v=19$m=65536,t=3,p=4$",
        "$argon2id$v=19$m=65536,t=3,p=4$!!!$???",
        "$bcrypt$whatever",
        "$2b$12$abcdefghijklmnopqrstuuJ7S3s9dKnh3o0n8cLAbKsq1cL3g1u",
    ],
)
def test_verify_hash_with_a_malformed_hash_is_false(phc: str, alice: KeyPair) -> None:
    assert verify_hash(phc, alice.key) is False


def test_verify_hash_with_a_corrupted_digest_is_false(alice: KeyPair) -> None:
    head, digest = alice.phc.rsplit("$", 1)
    flipped = ("B" if digest[0] == "A" else "A") + digest[1:]
    assert verify_hash(f"{head}${flipped}", alice.key) is False


# --- parse_hashes -----------------------------------------------------------------------------------


def test_parse_hashes_single_unnamed(alice: KeyPair) -> None:
    assert parse_hashes(alice.phc) == [NamedHash("key1", alice.phc)]


def test_parse_hashes_several_separated_by_semicolons_and_whitespace(alice: KeyPair, bob: KeyPair) -> None:
    value = f"  {alice.phc} ;\n\t{bob.phc};; {alice.phc}  "
    assert parse_hashes(value) == [
        NamedHash("key1", alice.phc),
        NamedHash("key2", bob.phc),
        NamedHash("key3", alice.phc),
    ]


def test_parse_hashes_names(alice: KeyPair, bob: KeyPair) -> None:
    value = f"alice:{alice.phc}; ci-runner:{bob.phc} {alice.phc}"
    assert parse_hashes(value) == [
        NamedHash("alice", alice.phc),
        NamedHash("ci-runner", bob.phc),
        NamedHash("key3", alice.phc),
    ]


def test_parse_hashes_strips_quotes_around_hashes(alice: KeyPair, bob: KeyPair) -> None:
    value = f"\"{alice.phc}\" '{bob.phc}' carol:'{alice.phc}'"
    assert parse_hashes(value) == [
        NamedHash("key1", alice.phc),
        NamedHash("key2", bob.phc),
        NamedHash("carol", alice.phc),
    ]


def test_parse_hashes_quoted_named_entry_has_a_clean_name(alice: KeyPair) -> None:
    """An env file read by docker compose keeps the quotes: ``X="alice:$argon2id$..."`` arrives
    with them. The hash already has its quotes stripped; the name, shown in logs, should too."""
    assert parse_hashes(f'"alice:{alice.phc}"') == [NamedHash("alice", alice.phc)]
    assert parse_hashes(f"'bob:{alice.phc}'") == [NamedHash("bob", alice.phc)]


def test_parse_hashes_empty_is_empty() -> None:
    assert parse_hashes("") == []
    assert parse_hashes(" ; ;\n") == []


@pytest.mark.parametrize(
    ("value", "bad_entry"),
    [
        ("plaintext-key", 1),
        ("$argon2i$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", 1),  # argon2i, not argon2id
        ("$2b$12$abcdefghijklmnopqrstuuJ7S3s9dKnh3o0n8cLAbKsq1cL3g1u", 1),  # bcrypt
        ("$argon2id$v=19$m=65536,t=3,p=4$c2FsdA", 1),  # hash part missing
        ("$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA$extra", 1),
        ("$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA;rtr_notahash", 2),
        ("name:", 1),
        ("name:rtr_abc", 1),
    ],
)
def test_parse_hashes_bad_entries_raise_value_error(value: str, bad_entry: int) -> None:
    with pytest.raises(ValueError, match=f"entry {bad_entry} is not an Argon2id PHC hash") as info:
        parse_hashes(value)
    assert "\n" not in str(info.value)


# --- KeyVerifier --------------------------------------------------------------------------------------


async def test_verifier_returns_the_name_for_a_valid_key(alice: KeyPair, bob: KeyPair) -> None:
    verifier = KeyVerifier([NamedHash("alice", alice.phc), NamedHash("bob", bob.phc)])
    try:
        assert await verifier.verify(bob.key) == "bob"
        assert await verifier.verify(alice.key) == "alice"
    finally:
        verifier.close()


async def test_verifier_returns_none_for_an_invalid_key(alice: KeyPair) -> None:
    verifier = KeyVerifier([NamedHash("alice", alice.phc)])
    try:
        assert await verifier.verify(generate_key(API_KEY_PREFIX)) is None
        assert await verifier.verify(alice.key[:-1]) is None
        assert await verifier.verify("") is None
    finally:
        verifier.close()


async def test_verifier_with_no_hashes_accepts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingVerify(fake_verify)
    monkeypatch.setattr(auth, "verify_hash", counter)
    verifier = KeyVerifier([])
    try:
        assert await verifier.verify("rtr_anything") is None
    finally:
        verifier.close()
    assert counter.calls == 0


async def test_overlong_key_is_rejected_without_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingVerify(fake_verify)
    monkeypatch.setattr(auth, "verify_hash", counter)
    long_key = "rtr_" + "A" * 10_000
    verifier = KeyVerifier([NamedHash("long", f"fake${long_key}")])
    try:
        assert await verifier.verify(long_key) is None
        assert await verifier.verify("rtr_" + "A" * (MAX_KEY_LENGTH - 3)) is None  # 257 characters
        assert counter.calls == 0
        edge = "k" * MAX_KEY_LENGTH  # exactly 256 is still hashed
        assert await verifier.verify(edge) is None
        assert counter.calls == 1
    finally:
        verifier.close()


async def test_cache_avoids_rehashing_valid_and_invalid_keys(monkeypatch: pytest.MonkeyPatch, alice: KeyPair) -> None:
    counter = CountingVerify(verify_hash)
    monkeypatch.setattr(auth, "verify_hash", counter)
    verifier = KeyVerifier([NamedHash("alice", alice.phc)])
    wrong = generate_key(API_KEY_PREFIX)
    try:
        assert await verifier.verify(alice.key) == "alice"
        assert counter.calls == 1
        for _ in range(5):
            assert await verifier.verify(alice.key) == "alice"
        assert counter.calls == 1
        assert await verifier.verify(wrong) is None
        assert counter.calls == 2
        assert await verifier.verify(wrong) is None  # negative results are cached too
        assert counter.calls == 2
    finally:
        verifier.close()


async def test_every_hash_is_checked_so_timing_does_not_tell_which_matched(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingVerify(fake_verify)
    monkeypatch.setattr(auth, "verify_hash", counter)
    verifier = KeyVerifier([NamedHash("a", "fake$ka"), NamedHash("b", "fake$kb"), NamedHash("c", "fake$kc")])
    try:
        assert await verifier.verify("ka") == "a"
        assert counter.calls == 3
        assert await verifier.verify("kc") == "c"
        assert counter.calls == 6
    finally:
        verifier.close()


async def test_cache_is_bounded_and_evicts_the_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingVerify(fake_verify)
    monkeypatch.setattr(auth, "verify_hash", counter)
    names = ["k1", "k2", "k3", "k4"]
    verifier = KeyVerifier([NamedHash(n, f"fake${n}") for n in names], cache_size=3)

    async def hashes_for(key: str) -> int:
        before = counter.calls
        assert await verifier.verify(key) == key
        return (counter.calls - before) // len(names)  # 1 if it was hashed, 0 if cached

    try:
        assert [await hashes_for(k) for k in ("k1", "k2", "k3")] == [1, 1, 1]
        assert await hashes_for("k1") == 0  # k1 is now the most recently used; k2 the least
        assert await hashes_for("k4") == 1  # a 4th key evicts k2
        assert await hashes_for("k1") == 0
        assert await hashes_for("k3") == 0
        assert await hashes_for("k4") == 0
        assert await hashes_for("k2") == 1  # was evicted: hashed again (and evicts k1 now)
        assert await hashes_for("k1") == 1
    finally:
        verifier.close()


async def test_cache_entries_expire_after_the_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingVerify(fake_verify)
    monkeypatch.setattr(auth, "verify_hash", counter)
    verifier = KeyVerifier([NamedHash("k", "fake$k")], cache_ttl=0.2)
    try:
        assert await verifier.verify("k") == "k"
        assert await verifier.verify("nope") is None
        assert counter.calls == 2
        await asyncio.sleep(0.05)
        assert await verifier.verify("k") == "k"
        assert await verifier.verify("nope") is None
        assert counter.calls == 2  # still fresh
        await asyncio.sleep(0.25)
        assert await verifier.verify("k") == "k"
        assert await verifier.verify("nope") is None
        assert counter.calls == 4  # recomputed after the TTL
    finally:
        verifier.close()


async def test_a_revoked_hash_stops_matching_after_the_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TTL is what bounds how long a cached answer outlives a change of the hash itself."""
    valid = {"fake$k"}
    counter = CountingVerify(lambda phc, key: phc in valid and phc == f"fake${key}")
    monkeypatch.setattr(auth, "verify_hash", counter)
    verifier = KeyVerifier([NamedHash("k", "fake$k")], cache_ttl=0.1)
    try:
        assert await verifier.verify("k") == "k"
        valid.clear()
        assert await verifier.verify("k") == "k"  # cached
        await asyncio.sleep(0.15)
        assert await verifier.verify("k") is None
    finally:
        verifier.close()


async def test_verification_does_not_block_the_event_loop(alice: KeyPair) -> None:
    verifier = KeyVerifier([NamedHash("alice", alice.phc)])
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await asyncio.sleep(0)
        started = time.monotonic()
        name = await verifier.verify(alice.key)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        await task
        verifier.close()
    assert name == "alice"
    assert elapsed > 0.02  # a real Argon2id computation ran
    # had the hash run on the loop, the ticker would have ticked at most once or twice
    assert ticks >= 10, (ticks, elapsed)


async def test_concurrent_verifications_are_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    def slow_verify(phc: str, key: str) -> bool:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.03)
        with lock:
            running -= 1
        return phc == f"fake${key}"

    monkeypatch.setattr(auth, "verify_hash", slow_verify)
    verifier = KeyVerifier([NamedHash("k", "fake$k")], max_concurrent=2)
    try:
        results = await asyncio.gather(*(verifier.verify(f"key{i}") for i in range(8)))
    finally:
        verifier.close()
    assert results == [None] * 8
    assert peak == 2


# --- FailureLimiter ---------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(auth.time, "monotonic", fake)
    return fake


def test_failure_limiter_allows_a_burst_then_blocks(clock: FakeClock) -> None:
    limiter = FailureLimiter(burst=5, per_minute=30)
    for _ in range(5):
        assert limiter.allowed("10.0.0.1")
        limiter.record_failure("10.0.0.1")
    assert not limiter.allowed("10.0.0.1")
    assert limiter.allowed("10.0.0.2")  # per client address


def test_failure_limiter_refills_at_the_rate(clock: FakeClock) -> None:
    limiter = FailureLimiter(burst=3, per_minute=30)  # one token every 2 s
    for _ in range(3):
        limiter.record_failure("c")
    assert not limiter.allowed("c")
    clock.now += 1.0
    assert not limiter.allowed("c")  # half a token
    clock.now += 1.1
    assert limiter.allowed("c")
    limiter.record_failure("c")
    assert not limiter.allowed("c")
    clock.now += 3600
    for _ in range(3):  # refills up to the burst, not beyond
        assert limiter.allowed("c")
        limiter.record_failure("c")
    assert not limiter.allowed("c")


def test_failure_limiter_checking_does_not_consume(clock: FakeClock) -> None:
    limiter = FailureLimiter(burst=1, per_minute=1)
    for _ in range(100):
        assert limiter.allowed("c")
    limiter.record_failure("c")
    assert not limiter.allowed("c")


def test_failure_limiter_is_bounded(clock: FakeClock) -> None:
    limiter = FailureLimiter(burst=1, per_minute=0.001, max_clients=3)
    for client in ("a", "b", "c"):
        limiter.record_failure(client)
        clock.now += 1
    assert not any(limiter.allowed(c) for c in ("a", "b", "c"))
    limiter.record_failure("d")  # a 4th client pushes out the oldest, "a"
    assert len(limiter._buckets) == 3
    assert limiter.allowed("a")
    assert not limiter.allowed("b")
    assert not limiter.allowed("d")
    for i in range(1000):
        limiter.record_failure(f"flood-{i}")
    assert len(limiter._buckets) == 3
