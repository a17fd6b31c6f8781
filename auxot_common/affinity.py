"""Sticky conversations across router instances sharing one Redis.

Each router instance knows only its own workers' prefix index (:mod:`auxot_common.routing`).
With several instances reading a model's shared job stream, a conversation's next turn may be
read by an instance whose workers never saw it. This module shares, through Redis, the least
that fixes it:

* **Record** (on dispatch): for a few *sampled* block hashes of the job's prefix chain,
  ``{p}affinity:{model}:{hash}`` -> ``{instance}/{worker}`` with a TTL. Bounded per job
  (:func:`sample_positions`: at most ``RECENT + FAR + 1`` keys) and in time (TTL).
* **Look up** (when an instance reads jobs from the shared stream): one ``MGET`` over the
  sampled hashes of all jobs read. The deepest hit names the worker that holds the longest
  prefix; if it is a live worker of another instance and would save enough prefill over this
  instance's best local match, the job is moved (atomically) to that instance's targeted
  stream (:meth:`auxot_common.queue.StreamQueue.forward`).

Positions are sampled on a fixed grid (absolute block indexes), not relative to the end of the
prompt: turn *n+1*'s chain contains turn *n*'s, so the grid points turn *n* recorded are grid
points turn *n+1* looks up. Dense near the end (every ``RECENT_STRIDE`` blocks), sparse further
back (every ``FAR_STRIDE``), plus the deepest block (a repeat of the same prompt).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from redis.asyncio import Redis

from auxot_common.models import model_key

log = logging.getLogger("auxot.affinity")

RECENT_STRIDE = 4  # blocks (~600 tokens): the last RECENT grid points cover ~32 blocks (16 KiB)
RECENT = 8
FAR_STRIDE = 64  # blocks (~10k tokens): the last FAR grid points cover 512 blocks (256 KiB)
FAR = 8
AFFINITY_TTL_S = 3600  # as the per-worker index (RoutingConfig.index_ttl_s)


def sample_positions(n_blocks: int) -> list[int]:
    """Block indexes (0-based) of a chain of ``n_blocks`` to record or look up, deepest first."""
    if n_blocks <= 0:
        return []
    picked = {n_blocks - 1}
    last = n_blocks - 1
    recent = last - (last + 1) % RECENT_STRIDE  # the deepest i with (i + 1) % stride == 0
    picked.update(i for i in range(recent, -1, -RECENT_STRIDE)[:RECENT] if i >= 0)
    far = last - (last + 1) % FAR_STRIDE
    picked.update(i for i in range(far, -1, -FAR_STRIDE)[:FAR] if i >= 0)
    return sorted(picked, reverse=True)


def affinity_key(prefix: str, model: str, block_hash: bytes) -> str:
    return f"{prefix}affinity:{model_key(model) if model else '-'}:{block_hash.hex()}"


def parse_owner(value: bytes | str | None) -> tuple[str, str] | None:
    """``instance/worker`` -> (instance, worker)."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    instance, sep, worker = text.partition("/")
    return (instance, worker) if sep and instance and worker else None


class AffinityBook:
    """Reads and writes the shared affinity keys of one router instance.

    Writes are buffered and sent as one pipeline per event-loop turn (a dispatch burst is one
    round trip); a failed write is logged and dropped (affinity is a hint: the cost of losing it
    is one cold prefill).
    """

    def __init__(self, redis: Redis, prefix: str, instance_id: str, ttl_s: int = AFFINITY_TTL_S) -> None:
        self.redis = redis
        self.prefix = prefix
        self.instance_id = instance_id
        self.ttl_s = ttl_s
        self._pending: dict[str, str] = {}
        self._flushing: asyncio.Task[None] | None = None
        self.forwarded = 0  # jobs moved to another instance's warm worker
        self.lookups = 0

    def record(self, model: str, hashes: Sequence[bytes], worker_id: str) -> None:
        owner = f"{self.instance_id}/{worker_id}"
        for i in sample_positions(len(hashes)):
            self._pending[affinity_key(self.prefix, model, hashes[i])] = owner
        if self._pending and self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for key, owner in batch.items():
                            pipe.set(key, owner, ex=self.ttl_s)
                        await pipe.execute()
                except Exception as exc:  # a hint lost, never a job
                    log.warning("recording prompt affinity failed", extra={"error": str(exc), "keys": len(batch)})
        finally:
            self._flushing = None

    async def lookup(self, model: str, chains: Sequence[Sequence[bytes]]) -> list[tuple[int, str, str] | None]:
        """For each chain, the deepest recorded owner: (blocks, instance, worker), or None.
        One ``MGET`` for all of them."""
        positions = [sample_positions(len(chain)) for chain in chains]
        keys = [
            affinity_key(self.prefix, model, chain[i])
            for chain, pos in zip(chains, positions, strict=True)
            for i in pos
        ]
        if not keys:
            return [None] * len(chains)
        self.lookups += 1
        values = await self.redis.mget(keys)
        out: list[tuple[int, str, str] | None] = []
        at = 0
        for pos in positions:
            found: tuple[int, str, str] | None = None
            for j, i in enumerate(pos):  # deepest first
                owner = parse_owner(values[at + j])
                if owner is not None:
                    found = (i + 1, owner[0], owner[1])
                    break
            at += len(pos)
            out.append(found)
        return out

    async def close(self) -> None:
        if self._flushing is not None:
            await asyncio.shield(self._flushing)
