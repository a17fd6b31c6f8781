#!/usr/bin/env python3
"""Auxot router: OpenAI- and Anthropic-compatible APIs in front of GPU workers.

One aiohttp application on one event loop serves the HTTP APIs (with SSE streaming), ``/health``
and the worker WebSocket hub ``/ws``. Jobs go through Redis Streams (embedded fakeredis by
default, ``AUXOT_REDIS_URL`` for a real Redis shared by several routers). Tokens travel from the
worker socket straight to the waiting request when both are on this instance, and through the
owner's Redis inbox otherwise.

Reading order: configuration, worker pool, job tracking, dispatch, HTTP plumbing (errors, auth),
handlers, background tasks, application wiring, command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson
from aiohttp import WSMsgType, web
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from auxot_common import anthropic_api as anthropic
from auxot_common import protocol as proto
from auxot_common.auth import (
    API_KEY_PREFIX,
    GPU_KEY_PREFIX,
    FailureLimiter,
    KeyVerifier,
    NamedHash,
    generate_key,
    hash_key,
    parse_hashes,
)
from auxot_common.embeddings import embeddings_body, parse_embeddings_request
from auxot_common.logs import redact_url, setup_logging
from auxot_common.models import (
    CatalogError,
    ModelCatalog,
    ModelSettings,
    ModelSpec,
    PoolDemand,
    WorkerState,
    assign_model,
    load_catalog,
    plan_move,
)
from auxot_common.openai_api import (
    KEEPALIVE,
    ChatRequest,
    OpenAIChatStream,
    OpenAICompletionStream,
    RequestError,
    chat_completion_body,
    completion_body,
    error_body,
    model_object,
    parse_chat_request,
    parse_completion_request,
)
from auxot_common.queue import RelayPublisher, StreamQueue
from auxot_common.registry import ModelResolution, Registry, RegistryError, load_registry, resolve_model
from auxot_common.settings import ConfigError, EnvReader, load_environment

VERSION = "0.1.0"
DEFAULT_MODEL = "Qwen3-Coder-30B-A3B"
log = logging.getLogger("auxot.router")


# === Configuration ================================================================================


@dataclass(slots=True)
class RouterConfig:
    """Everything the router reads from the environment (and ``.env``); see the README table."""

    api_key_hashes: list[NamedHash]
    admin_key_hashes: list[NamedHash]
    model: str = DEFAULT_MODEL
    quantization: str = ""
    ctx_size: int = 131072
    max_parallel: int = 2
    host: str = "0.0.0.0"
    port: int = 8080
    log_level: str = "info"
    job_timeout: float = 300.0
    heartbeat_interval: float = 10.0
    dead_worker_timeout: float = 45.0
    auth_cache_ttl: float = 300.0
    redis_url: str = ""
    redis_prefix: str = "auxot:"
    registry_file: str = ""
    max_body_bytes: int = 64 * 1024 * 1024
    max_ws_message_bytes: int = 64 * 1024 * 1024
    max_queue: int = 1000
    max_requests: int = 4096
    max_workers: int = 1024
    max_attempts: int = 3
    sse_keepalive: float = 10.0
    shutdown_grace: float = 30.0
    hello_timeout: float = 5.0
    sweep_interval: float = 15.0
    models: str = ""  # AUXOT_MODELS: comma-separated, the first is the default
    models_file: str = ""  # AUXOT_MODELS_FILE: TOML, wins over AUXOT_MODELS and AUXOT_MODEL
    move_cooldown: float = 600.0  # a worker is not moved again within this long
    demand_persist: float = 30.0  # a model waits this long with jobs and no worker before a move
    balance_interval: float = 5.0  # how often moves are considered and the models file is checked

    @classmethod
    def from_env(cls, env: dict[str, str]) -> RouterConfig:
        read = EnvReader(env)
        api, admin = read.raw("AUXOT_API_KEY_HASH"), read.raw("AUXOT_ADMIN_KEY_HASH")
        if api is None or admin is None:
            raise ConfigError(
                "no keys configured: run `python auxot_router.py setup --write-env` (writes .env) or "
                "`python auxot_router.py setup` and export the AUXOT_API_KEY_HASH and AUXOT_ADMIN_KEY_HASH it prints"
            )
        try:
            api_hashes, admin_hashes = parse_hashes(api), parse_hashes(admin)
        except ValueError as exc:
            raise ConfigError(f"AUXOT_API_KEY_HASH/AUXOT_ADMIN_KEY_HASH: {exc}") from None
        heartbeat = read.duration("AUXOT_HEARTBEAT_INTERVAL", 10.0, minimum=0.05)
        return cls(
            api_key_hashes=api_hashes,
            admin_key_hashes=admin_hashes,
            model=read.text("AUXOT_MODEL", DEFAULT_MODEL),
            quantization=read.text("AUXOT_QUANTIZATION", ""),
            ctx_size=read.integer("AUXOT_CTX_SIZE", 131072, minimum=256),
            max_parallel=read.integer("AUXOT_MAX_PARALLEL", 2, minimum=1, maximum=512),
            host=read.text("AUXOT_HOST", "0.0.0.0"),
            port=read.integer("AUXOT_PORT", 8080, minimum=0, maximum=65535),
            log_level=read.choice("AUXOT_LOG_LEVEL", "info", ("debug", "info", "warn", "warning", "error")),
            job_timeout=read.duration("AUXOT_JOB_TIMEOUT", 300.0, minimum=1.0),
            heartbeat_interval=heartbeat,
            dead_worker_timeout=read.duration("AUXOT_DEAD_WORKER_TIMEOUT", max(45.0, 3 * heartbeat), minimum=0.1),
            auth_cache_ttl=read.duration("AUXOT_AUTH_CACHE_TTL", 300.0),
            redis_url=read.text("AUXOT_REDIS_URL", ""),
            redis_prefix=read.text("AUXOT_REDIS_PREFIX", "auxot:"),
            registry_file=read.text("AUXOT_REGISTRY_FILE", ""),
            max_body_bytes=read.integer("AUXOT_MAX_BODY_BYTES", 64 * 1024 * 1024, minimum=1024),
            max_queue=read.integer("AUXOT_MAX_QUEUE", 1000, minimum=1),
            max_requests=read.integer("AUXOT_MAX_REQUESTS", 4096, minimum=1),
            max_workers=read.integer("AUXOT_MAX_WORKERS", 1024, minimum=1),
            max_attempts=read.integer("AUXOT_MAX_ATTEMPTS", 3, minimum=1, maximum=10),
            sse_keepalive=read.duration("AUXOT_SSE_KEEPALIVE", 10.0, minimum=0.05),
            shutdown_grace=read.duration("AUXOT_SHUTDOWN_GRACE", 30.0),
            hello_timeout=read.duration("AUXOT_HELLO_TIMEOUT", 5.0, minimum=0.1),
            sweep_interval=read.duration("AUXOT_SWEEP_INTERVAL", 15.0, minimum=0.05),
            models=read.text("AUXOT_MODELS", ""),
            models_file=read.text("AUXOT_MODELS_FILE", ""),
            move_cooldown=read.duration("AUXOT_MOVE_COOLDOWN", 600.0),
            demand_persist=read.duration("AUXOT_DEMAND_PERSIST", 30.0),
            balance_interval=read.duration("AUXOT_BALANCE_INTERVAL", 5.0, minimum=0.05),
        )

    def resolve(self, *, vram_total_gb: float = 0.0, vram_free_gb: float = 0.0) -> ModelResolution:
        """The registry resolution of AUXOT_MODEL; raises ConfigError with suggestions."""
        try:
            return resolve_model(
                load_registry(self.registry_file or None),
                self.model,
                self.quantization or None,
                context_size=self.ctx_size,
                parallel=self.max_parallel,
                vram_total_gb=vram_total_gb,
                vram_free_gb=vram_free_gb,
            )
        except (RegistryError, OSError, ValueError) as exc:
            raise ConfigError(str(exc)) from None

    def load_catalog(self) -> tuple[Registry, ModelCatalog]:
        """The registry and the models to serve (AUXOT_MODELS_FILE, AUXOT_MODELS or AUXOT_MODEL);
        raises ConfigError with a one-line reason or a did-you-mean."""
        try:
            registry = load_registry(self.registry_file or None)
            catalog = load_catalog(
                registry,
                model=self.model,
                models=self.models,
                models_file=self.models_file,
                defaults=ModelSettings(
                    registry=self.model,
                    quantization=self.quantization,
                    ctx_size=self.ctx_size,
                    parallel=self.max_parallel,
                ),
            )
        except (RegistryError, CatalogError, OSError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        return registry, catalog


def policy_from(resolution: ModelResolution, spec: ModelSpec | None = None) -> proto.Policy:
    embedding = spec is not None and spec.embedding
    return proto.Policy(
        embedding=embedding,
        pooling=spec.pooling if spec is not None and embedding else "",
        model_name=resolution.model_name,
        quantization=resolution.quantization,
        context_size=resolution.context_size,
        max_parallelism=resolution.parallel,
        capabilities=list(resolution.capabilities),
        huggingface_id=resolution.huggingface_id,
        files=list(resolution.files),
        mmproj_file=resolution.mmproj_file,
        family=resolution.family,
        parameters=resolution.parameters,
    )


# === Worker pool ==================================================================================


@dataclass(slots=True)
class RunningJob:
    entry_id: str
    job: proto.Job


@dataclass(slots=True, eq=False)
class WorkerConnection:
    """One connected worker: its socket, what it serves, and the jobs it runs now."""

    worker_id: str
    ws: web.WebSocketResponse
    capabilities: proto.Capabilities
    slots: int
    policy: proto.Policy | None = None  # the policy this worker was last given
    running: dict[str, RunningJob] = field(default_factory=dict)
    side_jobs: set[str] = field(default_factory=set)  # slot-free jobs (tokenize) awaiting an answer
    connected_at: float = field(default_factory=time.time)
    model: str = ""  # the canonical name of the model (pool) it serves
    requested_model: str = ""  # what it asked for (--model); such a worker is never moved
    movable: bool = False  # asked for nothing and reports the model it runs (Capabilities.policy_model)
    assigned_at: float = field(default_factory=time.monotonic)  # its last assignment or move
    moving_to: str = ""  # sent a policy_update for this model; joins its pool when it reports it
    fits: frozenset[str] = frozenset()  # models whose quantization fits its VRAM

    @property
    def free(self) -> int:
        return self.slots - len(self.running)

    async def send(self, message: proto.Message) -> None:
        await self.ws.send_str(proto.encode(message).decode())

    def info(self, instance_id: str) -> dict[str, Any]:
        caps = self.capabilities
        return {
            "id": self.worker_id,
            "instance": instance_id,
            "model": caps.model,
            "served_model": self.model,
            "backend": caps.backend,
            "ctx_size": caps.ctx_size,
            "total_slots": self.slots,
            "free_slots": max(self.free, 0),
            "active_jobs": len(self.running),
            "gpus": caps.gpus,
            "connected_at": int(self.connected_at),
        }


Backlog = deque[tuple[str, proto.Job]]  # (stream entry id, job); the `keys` fair backlog has this interface


@dataclass(slots=True)
class PoolStats:
    """Throughput of one model's pool on this instance, since start."""

    jobs_completed: int = 0
    jobs_failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


