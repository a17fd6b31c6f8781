"""Tests for the Redis Streams job queue and relay (``auxot_common.queue``) on the embedded store.

Real-Redis behaviour (server-side ``BLOCK``) is covered elsewhere; here every queue runs on
``fakeredis`` with ``server_blocking=False``, as the router does in embedded mode.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable

import fakeredis
import orjson
import pytest

from auxot_common import protocol as proto
from auxot_common.queue import GROUP, RELAY_ENTRY_BYTES, RelayPublisher, StreamQueue

_counter = itertools.count()


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def prefix() -> str:
    return f"test{next(_counter)}-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def make_queue(server: fakeredis.FakeServer, prefix: str) -> AsyncIterator[Callable[[str], StreamQueue]]:
    """Queues of several router instances sharing one (fake) Redis."""
    clients: list[fakeredis.FakeAsyncRedis] = []

    def make(instance_id: str) -> StreamQueue:
        client = fakeredis.FakeAsyncRedis(server=server)
        clients.append(client)
        return StreamQueue(client, instance_id=instance_id, prefix=prefix, server_blocking=False, shared=True)

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def queue(make_queue: Callable[[str], StreamQueue]) -> StreamQueue:
    q = make_queue("instance-a")
    await q.ensure_group()
    return q


def job(job_id: str, **kwargs: object) -> proto.Job:
    return proto.Job(job_id=job_id, messages=[{"role": "user", "content": f"hello {job_id}"}], **kwargs)  # type: ignore[arg-type]


async def enqueue(q: StreamQueue, job_id: str) -> str:
    j = job(job_id)
    return await q.enqueue(j, proto.encode(j))


# --- jobs -------------------------------------------------------------------------------------------


async def test_ensure_group_is_idempotent(queue: StreamQueue) -> None:
    await queue.ensure_group()
    await queue.ensure_group()
    groups = await queue.redis.xinfo_groups(queue.jobs_key)
    assert [g["name"] for g in groups] == [GROUP.encode()]


async def test_ensure_group_keeps_jobs_that_were_already_queued(make_queue: Callable[[str], StreamQueue]) -> None:
    q = make_queue("a")
    await q.ensure_group()
    await enqueue(q, "j1")
    other = make_queue("b")
    await other.ensure_group()  # a second instance starting up must not reset the group
    assert await other.depth() == 1
    assert [j.job_id for _, j in await other.read_jobs(10, 0.1) if j] == ["j1"]


async def test_enqueue_counts_in_depth(queue: StreamQueue) -> None:
    assert await queue.depth() == 0
    first = await enqueue(queue, "j1")
    second = await enqueue(queue, "j2")
    assert first != second
    assert await queue.depth() == 2


async def test_read_jobs_returns_jobs_in_order_and_depth_drops(queue: StreamQueue) -> None:
    ids = [await enqueue(queue, f"j{i}") for i in range(3)]
    original = job("j0", temperature=0.5, stream=True)
    ids.append(await queue.enqueue(original, proto.encode(original)))
    entries = await queue.read_jobs(2, timeout=1.0)
    assert [entry_id for entry_id, _ in entries] == ids[:2]
    assert all(isinstance(j, proto.Job) for _, j in entries)
    assert [j.job_id for _, j in entries if j] == ["j0", "j1"]
    assert entries[0][1] is not None
    assert entries[0][1].messages == [{"role": "user", "content": "hello j0"}]
    assert await queue.depth() == 2  # delivered entries no longer wait
    rest = await queue.read_jobs(10, timeout=1.0)
    assert [entry_id for entry_id, _ in rest] == ids[2:]
    assert rest[1][1] == original  # the job comes back whole
    assert await queue.depth() == 0


async def test_read_jobs_never_rereads_own_pending_entries(queue: StreamQueue) -> None:
    await enqueue(queue, "j1")
    assert len(await queue.read_jobs(5, timeout=0.5)) == 1
    started = time.monotonic()
    assert await queue.read_jobs(5, timeout=0.1) == []
    assert time.monotonic() - started >= 0.09


async def test_read_jobs_wakes_when_a_job_is_enqueued(queue: StreamQueue) -> None:
    async def later() -> None:
        await asyncio.sleep(0.05)
        await enqueue(queue, "late")

    producer = asyncio.create_task(later())
    started = time.monotonic()
    entries = await queue.read_jobs(1, timeout=5.0)
    waited = time.monotonic() - started
    await producer
    assert [j.job_id for _, j in entries if j] == ["late"]
    assert 0.04 <= waited < 1.0


async def test_read_jobs_returns_empty_after_its_timeout(queue: StreamQueue) -> None:
    started = time.monotonic()
    assert await queue.read_jobs(3, timeout=0.15) == []
    waited = time.monotonic() - started
    assert 0.14 <= waited < 1.0


async def test_ack_removes_the_entry(queue: StreamQueue) -> None:
    await enqueue(queue, "j1")
    await enqueue(queue, "j2")
    entries = await queue.read_jobs(2, timeout=1.0)
    assert await queue.redis.xlen(queue.jobs_key) == 2
    assert (await queue.redis.xpending(queue.jobs_key, GROUP))["pending"] == 2
    await queue.ack([entries[0][0]])
    assert await queue.redis.xlen(queue.jobs_key) == 1
    assert (await queue.redis.xpending(queue.jobs_key, GROUP))["pending"] == 1
    await queue.ack([entries[1][0]])
    assert await queue.redis.xlen(queue.jobs_key) == 0
    pending = await queue.redis.xpending(queue.jobs_key, GROUP)
    assert pending["pending"] == 0
    assert await queue.depth() == 0
    await queue.ack([])  # nothing to do, no error


async def test_unreadable_entry_comes_back_as_none(queue: StreamQueue) -> None:
    await queue.redis.xadd(queue.jobs_key, {"job_id": "bad", "data": b"{not json"})
    await queue.redis.xadd(queue.jobs_key, {"job_id": "nodata"})
    wrong_type = proto.encode(proto.Cancel(job_id="c"))  # valid message, but not a job
    await queue.redis.xadd(queue.jobs_key, {"job_id": "c", "data": wrong_type})
    good = await enqueue(queue, "good")
    entries = await queue.read_jobs(10, timeout=1.0)
    assert len(entries) == 4
    assert [j for _, j in entries[:3]] == [None, None, None]
    assert all(isinstance(entry_id, str) and entry_id for entry_id, _ in entries)
    assert entries[3][0] == good
    assert entries[3][1] is not None
    assert entries[3][1].job_id == "good"
    await queue.ack([entry_id for entry_id, _ in entries[:3]])  # the caller can drop them
    assert await queue.redis.xlen(queue.jobs_key) == 1


# --- cancellation -----------------------------------------------------------------------------------


async def test_cancelled_markers(queue: StreamQueue) -> None:
    assert await queue.cancelled([]) == set()
    assert await queue.cancelled(["j1", "j2"]) == set()
    await queue.mark_cancelled("j2")
    await queue.mark_cancelled("j3")
    assert await queue.cancelled(["j1", "j2", "j3"]) == {"j2", "j3"}
    ttl = await queue.redis.ttl(f"{queue.prefix}cancelled:j2")
    assert 0 < ttl <= 3600  # markers do not pile up forever


async def test_cancelled_markers_are_shared_between_instances(make_queue: Callable[[str], StreamQueue]) -> None:
    a, b = make_queue("a"), make_queue("b")
    await a.mark_cancelled("job")
    assert await b.cancelled(["job", "other"]) == {"job"}


# --- relay ------------------------------------------------------------------------------------------


def relayed(entries: list[bytes]) -> list[proto.Message]:
    """The messages in inbox entries, in order (the messages of one publish share a batch)."""
    out: list[proto.Message] = []
    for raw in entries:
        message = proto.decode(raw)
        out.extend(message.messages if isinstance(message, proto.Batch) else [message])
    return out


def tokens(*texts: str) -> list[bytes]:
    return [proto.encode(proto.Token(job_id="j", token=text)) for text in texts]


async def test_publish_then_read_inbox_in_order_and_deleted(make_queue: Callable[[str], StreamQueue]) -> None:
    a, b = make_queue("a"), make_queue("b")
    payloads = tokens(*"01234")
    await a.publish({"b": payloads[:3]})
    await a.publish({"b": payloads[3:]})
    entries = await b.read_inbox(timeout=1.0)
    assert relayed(entries) == [proto.decode(p) for p in payloads]
    assert len(entries) == 2  # one entry per publish: a loop turn's messages share one
    assert await b.read_inbox(timeout=0.05) == []  # not read twice
    assert await b.redis.xlen(b.inbox_key("b")) == 0  # read entries are deleted (with the next read)
    assert await a.read_inbox(timeout=0.05) == []  # a's own inbox is untouched


async def test_publish_to_several_instances(make_queue: Callable[[str], StreamQueue]) -> None:
    a, b, c = make_queue("a"), make_queue("b"), make_queue("c")
    await a.publish({"b": tokens("to-b-1", "to-b-2"), "c": tokens("to-c")})
    assert relayed(await b.read_inbox(timeout=1.0)) == [proto.decode(p) for p in tokens("to-b-1", "to-b-2")]
    assert relayed(await c.read_inbox(timeout=1.0)) == [proto.decode(p) for p in tokens("to-c")]
    ttl = await a.redis.ttl(a.inbox_key("b"))
    assert ttl == -2 or 0 < ttl <= 600  # (deleted once empty, or expiring)


async def test_inbox_keeps_order_across_reads(make_queue: Callable[[str], StreamQueue]) -> None:
    a, b = make_queue("a"), make_queue("b")
    await a.publish({"b": tokens("1", "2")})
    assert relayed(await b.read_inbox(timeout=1.0)) == [proto.decode(p) for p in tokens("1", "2")]
    await a.publish({"b": tokens("3")})
    await a.publish({"b": tokens("4")})
    assert relayed(await b.read_inbox(timeout=1.0)) == [proto.decode(p) for p in tokens("3", "4")]


async def test_a_large_relay_batch_is_split_into_bounded_entries_in_order(
    make_queue: Callable[[str], StreamQueue],
) -> None:
    a, b = make_queue("a"), make_queue("b")
    payloads = tokens(*(f"{i:04d}" + "x" * 10_000 for i in range(100)))  # ~1 MB in one loop turn
    await a.publish({"b": payloads})
    entries = await b.read_inbox(timeout=1.0)
    assert relayed(entries) == [proto.decode(p) for p in payloads]
    assert 1 < len(entries) < len(payloads)
    assert max(len(e) for e in entries) <= RELAY_ENTRY_BYTES + 2 * len(payloads[0])


async def test_read_inbox_wakes_on_publish(make_queue: Callable[[str], StreamQueue]) -> None:
    a = make_queue("a")

    async def later() -> None:
        await asyncio.sleep(0.05)
        await a.publish({"a": tokens("hello")})

    publisher = asyncio.create_task(later())
    started = time.monotonic()
    got = await a.read_inbox(timeout=5.0)
    waited = time.monotonic() - started
    await publisher
    assert relayed(got) == [proto.decode(p) for p in tokens("hello")]
    assert 0.04 <= waited < 1.0


async def test_read_inbox_returns_empty_after_its_timeout(make_queue: Callable[[str], StreamQueue]) -> None:
    a = make_queue("a")
    started = time.monotonic()
    assert await a.read_inbox(timeout=0.1) == []
    assert 0.09 <= time.monotonic() - started < 1.0


async def test_relay_publisher_batches_and_preserves_order(
    make_queue: Callable[[str], StreamQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = make_queue("a"), make_queue("b"), make_queue("c")
    calls: list[dict[str, list[bytes]]] = []
    original = a.publish

    async def counting(batches: dict[str, list[bytes]]) -> None:
        calls.append({k: list(v) for k, v in batches.items()})
        await original(batches)

    monkeypatch.setattr(a, "publish", counting)
    relay = RelayPublisher(a)
    for i in range(50):
        relay.send("b", tokens(f"b{i}")[0])
        if i % 5 == 0:
            relay.send("c", tokens(f"c{i}")[0])
    await relay.close()
    assert len(calls) == 1  # everything sent in one loop turn goes out in one pipeline
    assert relayed(await b.read_inbox(timeout=1.0)) == [proto.decode(p) for p in tokens(*(f"b{i}" for i in range(50)))]
    assert relayed(await c.read_inbox(timeout=1.0)) == [
        proto.decode(p) for p in tokens(*(f"c{i}" for i in range(0, 50, 5)))
    ]

    # sends arriving while a flush is in flight go out in the next one, still in order
    for i in range(3):
        relay.send("b", tokens(f"x{i}")[0])
    await asyncio.sleep(0)
    for i in range(3, 6):
        relay.send("b", tokens(f"x{i}")[0])
    await relay.close()
    assert 2 <= len(calls) <= 3
    assert relayed(await b.read_inbox(timeout=1.0)) == [proto.decode(p) for p in tokens(*(f"x{i}" for i in range(6)))]


async def test_relay_publisher_survives_a_failed_flush(
    make_queue: Callable[[str], StreamQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_queue("a"), make_queue("b")
    original = a.publish
    failures = [True]

    async def flaky(batches: dict[str, list[bytes]]) -> None:
        if failures.pop(0) if failures else False:
            raise ConnectionError("redis went away")
        await original(batches)

    monkeypatch.setattr(a, "publish", flaky)
    relay = RelayPublisher(a)
    relay.send("b", tokens("lost")[0])
    await relay.close()
    relay.send("b", tokens("delivered")[0])
    await relay.close()
    assert relayed(await b.read_inbox(timeout=1.0)) == [proto.decode(p) for p in tokens("delivered")]


# --- liveness ---------------------------------------------------------------------------------------


async def test_instance_liveness(make_queue: Callable[[str], StreamQueue]) -> None:
    a, b = make_queue("a"), make_queue("b")
    assert not await b.instance_alive("a")
    await a.beat_instance(ttl_s=0.15)
    assert await b.instance_alive("a")
    await asyncio.sleep(0.25)
    assert not await b.instance_alive("a")
    await a.beat_instance(ttl_s=5)
    await a.drop_instance()
    assert not await b.instance_alive("a")


async def test_cluster_workers_lists_and_expires(make_queue: Callable[[str], StreamQueue]) -> None:
    a, b = make_queue("a"), make_queue("b")
    assert await a.cluster_workers() == []
    await a.beat_worker("w1", {"worker_id": "w1", "instance": "a", "slots": 2}, ttl_s=0.2)
    await b.beat_worker("w2", {"worker_id": "w2", "instance": "b", "slots": 4}, ttl_s=5.0)
    workers = sorted(await a.cluster_workers(), key=lambda w: w["worker_id"])
    assert workers == [
        {"worker_id": "w1", "instance": "a", "slots": 2},
        {"worker_id": "w2", "instance": "b", "slots": 4},
    ]
    await asyncio.sleep(0.3)
    assert await b.cluster_workers() == [{"worker_id": "w2", "instance": "b", "slots": 4}]
    await b.drop_worker("w2")
    assert await a.cluster_workers() == []


async def test_a_heartbeat_refreshes_the_worker_ttl(queue: StreamQueue) -> None:
    await queue.beat_worker("w", {"worker_id": "w"}, ttl_s=0.2)
    for _ in range(3):
        await asyncio.sleep(0.1)
        await queue.beat_worker("w", {"worker_id": "w"}, ttl_s=0.2)
    assert await queue.cluster_workers() == [{"worker_id": "w"}]


async def test_cluster_workers_ignores_other_prefixes(server: fakeredis.FakeServer, queue: StreamQueue) -> None:
    other_client = fakeredis.FakeAsyncRedis(server=server)
    try:
        other = StreamQueue(other_client, instance_id="x", prefix="other-cluster:", server_blocking=False)
        await other.beat_worker("foreign", {"worker_id": "foreign"}, ttl_s=5)
        await queue.beat_worker("mine", {"worker_id": "mine"}, ttl_s=5)
        assert await queue.cluster_workers() == [{"worker_id": "mine"}]
    finally:
        await other_client.aclose()


async def test_cluster_workers_info_survives_json(queue: StreamQueue) -> None:
    info = {"worker_id": "w", "capabilities": {"model": "m", "ctx_size": 4096}, "gpus": [{"name": "H100"}]}
    await queue.beat_worker("w", info, ttl_s=5)
    raw = await queue.redis.get(f"{queue.prefix}worker:w")
    assert orjson.loads(raw) == info
    assert await queue.cluster_workers() == [info]


# --- recovery ---------------------------------------------------------------------------------------


async def test_reclaim_from_a_dead_instance_after_min_idle(make_queue: Callable[[str], StreamQueue]) -> None:
    a, b = make_queue("a"), make_queue("b")
    await a.ensure_group()
    ids = [await enqueue(a, "j1"), await enqueue(a, "j2")]
    await a.beat_instance(ttl_s=0.1)
    taken = await a.read_jobs(5, timeout=1.0)  # instance a takes both jobs ...
    assert [entry_id for entry_id, _ in taken] == ids

    await b.beat_instance(ttl_s=5)
    assert await b.reclaim_from_dead_instances(min_idle_s=0.2) == []  # a is alive
    await asyncio.sleep(0.12)  # ... and dies: its liveness key expires
    assert not await b.instance_alive("a")
    assert await b.reclaim_from_dead_instances(min_idle_s=0.3) == []  # not idle long enough yet
    await asyncio.sleep(0.2)
    claimed = await b.reclaim_from_dead_instances(min_idle_s=0.3)
    assert [entry_id for entry_id, _ in claimed] == ids
    assert [j.job_id for _, j in claimed if j] == ["j1", "j2"]

    pending = await b.redis.xpending_range(b.jobs_key, GROUP, min="-", max="+", count=10)
    assert {p["consumer"] for p in pending} == {b"b"}  # now b's, to finish and ack
    consumers = await b.redis.xinfo_consumers(b.jobs_key, GROUP)
    assert b"a" not in {c["name"] for c in consumers}  # the dead consumer is cleaned up
    assert await b.depth() == 0  # reclaimed jobs are not counted as waiting twice
    await b.ack(ids)
    assert await b.redis.xlen(b.jobs_key) == 0


async def test_a_live_instance_never_reclaims_its_own_jobs(queue: StreamQueue) -> None:
    await enqueue(queue, "j1")
    await queue.read_jobs(1, timeout=1.0)
    await asyncio.sleep(0.05)
    assert await queue.reclaim_from_dead_instances(min_idle_s=0.01) == []


async def test_racing_reclaimers_take_a_job_only_once(
    make_queue: Callable[[str], StreamQueue], monkeypatch: pytest.MonkeyPatch
) -> None:
    """B and C both see A's idle entry; B claims first. C's XCLAIM, with the min-idle guard, must
    then get nothing, because B's claim reset the entry's idle time."""
    a, b, c = make_queue("a"), make_queue("b"), make_queue("c")
    await a.ensure_group()
    entry_id = await enqueue(a, "job")
    assert len(await a.read_jobs(1, timeout=1.0)) == 1
    await b.beat_instance(ttl_s=5)
    await c.beat_instance(ttl_s=5)
    await asyncio.sleep(0.15)

    b_claimed: list[tuple[str, proto.Job | None]] = []
    original_xclaim = c.redis.xclaim

    async def b_wins_the_race(*args: object, **kwargs: object) -> object:
        # C has already listed A's pending entry as idle enough; B's sweeper gets there first.
        b_claimed.extend(await b.reclaim_from_dead_instances(min_idle_s=0.1))
        return await original_xclaim(*args, **kwargs)

    monkeypatch.setattr(c.redis, "xclaim", b_wins_the_race)
    c_claimed = await c.reclaim_from_dead_instances(min_idle_s=0.1)
    assert [eid for eid, _ in b_claimed] == [entry_id]
    assert c_claimed == []
    pending = await a.redis.xpending_range(a.jobs_key, GROUP, min="-", max="+", count=10)
    assert [(p["message_id"].decode(), p["consumer"]) for p in pending] == [(entry_id, b"b")]


async def test_reclaimer_right_after_a_claim_gets_nothing(make_queue: Callable[[str], StreamQueue]) -> None:
    a, b, c = make_queue("a"), make_queue("b"), make_queue("c")
    await a.ensure_group()
    await enqueue(a, "job")
    await a.read_jobs(1, timeout=1.0)
    await asyncio.sleep(0.15)
    assert len(await b.reclaim_from_dead_instances(min_idle_s=0.1)) == 1
    # b has no liveness key either, but its claim is fresh: c cannot take the job from it
    assert await c.reclaim_from_dead_instances(min_idle_s=0.1) == []


async def test_private_queue_counts_waiting_jobs_without_redis() -> None:
    """The embedded queue belongs to one process, so its depth needs no round trip, and stays
    exact through enqueue and read."""
    client = fakeredis.FakeAsyncRedis()
    q = StreamQueue(client, instance_id="solo", prefix="solo:", server_blocking=False)
    await q.ensure_group()
    for job_id in ("a", "b", "c"):
        await enqueue(q, job_id)
    assert await q.depth() == 3
    assert len(await q.read_jobs(2, 0.1)) == 2
    assert await q.depth() == 1
    assert await q.redis.xlen(q.jobs_key) == 3  # read jobs stay pending until acknowledged
    await client.aclose()
