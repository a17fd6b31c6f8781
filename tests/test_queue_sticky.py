"""Targeted streams (sticky conversations across router instances) against a real redis-server:
``read_jobs(targeted=True)``, ``forward``, ``bounce_stale``, ``ack`` of ``{key}|{id}`` entries and
the sweep of a dead instance's targeted stream (auxot_common/queue.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from auxot_common import protocol as proto
from auxot_common.queue import GROUP, StreamQueue
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)

MakeQueue = Callable[[str], Awaitable[StreamQueue]]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def make_queue(redis_server: RedisServer) -> AsyncIterator[MakeQueue]:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    clients: list[aioredis.Redis] = []

    async def make(instance_id: str) -> StreamQueue:
        client = aioredis.Redis.from_url(redis_server.url)
        clients.append(client)
        q = StreamQueue(client, instance_id=instance_id, prefix=prefix, server_blocking=True, shared=True)
        q.sticky = True
        await q.ensure_group()
        await q.beat_instance(30)
        return q

    yield make
    for client in clients:
        await client.aclose()


def job(job_id: str) -> proto.Job:
    return proto.Job(job_id=job_id, messages=[{"role": "user", "content": f"hello {job_id}"}])


async def enqueue(q: StreamQueue, job_id: str) -> None:
    j = job(job_id)
    await q.enqueue(j, proto.encode(j))


async def read_one(q: StreamQueue, targeted: bool = True) -> tuple[str, proto.Job]:
    entries = await q.read_jobs(10, timeout=0.2, targeted=targeted)
    assert len(entries) == 1, entries
    entry_id, read = entries[0]
    assert read is not None
    return entry_id, read


async def forward_one(a: StreamQueue, b: StreamQueue, job_id: str) -> None:
    """``a`` reads ``job_id`` from the shared stream and moves it to ``b``'s targeted stream."""
    await enqueue(a, job_id)
    entry_id, read = await read_one(a)
    assert a.may_forward(read.job_id)
    await a.forward(entry_id, read, proto.encode(read), b.instance_id)


async def test_a_forwarded_job_is_read_by_its_target_only_and_acked_on_its_stream(make_queue: MakeQueue) -> None:
    a, b = await make_queue("a"), await make_queue("b")
    await forward_one(a, b, "j1")
    assert await a.redis.xlen(a.stream_key()) == 0  # moved, not copied
    assert await a.read_jobs(10, timeout=0.1, targeted=True) == []  # not a's
    entry_id, read = await read_one(b)
    assert read.job_id == "j1"
    assert entry_id.startswith(f"{b.target_key()}|")
    assert not b.may_forward("j1")  # moved once: never again
    await b.ack([entry_id])
    assert await b.redis.xlen(b.target_key()) == 0
    pending = await b.redis.xpending(b.target_key(), GROUP)
    assert pending["pending"] == 0


async def test_untargeted_read_leaves_the_targeted_stream_alone(make_queue: MakeQueue) -> None:
    a, b = await make_queue("a"), await make_queue("b")
    await forward_one(a, b, "j1")
    assert await b.read_jobs(10, timeout=0.1, targeted=False) == []
    assert (await read_one(b))[1].job_id == "j1"


async def test_ack_mixes_shared_and_targeted_entries(make_queue: MakeQueue) -> None:
    a, b = await make_queue("a"), await make_queue("b")
    await forward_one(a, b, "j1")
    await enqueue(b, "j2")
    entries = await b.read_jobs(10, timeout=0.2, targeted=True)
    assert sorted(j.job_id for _, j in entries if j is not None) == ["j1", "j2"]
    await b.ack([entry_id for entry_id, _ in entries])
    assert await b.redis.xlen(b.target_key()) == 0
    assert await b.redis.xlen(b.stream_key()) == 0


async def test_a_stale_targeted_job_goes_back_to_the_shared_stream_once(make_queue: MakeQueue) -> None:
    a, b = await make_queue("a"), await make_queue("b")
    # b has read from its targeted stream before (its last-delivered id is not 0-0)
    await forward_one(a, b, "j0")
    entry_id, _ = await read_one(b)
    await b.ack([entry_id])
    await forward_one(a, b, "j1")
    assert await b.bounce_stale("", max_age_s=30.0) == 0  # still young
    await asyncio.sleep(0.3)
    assert await b.bounce_stale("", max_age_s=0.2) == 1
    assert await b.redis.xlen(b.target_key()) == 0
    _, read = await read_one(a)  # anyone may take it now, and nobody moves it again
    assert read.job_id == "j1"
    assert not a.may_forward("j1")