class ModelPool:
    """The workers serving one model on this instance, its backlog, its dispatcher and stats.

    Worker choice goes through :meth:`pick` alone (least busy today; cache-aware routing replaces
    its body and gets told about dispatches, completions and departures by the ``on_*`` hooks).
    The backlog holds jobs read from the model's stream that no worker took yet: an object with
    ``append``, ``appendleft``, ``popleft`` and ``len`` (a deque today).
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.workers: dict[str, WorkerConnection] = {}
        self.backlog: Backlog = deque()
        self.capacity_changed = asyncio.Event()
        self.dispatcher: asyncio.Task[None] | None = None
        self.stats = PoolStats()
        self.starving_since: float | None = None  # waiting jobs and no worker since (monotonic)

    @property
    def name(self) -> str:
        return self.spec.name

    def total_free(self) -> int:
        return sum(max(w.free, 0) for w in self.workers.values())

    def pick(self, job: proto.Job) -> WorkerConnection | None:
        """The worker to run ``job``, or None when none has a free slot (least busy)."""
        open_workers = (w for w in self.workers.values() if not w.ws.closed)
        best = max(open_workers, key=lambda w: (w.free, -len(w.running)), default=None)
        return best if best is not None and best.free > 0 else None

    def on_dispatch(self, worker: WorkerConnection, job: proto.Job) -> None:
        """``job`` went to ``worker`` (a hook for the choice policy)."""

    def on_complete(self, worker: WorkerConnection, job: proto.Job, message: proto.Complete | proto.Error) -> None:
        """``job`` finished on ``worker``."""
        if isinstance(message, proto.Complete):
            self.stats.jobs_completed += 1
            self.stats.input_tokens += message.input_tokens
            self.stats.output_tokens += message.output_tokens
        else:
            self.stats.jobs_failed += 1

    def on_worker_gone(self, worker: WorkerConnection) -> None:
        """``worker`` left this pool (disconnected or moved to another model)."""


class WorkerPool:
    """The workers connected to this instance, in one :class:`ModelPool` per configured model."""

    def __init__(self) -> None:
        self.pools: dict[str, ModelPool] = {}
        self.workers: dict[str, WorkerConnection] = {}  # every worker of every pool

    def pool(self, model: str) -> ModelPool | None:
        return self.pools.get(model)

    def add(self, worker: WorkerConnection, model: str) -> None:
        pool = self.pools[model]
        worker.model = model
        self.workers[worker.worker_id] = worker
        pool.workers[worker.worker_id] = worker
        pool.capacity_changed.set()

    def remove(self, worker: WorkerConnection) -> None:
        self.workers.pop(worker.worker_id, None)
        pool = self.pools.get(worker.model)
        if pool is not None and pool.workers.pop(worker.worker_id, None) is not None:
            pool.on_worker_gone(worker)

    def move(self, worker: WorkerConnection, model: str) -> None:
        """``worker`` now serves ``model`` (its running jobs stay with it until they finish)."""
        old = self.pools.get(worker.model)
        if old is not None and old.workers.pop(worker.worker_id, None) is not None:
            old.on_worker_gone(worker)
        worker.model = model
        pool = self.pools[model]
        pool.workers[worker.worker_id] = worker
        pool.capacity_changed.set()

    def total_free(self) -> int:
        return sum(pool.total_free() for pool in self.pools.values())

    def find_job(self, job_id: str) -> tuple[WorkerConnection, RunningJob] | None:
        for worker in self.workers.values():
            running = worker.running.get(job_id)
            if running is not None:
                return worker, running
        return None


# === Job tracking (the side holding the caller's request) =========================================


class EventChannel:
    """Unbounded single-consumer channel; the consumer takes everything that arrived at once.

    It has no timeouts of its own: a timer per wait would cost a heap insert and removal per
    token. The tracker's ticker calls :meth:`wake` on channels that have been idle too long.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[proto.Message] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: proto.Message) -> None:
        self._items.append(item)
        self.wake()

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> list[proto.Message]:
        """Everything queued; an empty list when woken with nothing to deliver."""
        if not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


class QueueFullError(Exception):
    """More jobs are waiting than ``AUXOT_MAX_QUEUE`` allows."""


class ModelNotFoundError(Exception):
    """A request names a model that is not configured, and there is no default model."""

    def __init__(self, requested: str, configured: list[str]) -> None:
        super().__init__(
            f"The model `{requested}` does not exist or you do not have access to it. "
            f"Models served here: {', '.join(configured)}"
        )


@dataclass(slots=True, eq=False)
class JobHandle:
    job: proto.Job
    deadline: float
    events: EventChannel = field(default_factory=EventChannel)
    last_yield: float = field(default_factory=time.monotonic)
    content_sent: bool = False
    dispatched_to: tuple[str, str] | None = None  # (instance id, worker id)
    finished: bool = False


class JobTracker:
    """Submits jobs and turns what happens to them into a stream of protocol messages.

    The stream always ends with exactly one :class:`~auxot_common.protocol.Complete` or
    :class:`~auxot_common.protocol.Error`: a job whose worker disappears is re-queued if its
    caller has seen no content yet (up to ``max_attempts``), and otherwise fails explicitly, so
    text is never duplicated; a job past its deadline fails with a timeout error.
    """

    def __init__(self, router: Router) -> None:
        self._router = router
        self.handles: dict[str, JobHandle] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def submit(self, job: proto.Job) -> JobHandle:
        router = self._router
        if await router.queue.depth(job.model) >= router.config.max_queue:
            raise QueueFullError
        now = time.time()
        job.reply_to = router.instance_id
        job.deadline = now + router.config.job_timeout
        handle = JobHandle(job=job, deadline=job.deadline)
        self.handles[job.job_id] = handle
        try:
            await router.queue.enqueue(job, proto.encode(job))
        except BaseException:
            self.handles.pop(job.job_id, None)
            raise
        return handle

    def deliver(self, message: proto.Message) -> bool:
        """Hand a job event to its waiting request; False if nobody waits for it any more."""
        handle = self.handles.get(getattr(message, "job_id", ""))
        if handle is None:
            return False
        handle.events.put(message)
        return True

    async def events(self, handle: JobHandle, keepalive: float) -> AsyncIterator[list[proto.Message]]:
        """Batches of events for the caller; an empty batch means "nothing for a while"."""
        while not handle.finished:
            if time.time() >= handle.deadline:
                yield [self._fail(handle, f"the job timed out after {self._router.config.job_timeout:g}s", 504)]
                return
            batch = await handle.events.take()
            if not batch:  # woken by the ticker
                if time.monotonic() - handle.last_yield >= keepalive:
                    handle.last_yield = time.monotonic()
                    yield []
                continue
            out: list[proto.Message] = []
            for message in batch:
                kind = type(message)
                if kind is proto.Token or kind is proto.ToolCallDelta:  # the common case, first
                    out.append(message)
                elif isinstance(message, proto.Dispatched):
                    handle.dispatched_to = (message.instance_id, message.worker_id)
                elif isinstance(message, proto.WorkerLost):
                    failure = await self._worker_lost(handle, message)
                    if failure is not None:
                        out.append(failure)
                        break
                else:
                    out.append(message)
                    if isinstance(message, proto.Complete | proto.Error):
                        self._finish(handle)
                        break
            if out:  # a batch of only internal events is not a keep-alive tick
                handle.last_yield = time.monotonic()
                yield out

    async def tick_forever(self, keepalive: float) -> None:
        """Wake requests that are due a keep-alive or past their deadline (one timer for all)."""
        interval = min(0.25, keepalive / 2)
        while True:
            await asyncio.sleep(interval)
            now, wall = time.monotonic(), time.time()
            for handle in list(self.handles.values()):
                if now - handle.last_yield >= keepalive or wall >= handle.deadline:
                    handle.events.wake()

    async def _worker_lost(self, handle: JobHandle, lost: proto.WorkerLost) -> proto.Error | None:
        job = handle.job
        if handle.content_sent or job.attempt >= self._router.config.max_attempts:
            reason = "after part of the answer was sent" if handle.content_sent else f"{job.attempt} times"
            return self._fail(handle, f"the worker serving this request went away ({lost.reason}) {reason}", 502)
        job.attempt += 1
        handle.dispatched_to = None
        log.warning("re-queueing job after worker loss", extra={"job_id": job.job_id, "attempt": job.attempt})
        try:
            await self._router.queue.enqueue(job, proto.encode(job))
        except RedisError:
            return self._fail(handle, "the job could not be re-queued: the queue is unavailable", 503)
        return None

    def _fail(self, handle: JobHandle, message: str, status: int) -> proto.Error:
        self.abandon(handle)
        return proto.Error(job_id=handle.job.job_id, error=message, status=status)

    def _finish(self, handle: JobHandle) -> None:
        handle.finished = True
        self.handles.pop(handle.job.job_id, None)

    def abandon(self, handle: JobHandle) -> None:
        """The caller no longer waits (gone, timed out): stop the job wherever it is."""
        if handle.finished:
            return
        self._finish(handle)
        self.spawn(self._router.cancel_job(handle.job.job_id, handle.dispatched_to))

    def spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


