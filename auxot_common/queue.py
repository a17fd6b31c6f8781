"""The job queue and the router-to-router relay, on Redis Streams.

Keys (``prefix`` defaults to ``auxot:``):

==============================  ======  ===========================================================
``{p}jobs:{model_key}``          stream  one per model: ``job_id``, ``data`` (the job message);
                                         ``{p}jobs`` for jobs that name no model, and for the one
                                         model of a router configured with ``AUXOT_MODEL``
group ``workers`` on each        group   one consumer per *router instance* (see below)
``{p}inbox:{instance}``          stream  relay of job events to the instance holding the caller
``{p}cancelled:{job_id}``        string  set when a caller gave up; dispatch skips the job
``{p}instance:{instance}``       string  the instance is alive (TTL); the sweeper reads it
``{p}worker:{worker_id}``        string  JSON about a connected worker (TTL, refreshed only by the
                                         worker's own heartbeats); ``/health`` lists the cluster
``{stream}@{instance}``          stream  *targeted*: jobs of that model another instance moved to
                                         this one because one of its workers holds their prompt
                                         (``sticky``; :mod:`auxot_common.affinity`); same group
==============================  ======  ===========================================================

Targeted streams (only with ``sticky``, a shared Redis and cache-aware routing): read in the same
``XREADGROUP`` as the shared stream, but only while the pool has a free slot; entries not taken
within the hold bound go back to the shared stream marked ``hop`` (never forwarded again); a dead
instance's targeted stream is swept like its shared-stream pending list (pending entries are
reclaimed, undelivered ones moved back to the shared stream). A move between streams is one
MULTI/EXEC (XADD + XACK + XDEL), so a job is in exactly one place. Entry ids of a targeted
stream travel as ``{key}|{id}`` so that :meth:`StreamQueue.ack` finishes them on their stream.

Why one consumer per router instance rather than per worker (the Go design): the instance holding
worker sockets reads exactly as many jobs as its workers have free slots (``COUNT`` = free slots,
never re-reading its own pending list) and hands each to its least-busy worker. That is one
blocking Redis connection per instance instead of one per worker, least-busy placement for free,
and room for targeted dispatch (prompt-cache affinity) later. A job stays in the instance's
pending list until it completes; if the instance dies, its ``instance`` key expires and another
instance's sweeper claims the entries with a min-idle no smaller than the dead-instance timeout,
so two sweepers can never both take one job.

Every model has its own stream (and consumer group), so a router reads only the jobs of the
models its workers serve, ``COUNT`` = the free slots of that model's pool, and the guarantees
above (at-least-once, reclaim from a dead instance) hold per stream. The methods take the
model's canonical name (``Job.model``); ``""`` is the stream of jobs that name none.

The embedded store (fakeredis) ignores ``BLOCK``, so in embedded mode reads wait on an in-process
event that :meth:`StreamQueue.enqueue` sets; with a real Redis they block server-side.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from auxot_common.models import model_key
from auxot_common.protocol import Job, ProtocolError, decode, encode, encode_batches
from auxot_common.turnbatch import TurnBatch

log = logging.getLogger("auxot.queue")

GROUP = "workers"
INBOX_MAXLEN = 100_000
INBOX_TTL_S = 600
RELAY_ENTRY_BYTES = 256 * 1024  # one inbox entry carries the messages of one loop turn up to this
CANCELLED_TTL_S = 3600

_DELETE_IF_EMPTY = "if redis.call('XLEN', KEYS[1]) == 0 then return redis.call('DEL', KEYS[1]) end return 0"

JobEntry = tuple[str, Job | None]  # (stream entry id, job or None if the entry was unreadable)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StreamQueue:
    """Jobs, relay, cancel markers and liveness keys for one router instance.

    Parameters:
        redis: a ``redis.asyncio.Redis`` (real) or ``fakeredis.FakeAsyncRedis`` (embedded).
        instance_id: this router instance; its consumer name and inbox.
        prefix: key prefix, ``auxot:`` in production, unique per test.
        server_blocking: True for a real Redis (honours ``BLOCK``), False for the embedded one.
        shared: whether other instances may use the same store (default: ``server_blocking``);
            a private queue counts its waiting jobs locally instead of asking Redis.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        instance_id: str,
        prefix: str = "auxot:",
        server_blocking: bool,
        shared: bool | None = None,
    ) -> None:
        self.redis = redis
        self.instance_id = instance_id
        self.prefix = prefix
        self.jobs_key = f"{prefix}jobs"
        self._server_blocking = server_blocking
        # A real Redis may be shared with other router instances; the embedded store never is.
        self.shared = server_blocking if shared is None else shared
        self._jobs_added: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._inbox_added = asyncio.Event()
        self._inbox_last_id = "0-0"
        self._inbox_read: list[Any] = []  # entry ids read from the inbox, deleted with the next read
        self._waiting: defaultdict[str, int] = defaultdict(int)  # embedded: the only reader and writer
        # one model configured with AUXOT_MODEL: its jobs stay on ``{p}jobs``, the key of every
        # release before several models, so an upgrade finds the jobs already queued
        self.single_stream = False
        self._adds: TurnBatch[tuple[str, str, bytes], Any] = TurnBatch(self._xadd_all)
        self._acks: TurnBatch[dict[str, list[str]], None] = TurnBatch(self._ack_all)
        # read this instance's targeted streams too (set by the router: shared Redis + cache routing)
        self.sticky = False
        self._no_forward: dict[str, None] = {}  # job ids read from a targeted stream or bounced

    # --- keys -----------------------------------------------------------------------------------

    def stream_key(self, model: str = "") -> str:
        """The job stream of ``model`` (its canonical name); ``{p}jobs`` for ``""``."""
        if self.single_stream or not model:
            return self.jobs_key
        return f"{self.prefix}jobs:{model_key(model)}"

    def target_key(self, model: str = "", instance_id: str = "") -> str:
        """The targeted stream of ``model`` for ``instance_id`` (this instance by default)."""
        return f"{self.stream_key(model)}@{instance_id or self.instance_id}"

    def inbox_key(self, instance_id: str) -> str:
        return f"{self.prefix}inbox:{instance_id}"

    def _cancelled_key(self, job_id: str) -> str:
        return f"{self.prefix}cancelled:{job_id}"

    def _instance_key(self, instance_id: str) -> str:
        return f"{self.prefix}instance:{instance_id}"

    def _worker_key(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    # --- jobs -----------------------------------------------------------------------------------

    async def ensure_group(self, model: str = "") -> None:
        try:
            await self.redis.xgroup_create(self.stream_key(model), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _regroup_if_lost(self, exc: ResponseError, model: str = "") -> None:
        """A Redis restarted without persistence (or flushed) has lost the consumer group: create
        it again, so that the instance heals by itself; re-raise any other error."""
        if "NOGROUP" not in str(exc):
            raise exc
        log.warning("the job queue's consumer group is gone (Redis restarted empty?): creating it again")
        await self.ensure_group(model)

    async def enqueue(self, job: Job, data: bytes) -> str:
        """Append a job (``data`` is its encoded message) to its model's stream and wake local
        readers. The jobs queued in one loop turn go to Redis in one pipeline (``TurnBatch``)."""
        entry_id = await self._adds.submit((self.stream_key(job.model), job.job_id, data))
        self._waiting[job.model] += 1
        self._jobs_added[job.model].set()
        return _text(entry_id)

    async def _xadd_all(self, items: list[tuple[str, str, bytes]]) -> list[Any]:
        if len(items) == 1:  # alone in its turn: no pipeline to build
            key, job_id, data = items[0]
            return [await self.redis.xadd(key, {"job_id": job_id, "data": data})]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, job_id, data in items:
                pipe.xadd(key, {"job_id": job_id, "data": data})
            return list(await pipe.execute(raise_on_error=False))

    async def depth(self, model: str = "") -> int:
        """Jobs of ``model`` waiting for a worker: entries not yet delivered to any instance."""
        if not self.shared:  # no other instance can add or take jobs: the count is exact locally
            return self._waiting[model]
        key = self.stream_key(model)
        for attempt in range(2):
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.xlen(key)
                    pipe.xpending(key, GROUP)
                    length, pending = await pipe.execute()
                break
            except ResponseError as exc:
                if attempt:
                    raise
                await self._regroup_if_lost(exc, model)
        return max(int(length) - int(pending["pending"]), 0)

    async def unfinished(self, models: Sequence[str]) -> dict[str, int]:
        """Per model, its jobs not finished yet (finished entries are deleted): waiting, read
        ahead into some instance's backlog, or running, in its shared stream and in every
        instance's targeted stream. With a shared Redis, the cluster's waiting jobs are this
        minus the jobs its workers run. One SCAN and one pipelined round trip."""
        targeted = [k for k, _ in await self.targeted_streams()] if self.shared else []
        keys: list[tuple[str, str]] = []
        for model in models:
            shared_key = self.stream_key(model)
            keys.append((model, shared_key))
            keys.extend((model, k) for k in targeted if k.rpartition("@")[0] == shared_key)
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, key in keys:
                pipe.xlen(key)
            lengths = await pipe.execute()
        counts = dict.fromkeys(models, 0)
        for (model, _), length in zip(keys, lengths, strict=True):
            counts[model] += int(length)
        return counts

    async def read_jobs(self, count: int, timeout: float, model: str = "", targeted: bool = False) -> list[JobEntry]:
        """Take up to ``count`` new jobs of ``model`` for this instance, waiting at most
        ``timeout`` seconds; ``targeted``: from this instance's targeted stream too (sticky)."""
        added = self._jobs_added[model]
        added.clear()
        block_ms = int(timeout * 1000) if self._server_blocking else None
        if targeted and self.sticky:
            return await self._xreadgroup_targeted(count, block_ms, model)
        entries = await self._xreadgroup(count, block_ms, model)
        if not entries and not self._server_blocking:
            try:
                await asyncio.wait_for(added.wait(), timeout)
            except TimeoutError:
                return []
            entries = await self._xreadgroup(count, None, model)
        return entries

    async def _xreadgroup(self, count: int, block_ms: int | None, model: str = "") -> list[JobEntry]:
        streams: dict[Any, Any] = {self.stream_key(model): ">"}
        try:
            reply: Any = await self.redis.xreadgroup(GROUP, self.instance_id, streams, count=count, block=block_ms)
        except ResponseError as exc:
            await self._regroup_if_lost(exc, model)
            reply = await self.redis.xreadgroup(GROUP, self.instance_id, streams, count=count, block=block_ms)
        entries = [_job_entry(entry_id, fields) for _, stream in reply or [] for entry_id, fields in stream]
        self._waiting[model] = max(self._waiting[model] - len(entries), 0)
        return entries

    async def _xreadgroup_targeted(self, count: int, block_ms: int | None, model: str) -> list[JobEntry]:
        shared, target = self.stream_key(model), self.target_key(model)
        streams: dict[Any, Any] = {shared: ">", target: ">"}
        try:
            reply: Any = await self.redis.xreadgroup(GROUP, self.instance_id, streams, count=count, block=block_ms)
        except ResponseError as exc:
            await self._regroup_if_lost(exc, model)
            await self._ensure_group_key(target)
            reply = await self.redis.xreadgroup(GROUP, self.instance_id, streams, count=count, block=block_ms)
        entries: list[JobEntry] = []
        for name, stream in reply or []:
            from_target = _text(name) == target
            for entry_id, fields in stream:
                entry = _job_entry(entry_id, fields)
                if entry[1] is not None and (from_target or b"hop" in fields):
                    self._remember_no_forward(entry[1].job_id)
                entries.append((f"{target}|{entry[0]}", entry[1]) if from_target else entry)
        return entries

    def _remember_no_forward(self, job_id: str) -> None:
        self._no_forward[job_id] = None
        while len(self._no_forward) > 10_000:
            del self._no_forward[next(iter(self._no_forward))]

    def may_forward(self, job_id: str) -> bool:
        """False for a job that was already moved once (read from a targeted stream, or bounced
        back from one): it is never moved again, so it cannot ping-pong."""
        return job_id not in self._no_forward

    async def _ensure_group_key(self, key: str) -> None:
        try:
            await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def forward(self, entry_id: str, job: Job, data: bytes, instance_id: str) -> None:
        """Move a job read from its model's shared stream to ``instance_id``'s targeted stream,
        atomically (the job is in exactly one of them)."""
        shared = self.stream_key(job.model)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.target_key(job.model, instance_id), {"job_id": job.job_id, "data": data})
            pipe.xack(shared, GROUP, entry_id)
            pipe.xdel(shared, entry_id)
            await pipe.execute()

    async def _move_back(self, key: str, entries: list[tuple[str, bytes, bytes]], model_stream: str) -> None:
        """Targeted entries (id, job_id, data) back to the shared stream, marked ``hop``."""
        if not entries:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            for _, job_id, data in entries:
                pipe.xadd(model_stream, {"job_id": job_id, "data": data, "hop": b"1"})
            ids = [entry_id for entry_id, _, _ in entries]
            pipe.xack(key, GROUP, *ids)
            pipe.xdel(key, *ids)
            await pipe.execute()

    async def hand_back(self, model: str, entries: list[tuple[str, Job]]) -> None:
        """Jobs this instance read but cannot run (its last worker of ``model`` went away) back
        to the shared stream, each in one MULTI/EXEC with the XACK + XDEL of its entry, so that
        another instance takes them; ids ``{key}|{id}`` come from a targeted stream and go back
        marked ``hop`` (never moved again)."""
        if not entries:
            return
        shared = self.stream_key(model)
        async with self.redis.pipeline(transaction=True) as pipe:
            for entry, job in entries:
                key, _, entry_id = entry.rpartition("|")
                fields: dict[Any, Any] = {"job_id": job.job_id, "data": encode(job)}
                if key:
                    fields["hop"] = b"1"
                pipe.xadd(shared, fields)
                pipe.xack(key or shared, GROUP, entry_id)
                pipe.xdel(key or shared, entry_id)
            await pipe.execute()

    async def bounce_stale(self, model: str, max_age_s: float) -> int:
        """Entries of this instance's targeted stream of ``model`` not read within ``max_age_s``
        (no free slot here since they came) go back to the shared stream. Returns how many."""
        key = self.target_key(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.xinfo_groups(key)
            results = await pipe.execute(raise_on_error=False)
        now, groups = results
        if isinstance(groups, Exception) or not groups:
            return 0
        seconds, micros = now
        cutoff = f"{int(seconds) * 1000 + int(micros) // 1000 - int(max_age_s * 1000)}"
        last = _text(groups[0]["last-delivered-id"])
        stale: Any = await self.redis.xrange(key, min=f"({last}", max=cutoff, count=100)
        if not stale:
            return 0
        # this instance is the only reader of its targeted stream: ">" yields exactly these
        reply: Any = await self.redis.xreadgroup(GROUP, self.instance_id, {key: ">"}, count=len(stale))
        moved = [(_text(i), f.get(b"job_id", b""), f.get(b"data", b"")) for _, s in reply or [] for i, f in s]
        await self._move_back(key, moved, self.stream_key(model))
        return len(moved)

    async def ack(self, entry_ids: list[str], model: str = "") -> None:
        """Finish entries of ``model``'s stream: XACK then XDEL. Ids of the form ``{key}|{id}``
        are entries of a targeted stream, finished there. What every caller acknowledges in one
        loop turn (jobs finishing on many workers at once) goes in one round trip."""
        by_key: dict[str, list[str]] = {}
        for entry in entry_ids:
            if "|" in entry:
                key, _, entry_id = entry.rpartition("|")
                by_key.setdefault(key, []).append(entry_id)
            else:
                by_key.setdefault(self.stream_key(model), []).append(entry)
        if by_key:
            await self._acks.submit(by_key)

    async def _ack_all(self, items: list[dict[str, list[str]]]) -> list[BaseException | None]:
        merged: dict[str, list[str]] = {}
        for by_key in items:
            for key, ids in by_key.items():
                merged.setdefault(key, []).extend(ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, ids in merged.items():
                pipe.xack(key, GROUP, *ids)
                pipe.xdel(key, *ids)
            results = await pipe.execute(raise_on_error=False)
        failed: dict[str, BaseException] = {}
        for key, result in zip([k for k in merged for _ in (0, 1)], results, strict=True):
            # NOGROUP: Redis lost the group and the entries with it; nothing to finish
            if isinstance(result, Exception) and "NOGROUP" not in str(result):
                failed.setdefault(key, result)
        return [next((failed[k] for k in by_key if k in failed), None) for by_key in items]

    # --- cancellation ---------------------------------------------------------------------------

    async def mark_cancelled(self, job_id: str) -> None:
        await self.redis.set(self._cancelled_key(job_id), b"1", ex=CANCELLED_TTL_S)

    async def cancelled(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        values = await self.redis.mget([self._cancelled_key(j) for j in job_ids])
        return {job_id for job_id, value in zip(job_ids, values, strict=True) if value is not None}

    # --- relay between instances ----------------------------------------------------------------

    async def publish(self, batches: dict[str, list[bytes]]) -> None:
        """Append encoded messages to other instances' inboxes: one pipeline for all of them, and
        the messages for one instance in as few entries as possible (``batch`` messages of up to
        RELAY_ENTRY_BYTES): a stream entry costs Redis, and the reader, far more than its bytes."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance_id, payloads in batches.items():
                key = self.inbox_key(instance_id)
                for entry in encode_batches(payloads, RELAY_ENTRY_BYTES):
                    pipe.xadd(key, {"m": entry}, maxlen=INBOX_MAXLEN, approximate=True)
                pipe.expire(key, INBOX_TTL_S)
            await pipe.execute()
        if self.instance_id in batches:
            self._inbox_added.set()

    async def read_inbox(self, timeout: float) -> list[bytes]:
        """Messages other instances relayed to this one, oldest first. The entries read are
        deleted in the round trip of the next read: the caller handles them without waiting
        for a deletion first."""
        key = self.inbox_key(self.instance_id)
        self._inbox_added.clear()
        block = int(timeout * 1000) if self._server_blocking else None
        reply = await self._delete_read_and_read(key, block)
        if not reply and not self._server_blocking:
            try:
                await asyncio.wait_for(self._inbox_added.wait(), timeout)
            except TimeoutError:
                return []
            reply = await self._delete_read_and_read(key, None)
        if not reply:
            return []
        entries = reply[0][1]
        self._inbox_last_id = _text(entries[-1][0])
        self._inbox_read = [entry_id for entry_id, _ in entries]
        return [fields[b"m"] for _, fields in entries if b"m" in fields]

    async def _delete_read_and_read(self, key: str, block: int | None) -> Any:
        if not self._inbox_read:
            return await self.redis.xread({key: self._inbox_last_id}, count=1000, block=block)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xdel(key, *self._inbox_read)
            pipe.xread({key: self._inbox_last_id}, count=1000, block=block)
            _, reply = await pipe.execute()
        self._inbox_read = []
        return reply

    # --- liveness -------------------------------------------------------------------------------

    async def beat_instance(self, ttl_s: float) -> None:
        await self.redis.set(self._instance_key(self.instance_id), b"1", px=int(ttl_s * 1000))

    async def drop_instance(self) -> None:
        await self.redis.delete(self._instance_key(self.instance_id))

    async def instance_alive(self, instance_id: str) -> bool:
        return bool(await self.redis.exists(self._instance_key(instance_id)))

    async def beat_worker(self, worker_id: str, info: dict[str, Any], ttl_s: float) -> None:
        await self.redis.set(self._worker_key(worker_id), orjson.dumps(info), px=int(ttl_s * 1000))

    async def beat_workers(self, infos: Mapping[str, dict[str, Any]], ttl_s: float) -> None:
        """:meth:`beat_worker` for several workers in one round trip."""
        if not infos:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id, info in infos.items():
                pipe.set(self._worker_key(worker_id), orjson.dumps(info), px=int(ttl_s * 1000))
            await pipe.execute()

    async def drop_worker(self, worker_id: str) -> None:
        await self.redis.delete(self._worker_key(worker_id))

    async def cluster_workers(self) -> list[dict[str, Any]]:
        """Every live worker of every instance sharing this Redis."""
        keys = [key async for key in self.redis.scan_iter(match=f"{self.prefix}worker:*", count=200)]
        if not keys:
            return []
        values = await self.redis.mget(keys)
        return [orjson.loads(v) for v in values if v is not None]

    # --- recovery -------------------------------------------------------------------------------

    async def job_streams(self) -> list[str]:
        """The keys of every job stream that exists (configured now or not: a model removed by a
        reload may still hold a dead instance's jobs)."""
        keys = [self.jobs_key] if await self.redis.exists(self.jobs_key) else []
        found = {_text(k) async for k in self.redis.scan_iter(match=f"{self.prefix}jobs:*", count=200)}
        keys += sorted(k for k in found if "@" not in k)  # targeted streams: see targeted_streams
        return keys

    async def targeted_streams(self) -> list[tuple[str, str]]:
        """(key, owner instance) of every targeted stream."""
        found = {_text(k) async for k in self.redis.scan_iter(match=f"{self.prefix}jobs*@*", count=200)}
        return sorted((k, k.rpartition("@")[2]) for k in found)

    async def _sweep_targeted(self, min_idle_s: float) -> list[JobEntry]:
        """A dead instance's targeted streams: entries it had read are reclaimed (returned, ids
        ``{key}|{id}``); entries it never read go back to the shared stream; the empty stream
        is deleted."""
        claimed: list[JobEntry] = []
        for key, owner in await self.targeted_streams():
            if owner == self.instance_id or await self.instance_alive(owner):
                continue
            shared = key.rpartition("@")[0]
            await self._ensure_group_key(key)  # a late forward may have created it without one
            claimed.extend((f"{key}|{i}", job) for i, job in await self._claim_all(owner, int(min_idle_s * 1000), key))
            while True:  # one sweeper gets each undelivered entry (">"), then moves it
                reply: Any = await self.redis.xreadgroup(GROUP, self.instance_id, {key: ">"}, count=100)
                moved = [(_text(i), f.get(b"job_id", b""), f.get(b"data", b"")) for _, s in reply or [] for i, f in s]
                if not moved:
                    break
                await self._move_back(key, moved, shared)
                log.warning(
                    "moved jobs of a dead instance's targeted stream back",
                    extra={"instance": owner, "jobs": len(moved)},
                )
            await self.redis.eval(_DELETE_IF_EMPTY, 1, key)  # atomic: a late forward is never lost
        return claimed

    async def reclaim_from_dead_instances(self, min_idle_s: float) -> list[JobEntry]:
        """Claim the pending jobs of instances whose liveness key expired, on every model's
        stream. A claimed job keeps its ``model``, whose stream it is on: the caller acknowledges
        it with ``ack([entry_id], job.model)``. Unreadable entries are finished here.

        ``min_idle_s`` must be no smaller than the instance TTL: XCLAIM resets the idle time, so
        of two sweepers racing for one entry only the first gets it.
        """
        claimed: list[JobEntry] = []
        for key in await self.job_streams():
            try:
                summary = await self.redis.xpending(key, GROUP)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                continue  # a stream without a group has nothing pending
            for consumer in summary.get("consumers") or []:
                name = _text(consumer["name"])
                if name == self.instance_id or await self.instance_alive(name):
                    continue
                claimed.extend(await self._claim_all(name, int(min_idle_s * 1000), key))
        if self.sticky:
            claimed.extend(await self._sweep_targeted(min_idle_s))
        return claimed

    async def _claim_all(self, consumer: str, min_idle_ms: int, key: str) -> list[JobEntry]:
        claimed: list[JobEntry] = []
        while True:
            pending: Any = await self.redis.xpending_range(
                key, GROUP, min="-", max="+", count=100, consumername=consumer, idle=min_idle_ms
            )
            if not pending:
                break
            ids = [p["message_id"] for p in pending]
            entries: Any = await self.redis.xclaim(key, GROUP, self.instance_id, min_idle_ms, ids)
            readable = [_job_entry(entry_id, fields) for entry_id, fields in entries if fields]
            # an unreadable entry can never run; finish it here, where its stream is known
            unreadable = [entry_id for entry_id, job in readable if job is None]
            if unreadable:
                await self._acks.submit({key: unreadable})
            claimed.extend(entry for entry in readable if entry[1] is not None)
            if len(pending) < 100:
                break
        remaining = await self.redis.xpending_range(key, GROUP, min="-", max="+", count=1, consumername=consumer)
        if not remaining:
            await self.redis.xgroup_delconsumer(key, GROUP, consumer)
        if claimed:
            log.warning(
                "reclaimed jobs from a dead router instance", extra={"instance": consumer, "jobs": len(claimed)}
            )
        return claimed


def _job_entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> JobEntry:
    try:
        message = decode(fields[b"data"])
    except (KeyError, ProtocolError):
        return _text(entry_id), None
    return _text(entry_id), message if isinstance(message, Job) else None


class RelayPublisher:
    """Buffers messages for other instances and flushes them in one pipeline per loop turn.

    Order is kept per destination, which is what a job's events need. A failed flush is logged
    and dropped: the owner's job timeout and the sweeper cover what is lost.
    """

    def __init__(self, queue: StreamQueue) -> None:
        self._queue = queue
        self._pending: defaultdict[str, list[bytes]] = defaultdict(list)
        self._flushing: asyncio.Task[None] | None = None

    def send(self, instance_id: str, payload: bytes) -> None:
        self._pending[instance_id].append(payload)
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                batches, self._pending = dict(self._pending), defaultdict(list)
                try:
                    await self._queue.publish(batches)
                except Exception:
                    log.exception("relay publish failed", extra={"instances": list(batches)})
        finally:
            self._flushing = None

    async def close(self) -> None:
        if self._flushing is not None:
            await asyncio.shield(self._flushing)
