"""Cache-aware worker choice: send a conversation back to the worker that holds its prompt.

Pure policy, no I/O. The router (one ``CacheAwarePolicy`` per model pool) calls :meth:`pick`
to choose a worker for a job, and tells the policy about dispatches, completions and workers
that go away. See NOTES.md "Cache-aware routing" for the reasoning behind each number.

Where a prompt lives
    The prompt of a job is turned into the byte stream the worker's chat template will render,
    in its order: the system message(s), then the tools, then the other messages one by one
    (each serialised on its own, so turn *n+1*'s stream starts with turn *n*'s). The stream is
    cut into fixed blocks of ``block_bytes`` (512 bytes, ~150 tokens) and each block gets a
    chained hash (BLAKE2b-64 of the previous hash and the block), so block *i*'s hash names the
    whole prefix up to it. There is no length cap: two Claude Code sessions share ~60 KiB of
    system prompt and tools, and differ only after that.

    Each worker has a :class:`PrefixIndex`: the block hashes it was sent, LRU with a TTL,
    bounded by what the worker can really hold (its slots x context, plus llama-server's
    host-RAM prompt cache, modelled as ``ram_factor`` times that unless the worker says).

Ground truth
    Every ``complete`` reports how many prompt tokens llama-server reused. When that is well
    below what the index predicted, the worker has evicted more than we modelled: every index
    entry no newer than the one that missed is dropped (the worker's caches are LRU too).
    A worker that restarts or reloads forgets everything (:meth:`CacheAwarePolicy.on_worker_reset`).

Choosing
    Among workers with a free slot, the expected cost of a job on a worker is
    ``uncached prompt tokens x its measured prefill time per token + load_cost_s x its busy
    fraction``. The warm worker wins when it saves more prefill than the load difference; short
    uncached prompts, where nothing is saved, spread by load. When the worker with the longest
    match is full and another is free, the job is *held* for it, but only while the prefill it
    would save exceeds ``min_hold_saving_s`` and for at most ``min(saving, max_hold_s)``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

BLOCK_BYTES = 512
HASH_BYTES = 8
# Memory per index entry: an OrderedDict node (~56 B) + the 8-byte key as ``bytes`` (41 B) + a
# float stamp (24 B) + the dict slot: about 150 B. A worker with 4 slots x 64k tokens and the
# default RAM factor holds ~1M tokens = ~6,800 blocks of 512 B (~150 tokens) = ~1 MB.
# Small blocks so that short prompts (a 1 KB chat) still have a key; hashing stays ~1 ms/MiB.
INDEX_ENTRY_BYTES = 150


@dataclass(slots=True)
class RoutingConfig:
    """Tunables; defaults argued in NOTES.md."""

    block_bytes: int = BLOCK_BYTES
    # Prefill time per uncached token until a worker has reported its own (a ~30B model on
    # one GPU: 0.1-0.3 ms/token).
    default_ms_per_token: float = 0.2
    # What a fully busy worker costs a new job relative to an idle one (decode steps shared with
    # the slots already running). Chosen so that a shared system prompt of a few hundred tokens
    # (~0.1 s) is not worth stacking jobs on one worker while others idle, and the warm prefix of
    # a conversation (thousands of tokens, seconds) always is.
    load_cost_s: float = 0.5
    # Longest a job waits for its busy warm worker while another is free (the hold is also never
    # longer than the prefill it saves). Not below a typical job's duration: a warm worker frees
    # its next slot after about one job (prefill + a few hundred output tokens: ~5 s); a cap
    # under that makes held turns go cold just before their slot frees, and under load each cold
    # prefill occupies another GPU, keeps its slots busy longer and expires more holds (in the
    # replay, 3 s: 79-98% of the oracle's cached tokens across seeds 1-7; 5 s and up: 95-98%).
    max_hold_s: float = 10.0
    # Smallest prefill saving worth holding a job for.
    min_hold_saving_s: float = 0.5
    index_ttl_s: float = 3600.0
    # llama-server's host-RAM prompt cache (``--cache-ram``) holds evicted slot prompts; unless a
    # worker reports its size, assume it holds this many times what the slots hold.
    ram_factor: float = 3.0
    # A completion whose cached tokens are below this share of the prediction is a miss.
    miss_share: float = 0.5
    session_capacity: int = 100_000
    # Bytes per token before the pool has measured its own ratio (English/code with a BPE vocab).
    bytes_per_token: float = 3.5
    # A worker's measured prefill rate is trusted in proportion to its measurements: it counts
    # as n of them against this many at the pool's mean. One prefill timed while it shared the
    # GPU (or CPU) with others can read several times too slow, and a warm conversation must not
    # go cold on such a reading; a GPU that is really slower shows it over a dozen jobs.
    rate_prior_jobs: int = 8


class WorkerView(Protocol):
    """What the policy needs to know about a worker (the router's WorkerConnection has it)."""

    @property
    def worker_id(self) -> str: ...
    @property
    def free(self) -> int: ...
    @property
    def slots(self) -> int: ...
    @property
    def capabilities(self) -> Any: ...  # .ctx_size per slot
    @property
    def running(self) -> Mapping[str, Any]: ...


# --- the prefix key of a job ------------------------------------------------------------------


def prompt_segments(messages: Sequence[Any], tools: Sequence[Any], prompt: str | None = None) -> list[bytes]:
    """The prompt as the chat template renders it, in its order: system, tools, the rest.

    Each message is serialised on its own so that a conversation's next turn starts with
    exactly the bytes of this one. ``prompt`` (``/v1/completions``) is taken as is.
    """
    if prompt is not None:
        return [prompt.encode()]
    head = 0
    while head < len(messages) and _is_system(messages[head]):
        head += 1
    out = [orjson.dumps(m) for m in messages[:head]]
    if tools:
        out.append(orjson.dumps(list(tools)))
    out.extend(orjson.dumps(m) for m in messages[head:])
    return out


def _is_system(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in ("system", "developer")


@dataclass(slots=True, frozen=True)
class PrefixKey:
    """Chained hashes of the full blocks of a prompt, and its size in bytes."""

    hashes: tuple[bytes, ...]
    total_bytes: int


def prefix_key(segments: Sequence[bytes], block_bytes: int = BLOCK_BYTES) -> PrefixKey:
    """Chained BLAKE2b hashes over the full ``block_bytes`` blocks of the joined segments.

    The trailing partial block is left out: the next turn appends to it, so its hash would never
    match again. Cost: one pass of a C hash over the prompt (~1 ms per MiB).
    """
    data = b"".join(segments)
    hashes: list[bytes] = []
    previous = b""
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        previous = hashlib.blake2b(previous + data[start : start + block_bytes], digest_size=HASH_BYTES).digest()
        hashes.append(previous)
    return PrefixKey(tuple(hashes), len(data))


def job_prefix_key(job: Any, block_bytes: int = BLOCK_BYTES) -> PrefixKey:
    """The prefix key of a :class:`~auxot_common.protocol.Job` (chat or completion)."""
    prompt = job.params.get("prompt") if job.kind == "completion" else None
    if job.kind == "completion" and not isinstance(prompt, str):
        prompt = orjson.dumps(prompt).decode() if prompt is not None else ""
    return prefix_key(prompt_segments(job.messages, job.tools, prompt), block_bytes)


# --- llama-server's own prompt caching (inside a worker) -------------------------------------

# --slot-prompt-similarity: b11434's default, pinned. A request takes the idle slot whose prompt
# shares the largest fraction (> 0.1) of its own; otherwise the least recently used slot. With
# the router sending a conversation back to its worker, the slot holding it shares ~all of it.
SLOT_PROMPT_SIMILARITY = "0.1"
CACHE_RAM_SHARE = 0.25  # of the host's physical RAM, for llama-server's host-RAM prompt cache


def llama_cache_args(cache_ram_mib: int | None, host_ram_bytes: int) -> list[str]:
    """llama-server flags for prompt caching.

    ``--cache-ram``: evicted slot prompts are kept in host RAM and restored when a request
    continues one (llama.cpp PR 16391; b11434's default is 8192 MiB). KV for a 30B-class model
    is ~100 KB per token, so 8 GiB hold less than two 60k-token agent sessions; a GPU host has far
    more RAM than that, so by default a quarter of its physical RAM is used. ``cache_ram_mib``
    (``AUXOT_CACHE_RAM_MIB``) overrides it: -1 no limit, 0 off. ``--cache-reuse`` (KV shifting
    of chunks after a change) is left off: the router keeps prompts byte-stable, it is not
    available for every model, and it was not measured to help.
    """
    if cache_ram_mib is None:
        cache_ram_mib = max(int(host_ram_bytes * CACHE_RAM_SHARE) // (1 << 20), 1024) if host_ram_bytes > 0 else 8192
    return ["--cache-ram", str(cache_ram_mib), "--slot-prompt-similarity", SLOT_PROMPT_SIMILARITY]


def host_ram_bytes() -> int:
    """Physical RAM of this host, 0 if unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


# --- client session hints ---------------------------------------------------------------------

SESSION_HEADERS = ("x-claude-code-session-id", "session-id", "x-session-id")
SESSION_BODY_FIELDS = ("prompt_cache_key", "user")


def session_hint(headers: Mapping[str, str], params: Mapping[str, Any]) -> str:
    """A short stable hash of the client's session id, or ``""``.

    Headers: Claude Code ``x-claude-code-session-id``, Codex ``session-id``, generic
    ``x-session-id``; body: Codex/OpenAI ``prompt_cache_key``, OpenAI ``user``. Hashed so that
    what travels in jobs and Redis is short and says nothing about the client.
    """
    for name in SESSION_HEADERS:
        value = headers.get(name)
        if value:
            return _short_hash("h:" + value)
    for name in SESSION_BODY_FIELDS:
        value = params.get(name)
        if isinstance(value, str) and value:
            return _short_hash(f"{name}:{value}")
    return ""


def _short_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=HASH_BYTES).hexdigest()


# --- per-worker index -------------------------------------------------------------------------


class PrefixIndex:
    """The block hashes one worker was sent: LRU, TTL, at most ``capacity`` entries.

    Blocks of one prompt are touched deepest first, so the front of the LRU (evicted first) holds
    the deepest blocks of the oldest prompts: a worker that evicts a prompt loses its tail
    first, which is what the index then predicts.
    """

    __slots__ = ("_stamps", "capacity", "ttl_s")

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = max(capacity, 1)
        self.ttl_s = ttl_s
        self._stamps: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._stamps)

    def match(self, hashes: Sequence[bytes], now: float) -> tuple[int, float]:
        """Blocks of the prompt this worker holds (the deepest known block: hashes are chained),
        and the stamp of that block (when it was last sent there)."""
        # Held blocks of one chain form a prefix: block i's hash names blocks 0..i, so every
        # prompt that touched block i touched the shallower ones at the same time (and later in
        # the LRU, with stamps no older). A binary search is exact, and a miss costs one lookup
        # instead of one per block of a long prompt, for each worker of the pool.
        horizon = now - self.ttl_s
        stamps = self._stamps
        if not hashes:
            return 0, 0.0
        first = stamps.get(hashes[0])
        if first is None or first < horizon:
            return 0, 0.0
        low, high, found = 0, len(hashes) - 1, first  # hashes[low] is held and fresh
        while low < high:
            mid = (low + high + 1) // 2
            stamp = stamps.get(hashes[mid])
            if stamp is not None and stamp >= horizon:
                low, found = mid, stamp
            else:
                high = mid - 1
        return low + 1, found

    def insert(self, hashes: Sequence[bytes], now: float) -> None:
        stamps = self._stamps
        for h in reversed(hashes):
            stamps[h] = now
            stamps.move_to_end(h)
        self.trim(now)

    def trim(self, now: float) -> None:
        stamps, horizon = self._stamps, now - self.ttl_s
        while stamps:
            oldest, stamp = next(iter(stamps.items()))
            if len(stamps) <= self.capacity and stamp >= horizon:
                break
            del stamps[oldest]

    def evict_not_newer_than(self, stamp: float) -> int:
        """Drop every entry last sent at or before ``stamp``; returns how many."""
        stamps, dropped = self._stamps, 0
        while stamps:
            oldest, when = next(iter(stamps.items()))
            if when > stamp:
                break
            del stamps[oldest]
            dropped += 1
        return dropped

    def clear(self) -> None:
        self._stamps.clear()


# --- the policy -------------------------------------------------------------------------------


@dataclass(slots=True)
class WorkerCacheStats:
    """What the policy knows and has measured about one worker."""

    index: PrefixIndex
    ms_per_token: float = 0.0  # measured prefill time per uncached token; 0 = not yet
    rate_jobs: int = 0  # jobs that measured it
    # jobs running there: (dispatched at, expected prompt processing seconds), until complete;
    # changed only through start_job / end_job / reset_jobs, which keep _queue_end in step
    inflight: dict[str, tuple[float, float]] = field(default_factory=dict)
    _queue_end: float = -1.0  # when the prompt processing sent there ends; < 0: to compute
    jobs: int = 0
    hits: int = 0  # jobs that reused at least half of their prompt
    prompt_tokens: int = 0
    cached_tokens: int = 0
    misses_corrected: int = 0

    def queue_s(self, now: float) -> float:
        """Prompt processing sent there and, by estimate, not done yet (one GPU: in order).
        Computed once per change of the worker's jobs: every pick asks it of every worker."""
        end = self._queue_end
        if end < 0:
            end = 0.0
            for dispatched, prefill_s in sorted(self.inflight.values()):
                end = max(end, dispatched) + prefill_s
            self._queue_end = end
        return max(end - now, 0.0)

    def start_job(self, job_id: str, now: float, prefill_s: float) -> None:
        self.inflight[job_id] = (now, prefill_s)
        self._queue_end = -1.0

    def end_job(self, job_id: str) -> None:
        if self.inflight.pop(job_id, None) is not None:
            self._queue_end = -1.0

    def reset_jobs(self) -> None:
        self.inflight.clear()
        self._queue_end = -1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "hit_ratio": round(self.hits / self.jobs, 3) if self.jobs else None,
            "cached_token_ratio": round(self.cached_tokens / self.prompt_tokens, 3) if self.prompt_tokens else None,
            "prefill_ms_per_token": round(self.ms_per_token, 4) if self.ms_per_token else None,
            "indexed_blocks": len(self.index),
        }


@dataclass(slots=True)
class Choice:
    """The result of :meth:`CacheAwarePolicy.pick`: a worker, or a job held until ``hold_until``
    for its busy warm worker (``worker`` None), or nothing (no free slot anywhere)."""

    worker: Any = None
    expected_cached_tokens: int = 0
    hold_until: float = 0.0


@dataclass(slots=True)
class _Placement:
    worker_id: str
    predicted_blocks: int
    prior_stamp: float
    key: PrefixKey
    total_bytes: int


@dataclass(slots=True)
class _Holding:
    since: float
    until: float


class CacheAwarePolicy:
    """Cache-aware choice of a worker within one model pool.

    ``pick(job, workers, now)`` -> :class:`Choice`; then ``on_dispatch(worker_id, job, now)``
    when the job was sent, ``on_complete(worker_id, job_id, input_tokens, cache_tokens,
    prompt_ms, now)`` when it finished, ``on_dispatch_failed(job_id)`` if sending failed,
    ``on_worker_reset(worker_id)`` when a worker's llama-server restarted or loaded another
    model, ``on_worker_gone(worker_id)`` when it disconnected.
    """

    def __init__(self, config: RoutingConfig | None = None) -> None:
        self.config = config or RoutingConfig()
        self.workers: dict[str, WorkerCacheStats] = {}
        self.sessions: OrderedDict[str, str] = OrderedDict()  # session hint -> worker id
        self._keys: OrderedDict[str, PrefixKey] = OrderedDict()  # jobs waiting in the backlog
        self._holding: dict[str, _Holding] = {}
        self._placed: dict[str, _Placement] = {}  # dispatched, not yet complete
        self._bytes_per_token = self.config.bytes_per_token
        self._pool_rate: float | None = None  # cache of _pool_ms_per_token()

    # --- helpers --------------------------------------------------------------------------------

    def key_of(self, job: Any) -> PrefixKey:
        key = self._keys.get(job.job_id)
        if key is None:
            key = job_prefix_key(job, self.config.block_bytes)
            self._keys[job.job_id] = key
            while len(self._keys) > 10_000:  # jobs dropped from a backlog without dispatch
                self._keys.popitem(last=False)
        return key

    def stats_for(self, worker: WorkerView) -> WorkerCacheStats:
        stats = self.workers.get(worker.worker_id)
        if stats is None:
            stats = WorkerCacheStats(PrefixIndex(self._capacity_blocks(worker), self.config.index_ttl_s))
            self.workers[worker.worker_id] = stats
        else:
            stats.index.capacity = self._capacity_blocks(worker)
        return stats

    def _capacity_blocks(self, worker: WorkerView) -> int:
        caps = worker.capabilities
        ctx = int(getattr(caps, "ctx_size", 0) or 0) or 4096
        slot_tokens = max(worker.slots, 1) * ctx
        ram_tokens = int(getattr(caps, "prompt_cache_tokens", 0) or 0) or int(slot_tokens * self.config.ram_factor)
        return max(int((slot_tokens + ram_tokens) * self._bytes_per_token / self.config.block_bytes), 16)

    def _pool_ms_per_token(self) -> float:
        """The mean measured prefill rate of the pool's workers (kept until a rate changes: a
        pick would otherwise cost the square of the pool's size)."""
        if self._pool_rate is None:
            measured = [s.ms_per_token for s in self.workers.values() if s.ms_per_token > 0]
            self._pool_rate = sum(measured) / len(measured) if measured else self.config.default_ms_per_token
        return self._pool_rate

    def _ms_per_token(self, stats: WorkerCacheStats, pool: float | None = None) -> float:
        """The worker's prefill rate, shrunk toward the pool's mean while it has few measurements."""
        pool = self._pool_ms_per_token() if pool is None else pool
        if stats.ms_per_token <= 0:
            return pool
        n, prior = stats.rate_jobs, self.config.rate_prior_jobs
        return (n * stats.ms_per_token + prior * pool) / (n + prior)

    def tokens(self, n_bytes: int) -> int:
        return int(n_bytes / self._bytes_per_token)

    # --- choosing -------------------------------------------------------------------------------

    def pick(self, job: Any, workers: Sequence[WorkerView], now: float | None = None) -> Choice:
        """The worker for ``job`` among ``workers`` (open connections of its pool).

        Returns a Choice with ``worker`` set, or with ``hold_until`` when the job should wait a
        little for its busy warm worker, or an empty Choice when no worker has a free slot.
        """
        now = time.monotonic() if now is None else now
        config = self.config
        key = self.key_of(job)
        session = getattr(job, "session", "")
        hinted = self.sessions.get(session) if session else None
        block_tokens = config.block_bytes / self._bytes_per_token
        total_tokens = self.tokens(key.total_bytes)

        best: tuple[float, int, int, float, str] | None = None
        best_worker: WorkerView | None = None
        best_cached = 0
        warm_busy_cost = 0.0
        warm_busy: WorkerView | None = None
        pool_rate = self._pool_ms_per_token()
        known = self.workers
        hashes = key.hashes
        for worker in workers:  # the hot loop of dispatch: once per worker of the pool, per job
            stats = known.get(worker.worker_id) or self.stats_for(worker)  # capacity: at dispatch
            free = worker.free
            blocks = stats.index.match(hashes, now)[0] if len(stats.index) else 0
            if free <= 0 and not blocks:
                continue  # neither free nor warm: nothing to weigh
            cached = min(int(blocks * block_tokens), total_tokens)
            rate_s = self._ms_per_token(stats, pool_rate) / 1000.0
            # its queue: prompt processing already sent there and not yet done (one GPU)
            queue_s = stats.queue_s(now) if stats.inflight else 0.0
            prefill_s = queue_s + (total_tokens - cached) * rate_s
            if free <= 0:
                if warm_busy is None or prefill_s < warm_busy_cost:
                    warm_busy_cost, warm_busy = prefill_s, worker
                continue
            cost = prefill_s + config.load_cost_s * (worker.slots - free) / max(worker.slots, 1)
            if best is not None and cost > best[0]:
                continue
            # ties: the session's worker, the most free slots, the emptiest cache (a new prompt
            # evicts the least there), then a stable order
            fill = len(stats.index) / stats.index.capacity
            rank = (cost, 0 if worker.worker_id == hinted else 1, -free, fill, worker.worker_id)
            if best is None or rank < best:
                best, best_worker, best_cached = rank, worker, cached
        if best is None or best_worker is None:
            self._holding.pop(job.job_id, None)
            return Choice()
        if warm_busy is not None:
            saving = best[0] - warm_busy_cost  # were a slot free there now
            if saving >= config.min_hold_saving_s:
                holding = self._holding.get(job.job_id)
                if holding is None:
                    holding = _Holding(now, now + min(saving, config.max_hold_s))
                    self._holding[job.job_id] = holding
                if now < holding.until:
                    return Choice(hold_until=holding.until)
        self._holding.pop(job.job_id, None)
        return Choice(worker=best_worker, expected_cached_tokens=best_cached)

    def remote_saving_s(self, job: Any, remote_blocks: int, workers: Sequence[WorkerView], now: float) -> float:
        """Prefill a worker elsewhere holding ``remote_blocks`` of ``job``'s prompt would save
        over the best of ``workers`` (this instance's): what moving the job there is worth."""
        key = self.key_of(job)
        local = max((self.stats_for(w).index.match(key.hashes, now)[0] for w in workers), default=0)
        extra_tokens = (min(remote_blocks, len(key.hashes)) - local) * self.config.block_bytes / self._bytes_per_token
        return max(extra_tokens, 0.0) * self._pool_ms_per_token() / 1000.0

    def held_until(self, job_id: str) -> float:
        holding = self._holding.get(job_id)
        return holding.until if holding is not None else 0.0

    # --- learning -------------------------------------------------------------------------------

    def on_dispatch(self, worker: WorkerView, job: Any, now: float | None = None) -> None:
        """``job`` was sent to ``worker``: from now on the worker holds its prompt."""
        now = time.monotonic() if now is None else now
        key = self._keys.pop(job.job_id, None) or job_prefix_key(job, self.config.block_bytes)
        self._holding.pop(job.job_id, None)
        stats = self.stats_for(worker)
        blocks, stamp = stats.index.match(key.hashes, now)
        self._placed[job.job_id] = _Placement(worker.worker_id, blocks, stamp, key, key.total_bytes)
        uncached = max(self.tokens(key.total_bytes) - self.tokens(blocks * self.config.block_bytes), 0)
        stats.start_job(job.job_id, now, uncached * self._ms_per_token(stats) / 1000)
        stats.index.insert(key.hashes, now)
        session = getattr(job, "session", "")
        if session:
            self.sessions[session] = worker.worker_id
            self.sessions.move_to_end(session)
            while len(self.sessions) > self.config.session_capacity:
                self.sessions.popitem(last=False)

    def on_dispatch_failed(self, job_id: str) -> None:
        placed = self._placed.pop(job_id, None)
        stats = self.workers.get(placed.worker_id) if placed is not None else None
        if stats is not None:
            stats.end_job(job_id)

    def forget_job(self, job_id: str) -> None:
        """A job left the backlog without being dispatched (cancelled, expired)."""
        self._keys.pop(job_id, None)
        self._holding.pop(job_id, None)

    def on_complete(
        self,
        worker_id: str,
        job_id: str,
        *,
        input_tokens: int,
        cache_tokens: int,
        prompt_ms: float = 0.0,
        ok: bool = True,
    ) -> None:
        """What the worker really reused. A miss drops the index entries it proves stale."""
        placed = self._placed.pop(job_id, None)
        stats = self.workers.get(worker_id)
        if stats is not None:
            stats.end_job(job_id)
        if placed is None or stats is None or placed.worker_id != worker_id or not ok:
            return
        stats.jobs += 1
        stats.prompt_tokens += input_tokens
        stats.cached_tokens += cache_tokens
        if input_tokens > 0 and cache_tokens * 2 >= input_tokens:
            stats.hits += 1
        if input_tokens > 0 and placed.total_bytes >= 1024:  # learn bytes per token (slowly)
            ratio = placed.total_bytes / input_tokens
            self._bytes_per_token = 0.9 * self._bytes_per_token + 0.1 * min(max(ratio, 1.0), 8.0)
        uncached = input_tokens - cache_tokens
        if prompt_ms > 0 and uncached >= 64:  # too few tokens measure overhead, not prefill
            rate = prompt_ms / uncached
            stats.ms_per_token = rate if stats.ms_per_token == 0 else 0.7 * stats.ms_per_token + 0.3 * rate
            stats.rate_jobs += 1
            self._pool_rate = None
        predicted_tokens = self.tokens(placed.predicted_blocks * self.config.block_bytes)
        if placed.predicted_blocks and cache_tokens < predicted_tokens * self.config.miss_share:
            # The worker no longer had what we sent it at ``prior_stamp``: neither has it anything
            # sent there before then. (This job's own blocks were stamped later and stay.)
            stats.index.evict_not_newer_than(placed.prior_stamp)
            stats.misses_corrected += 1

    def on_worker_reset(self, worker_id: str) -> None:
        """The worker's llama-server restarted or loaded another model: its caches are empty."""
        stats = self.workers.get(worker_id)
        if stats is not None:
            stats.index.clear()
            stats.reset_jobs()
        for job_id in [j for j, p in self._placed.items() if p.worker_id == worker_id]:
            del self._placed[job_id]

    def on_worker_gone(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)
        self._pool_rate = None
        for job_id in [j for j, p in self._placed.items() if p.worker_id == worker_id]:
            del self._placed[job_id]
        for session in [s for s, w in self.sessions.items() if w == worker_id]:
            del self.sessions[session]

    def worker_stats(self, worker_id: str) -> dict[str, Any]:
        stats = self.workers.get(worker_id)
        return stats.as_dict() if stats is not None else WorkerCacheStats(PrefixIndex(1, 1)).as_dict()


class BaselinePolicy:
    """The choice without a cache index, with the policy interface: ``least-busy`` (today's:
    most free slots) or ``round-robin``. Benchmarks compare them with the cache-aware policy."""

    def __init__(self, mode: str = "least-busy") -> None:
        self.mode = mode
        self._turn = 0

    def pick(self, job: Any, workers: Sequence[WorkerView], now: float | None = None) -> Choice:
        free = [w for w in workers if w.free > 0]
        if not free:
            return Choice()
        if self.mode == "round-robin":
            self._turn += 1
            return Choice(worker=free[self._turn % len(free)])
        return Choice(worker=max(free, key=lambda w: (w.free, -len(w.running))))

    def held_until(self, job_id: str) -> float:
        return 0.0

    def on_dispatch(self, worker: WorkerView, job: Any, now: float | None = None) -> None:
        pass

    def on_dispatch_failed(self, job_id: str) -> None:
        pass

    def forget_job(self, job_id: str) -> None:
        pass

    def on_complete(
        self,
        worker_id: str,
        job_id: str,
        *,
        input_tokens: int,
        cache_tokens: int,
        prompt_ms: float = 0.0,
        ok: bool = True,
    ) -> None:
        pass

    def on_worker_reset(self, worker_id: str) -> None:
        pass

    def on_worker_gone(self, worker_id: str) -> None:
        pass

    def worker_stats(self, worker_id: str) -> dict[str, Any]:
        return {}


ROUTING_MODES = ("cache", "least-busy", "round-robin")
RoutingPolicy = CacheAwarePolicy | BaselinePolicy


def make_policy(mode: str, config: RoutingConfig | None = None) -> RoutingPolicy:
    """``AUXOT_ROUTING``: ``cache`` (default), ``least-busy`` or ``round-robin``."""
    if mode == "cache":
        return CacheAwarePolicy(config)
    if mode in ROUTING_MODES:
        return BaselinePolicy(mode)
    raise ValueError(f"unknown routing mode {mode!r} (one of {', '.join(ROUTING_MODES)})")