# === The router: dispatch and message routing =====================================================


class Router:
    """State of one router instance, shared by handlers and background tasks."""

    def __init__(self, config: RouterConfig, redis: Redis, *, server_blocking: bool) -> None:
        self.config = config
        self.instance_id = secrets.token_hex(8)
        self.redis = redis
        self.queue = StreamQueue(
            redis, instance_id=self.instance_id, prefix=config.redis_prefix, server_blocking=server_blocking
        )
        self.relay = RelayPublisher(self.queue)
        self.pool = WorkerPool()
        self.tracker = JobTracker(self)
        self.api_keys = KeyVerifier(config.api_key_hashes, cache_ttl=config.auth_cache_ttl)
        self.admin_keys = KeyVerifier(config.admin_key_hashes, cache_ttl=config.auth_cache_ttl)
        self.auth_failures = FailureLimiter()
        self.registry, self.catalog = config.load_catalog()
        self.queue.single_stream = self.single_model
        self._set_default()
        for spec in self.catalog.specs:
            self.pool.pools[spec.name] = ModelPool(spec)
        self.draining = False
        self.running = False  # dispatchers are started (background_tasks) and new pools get one
        self.unacked: list[tuple[str, str]] = []  # (model, entry) finished, but XACK failed (Redis away)
        self.in_flight = 0
        self.started = int(time.time())
        self.models_file_mtime = self._models_file_mtime()
        self.depths: dict[str, int] = {}  # queue depth per model, refreshed by the balancer

    def _set_default(self) -> None:
        """``resolution``, ``policy`` and ``model_name`` describe the default model (or the first),
        as they did when the router served one model."""
        spec = self.catalog.default or self.catalog.specs[0]
        self.resolution = spec.resolution
        self.policy = policy_from(spec.resolution, spec)
        self.model_name = spec.name

    @property
    def single_model(self) -> bool:
        """Configured with AUXOT_MODEL alone: responses echo the request's model, as before."""
        return self.catalog.source == "AUXOT_MODEL"

    def _models_file_mtime(self) -> float:
        try:
            return os.stat(self.config.models_file).st_mtime if self.config.models_file else 0.0
        except OSError:
            return 0.0

    # --- dispatch -------------------------------------------------------------------------------

    def start_dispatchers(self) -> None:
        self.running = True
        for pool in self.pool.pools.values():
            if pool.dispatcher is None:
                pool.dispatcher = asyncio.create_task(self.dispatch_forever(pool), name=f"dispatch-{pool.name}")

    async def stop_dispatchers(self) -> None:
        self.running = False
        tasks = [p.dispatcher for p in self.pool.pools.values() if p.dispatcher is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pool in self.pool.pools.values():
            pool.dispatcher = None

    async def dispatch_forever(self, pool: ModelPool) -> None:
        """Read as many jobs of the pool's model as its workers have free slots, and hand each
        to the worker :meth:`ModelPool.pick` chooses."""
        model = pool.name
        while True:
            free = pool.total_free()
            if (self.draining and self.queue.shared) or free <= 0:
                pool.capacity_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pool.capacity_changed.wait(), 1.0)
                continue
            if pool.backlog:
                if await self._dispatch_backlog(pool):
                    continue
                # jobs wait that no worker takes now (a choice policy may hold one back)
                pool.capacity_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pool.capacity_changed.wait(), 0.05)
                continue
            try:
                entries = await self.queue.read_jobs(free, timeout=1.0, model=model)
            except RedisError as exc:
                log.error("reading jobs failed", extra={"error": str(exc), "model": model})
                await asyncio.sleep(1.0)
                continue
            await self._accept(pool, entries)

    async def _accept(self, pool: ModelPool, entries: list[tuple[str, proto.Job | None]]) -> None:
        drop: list[str] = []
        jobs: list[tuple[str, proto.Job]] = []
        for entry_id, job in entries:
            if job is None:
                log.error("dropping an unreadable job entry", extra={"entry_id": entry_id})
                drop.append(entry_id)
            else:
                jobs.append((entry_id, job))
        remote = [job.job_id for _, job in jobs if job.reply_to != self.instance_id]
        cancelled: set[str] = set()
        if remote:
            try:
                cancelled = await self.queue.cancelled(remote)
            except RedisError:  # run them: a job run for nobody costs less than one lost
                log.warning("could not check cancellations", extra={"jobs": len(remote)})
        now = time.time()
        for entry_id, job in jobs:
            gone = job.job_id in cancelled or (
                job.reply_to == self.instance_id and job.job_id not in self.tracker.handles
            )
            if gone or (job.deadline and job.deadline < now):
                drop.append(entry_id)
            else:
                job.model = pool.name  # a job from the stream of this model is this model's
                pool.backlog.append((entry_id, job))
        if drop:
            await self.ack(drop, pool.name)
        await self._dispatch_backlog(pool)

    async def _dispatch_backlog(self, pool: ModelPool) -> bool:
        """Hand backlog jobs to workers while some can take one; True if any was dispatched."""
        dispatched = False
        while pool.backlog:
            entry_id, job = pool.backlog.popleft()
            worker = pool.pick(job)
            if worker is None:
                pool.backlog.appendleft((entry_id, job))
                return dispatched
            worker.running[job.job_id] = RunningJob(entry_id, job)
            try:
                await worker.send(job)
            except (ConnectionError, RuntimeError):
                # its socket is closing and its handler has not noticed yet: never pick it again
                # (the handler's cleanup hands its other jobs back), keep the job for another
                worker.running.pop(job.job_id, None)
                self.pool.remove(worker)
                pool.backlog.appendleft((entry_id, job))
                continue
            dispatched = True
            pool.on_dispatch(worker, job)
            log.debug("job dispatched", extra={"job_id": job.job_id, "worker_id": worker.worker_id, "model": pool.name})
            self.route(job.reply_to, proto.Dispatched(job.job_id, worker.worker_id, self.instance_id))
        return dispatched

    # --- routing job events to their owner ------------------------------------------------------

    def route(self, owner: str, message: proto.Message, raw: bytes | None = None) -> bool:
        """Deliver a job event to the instance holding the caller. False if it is local and gone."""
        if owner == self.instance_id:
            return self.tracker.deliver(message)
        self.relay.send(owner, raw if raw is not None else proto.encode(message))
        return True

    async def on_worker_message(self, worker: WorkerConnection, raw: bytes, message: proto.Message) -> None:
        kind = type(message)
        if kind is proto.Token or kind is proto.ToolCallDelta or kind is proto.PromptProgress:
            assert isinstance(message, proto.Token | proto.ToolCallDelta | proto.PromptProgress)
            running = worker.running.get(message.job_id)
            if running is not None and not self.route(running.job.reply_to, message, raw):
                await self._stop_on_worker(worker, message.job_id)  # its caller left meanwhile
        elif isinstance(message, proto.Complete | proto.Error) and message.job_id in worker.side_jobs:
            self.tracker.deliver(message)
        elif isinstance(message, proto.Complete | proto.Error) and message.job_id:
            running = worker.running.pop(message.job_id, None)
            if running is not None:
                pool = self.pool.pool(running.job.model) or self.pool.pool(worker.model)
                if pool is not None:
                    pool.on_complete(worker, running.job, message)
                self._capacity_changed(worker)
                if isinstance(message, proto.Error) and message.retryable:  # e.g. its llama-server died
                    self.route(running.job.reply_to, proto.WorkerLost(message.job_id, message.error))
                else:
                    self.route(running.job.reply_to, message, raw)
                await self.ack([running.entry_id], running.job.model)
        elif isinstance(message, proto.Heartbeat):
            await worker.send(proto.HeartbeatAck())
            try:  # a Redis outage must not drop a worker whose tokens need no Redis
                info = worker.info(self.instance_id)
                await self.queue.beat_worker(worker.worker_id, info, self.config.dead_worker_timeout)
            except RedisError as exc:
                log.warning("could not record a heartbeat", extra={"worker_id": worker.worker_id, "error": str(exc)})
        elif isinstance(message, proto.Config):
            worker.capabilities = message.capabilities
            serving = message.capabilities.policy_model
            if serving and serving != worker.model and self.pool.pool(serving) is not None:
                # a moved worker reports its new model once its llama-server runs it
                log.info("worker moved", extra={"worker_id": worker.worker_id, "from": worker.model, "to": serving})
                self.pool.move(worker, serving)
                worker.assigned_at = time.monotonic()
            if worker.moving_to == serving:
                worker.moving_to = ""
            elif worker.moving_to and serving and serving == worker.model:
                # it answered the policy_update with its old model (--model-path pins a file)
                log.warning("worker refused a move", extra={"worker_id": worker.worker_id, "model": serving})
                worker.moving_to, worker.movable = "", False
            if message.capabilities.draining:
                worker.slots = 0
            elif message.capabilities.total_slots > 0:
                worker.slots = message.capabilities.total_slots
                self._capacity_changed(worker)
            await worker.send(proto.ConfigAck(success=True))
        elif isinstance(message, proto.Error):
            log.warning("worker reported an error", extra={"worker_id": worker.worker_id, "error": message.error})
        else:
            log.warning("unexpected message from worker", extra={"worker_id": worker.worker_id, "type": message.type})

    def _capacity_changed(self, worker: WorkerConnection) -> None:
        pool = self.pool.pool(worker.model)
        if pool is not None:
            pool.capacity_changed.set()

    async def ack(self, entry_ids: list[str], model: str) -> None:
        """Finish queue entries of ``model``'s stream; if Redis is away, remember them and try
        again later."""
        todo = self.unacked + [(model, entry_id) for entry_id in entry_ids]
        by_model: dict[str, list[str]] = {}
        for name, entry_id in todo:
            by_model.setdefault(name, []).append(entry_id)
        self.unacked = []
        for name, ids in by_model.items():
            try:
                await self.queue.ack(ids, name)
            except RedisError as exc:
                self.unacked.extend((name, entry_id) for entry_id in ids)
                log.warning(
                    "could not acknowledge jobs; will retry", extra={"entries": len(self.unacked), "error": str(exc)}
                )

    async def _stop_on_worker(self, worker: WorkerConnection, job_id: str) -> None:
        running = worker.running.pop(job_id, None)
        if running is None:
            return
        self._capacity_changed(worker)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await worker.send(proto.Cancel(job_id))
        await self.ack([running.entry_id], running.job.model)

    async def worker_gone(self, worker: WorkerConnection, reason: str) -> None:
        """A worker's socket closed: its running jobs go back to their owners to retry or fail."""
        self.pool.remove(worker)
        lost = list(worker.running.values())
        worker.running.clear()
        with contextlib.suppress(RedisError):
            await self.queue.drop_worker(worker.worker_id)
        for running in lost:
            await self.ack([running.entry_id], running.job.model)
        for running in lost:
            self.route(running.job.reply_to, proto.WorkerLost(running.job.job_id, reason))
        if lost:
            log.warning(
                "worker disconnected with running jobs", extra={"worker_id": worker.worker_id, "jobs": len(lost)}
            )

    async def cancel_job(self, job_id: str, dispatched_to: tuple[str, str] | None) -> None:
        """Stop a job whose caller left: skip it at dispatch, or tell its worker to abort."""
        try:
            found = self.pool.find_job(job_id)
            if found is not None:
                await self._stop_on_worker(found[0], job_id)
            elif dispatched_to is not None and dispatched_to[0] != self.instance_id:
                self.relay.send(dispatched_to[0], proto.encode(proto.Cancel(job_id)))
            else:
                await self.queue.mark_cancelled(job_id)
        except RedisError as exc:
            log.warning("could not record a cancellation", extra={"job_id": job_id, "error": str(exc)})

    async def on_relayed(self, raw: bytes) -> None:
        """A message another instance relayed to this one."""
        try:
            message = proto.decode(raw)
        except proto.ProtocolError:
            log.error("unreadable relay message")
            return
        if isinstance(message, proto.Cancel):
            found = self.pool.find_job(message.job_id)
            if found is not None:
                await self._stop_on_worker(found[0], message.job_id)
        elif not self.tracker.deliver(message) and isinstance(message, proto.Dispatched):
            self.relay.send(message.instance_id, proto.encode(proto.Cancel(message.job_id)))

    async def reload(self, env: dict[str, str]) -> None:
        """SIGHUP or a changed models file: re-read the model settings; workers whose policy
        changed get a ``policy_update`` (they download, restart llama-server and re-announce
        their slots); pools of models no longer configured hand their workers to the others."""
        try:
            fresh = RouterConfig.from_env(env)
            registry, catalog = fresh.load_catalog()
        except ConfigError as exc:
            log.error("reload refused: the new configuration is invalid", extra={"error": str(exc)})
            return
        config = self.config
        config.model, config.quantization = fresh.model, fresh.quantization
        config.ctx_size, config.max_parallel, config.registry_file = (
            fresh.ctx_size,
            fresh.max_parallel,
            fresh.registry_file,
        )
        config.models, config.models_file = fresh.models, fresh.models_file
        self.registry, self.catalog = registry, catalog
        self.queue.single_stream = self.single_model
        self.models_file_mtime = self._models_file_mtime()
        self._set_default()
        removed = [pool for name, pool in self.pool.pools.items() if catalog.get(name) is None]
        for spec in catalog.specs:
            pool = self.pool.pools.get(spec.name)
            if pool is None:
                pool = self.pool.pools[spec.name] = ModelPool(spec)
                if self.running:
                    pool.dispatcher = asyncio.create_task(self.dispatch_forever(pool), name=f"dispatch-{spec.name}")
            pool.spec = spec
        log.info("configuration reloaded", extra={"models": catalog.names, "default": self.model_name})
        for pool in removed:
            await self._retire(pool)
        for worker in list(self.pool.workers.values()):
            target = catalog.get(worker.moving_to or worker.model)
            if target is None:
                continue
            worker.fits = self.fitting_models(worker.capabilities)
            policy = self.policy_for(worker.capabilities, target)
            if policy != worker.policy:
                await self._send_policy(worker, policy)

    async def _retire(self, pool: ModelPool) -> None:
        """A model left the catalog: its workers are assigned another; its jobs already read stay
        in the backlog until they finish or time out elsewhere (its stream is still swept)."""
        if pool.dispatcher is not None:
            pool.dispatcher.cancel()
        self.pool.pools.pop(pool.name, None)
        for worker in list(pool.workers.values()):
            target = self.assign(worker.capabilities, current="")
            if target is None:
                continue
            # in no pool until it reports the new model (it still runs the old one); its running
            # jobs stay with it
            worker.model, worker.moving_to = "", target.name
            worker.assigned_at = time.monotonic()
            await self._send_policy(worker, self.policy_for(worker.capabilities, target))
        for entry_id, job in pool.backlog:  # give them back to their callers to fail or retry
            self.route(job.reply_to, proto.WorkerLost(job.job_id, f"the model {pool.name} is no longer served"))
            await self.ack([entry_id], pool.name)
        log.warning("model removed from the catalog", extra={"model": pool.name})

    async def _send_policy(self, worker: WorkerConnection, policy: proto.Policy) -> None:
        worker.policy = policy
        with contextlib.suppress(ConnectionError, RuntimeError):
            await worker.send(proto.PolicyUpdate(policy=policy))
        log.info("policy update sent", extra={"worker_id": worker.worker_id, "model": policy.model_name})

    def policy_for(self, caps: proto.Capabilities, spec: ModelSpec | None = None) -> proto.Policy:
        """The policy for one worker serving ``spec`` (the default model when None): with
        quantization ``auto``, the best quantization that fits the VRAM it reported."""
        spec = spec or self.catalog.default or self.catalog.specs[0]
        try:
            resolution = spec.resolve_for(self.registry, caps.vram_gb)
        except RegistryError:
            resolution = spec.resolution
        if resolution.warning:
            log.warning("model may not fit the worker", extra={"warning": resolution.warning, "vram_gb": caps.vram_gb})
        return policy_from(resolution, spec)

    def fitting_models(self, caps: proto.Capabilities) -> frozenset[str]:
        """The models whose chosen quantization fits the worker's VRAM (all when it is unknown)."""
        fits = set()
        for spec in self.catalog.specs:
            try:
                if caps.vram_gb <= 0 or not spec.resolve_for(self.registry, caps.vram_gb).warning:
                    fits.add(spec.name)
            except RegistryError:
                continue
        return frozenset(fits)

    # --- which worker serves which model --------------------------------------------------------

    def demand(self) -> list[PoolDemand]:
        """Each model's pool as the assignment policy sees it (local workers, local backlog and
        the last queue depth the balancer saw)."""
        arriving: dict[str, int] = {}
        for worker in self.pool.workers.values():
            if worker.moving_to and worker.moving_to != worker.model:
                arriving[worker.moving_to] = arriving.get(worker.moving_to, 0) + 1
        out = []
        for spec in self.catalog.specs:
            pool = self.pool.pools[spec.name]
            out.append(
                PoolDemand(
                    name=spec.name,
                    workers=len(pool.workers) + arriving.get(spec.name, 0),
                    waiting=len(pool.backlog) + self.depths.get(spec.name, 0),
                    min_workers=spec.min_workers,
                    max_workers=spec.max_workers,
                    size_gb=spec.resolution.vram_gb,
                    starving_since=pool.starving_since,
                )
            )
        return out

    def assign(self, caps: proto.Capabilities, *, current: str) -> ModelSpec | None:
        fits = self.fitting_models(caps)
        name = assign_model(self.demand(), lambda model: model in fits, current=current)
        return self.catalog.get(name) if name else None

    async def balance(self) -> None:
        """One round of the balancer: refresh queue depths, note starving models, move at most
        one idle worker to a model that has had waiting jobs and no worker for a while."""
        depths = {}
        for spec in self.catalog.specs:
            depths[spec.name] = await self.queue.depth(spec.name)
        self.depths = depths
        now = time.monotonic()
        for state in self.demand():
            pool = self.pool.pools[state.name]
            if state.workers == 0 and state.waiting > 0:
                pool.starving_since = pool.starving_since if pool.starving_since is not None else now
            else:
                pool.starving_since = None
        states = [
            WorkerState(
                worker_id=w.worker_id,
                model=w.model,
                running=len(w.running),
                movable=w.movable and not w.moving_to,
                assigned_at=w.assigned_at,
                fits=w.fits,
            )
            for w in self.pool.workers.values()
        ]
        move = plan_move(
            self.demand(), states, now, cooldown_s=self.config.move_cooldown, persist_s=self.config.demand_persist
        )
        if move is None:
            return
        worker = self.pool.workers[move[0]]
        target = self.catalog.get(move[1])
        assert target is not None
        log.info(
            "moving a worker to a model with waiting jobs",
            extra={"worker_id": worker.worker_id, "from": worker.model, "to": target.name},
        )
        worker.moving_to = target.name
        worker.assigned_at = now
        await self._send_policy(worker, self.policy_for(worker.capabilities, target))

    # --- tokenizing (count_tokens) --------------------------------------------------------------

    async def tokenize(self, job: proto.Job, timeout: float) -> int | None:
        """Exact prompt tokens via a local worker's llama-server; None if none answers in time.

        Counting needs no generation slot, so it goes straight to the least busy worker of this
        instance instead of waiting in the queue behind generations.
        """
        pool = self.pool.pool(job.model)
        workers = sorted(pool.workers.values() if pool else (), key=lambda w: len(w.running))
        if not workers:
            return None
        worker = workers[0]
        job.reply_to = self.instance_id
        handle = JobHandle(job=job, deadline=time.time() + timeout)
        self.tracker.handles[job.job_id] = handle
        worker.side_jobs.add(job.job_id)
        try:
            await worker.send(job)
            final = await wait_final(self, handle)
        except (ConnectionError, RuntimeError):
            return None
        finally:
            worker.side_jobs.discard(job.job_id)
            self.tracker.handles.pop(job.job_id, None)
        if isinstance(final, proto.Complete):
            return final.input_tokens
        return None

    # --- health ---------------------------------------------------------------------------------

    async def health(self) -> tuple[int, dict[str, Any]]:
        local = [w.info(self.instance_id) for w in self.pool.workers.values()]
        body: dict[str, Any] = {
            "status": "ok",
            "version": VERSION,
            "instance": self.instance_id,
            "model": self.model_name,
        }
        status = 200
        try:
            depth = 0
            cluster = await self.queue.cluster_workers()
        except RedisError:
            depth, cluster, status = -1, [], 503
            body["status"] = "degraded"
            body["redis"] = "unreachable"
        workers = local + [w for w in cluster if w.get("instance") != self.instance_id]
        total = sum(int(w.get("total_slots", 0)) for w in workers)
        active = sum(int(w.get("active_jobs", 0)) for w in workers)
        models: dict[str, Any] = {}
        for spec in self.catalog.specs:
            served = [w for w in workers if w.get("served_model") == spec.name]
            pool = self.pool.pools[spec.name]
            try:
                model_depth = await self.queue.depth(spec.name) if depth >= 0 else -1
            except RedisError:
                model_depth = -1
            slots = sum(int(w.get("total_slots", 0)) for w in served)
            busy = sum(int(w.get("active_jobs", 0)) for w in served)
            models[spec.name] = {
                "default": spec is self.catalog.default,
                "embedding": spec.embedding,
                "workers": len(served),
                "total_slots": slots,
                "active_jobs": busy,
                "available": max(slots - busy, 0),
                "queue_depth": model_depth,
                "backlog": len(pool.backlog),
                "jobs_completed": pool.stats.jobs_completed,
                "jobs_failed": pool.stats.jobs_failed,
                "input_tokens": pool.stats.input_tokens,
                "output_tokens": pool.stats.output_tokens,
            }
        if depth >= 0:
            depth = sum(m["queue_depth"] for m in models.values() if m["queue_depth"] > 0)
        body.update(
            workers=len(workers),
            total_slots=total,
            active_jobs=active,
            available=max(total - active, 0),
            queue_depth=depth,
            models=models,
            worker_list=workers,
        )
        if self.draining:
            body["status"] = "draining"
        return status, body