async def test_a_job_forwarded_twice_to_the_same_instance_is_bounced_the_second_time(make_queue: MakeQueue) -> None:
    """A re-queued job (its worker died) may be moved to the same instance again."""
    a, b = await make_queue("a"), await make_queue("b")
    await forward_one(a, b, "j1")
    entry_id, read = await read_one(b)
    await b.ack([entry_id])
    await b.enqueue(read, proto.encode(read))  # re-queued after worker loss, same job id
    entry_id, again = await read_one(a)
    assert a.may_forward(again.job_id)
    await a.forward(entry_id, again, proto.encode(again), b.instance_id)
    await asyncio.sleep(0.3)
    assert await b.bounce_stale("", max_age_s=0.2) == 1
    assert (await read_one(a))[1].job_id == "j1"


async def test_the_sweeper_takes_a_dead_instances_targeted_stream(make_queue: MakeQueue) -> None:
    a, b = await make_queue("a"), await make_queue("b")
    await forward_one(a, b, "read-by-b")
    await forward_one(a, b, "unread")
    # b reads the first only, then dies
    assert [j.job_id for _, j in await b.read_jobs(1, timeout=0.2, targeted=True) if j is not None] == ["read-by-b"]
    await b.drop_instance()
    claimed = await a.reclaim_from_dead_instances(min_idle_s=0)
    assert [j.job_id for _, j in claimed if j is not None] == ["read-by-b"]
    assert claimed[0][0].startswith(f"{b.target_key()}|")
    _, back = await read_one(a)
    assert back.job_id == "unread"
    assert not a.may_forward("unread")
    await a.ack([claimed[0][0]])
    assert await a.reclaim_from_dead_instances(min_idle_s=0) == []
    assert await a.redis.exists(b.target_key()) == 0  # emptied, then deleted by the next sweep


async def test_a_requeued_job_moved_to_an_instance_that_ran_it_from_the_shared_stream_is_bounced(
    make_queue: MakeQueue,
) -> None:
    """Its worker on ``a`` died: the owner ``b`` re-queues it, reads it and moves it to ``a``."""
    a, b = await make_queue("a"), await make_queue("b")
    await forward_one(b, a, "j0")  # a's targeted stream has been read before
    entry_id, _ = await read_one(a)
    await a.ack([entry_id])
    await enqueue(b, "j1")
    entry_id, read = await read_one(a)  # a reads it from the shared stream, its worker dies
    await a.ack([entry_id])
    await b.enqueue(read, proto.encode(read))
    entry_id, again = await read_one(b)
    assert b.may_forward("j1")
    await b.forward(entry_id, again, proto.encode(again), a.instance_id)
    await asyncio.sleep(0.3)
    assert await a.bounce_stale("", max_age_s=0.2) == 1
    assert (await read_one(b))[1].job_id == "j1"


async def test_jobs_read_by_an_instance_that_lost_its_worker_are_handed_back(make_queue: MakeQueue) -> None:
    """Its last worker went away while a read was in flight: shared and targeted entries go back
    to the shared stream (the targeted one marked: never moved again) and are finished where
    they were."""
    a, b = await make_queue("a"), await make_queue("b")
    await forward_one(b, a, "targeted")
    await enqueue(b, "shared")
    entries = await a.read_jobs(10, timeout=0.2, targeted=True)
    assert len(entries) == 2
    await a.hand_back("", [(entry_id, j) for entry_id, j in entries if j is not None])
    for key in (a.stream_key(), a.target_key()):
        assert (await a.redis.xpending(key, GROUP))["pending"] == 0
    assert await a.redis.xlen(a.target_key()) == 0
    taken = await b.read_jobs(10, timeout=0.2, targeted=True)
    assert sorted(j.job_id for _, j in taken if j is not None) == ["shared", "targeted"]
    assert b.may_forward("shared") and not b.may_forward("targeted")
