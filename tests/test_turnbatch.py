"""Tests for the per-loop-turn coalescer (``auxot_common.turnbatch``) and its use by the job queue:
jobs queued together reach Redis in one pipeline and each caller still gets its own entry."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest

from auxot_common import protocol as proto
from auxot_common.queue import StreamQueue
from auxot_common.turnbatch import TurnBatch


async def test_callers_of_one_turn_share_one_flush_and_each_gets_its_result() -> None:
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushed.append(items)
        return [item * 10 for item in items]

    batch: TurnBatch[int, int] = TurnBatch(flush)
    results = await asyncio.gather(*(batch.submit(i) for i in range(32)))
    assert results == [i * 10 for i in range(32)]
    assert flushed == [list(range(32))]
    # a later caller, alone in its turn, gets a batch of its own
    assert await batch.submit(7) == 70
    assert flushed[-1] == [7] and batch.batches == 2 and batch.items == 33


async def test_a_per_item_error_goes_to_its_caller_only() -> None:
    async def flush(items: list[int]) -> list[int | BaseException]:
        return [ValueError(f"bad {item}") if item == 2 else item for item in items]

    batch: TurnBatch[int, int] = TurnBatch(flush)
    results = await asyncio.gather(*(batch.submit(i) for i in range(4)), return_exceptions=True)
    assert results[:2] == [0, 1] and results[3] == 3
    assert isinstance(results[2], ValueError) and str(results[2]) == "bad 2"


async def test_a_failed_flush_fails_every_caller_of_the_batch() -> None:
    async def flush(items: list[int]) -> list[int]:
        raise ConnectionError("store away")

    batch: TurnBatch[int, int] = TurnBatch(flush)
    results = await asyncio.gather(*(batch.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_cancelled_first_caller_does_not_strand_the_others() -> None:
    async def flush(items: list[int]) -> list[int]:
        return items

    batch: TurnBatch[int, int] = TurnBatch(flush)
    first = asyncio.ensure_future(batch.submit(1))
    await asyncio.sleep(0)  # first is waiting for its batch
    second = asyncio.ensure_future(batch.submit(2))
    first.cancel()
    assert await second == 2
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_full_batch_is_flushed_and_the_next_callers_start_another() -> None:
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushed.append(items)
        return items

    batch: TurnBatch[int, int] = TurnBatch(flush, max_items=4)
    assert await asyncio.gather(*(batch.submit(i) for i in range(10))) == list(range(10))
    assert [len(b) for b in flushed] == [4, 4, 2]


async def test_jobs_queued_together_go_in_one_pipeline_and_are_all_read_in_order() -> None:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    queue = StreamQueue(client, instance_id="a", prefix="tb:", server_blocking=False)
    await queue.ensure_group()
    jobs = [proto.Job(job_id=f"j{i}", messages=[{"role": "user", "content": f"hi {i}"}]) for i in range(32)]
    entry_ids = await asyncio.gather(*(queue.enqueue(j, proto.encode(j)) for j in jobs))
    assert len(set(entry_ids)) == 32
    assert queue._adds.batches == 1  # one round trip for the 32
    assert await queue.depth() == 32
    read = await queue.read_jobs(64, timeout=1.0)
    assert [job.job_id for _, job in read if job is not None] == [j.job_id for j in jobs]
    assert [entry_id for entry_id, _ in read] == list(entry_ids)
    await client.aclose()