ROUTER = web.AppKey("router", Router)


# === HTTP plumbing: error shapes, JSON bodies, auth ===============================================


def is_anthropic(request: web.Request) -> bool:
    path = request.path
    if path.startswith("/api/anthropic"):
        return True
    if path.startswith("/v1/messages"):
        return True
    return path.startswith("/v1/models") and ("anthropic-version" in request.headers or "x-api-key" in request.headers)


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented",
}


def error_response(request: web.Request, status: int, message: str, *, retry_after: int | None = None) -> web.Response:
    """An error in the shape of the API the request was for."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    if is_anthropic(request):
        body = anthropic.error_body(anthropic.error_type_for_status(status), message)
    else:
        body = error_body(message, _OPENAI_TYPES.get(status, "server_error"))
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; raises RequestError (400, 413) in the API's terms."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[ROUTER].config.max_body_bytes
        raise RequestError(413, f"request body too large: the limit is {limit} bytes (AUXOT_MAX_BODY_BYTES)") from None
    if not raw:
        raise RequestError(400, "the request body is empty; expected a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"invalid JSON: {exc}") from None


def presented_key(request: web.Request) -> str:
    """The API key: ``Authorization: Bearer`` (both APIs) or ``x-api-key`` (Anthropic)."""
    if is_anthropic(request):
        key = request.headers.get("x-api-key", "").strip()
        if key:
            return key
    header = request.headers.get("Authorization", "")
    return header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure becomes a JSON error in the API's own shape; the server keeps serving."""
    try:
        return await handler(request)
    except RequestError as exc:
        return error_response(request, exc.status, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return error_response(request, 404, f"endpoint not found: {request.method} {request.path}")
        if exc.status == 405:
            return error_response(request, 405, f"method {request.method} is not allowed on {request.path}")
        if exc.status == 413:
            return error_response(request, 413, "request body too large")
        return error_response(request, exc.status, exc.reason)
    except RedisError as exc:
        log.error("queue unavailable", extra={"error": str(exc), "path": request.path})
        return error_response(request, 503, "the job queue is unavailable; try again shortly", retry_after=2)
    except ModelNotFoundError as exc:
        if is_anthropic(request):
            body = anthropic.error_body("not_found_error", str(exc))
        else:
            body = error_body(str(exc), "invalid_request_error", param="model", code="model_not_found")
        return json_response(body, status=404)
    except QueueFullError:
        status = 529 if is_anthropic(request) else 429
        return error_response(
            request, status, "too many requests are waiting for a GPU; try again shortly", retry_after=5
        )


OPEN_PATHS = frozenset({"/health", "/ws"})


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """API routes need a valid ``rtr_`` key. Failures are rate-limited per client address."""
    if request.path in OPEN_PATHS:
        return await handler(request)
    router = request.app[ROUTER]
    client = request.remote or "unknown"
    if not router.auth_failures.allowed(client):
        return error_response(request, 429, "too many failed authentication attempts; slow down", retry_after=60)
    key = presented_key(request)
    if not key:
        missing = (
            "missing API key: set the x-api-key header or use Bearer"
            if is_anthropic(request)
            else "missing Bearer token"
        )
        return error_response(request, 401, missing)
    if await router.api_keys.verify(key) is None:
        router.auth_failures.record_failure(client)
        return error_response(request, 401, "invalid API key")
    return await handler(request)


@web.middleware
async def admission_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse new work while draining, and beyond AUXOT_MAX_REQUESTS requests in flight."""
    router = request.app[ROUTER]
    if request.path == "/health":
        return await handler(request)
    if router.draining:
        return error_response(request, 503, "the router is shutting down; retry on another instance", retry_after=1)
    if request.path == "/ws" and len(router.pool.workers) >= router.config.max_workers:
        return error_response(request, 503, "too many workers are connected (AUXOT_MAX_WORKERS)", retry_after=30)
    if router.in_flight >= router.config.max_requests:
        return error_response(request, 503, "too many requests in flight; try again shortly", retry_after=1)
    router.in_flight += 1
    try:
        return await handler(request)
    finally:
        router.in_flight -= 1


# === Handlers: OpenAI =============================================================================


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class JobRequest(Protocol):
    """A validated request of either API (OpenAI's or Anthropic's ChatRequest)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    temperature: float | None
    reasoning_effort: str
    params: dict[str, Any]
    stream: bool

    @property
    def max_tokens(self) -> int | None: ...


def request_model(router: Router, requested: str | None, *, kind: str = "chat") -> ModelSpec:
    """The configured model a request names (exact names, aliases, else the default); raises
    ModelNotFoundError, or RequestError when the model cannot do ``kind``."""
    spec = router.catalog.match(requested or "")
    if spec is None:
        raise ModelNotFoundError(requested or "", router.catalog.names)
    if kind == "embeddings" and not spec.embedding:
        raise RequestError(400, f"the model {spec.name} is not an embedding model", param="model")
    if kind != "embeddings" and spec.embedding:
        raise RequestError(400, f"the model {spec.name} is an embedding model: use /v1/embeddings", param="model")
    return spec


def served_name(router: Router, requested: str | None, spec: ModelSpec) -> str:
    """The ``model`` of a response: the model that serves it; a single-model router (AUXOT_MODEL)
    echoes the request's name, as it always has."""
    if router.single_model:
        return requested or spec.name
    return spec.name


def job_from(request_: JobRequest, kind: str, job_id: str, model: str = "") -> proto.Job:
    return proto.Job(
        job_id=job_id,
        model=model,
        messages=request_.messages,
        tools=request_.tools,
        temperature=request_.temperature,
        max_tokens=request_.max_tokens,
        reasoning_effort=request_.reasoning_effort,
        stream=request_.stream,
        kind=kind,
        params=request_.params,
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    chat = parse_chat_request(await read_json(request))
    return await run_openai_job(request, chat, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    chat = parse_completion_request(await read_json(request))
    return await run_openai_job(request, chat, "completion")


async def run_openai_job(request: web.Request, chat: ChatRequest, kind: str) -> web.StreamResponse:
    router = request.app[ROUTER]
    spec = request_model(router, chat.model)
    completion_id = new_id("chatcmpl-" if kind == "chat" else "cmpl-")
    model = served_name(router, chat.model, spec)
    created = int(time.time())
    handle = await router.tracker.submit(job_from(chat, kind, completion_id, spec.name))
    log.info("job accepted", extra={"job_id": completion_id, "kind": kind, "stream": chat.stream})
    try:
        if not chat.stream:
            final = await wait_final(router, handle)
            if isinstance(final, proto.Error):
                return job_error_response(request, final)
            build = chat_completion_body if kind == "chat" else completion_body
            return json_response(build(final, completion_id=completion_id, model=model, created=created))
        encoder_cls = OpenAIChatStream if kind == "chat" else OpenAICompletionStream
        encoder = encoder_cls(completion_id, model, created, chat.include_usage)
        return await stream_job(request, router, handle, encoder)
    finally:
        router.tracker.abandon(handle)


async def wait_final(router: Router, handle: JobHandle) -> proto.Complete | proto.Error:
    async for batch in router.tracker.events(handle, router.config.sse_keepalive):
        for message in batch:
            if isinstance(message, proto.Complete | proto.Error):
                return message
    return proto.Error(job_id=handle.job.job_id, error="the job ended without a result", status=502)


def job_error_response(request: web.Request, error: proto.Error) -> web.Response:
    """A job failure as an HTTP error: llama-server's 4xx (prompt too long) stay 400s."""
    status = error.status if error.status in (502, 503, 504) else 400 if 400 <= error.status < 500 else 500
    message = error.error + (f": {error.details}" if error.details else "")
    return error_response(request, status, message)


class StreamEncoder(Protocol):
    """What :func:`stream_job` needs from an API's SSE encoder."""

    def start(self) -> bytes: ...
    def on_token(self, msg: proto.Token) -> bytes: ...
    def on_tool_call_delta(self, msg: proto.ToolCallDelta) -> bytes: ...
    def on_complete(self, msg: proto.Complete) -> bytes: ...
    def on_error(self, message: str) -> bytes: ...


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def stream_job(
    request: web.Request, router: Router, handle: JobHandle, encoder: StreamEncoder, keepalive: bytes = KEEPALIVE
) -> web.StreamResponse:
    """Relay a job as SSE.

    Headers go out with the first event, or after one keep-alive interval with nothing to say:
    an error that comes quickly (a prompt longer than the context) is still a proper HTTP 400,
    and a long wait in the queue still keeps proxies from cutting the connection.
    """
    response: web.StreamResponse | None = None
    async for batch in router.tracker.events(handle, router.config.sse_keepalive):
        if response is None:
            first = batch[0] if batch else None
            if isinstance(first, proto.Error):
                return job_error_response(request, first)
            response = web.StreamResponse(headers=SSE_HEADERS)
            await response.prepare(request)
            await response.write(encoder.start())
        if not batch:
            await response.write(keepalive)
            continue
        await response.write(encode_batch(handle, encoder, batch))
    if response is None:  # pragma: no cover - events() always yields a final message
        raise web.HTTPInternalServerError()
    return response


def encode_batch(handle: JobHandle, encoder: StreamEncoder, batch: list[proto.Message]) -> bytes:
    out = bytearray()
    for message in batch:
        if isinstance(message, proto.Token):
            out += encoder.on_token(message)
            handle.content_sent = True
        elif isinstance(message, proto.ToolCallDelta):
            out += encoder.on_tool_call_delta(message)
            handle.content_sent = True
        elif isinstance(message, proto.Complete):
            out += encoder.on_complete(message)
        elif isinstance(message, proto.Error):
            out += encoder.on_error(message.error + (f": {message.details}" if message.details else ""))
    return bytes(out)


def model_entry(router: Router, spec: ModelSpec, anthropic_shape: bool) -> dict[str, Any]:
    """One model of ``/models``: the API's own fields plus its context length, whether a worker
    serves it now, and (OpenAI) its aliases and whether it is the default."""
    context = spec.resolution.context_size
    pool = router.pool.pools.get(spec.name)
    serving = pool is not None and any(w.slots > 0 for w in pool.workers.values())
    if anthropic_shape:
        obj = anthropic.model_object(spec.name, max_input_tokens=context, max_tokens=context)
    else:
        obj = model_object(spec.name, router.started)
        obj.update(context_length=context, aliases=list(spec.aliases), default=spec is router.catalog.default)
        if spec.embedding:
            obj["embedding"] = True
    obj["serving"] = serving
    return obj


async def list_models(request: web.Request) -> web.Response:
    """``/models`` in the shape of the API asking (``/v1/models`` serves both): every configured
    model, the default first."""
    router = request.app[ROUTER]
    specs = sorted(router.catalog.specs, key=lambda s: s is not router.catalog.default)
    shape = is_anthropic(request)
    data = [model_entry(router, spec, shape) for spec in specs]
    if shape:
        first, last = data[0]["id"], data[-1]["id"]
        return json_response({"data": data, "first_id": first, "has_more": False, "last_id": last})
    return json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """One configured model, by name, id or alias (never the default fallback)."""
    router = request.app[ROUTER]
    model_id = request.match_info.get("model_id", "")
    spec = router.catalog.match_exact(model_id)
    if spec is None:
        suffix = " or you do not have access to it." if is_anthropic(request) else ""
        return error_response(request, 404, f'The model "{model_id}" does not exist{suffix}')
    return json_response(model_entry(router, spec, is_anthropic(request)))


async def embeddings(request: web.Request) -> web.Response:
    """OpenAI embeddings from a model marked as an embedding model."""
    router = request.app[ROUTER]
    if not any(spec.embedding for spec in router.catalog.specs):
        return error_response(
            request, 501, "embeddings are not served here: no model is marked `embedding = true` (AUXOT_MODELS_FILE)"
        )
    parsed = parse_embeddings_request(await read_json(request))
    requested = router.catalog.match_exact(parsed.model) if parsed.model else None
    if requested is None:  # unknown names go to the embedding model when there is only one
        embedders = [s for s in router.catalog.specs if s.embedding]
        if parsed.model and len(embedders) != 1:
            raise ModelNotFoundError(parsed.model, [s.name for s in embedders])
        requested = embedders[0]
    spec = request_model(router, requested.name, kind="embeddings")
    job = proto.Job(job_id=new_id("emb-"), model=spec.name, kind="embeddings", params={"input": parsed.inputs})
    handle = await router.tracker.submit(job)
    log.info("job accepted", extra={"job_id": job.job_id, "kind": "embeddings", "inputs": len(parsed.inputs)})
    try:
        final = await wait_final(router, handle)
    finally:
        router.tracker.abandon(handle)
    if isinstance(final, proto.Error):
        return job_error_response(request, final)
    if len(final.embeddings) != len(parsed.inputs):
        count = f"{len(final.embeddings)} vectors for {len(parsed.inputs)} inputs"
        return error_response(request, 502, f"the worker returned {count}")
    return json_response(
        embeddings_body(
            final.embeddings,
            model=served_name(router, parsed.model, spec),
            prompt_tokens=final.input_tokens,
            encoding_format=parsed.encoding_format,
        )
    )


async def list_stored_completions(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None})


async def stored_completion(request: web.Request) -> web.Response:
    if request.method == "DELETE":
        return error_response(request, 400, "Deleting completions is not supported. Auxot does not store completions.")
    return error_response(request, 404, "No chat completion found. Auxot does not store completions.")


async def not_implemented(request: web.Request) -> web.Response:
    return error_response(request, 501, f"endpoint not implemented: {request.method} {request.path}")


# === Handlers: Anthropic ==========================================================================


async def anthropic_messages(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER]
    body = await read_json(request)
    requested = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else ""
    spec = request_model(router, requested)
    try:
        chat = anthropic.translate_request(body, max_output_tokens=spec.resolution.context_size)
    except anthropic.AnthropicError as exc:
        return error_response(request, exc.status, exc.message)
    message_id = new_id("msg_")
    model = served_name(router, chat.model, spec)
    stop_sequences = body.get("stop_sequences") if isinstance(body.get("stop_sequences"), list) else None
    handle = await router.tracker.submit(job_from(chat, "chat", new_id("chatcmpl-"), spec.name))
    log.info("job accepted", extra={"job_id": handle.job.job_id, "kind": "messages", "stream": chat.stream})
    try:
        if not chat.stream:
            final = await wait_final(router, handle)
            if isinstance(final, proto.Error):
                return job_error_response(request, final)
            return json_response(
                anthropic.build_message(final, message_id=message_id, model=model, stop_sequences=stop_sequences)
            )
        encoder = anthropic.AnthropicStream(message_id, model, stop_sequences=stop_sequences)
        return await stream_job(request, router, handle, encoder, keepalive=anthropic.AnthropicStream.ping())
    finally:
        router.tracker.abandon(handle)


TOKEN_COUNT_HEADER = "x-auxot-token-count"


async def anthropic_count_tokens(request: web.Request) -> web.Response:
    """Exact with the model's own chat template and tokenizer (through a worker); an estimate,
    marked as such in a header, only when no worker can answer."""
    router = request.app[ROUTER]
    body = await read_json(request)
    try:
        chat = anthropic.count_tokens_request(body)
    except anthropic.AnthropicError as exc:
        return error_response(request, exc.status, exc.message)
    spec = request_model(router, chat.model)
    job = job_from(chat, "tokenize", new_id("tok-"), spec.name)
    count = await router.tokenize(job, timeout=15.0)
    if count is not None:
        return json_response({"input_tokens": count}, headers={TOKEN_COUNT_HEADER: "exact"})
    return json_response({"input_tokens": anthropic.estimate_tokens(body)}, headers={TOKEN_COUNT_HEADER: "estimate"})


# === Handlers: health and the worker hub ==========================================================


async def health(request: web.Request) -> web.Response:
    status, body = await request.app[ROUTER].health()
    return json_response(body, status=status)


async def worker_socket(request: web.Request) -> web.WebSocketResponse:
    """The worker hub: hello within a few seconds, key check, policy, then jobs and events."""
    router = request.app[ROUTER]
    config = router.config
    ws = web.WebSocketResponse(
        heartbeat=config.heartbeat_interval,
        receive_timeout=3 * config.heartbeat_interval + config.hello_timeout,
        max_msg_size=config.max_ws_message_bytes,
        compress=False,
        decode_text=False,  # frames stay bytes: orjson parses them and the relay forwards them as they are
    )
    await ws.prepare(request)
    hello = await receive_hello(ws, config.hello_timeout)
    if hello is None:
        await ws.close()
        return ws
    client = request.remote or "unknown"
    if not router.auth_failures.allowed(client) or await router.admin_keys.verify(hello.gpu_key) is None:
        router.auth_failures.record_failure(client)
        log.warning("worker rejected: invalid GPU key", extra={"remote": client})
        await ws.send_str(
            proto.encode(proto.HelloAck(success=False, error="invalid GPU key: authentication failed")).decode()
        )
        await ws.close()
        return ws
    spec, refusal = choose_model(router, hello)
    if spec is None:
        log.warning("worker rejected: " + refusal, extra={"remote": client, "model": hello.model})
        await ws.send_str(proto.encode(proto.HelloAck(success=False, error=refusal)).decode())
        await ws.close()
        return ws
    worker_id = secrets.token_hex(16)
    ack = proto.HelloAck(success=True, gpu_id=worker_id, policy=router.policy_for(hello.capabilities, spec))
    await ws.send_str(proto.encode(ack).decode())
    if hello.policy_only:
        with contextlib.suppress(TimeoutError):
            await ws.receive(timeout=config.hello_timeout)
        await ws.close()
        return ws
    slots = hello.capabilities.total_slots or spec.parallel
    worker = WorkerConnection(
        worker_id=worker_id,
        ws=ws,
        capabilities=hello.capabilities,
        slots=slots,
        policy=ack.policy,
        model=spec.name,
        requested_model=hello.model,
        movable=not hello.model and bool(hello.capabilities.policy_model),
        fits=router.fitting_models(hello.capabilities),
    )
    await serve_worker(router, worker)
    return ws


def choose_model(router: Router, hello: proto.Hello) -> tuple[ModelSpec | None, str]:
    """The model a worker is to serve, or None and why not.

    ``--model NAME`` must name a configured model (name, id or alias). Without it, a worker that
    already runs a configured model (reconnecting) keeps it; else the assignment policy picks.
    """
    catalog = router.catalog
    if hello.model:
        spec = catalog.match_exact(hello.model)
        if spec is None:
            return None, f'model "{hello.model}" is not served by this router (it serves: {", ".join(catalog.names)})'
        return spec, ""
    current = hello.capabilities.policy_model
    spec = router.assign(hello.capabilities, current=current if catalog.get(current) else "")
    if spec is None:
        return None, "every configured model has its maximum number of workers"
    return spec, ""


async def receive_hello(ws: web.WebSocketResponse, timeout: float) -> proto.Hello | None:
    try:
        msg = await ws.receive(timeout=timeout)
    except TimeoutError:
        return None
    if msg.type != WSMsgType.TEXT:  # a text frame (its data stays bytes: decode_text=False)
        return None
    try:
        hello = proto.decode(msg.data)
    except proto.ProtocolError:
        return None
    return hello if isinstance(hello, proto.Hello) else None


async def serve_worker(router: Router, worker: WorkerConnection) -> None:
    if router.pool.pool(worker.model) is None:  # its model left the catalog meanwhile (a reload)
        await worker.ws.close(code=1012, message=b"model no longer served; reconnect")
        return
    router.pool.add(worker, worker.model)
    log.info(
        "worker connected",
        extra={
            "worker_id": worker.worker_id,
            "model": worker.model,
            "backend_model": worker.capabilities.model,
            "slots": worker.slots,
        },
    )
    reason = "connection closed"
    try:
        with contextlib.suppress(RedisError):
            await router.queue.beat_worker(
                worker.worker_id, worker.info(router.instance_id), router.config.dead_worker_timeout
            )
        async for msg in worker.ws:
            if msg.type != WSMsgType.TEXT:
                reason = "protocol error: binary frame"
                break
            try:
                message = proto.decode(msg.data)
            except proto.ProtocolError as exc:
                log.warning("bad message from worker", extra={"worker_id": worker.worker_id, "error": str(exc)})
                continue
            await router.on_worker_message(worker, msg.data, message)
        if worker.ws.close_code not in (None, 1000, 1001):
            reason = f"closed with code {worker.ws.close_code}"
    except TimeoutError:
        reason = "no heartbeat"
    except (ConnectionError, RedisError) as exc:
        reason = str(exc) or type(exc).__name__
    finally:
        await router.worker_gone(worker, reason)
        log.info("worker disconnected", extra={"worker_id": worker.worker_id, "reason": reason})
        if not worker.ws.closed:
            await worker.ws.close()


# === Background tasks =============================================================================


async def relay_reader(router: Router) -> None:
    while True:
        try:
            for raw in await router.queue.read_inbox(timeout=1.0):
                await router.on_relayed(raw)
        except RedisError as exc:
            log.error("reading the relay inbox failed", extra={"error": str(exc)})
            await asyncio.sleep(1.0)


async def liveness(router: Router) -> None:
    """Keep this instance's key alive and reclaim the jobs of instances that died."""
    config = router.config
    last_sweep = 0.0
    while True:
        try:
            await router.queue.beat_instance(config.dead_worker_timeout)
            if router.unacked:
                await router.ack([], "")
            if time.monotonic() - last_sweep >= config.sweep_interval:
                last_sweep = time.monotonic()
                await reclaim(router)
        except RedisError as exc:
            log.error("liveness update failed", extra={"error": str(exc)})
        await asyncio.sleep(min(config.dead_worker_timeout / 3, config.sweep_interval))


async def reclaim(router: Router) -> None:
    claimed = await router.queue.reclaim_from_dead_instances(router.config.dead_worker_timeout)
    if not claimed:
        return
    for entry_id, job in claimed:
        if job is not None:
            await router.queue.ack([entry_id], job.model)
            router.route(job.reply_to, proto.WorkerLost(job.job_id, "its router instance died"))


async def balancer(router: Router) -> None:
    """Moves workers where demand is (see :func:`auxot_common.models.plan_move`), and applies
    a changed models file as SIGHUP would."""
    while True:
        await asyncio.sleep(router.config.balance_interval)
        try:
            if router.config.models_file and router._models_file_mtime() != router.models_file_mtime:
                log.info("the models file changed: reloading", extra={"file": router.config.models_file})
                await router.reload(load_environment())
            await router.balance()
        except RedisError as exc:
            log.warning("balancing skipped: the queue is unavailable", extra={"error": str(exc)})
        except Exception:  # the balancer must outlive any bug in one round
            log.exception("balancing failed")


async def background_tasks(app: web.Application) -> AsyncIterator[None]:
    router = app[ROUTER]
    for spec in router.catalog.specs:
        await router.queue.ensure_group(spec.name)
    await router.queue.beat_instance(router.config.dead_worker_timeout)
    router.start_dispatchers()
    tasks = [
        asyncio.create_task(relay_reader(router), name="relay-reader"),
        asyncio.create_task(liveness(router), name="liveness"),
        asyncio.create_task(balancer(router), name="balancer"),
        asyncio.create_task(router.tracker.tick_forever(router.config.sse_keepalive), name="ticker"),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await router.stop_dispatchers()
    await router.relay.close()
    with contextlib.suppress(RedisError):
        await router.queue.drop_instance()
    router.api_keys.close()
    router.admin_keys.close()


async def drain(router: Router) -> None:
    """Take no new requests and let the ones in flight finish, up to the grace period.

    With the embedded queue this instance is the only one, so it keeps dispatching its queued
    jobs meanwhile; with a shared Redis it stops reading jobs and leaves them to the others.
    """
    router.draining = True
    deadline = time.monotonic() + router.config.shutdown_grace

    def busy() -> bool:  # its own callers, and jobs its workers run for other routers' callers
        return bool(router.tracker.handles) or any(w.running for w in router.pool.workers.values())

    while busy() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await router.relay.close()  # the last relayed tokens reach their routers


async def close_worker_sockets(app: web.Application) -> None:
    router = app[ROUTER]
    router.draining = True
    for worker in list(router.pool.workers.values()):
        await worker.ws.close(code=1001, message=b"router shutting down")


# === Application wiring ===========================================================================


def api_paths(api: str, rest: str) -> list[str]:
    """Zero, one or two ``/v1`` segments under ``/api/{api}``, plus the plain ``/v1`` alias."""
    return [f"/api/{api}{v}{rest}" for v in ("", "/v1", "/v1/v1")] + [f"/v1{rest}"]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPENAI_ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/chat/completions", chat_completions),
    ("GET", "/chat/completions", list_stored_completions),
    ("GET", "/chat/completions/{completion_id}", stored_completion),
    ("DELETE", "/chat/completions/{completion_id}", stored_completion),
    ("GET", "/chat/completions/{completion_id}/messages", stored_completion),
    ("POST", "/completions", completions),
    ("POST", "/embeddings", embeddings),
    ("GET", "/models", list_models),
    ("GET", "/models/{model_id}", get_model),
]
ANTHROPIC_ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/messages", anthropic_messages),
    ("POST", "/messages/count_tokens", anthropic_count_tokens),
    ("*", "/messages/batches", not_implemented),
    ("*", "/messages/batches/{tail:.*}", not_implemented),
    ("GET", "/models", list_models),
    ("GET", "/models/{model_id}", get_model),
]


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/ws", worker_socket)
    added: set[tuple[str, str]] = set()
    for api, table in (("openai", OPENAI_ROUTES), ("anthropic", ANTHROPIC_ROUTES)):
        for method, rest, handler in table:
            for path in api_paths(api, rest):
                if (method, path) not in added:  # /v1/models serves both APIs (is_anthropic decides)
                    added.add((method, path))
                    app.router.add_route(method, path, handler)
    for api in ("openai", "anthropic"):
        app.router.add_route("*", f"/api/{api}/{{tail:.*}}", not_implemented)


def create_app(config: RouterConfig, redis: Redis | None = None) -> web.Application:
    """Build the application. ``redis`` overrides the store (tests); by default the embedded one
    or ``AUXOT_REDIS_URL``."""
    if redis is None:
        redis, server_blocking = connect_redis(config.redis_url)
    else:
        server_blocking = not type(redis).__module__.startswith("fakeredis")
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[errors_middleware, admission_middleware, auth_middleware],
        handler_args={"max_field_size": 65536},
    )
    app[ROUTER] = Router(config, redis, server_blocking=server_blocking)
    add_routes(app)
    app.cleanup_ctx.append(background_tasks)
    app.on_shutdown.append(close_worker_sockets)
    return app


def connect_redis(url: str) -> tuple[Redis, bool]:
    """The external Redis at ``url``, or the embedded in-process store when ``url`` is empty."""
    if not url:
        import fakeredis

        return fakeredis.FakeAsyncRedis(), False
    # from_url gives connections no retry: after a Redis restart each pooled connection would fail
    # one request. A short, bounded retry reconnects them; a Redis that is down still fails fast.
    client: Redis = Redis.from_url(
        url,
        socket_connect_timeout=3,
        socket_timeout=10,
        health_check_interval=15,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3),
    )
    return client, True


# === Command line =================================================================================


USAGE = """usage: python auxot_router.py [command]

commands:
  (none)              start the router
  setup [--write-env] [--fly] [--model NAME]
                      generate an API key (rtr_) and a GPU key (adm_) with their Argon2id hashes
  models [--json] [--family F] [--max-vram GB] [--capability C] [--search TEXT]
                      list the models of the registry
  version             print the version
"""


def setup_command(args: list[str]) -> int:
    model = DEFAULT_MODEL
    if "--model" in args:
        index = args.index("--model")
        if index + 1 >= len(args):
            print("setup: --model needs a name", file=sys.stderr)
            return 2
        model = args[index + 1]
    gpu_key, api_key = generate_key(GPU_KEY_PREFIX), generate_key(API_KEY_PREFIX)
    admin_hash, api_hash = hash_key(gpu_key), hash_key(api_key)
    if "--fly" in args:
        print(fly_setup_text(gpu_key, api_key, admin_hash, api_hash, model))
        return 0
    env_lines = f"AUXOT_ADMIN_KEY_HASH='{admin_hash}'\nAUXOT_API_KEY_HASH='{api_hash}'\nAUXOT_MODEL={model}\n"
    print("auxot-router setup\n==================\n")
    print(f"GPU key (for workers):   {gpu_key}")
    print(f"  run a worker with:     python auxot_worker.py --gpu-key {gpu_key} --router-url ws://HOST:8080/ws\n")
    print(f"API key (for callers):   {api_key}")
    print("  use it as the OpenAI/Anthropic API key (Authorization: Bearer or x-api-key)\n")
    print("SAVE THESE KEYS NOW: they are not stored anywhere and will not be shown again.\n")
    if "--write-env" in args:
        env_path = Path(".env")
        if env_path.exists():
            print("Error: .env already exists. Remove it first or run setup without --write-env.", file=sys.stderr)
            return 1
        fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(env_lines)
        print("Wrote .env (mode 0600) with the hashes; the router reads it at startup.")
        return 0
    print("Configure the router with these lines (the hashes are safe to store):\n")
    for line in env_lines.splitlines():
        print(f"export {line}")
    return 0


def fly_setup_text(gpu_key: str, api_key: str, admin_hash: str, api_hash: str, model: str) -> str:
    return (
        "# auxot-router keys. SAVE THESE KEYS NOW: they will not be shown again.\n"
        f"# GPU key (workers):  {gpu_key}\n"
        f"# API key (callers):  {api_key}\n"
        "fly secrets set \\\n"
        f"  AUXOT_ADMIN_KEY_HASH='{admin_hash}' \\\n"
        f"  AUXOT_API_KEY_HASH='{api_hash}' \\\n"
        f"  AUXOT_MODEL='{model}'\n"
        "# Then deploy:\n#   fly deploy"
    )


async def serve(config: RouterConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully."""
    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=config.shutdown_grace + 5)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    await site.start()
    log.info(
        "auxot-router started",
        extra={
            "addr": f"{config.host}:{config.port}",
            "redis": redact_url(config.redis_url) if config.redis_url else "embedded",
            "model": config.model,
            "instance": app[ROUTER].instance_id,
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = loop.create_task(app[ROUTER].reload(load_environment()))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop.wait()
    log.info("shutdown signal received: draining", extra={"grace_s": config.shutdown_grace})
    await site.stop()  # before runner.cleanup(), which would also close the worker sockets
    await drain(app[ROUTER])
    await runner.cleanup()
    log.info("shutdown complete")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else ""
    if command in ("help", "--help", "-h"):
        print(USAGE)
        return 0
    if command == "version":
        print(f"auxot-router v{VERSION}")
        return 0
    if command == "setup":
        return setup_command(args[1:])
    if command == "models":
        from auxot_common.registry import models_command

        return models_command(args[1:])
    if command:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        config = RouterConfig.from_env(load_environment())
    except ConfigError as exc:
        print(f"auxot-router: configuration error: {exc}", file=sys.stderr)
        return 1
    setup_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        log.error("cannot listen", extra={"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
