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
import dataclasses
import hmac
import logging
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import WSMsgType, web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from auxot_common import anthropic_api as anthropic
from auxot_common import autoroute, eventloop, upstreams
from auxot_common import keys as keystore
from auxot_common import protocol as proto
from auxot_common import responses_api as responses
from auxot_common.affinity import AffinityBook
from auxot_common.auth import (
    API_KEY_PREFIX,
    GPU_KEY_PREFIX,
    FailureLimiter,
    KeyVerifier,
    NamedHash,
    Outcome,
    generate_key,
    hash_key,
    parse_hashes,
)
from auxot_common.clientaddr import Network, client_address, parse_trusted_proxies
from auxot_common.embeddings import embeddings_body, parse_embeddings_request
from auxot_common.fairness import FairBacklog
from auxot_common.limits import (
    Decision,
    Limiter,
    Limits,
    LocalLimiter,
    RedisLimiter,
    ratelimit_headers,
    refusal_message,
    resolve_limits,
)
from auxot_common.logs import redact_url, setup_logging
from auxot_common.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from auxot_common.metrics import ClusterView, JobStats, ModelGauges, RouterMetrics, access_record, key_fingerprint
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
from auxot_common.processes import parse_processes, run_processes
from auxot_common.queue import RelayPublisher, StreamQueue
from auxot_common.registry import ModelResolution, Registry, RegistryError, load_registry, resolve_model
from auxot_common.responses_store import ResponseStore
from auxot_common.routing import (
    ROUTING_MODES,
    CacheAwarePolicy,
    Choice,
    RoutingConfig,
    RoutingPolicy,
    make_policy,
    session_hint,
)
from auxot_common.routing_extras import ExtrasError, RoutingExtras, candidates, load_extras
from auxot_common.settings import ConfigError, EnvReader, load_environment
from auxot_common.usage import FileUsage, RedisUsage, UsageStore

VERSION = "0.1.0"
DEFAULT_MODEL = "Qwen3-Coder-30B-A3B"
HELD_JOB_POLL_S = 0.05  # how soon a job held for its busy warm worker is looked at again
DISPATCHER_RESTART_S = 1.0  # pause before a failed dispatcher starts again (no hot error loop)
WORKER_HEADER = "x-auxot-worker"
CACHED_TOKENS_HEADER = "x-auxot-cached-tokens"
log = logging.getLogger("auxot.router")
access_log = logging.getLogger("auxot.access")


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
    redis_max_connections: int = 256
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
    trusted_proxies: tuple[Network, ...] = ()
    write_timeout: float = 30.0
    health_refresh: float = 1.0
    auth_failure_burst: int = 20
    auth_failures_per_minute: int = 30
    access_log: bool = True
    direct_tokens: bool = True  # AUXOT_DIRECT_TOKENS=off: every token wakes its handler (to compare)
    metrics_token: str = ""
    keys_file: str = field(default_factory=lambda: str(keystore.keys_file_path({})))
    usage_file: str = field(default_factory=lambda: str(keystore.default_data_dir({}) / "usage.json"))
    default_limits: Limits = field(default_factory=Limits)
    keys_refresh: float = 2.0
    fair_readahead: int = 64
    queue_notice: float = 1.0
    routing: str = "cache"  # AUXOT_ROUTING: cache | least-busy | round-robin
    cache_max_wait: float = 10.0  # AUXOT_CACHE_MAX_WAIT: longest hold for a busy warm worker
    models: str = ""  # AUXOT_MODELS: comma-separated, the first is the default
    models_file: str = ""  # AUXOT_MODELS_FILE: TOML, wins over AUXOT_MODELS and AUXOT_MODEL
    move_cooldown: float = 600.0  # a worker is not moved again within this long
    demand_persist: float = 30.0  # a model waits this long with jobs and no worker before a move
    balance_interval: float = 5.0  # how often moves are considered and the models file is checked
    responses_ttl: float = 7 * 86400.0
    responses_max_bytes: int = 16 * 1024 * 1024
    processes: int = 1  # AUXOT_PROCESSES: router processes on this port (SO_REUSEPORT), one Redis

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
        try:
            trusted = parse_trusted_proxies(read.text("AUXOT_TRUSTED_PROXIES", ""))
        except ValueError as exc:
            raise ConfigError(f"AUXOT_TRUSTED_PROXIES: {exc}") from None
        max_body = read.integer("AUXOT_MAX_BODY_BYTES", 64 * 1024 * 1024, minimum=1024)
        try:
            processes = parse_processes(read.text("AUXOT_PROCESSES", "1"))
        except ValueError as exc:
            raise ConfigError(f"AUXOT_PROCESSES: {exc}") from None
        redis_url = read.text("AUXOT_REDIS_URL", "")
        port = read.integer("AUXOT_PORT", 8080, minimum=0, maximum=65535)
        if processes > 1 and not redis_url:
            raise ConfigError(
                "AUXOT_PROCESSES above 1 needs AUXOT_REDIS_URL: the processes share the job queue in one "
                "Redis (the embedded store lives inside one process)"
            )
        if processes > 1 and port == 0:
            raise ConfigError("AUXOT_PROCESSES above 1 needs a fixed AUXOT_PORT (the processes share it)")
        return cls(
            api_key_hashes=api_hashes,
            admin_key_hashes=admin_hashes,
            model=read.text("AUXOT_MODEL", DEFAULT_MODEL),
            quantization=read.text("AUXOT_QUANTIZATION", ""),
            ctx_size=read.integer("AUXOT_CTX_SIZE", 131072, minimum=256),
            max_parallel=read.integer("AUXOT_MAX_PARALLEL", 2, minimum=1, maximum=512),
            host=read.text("AUXOT_HOST", "0.0.0.0"),
            port=port,
            log_level=read.choice("AUXOT_LOG_LEVEL", "info", ("debug", "info", "warn", "warning", "error")),
            job_timeout=read.duration("AUXOT_JOB_TIMEOUT", 300.0, minimum=1.0),
            heartbeat_interval=heartbeat,
            dead_worker_timeout=read.duration("AUXOT_DEAD_WORKER_TIMEOUT", max(45.0, 3 * heartbeat), minimum=0.1),
            auth_cache_ttl=read.duration("AUXOT_AUTH_CACHE_TTL", 300.0),
            redis_url=redis_url,
            redis_prefix=read.text("AUXOT_REDIS_PREFIX", "auxot:"),
            redis_max_connections=read.integer("AUXOT_REDIS_MAX_CONNECTIONS", 256, minimum=8, maximum=100_000),
            registry_file=read.text("AUXOT_REGISTRY_FILE", ""),
            max_body_bytes=max_body,
            # a job is the body plus a little: by default every body that fits becomes a job that fits
            max_ws_message_bytes=read.integer(
                "AUXOT_MAX_WS_MESSAGE_BYTES", max(64 * 1024 * 1024, max_body + 1024 * 1024), minimum=64 * 1024
            ),
            max_queue=read.integer("AUXOT_MAX_QUEUE", 1000, minimum=1),
            max_requests=read.integer("AUXOT_MAX_REQUESTS", 4096, minimum=1),
            max_workers=read.integer("AUXOT_MAX_WORKERS", 1024, minimum=1),
            max_attempts=read.integer("AUXOT_MAX_ATTEMPTS", 3, minimum=1, maximum=10),
            sse_keepalive=read.duration("AUXOT_SSE_KEEPALIVE", 10.0, minimum=0.05),
            shutdown_grace=read.duration("AUXOT_SHUTDOWN_GRACE", 30.0),
            hello_timeout=read.duration("AUXOT_HELLO_TIMEOUT", 5.0, minimum=0.1),
            sweep_interval=read.duration("AUXOT_SWEEP_INTERVAL", 15.0, minimum=0.05),
            trusted_proxies=trusted,
            write_timeout=read.duration("AUXOT_WRITE_TIMEOUT", 30.0, minimum=0.05),
            health_refresh=read.duration("AUXOT_HEALTH_REFRESH", 1.0, minimum=0.05),
            auth_failure_burst=read.integer("AUXOT_AUTH_FAILURE_BURST", 20, minimum=1),
            auth_failures_per_minute=read.integer("AUXOT_AUTH_FAILURES_PER_MINUTE", 30, minimum=1),
            access_log=read.choice("AUXOT_ACCESS_LOG", "on", ("on", "off", "true", "false", "1", "0"))
            in ("on", "true", "1"),
            direct_tokens=read.choice("AUXOT_DIRECT_TOKENS", "on", ("on", "off", "true", "false", "1", "0"))
            in ("on", "true", "1"),
            metrics_token=read.text("AUXOT_METRICS_TOKEN", ""),
            keys_file=str(keystore.keys_file_path(env)),
            usage_file=read.text("AUXOT_USAGE_FILE", str(keystore.default_data_dir(env) / "usage.json")),
            default_limits=Limits(
                rpm=read.integer("AUXOT_DEFAULT_RPM", 0, minimum=0),
                tpm=read.integer("AUXOT_DEFAULT_TPM", 0, minimum=0),
                concurrency=read.integer("AUXOT_DEFAULT_CONCURRENCY", 0, minimum=0),
                daily_tokens=read.integer("AUXOT_DEFAULT_DAILY_TOKENS", 0, minimum=0),
            ),
            keys_refresh=read.duration("AUXOT_KEYS_REFRESH", 2.0, minimum=0.05),
            fair_readahead=read.integer("AUXOT_FAIR_READAHEAD", 64, minimum=0),
            queue_notice=read.duration("AUXOT_QUEUE_NOTICE", 1.0, minimum=0.05),
            routing=read.choice("AUXOT_ROUTING", "cache", ROUTING_MODES),
            cache_max_wait=read.duration("AUXOT_CACHE_MAX_WAIT", 10.0),
            models=read.text("AUXOT_MODELS", ""),
            models_file=read.text("AUXOT_MODELS_FILE", ""),
            move_cooldown=read.duration("AUXOT_MOVE_COOLDOWN", 600.0),
            demand_persist=read.duration("AUXOT_DEMAND_PERSIST", 30.0),
            balance_interval=read.duration("AUXOT_BALANCE_INTERVAL", 5.0, minimum=0.05),
            responses_ttl=read.duration("AUXOT_RESPONSES_TTL", 7 * 86400.0, minimum=1.0),
            responses_max_bytes=read.integer("AUXOT_RESPONSES_MAX_BYTES", 16 * 1024 * 1024, minimum=1024),
            processes=processes,
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


    def load_extras(self, catalog: ModelCatalog) -> RoutingExtras:
        """``[auto]``, ``[upstreams.*]`` and ``[fallbacks]`` of the models file (none without one);
        upstream keys are read from the environment variables the file names."""
        if not self.models_file:
            return RoutingExtras()
        try:
            text = Path(self.models_file).read_text(encoding="utf-8")
            return load_extras(text, self.models_file, catalog, os.environ)
        except (ExtrasError, OSError) as exc:
            raise ConfigError(str(exc)) from None


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
    unreported: int = 0  # heartbeats in a row that did not list this job


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
    key_name: str = ""  # the GPU key it connected with, and that key's hash: revoking it disconnects
    key_phc: str = ""
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


Backlog = FairBacklog[tuple[str, proto.Job]]  # (stream entry id, job), round-robin across API keys


def new_backlog() -> Backlog:
    """Jobs read from a model's stream that wait for a slot: round-robin across API keys weighted
    by priority, first come first served within a key (auxot_common/fairness.py)."""
    return FairBacklog(key_of=lambda entry: (entry[1].key_name, entry[1].priority), id_of=lambda entry: entry[1].job_id)


@dataclass(slots=True)
class PoolStats:
    """Throughput of one model's pool on this instance, since start."""

    jobs_completed: int = 0
    jobs_failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


class ModelPool:
    """The workers serving one model on this instance, its backlog, its dispatcher and stats.

    Worker choice goes through :meth:`pick` alone, which asks the pool's routing policy
    (:mod:`auxot_common.routing`: cache-aware by default); the policy is told about dispatches,
    completions, workers that reset and departures by the ``on_*`` hooks.
    The backlog holds jobs read from the model's stream that no worker took yet: an object with
    ``append``, ``appendleft``, ``popleft`` and ``len`` (a deque today).
    """

    def __init__(self, spec: ModelSpec, routing: RoutingPolicy | None = None) -> None:
        self.spec = spec
        self.routing: RoutingPolicy = routing or make_policy("least-busy", RoutingConfig())
        self.workers: dict[str, WorkerConnection] = {}
        self.backlog: Backlog = new_backlog()
        self.capacity_changed = asyncio.Event()
        self.dispatcher: asyncio.Task[None] | None = None
        self.stats = PoolStats()
        self.starving_since: float | None = None  # waiting jobs and no worker since (monotonic)
        self.sticky_checked = 0.0  # last look at this instance's targeted stream (monotonic)

    @property
    def name(self) -> str:
        return self.spec.name

    def total_free(self) -> int:
        return sum(max(w.free, 0) for w in self.workers.values())

    def has_free(self) -> bool:
        return any(w.free > 0 for w in self.workers.values())

    def pick(self, job: proto.Job) -> Choice:
        """A worker for ``job``, or a hold for its busy warm worker, or nothing free."""
        open_workers = [w for w in self.workers.values() if not w.ws.closed]
        return self.routing.pick(job, open_workers, time.monotonic())

    def on_dispatch(self, worker: WorkerConnection, job: proto.Job) -> None:
        """``job`` went to ``worker``: the worker will hold its prompt."""
        self.routing.on_dispatch(worker, job, time.monotonic())

    def on_complete(self, worker: WorkerConnection, job: proto.Job, message: proto.Complete | proto.Error) -> None:
        """``job`` finished on ``worker``: what llama-server really reused corrects the index."""
        if isinstance(message, proto.Complete):
            self.stats.jobs_completed += 1
            self.stats.input_tokens += message.input_tokens
            self.stats.output_tokens += message.output_tokens
            self.routing.on_complete(
                worker.worker_id,
                job.job_id,
                input_tokens=message.input_tokens,
                cache_tokens=message.cache_tokens,
                prompt_ms=message.prompt_ms,
            )
        else:
            self.stats.jobs_failed += 1
            self.routing.on_complete(worker.worker_id, job.job_id, input_tokens=0, cache_tokens=0, ok=False)

    def on_worker_reset(self, worker: WorkerConnection) -> None:
        """``worker`` (re)started or stopped its llama-server: whatever it cached is gone."""
        self.routing.on_worker_reset(worker.worker_id)

    def on_worker_gone(self, worker: WorkerConnection) -> None:
        """``worker`` left this pool (disconnected or moved to another model)."""
        self.routing.on_worker_gone(worker.worker_id)


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


@dataclass(slots=True)
class Ticket:
    """One admitted request: its key, its limits and concurrency lease, and its job."""

    key_name: str
    priority: int
    limits: Limits
    lease: str
    decision: Decision
    handle: JobHandle | None = None
    upstream_usage: upstreams.Usage | None = None  # answered by an upstream provider, not a job


class RateLimitedError(Exception):
    """The caller's key is over one of its limits (the ticket on the request has the headers)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class EventChannel:
    """Unbounded single-consumer channel; the consumer takes everything that arrived at once.

    It has no timeouts of its own: a timer per wait would cost a heap insert and removal per
    token. The tracker's ticker calls :meth:`wake` on channels that have been idle too long.
    """

    __slots__ = ("_items", "_waiter", "direct")

    def __init__(self) -> None:
        self._items: list[proto.Message] = []
        self._waiter: asyncio.Future[None] | None = None
        # takes an item while the consumer is parked with nothing queued; False: queue it
        self.direct: Callable[[proto.Message], bool] | None = None

    def put(self, item: proto.Message) -> None:
        waiter, direct = self._waiter, self.direct
        if direct is not None and waiter is not None and not waiter.done() and direct(item):
            return  # handled in place: the consumer stays parked (no wake-up, no task switch)
        self._items.append(item)
        self.wake()

    @property
    def pending(self) -> bool:
        """Something arrived that the consumer has not taken yet (a dispatch, tokens, the end)."""
        return bool(self._items)

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
    stats: JobStats = field(default_factory=lambda: JobStats(model=""))
    side_worker: WorkerConnection | None = None  # a slot-free job (tokenize) sent straight to it
    submitted: float = field(default_factory=time.monotonic)
    dispatched_at: float = 0.0  # monotonic; 0 while it waits for a slot
    last_notice: float = field(default_factory=time.monotonic)
    final: proto.Complete | proto.Error | None = None
    streamed_chars: int = 0  # text delivered to the caller (a usage estimate if it hangs up)

    def content_delivered(self, chars: int, now: float) -> None:
        """Content (text or a tool-call fragment) went to the caller: it may no longer be re-queued
        (its text would repeat), and the first-token time and the hang-up estimate count it."""
        self.content_sent = True
        if self.stats.first_token_at is None:
            self.stats.first_token_at = now
        self.streamed_chars += chars

    def queue_ms(self) -> int:
        """Milliseconds it waited for a slot (so far, if it still waits)."""
        end = self.dispatched_at or time.monotonic()
        return int((end - self.submitted) * 1000)


def estimated_tokens(handle: JobHandle) -> int:
    """Prompt plus streamed text of a job that ended without a usage report, at ~4 bytes a token."""
    job = handle.job
    prompt_bytes = len(orjson.dumps(job.messages)) + (len(orjson.dumps(job.tools)) if job.tools else 0)
    return (prompt_bytes + handle.streamed_chars) // 4


@dataclass(slots=True)
class QueueNotice:
    """Internal event for a waiting streaming request: where it stands in the queue."""

    position: int | None
    eta_ms: int | None

    def comment(self) -> bytes:
        if self.position is None:
            return b": queued\n\n"
        eta = f" eta_ms={self.eta_ms}" if self.eta_ms is not None else ""
        return f": queued position={self.position}{eta}\n\n".encode()


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

    async def submit(self, job: proto.Job, ticket: Ticket | None = None) -> JobHandle:
        router = self._router
        if ticket is not None:
            job.key_name, job.priority = ticket.key_name, ticket.priority
        pool = router.pool.pool(job.model)
        backlog = len(pool.backlog) if pool is not None else 0  # read ahead into the fair backlog
        if await router.queue.depth(job.model) + backlog >= router.config.max_queue:
            raise QueueFullError
        now = time.time()
        job.reply_to = router.instance_id
        job.deadline = now + router.config.job_timeout
        encoded = proto.encode(job)
        if len(encoded) > router.config.max_ws_message_bytes - 4096:  # room for timeout_s, attempt
            raise RequestError(
                413,
                f"the request is too large for a worker: {len(encoded)} bytes as a job, the limit is "
                f"{router.config.max_ws_message_bytes} (AUXOT_MAX_WS_MESSAGE_BYTES)",
            )
        handle = JobHandle(job=job, deadline=job.deadline, stats=JobStats(model=job.model, kind=job.kind))
        if ticket is not None:
            ticket.handle = handle
        self.handles[job.job_id] = handle
        try:
            await router.queue.enqueue(job, encoded)
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

    async def events(
        self, handle: JobHandle, keepalive: float
    ) -> AsyncIterator[list[proto.Message | QueueNotice]]:
        """Batches of events for the caller; an empty batch means "nothing for a while"; a
        streaming job waiting for a slot gets a :class:`QueueNotice` every AUXOT_QUEUE_NOTICE."""
        notice = self._router.config.queue_notice
        while not handle.finished:
            if time.time() >= handle.deadline:
                timeout = self._router.config.job_timeout
                yield [self._fail(handle, f"the job timed out after {timeout:g}s", 504, outcome="timeout")]
                return
            batch = await handle.events.take()
            if not batch:  # woken by the ticker
                if handle.job.stream and not handle.dispatched_at and time.monotonic() - handle.last_notice >= notice:
                    handle.last_notice = handle.last_yield = time.monotonic()
                    yield [self._router.queue_notice(handle.job)]
                    continue
                if time.monotonic() - handle.last_yield >= keepalive:
                    handle.last_yield = time.monotonic()
                    yield []
                continue
            out: list[proto.Message | QueueNotice] = []
            for message in batch:
                kind = type(message)
                if kind is proto.Token or kind is proto.ToolCallDelta:  # the common case, first
                    out.append(message)
                    # sent as of now: a WorkerLost later in this same batch must not re-queue
                    chars = len(message.token) if kind is proto.Token else 0  # type: ignore[union-attr]
                    handle.content_delivered(chars, time.monotonic())
                elif isinstance(message, proto.Dispatched):
                    handle.dispatched_to = (message.instance_id, message.worker_id)
                    handle.dispatched_at = handle.dispatched_at or time.monotonic()
                    handle.stats.dispatched_at, handle.stats.worker_id = time.monotonic(), message.worker_id
                elif isinstance(message, proto.WorkerLost):
                    failure = await self._worker_lost(handle, message)
                    if failure is not None:
                        out.append(failure)
                        break
                else:
                    out.append(message)
                    if isinstance(message, proto.Complete):
                        handle.final = message
                        handle.stats.prompt_tokens = message.input_tokens
                        handle.stats.cached_tokens = message.cache_tokens
                        handle.stats.completion_tokens = message.output_tokens
                        self._finish(handle, "complete")
                        break
                    if isinstance(message, proto.Error):
                        handle.final = message
                        self._finish(handle, "error")
                        break
            if out:  # a batch of only internal events is not a keep-alive tick
                handle.last_yield = time.monotonic()
                yield out

    async def tick_forever(self, keepalive: float) -> None:
        """Wake requests that are due a keep-alive, a queue notice or past their deadline (one
        timer for all)."""
        notice = self._router.config.queue_notice
        interval = min(0.25, keepalive / 2, notice / 2)
        while True:
            await asyncio.sleep(interval)
            now, wall = time.monotonic(), time.time()
            for handle in list(self.handles.values()):
                due_notice = handle.job.stream and not handle.dispatched_at and now - handle.last_notice >= notice
                if due_notice or now - handle.last_yield >= keepalive or wall >= handle.deadline:
                    handle.events.wake()

    async def _worker_lost(self, handle: JobHandle, lost: proto.WorkerLost) -> proto.Error | None:
        job = handle.job
        if handle.content_sent or job.attempt >= self._router.config.max_attempts:
            reason = "after part of the answer was sent" if handle.content_sent else f"{job.attempt} times"
            return self._fail(handle, f"the worker serving this request went away ({lost.reason}) {reason}", 502)
        job.attempt += 1
        handle.dispatched_to = None
        handle.dispatched_at = 0.0  # waiting for a slot again (queue position, x-auxot-queue-ms)
        self._router.metrics.retries.labels(handle.stats.model).inc()
        log.warning("re-queueing job after worker loss", extra={"job_id": job.job_id, "attempt": job.attempt})
        try:
            await self._router.queue.enqueue(job, proto.encode(job))
        except RedisError:
            return self._fail(handle, "the job could not be re-queued: the queue is unavailable", 503)
        return None

    def _fail(self, handle: JobHandle, message: str, status: int, outcome: str = "error") -> proto.Error:
        self._stop(handle, outcome)
        return proto.Error(job_id=handle.job.job_id, error=message, status=status)

    def _finish(self, handle: JobHandle, outcome: str) -> None:
        handle.finished = True
        self.handles.pop(handle.job.job_id, None)
        handle.stats.outcome, handle.stats.finished_at = outcome, time.monotonic()
        if handle.side_worker is None:  # slot-free jobs (count_tokens) are not generation jobs
            self._router.metrics.observe_job(handle.stats)

    def abandon(self, handle: JobHandle, outcome: str = "cancelled") -> None:
        """The caller no longer waits (gone), or the job went upstream (``overflow``): stop the
        job wherever it is."""
        self._stop(handle, outcome)

    def _stop(self, handle: JobHandle, outcome: str) -> None:
        if handle.finished:
            return
        self._finish(handle, outcome)
        side = handle.side_worker
        if side is not None:  # never queued: nothing to record in Redis, only the worker to tell
            if not side.ws.closed:
                self.spawn(self._router.cancel_side_job(side, handle.job.job_id))
            return
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
        # several instances on one Redis: conversations stay with the instance whose worker is warm
        self.affinity: AffinityBook | None = None
        if self.queue.shared and config.routing == "cache":
            self.queue.sticky = True
            self.affinity = AffinityBook(redis, config.redis_prefix, self.instance_id)
        self.pool = WorkerPool()
        self.tracker = JobTracker(self)
        # shared: a client's wrong keys count whatever their role
        self.auth_failures = FailureLimiter(config.auth_failure_burst, config.auth_failures_per_minute)
        self.api_keys = KeyVerifier(config.api_key_hashes, cache_ttl=config.auth_cache_ttl, limiter=self.auth_failures)
        self.admin_keys = KeyVerifier(
            config.admin_key_hashes, cache_ttl=config.auth_cache_ttl, limiter=self.auth_failures
        )
        self.registry, self.catalog = config.load_catalog()
        self.queue.single_stream = self.single_model
        self._set_default()
        for spec in self.catalog.specs:
            self.pool.pools[spec.name] = self.new_pool(spec)
        self.job_seconds = 0.0  # moving average of a job's time on a worker, for queue estimates
        self.key_cache = keystore.KeyCache(
            keystore.RedisKeyStore(redis, config.redis_prefix)
            if self.queue.shared
            else keystore.FileKeyStore(Path(config.keys_file))
        )
        self.limiter: Limiter = (
            RedisLimiter(redis, config.redis_prefix, lease_ttl=config.job_timeout + 60)
            if self.queue.shared
            else LocalLimiter(lease_ttl=config.job_timeout + 60)
        )
        self.usage: UsageStore = (
            RedisUsage(redis, config.redis_prefix) if self.queue.shared else FileUsage(Path(config.usage_file))
        )
        self.gpu_hashes: list[NamedHash] = list(config.admin_key_hashes)
        self.usage_admins = KeyVerifier([], cache_ttl=config.auth_cache_ttl, limiter=self.auth_failures)
        self.metrics = RouterMetrics(version=VERSION, instance=self.instance_id)
        self.draining = False
        self.running = False  # dispatchers are started (background_tasks) and new pools get one
        self.unacked: list[tuple[str, str]] = []  # (model, entry) finished, but XACK failed (Redis away)
        self.in_flight = 0
        self.started = int(time.time())
        # /health reads these; a background task refreshes them (no Redis scan per call)
        self.cluster_view: list[dict[str, Any]] = []
        self.model_depths: dict[str, int] = {}
        self.redis_error = ""
        self.models_file_mtime = self._models_file_mtime()
        self.depths: dict[str, int] = {}  # queue depth per model, refreshed by the balancer
        # automatic choice and upstreams (issue 15): the models file's [auto], [upstreams], [fallbacks]
        self.extras = config.load_extras(self.catalog)
        self.profiles = autoroute.ProfileBook(self.catalog.names)
        self.upstream_stats: dict[str, upstreams.UpstreamStats] = {}
        self.http: aiohttp.ClientSession | None = None  # for upstreams; opened by upstream_session

    def new_pool(self, spec: ModelSpec) -> ModelPool:
        """A pool for ``spec`` with its own routing policy (its own prefix index and stats)."""
        routing = make_policy(self.config.routing, RoutingConfig(max_hold_s=self.config.cache_max_wait))
        return ModelPool(spec, routing)

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
                pool.dispatcher = asyncio.create_task(self.supervise_dispatcher(pool), name=f"dispatch-{pool.name}")

    async def stop_dispatchers(self) -> None:
        self.running = False
        tasks = [p.dispatcher for p in self.pool.pools.values() if p.dispatcher is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pool in self.pool.pools.values():
            pool.dispatcher = None

    def read_room(self, pool: ModelPool) -> int:
        """How many more queue entries of ``pool``'s model to read into its backlog now.

        The fair backlog can only reorder what it holds, so the dispatcher reads ahead of its free
        slots. Embedded, this instance is the only reader: it reads everything (up to
        AUXOT_MAX_QUEUE), so fairness covers every waiting job. With a shared Redis, an entry this
        instance reads can only run on its own workers, so it reads at most AUXOT_FAIR_READAHEAD
        beyond its free slots, and nothing while the pool has no worker here.
        """
        if not self.queue.shared:
            return self.config.max_queue - len(pool.backlog)
        if not pool.workers:
            return 0
        return pool.total_free() + self.config.fair_readahead - len(pool.backlog)

    async def supervise_dispatcher(self, pool: ModelPool) -> None:
        """Run the pool's dispatcher; an unexpected exception is logged with its traceback and
        the loop starts again after a short pause: a pool whose dispatcher died would take no
        job again, and say nothing."""
        while True:
            try:
                await self.dispatch_forever(pool)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.dispatcher_restarts.labels(pool.name).inc()
                log.exception("the dispatcher failed; restarting it", extra={"model": pool.name})
                await asyncio.sleep(DISPATCHER_RESTART_S)

    async def dispatch_forever(self, pool: ModelPool) -> None:
        """Read jobs of the pool's model into its fair backlog and hand each to the worker
        :meth:`ModelPool.pick` chooses. Completions, new workers and slot announcements also
        dispatch from the backlog at once (:meth:`_dispatch_backlog`); this loop reads, and looks
        again at jobs held for their busy warm worker when their hold runs out."""
        model = pool.name
        while True:
            if self.draining and self.queue.shared:
                if self.affinity is not None:  # jobs moved here go back to the others at once
                    await self._sticky_upkeep(pool)
                pool.capacity_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pool.capacity_changed.wait(), 1.0)
                continue
            if self.queue.shared and not pool.workers and pool.backlog:
                await self._hand_back_backlog(pool)
            held = await self._dispatch_backlog(pool) if pool.backlog else 0.0
            if self.affinity is not None:  # also while no worker here: what was moved here goes back
                await self._sticky_upkeep(pool)
            # held jobs stay in the backlog without blocking the jobs behind them; the short
            # timeout looks at them again soon after a slot frees
            timeout = 1.0 if not held else min(max(held - time.monotonic(), 0.01), HELD_JOB_POLL_S)
            room = self.read_room(pool)
            if room <= 0:
                pool.capacity_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(pool.capacity_changed.wait(), timeout)
                continue
            try:
                # a targeted job is read only into a free slot: it waits in its stream otherwise,
                # and goes back to the shared one after the hold bound (_sticky_upkeep)
                targeted = self.affinity is not None and pool.has_free()
                entries = await self.queue.read_jobs(room, timeout=timeout, model=model, targeted=targeted)
            except RedisError as exc:
                log.error("reading jobs failed", extra={"error": str(exc), "model": model})
                await asyncio.sleep(1.0)
                continue
            await self._accept(pool, entries)

    async def _hand_back_backlog(self, pool: ModelPool) -> None:
        """The pool's last worker here went away with jobs in its backlog (read while it still
        had one, e.g. a job just moved here by an instance whose cluster view still listed the
        dead worker): they go back to the shared stream for another instance, instead of
        waiting here for a worker that may never come."""
        entries = list(pool.backlog)
        try:
            await self.queue.hand_back(pool.name, entries)
        except RedisError as exc:
            log.warning("could not hand back the backlog", extra={"error": str(exc), "model": pool.name})
            return
        for _, job in entries:
            pool.routing.forget_job(job.job_id)
        while pool.backlog:  # only this dispatcher adds to it: these are the entries handed back
            pool.backlog.popleft()
        log.warning(
            "no worker left here: jobs went back to the shared queue", extra={"jobs": len(entries), "model": pool.name}
        )

    async def _sticky_upkeep(self, pool: ModelPool) -> None:
        """Jobs another instance moved here that found no free slot within the hold bound (or
        any, while draining) go back to the shared stream. At most every HELD_JOB_POLL_S."""
        now = time.monotonic()
        if now - pool.sticky_checked < HELD_JOB_POLL_S * 4 and not self.draining:
            return
        pool.sticky_checked = now
        try:
            moved = await self.queue.bounce_stale(pool.name, 0.0 if self.draining else self.config.cache_max_wait)
        except RedisError as exc:
            log.warning("could not check the targeted stream", extra={"error": str(exc), "model": pool.name})
            return
        if moved:
            log.info("targeted jobs went back to the shared queue", extra={"jobs": moved, "model": pool.name})

    async def _divert_sticky(self, pool: ModelPool, jobs: list[tuple[str, proto.Job]]) -> list[tuple[str, proto.Job]]:
        """Jobs read from the shared stream whose prompt a live worker of *another* instance
        holds (deeper than any worker here, by a saving worth holding for) move to that
        instance's targeted stream; the others stay. One MGET for the whole batch."""
        policy = pool.routing
        if self.affinity is None or not isinstance(policy, CacheAwarePolicy):
            return jobs
        candidates = [(e, j) for e, j in jobs if "|" not in e and self.queue.may_forward(j.job_id)]
        if not candidates:
            return jobs
        keys = [policy.key_of(job) for _, job in candidates]
        try:
            found = await self.affinity.lookup(pool.name, [key.hashes for key in keys])
        except RedisError as exc:
            log.warning("prompt affinity lookup failed", extra={"error": str(exc)})
            return jobs
        live = {(w.get("instance"), w.get("id")) for w in self.cluster_view if w.get("served_model") == pool.name}
        local = [w for w in pool.workers.values() if not w.ws.closed]
        now = time.monotonic()
        moved: set[str] = set()
        for (entry_id, job), hit in zip(candidates, found, strict=True):
            if hit is None:
                continue
            blocks, instance, worker_id = hit
            if instance == self.instance_id or (instance, worker_id) not in live:
                continue
            if policy.remote_saving_s(job, blocks, local, now) < policy.config.min_hold_saving_s:
                continue
            try:
                await self.queue.forward(entry_id, job, proto.encode(job), instance)
            except RedisError as exc:
                log.warning("could not move a job to its warm instance", extra={"error": str(exc)})
                continue
            policy.forget_job(job.job_id)
            moved.add(job.job_id)
            self.metrics.sticky_forwarded.labels(pool.name).inc()
            log.debug("job moved to its warm instance", extra={"job_id": job.job_id, "instance": instance})
        return [item for item in jobs if item[1].job_id not in moved] if moved else jobs

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
        kept: list[tuple[str, proto.Job]] = []
        for entry_id, job in jobs:
            gone = job.job_id in cancelled or (
                job.reply_to == self.instance_id and job.job_id not in self.tracker.handles
            )
            if gone or (job.deadline and job.deadline < now):
                drop.append(entry_id)
            else:
                job.model = pool.name  # a job from the stream of this model is this model's
                kept.append((entry_id, job))
        if drop:
            await self.ack(drop, pool.name)
        for item in await self._divert_sticky(pool, kept) if self.affinity is not None else kept:
            pool.backlog.append(item)
        await self._dispatch_backlog(pool)

    async def _cancelled_remote(self, job: proto.Job) -> bool:
        """Whether the caller of a job owned by another instance left (it marks that in Redis):
        a job read ahead into the backlog may have waited long after the check at reading."""
        if job.reply_to == self.instance_id:
            return False
        try:
            return bool(await self.queue.cancelled([job.job_id]))
        except RedisError:  # run it: a job run for nobody costs less than one lost
            return False

    async def _dispatch_backlog(self, pool: ModelPool) -> float:
        """Dispatch what can run now; returns the earliest hold deadline (``time.monotonic()``)
        of the jobs left held for their warm worker, 0 if none is held."""
        if self.draining and self.queue.shared:  # its backlog is handed back to the other instances
            return 0.0
        held: list[tuple[str, proto.Job]] = []
        wake = 0.0
        while pool.backlog and pool.has_free():
            entry_id, job = pool.backlog.popleft()
            pool.capacity_changed.set()  # room to read more ahead
            local_gone = job.reply_to == self.instance_id and job.job_id not in self.tracker.handles
            if local_gone or (job.deadline and job.deadline < time.time()) or await self._cancelled_remote(job):
                pool.routing.forget_job(job.job_id)  # its caller left while it waited in the backlog
                await self.ack([entry_id], pool.name)
                continue
            choice = pool.pick(job)
            worker = choice.worker
            if worker is None:
                if choice.hold_until:  # keep it for its warm worker; look at the next job
                    held.append((entry_id, job))
                    wake = min(wake, choice.hold_until) if wake else choice.hold_until
                    continue
                pool.backlog.appendleft((entry_id, job))  # no free slot anywhere
                break
            worker.running[job.job_id] = RunningJob(entry_id, job)
            if job.deadline:  # the worker gets the time left: its clock is not ours
                job.timeout_s = max(round(job.deadline - time.time(), 3), 0.001)
            try:
                await worker.send(job)
            except (ConnectionError, RuntimeError):
                # its socket is closing and its handler has not noticed yet: never pick it again
                # (the handler's cleanup hands its other jobs back), keep the job for another
                worker.running.pop(job.job_id, None)
                self.pool.remove(worker)
                pool.backlog.appendleft((entry_id, job))
                continue
            if self.affinity is not None and isinstance(pool.routing, CacheAwarePolicy):
                self.affinity.record(pool.name, pool.routing.key_of(job).hashes, worker.worker_id)
            pool.on_dispatch(worker, job)
            log.debug("job dispatched", extra={"job_id": job.job_id, "worker_id": worker.worker_id, "model": pool.name})
            self.route(job.reply_to, proto.Dispatched(job.job_id, worker.worker_id, self.instance_id))
        for item in reversed(held):  # back at the front, in their order
            pool.backlog.appendleft(item)
        return wake

    # --- routing job events to their owner ------------------------------------------------------

    def route(self, owner: str, message: proto.Message, raw: bytes | None = None) -> bool:
        """Deliver a job event to the instance holding the caller. False if it is local and gone."""
        if owner == self.instance_id:
            return self.tracker.deliver(message)
        self.relay.send(owner, raw if raw is not None else proto.encode(message))
        return True

    async def on_worker_message(
        self,
        worker: WorkerConnection,
        raw: bytes | None,
        message: proto.Message,
        acks: list[tuple[str, str]] | None = None,
    ) -> None:
        """Handle one message of ``worker``. With ``acks``, finished queue entries are added to it
        as ``(model, entry id)`` for the caller to acknowledge at once for a whole batch frame
        (:meth:`ack_all`); without, each is acknowledged here."""
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
                    if isinstance(message, proto.Complete):
                        observe_profile(self.profiles, pool.name, message)
                self._capacity_changed(worker)
                if isinstance(message, proto.Error) and message.retryable:  # e.g. its llama-server died
                    self.route(running.job.reply_to, proto.WorkerLost(message.job_id, message.error))
                else:
                    self.route(running.job.reply_to, message, raw)
                if acks is not None:  # the batch's entries in one round trip, after every event went out
                    acks.append((running.job.model, running.entry_id))
                else:
                    await self.ack([running.entry_id], running.job.model)
                if pool is not None:  # the freed slot goes to the fair backlog's next job
                    await self._dispatch_backlog(pool)
        elif isinstance(message, proto.Heartbeat):
            if message.jobs is not None:
                await self._check_reported_jobs(worker, set(message.jobs))
            await worker.send(proto.HeartbeatAck())
            try:  # a Redis outage must not drop a worker whose tokens need no Redis
                info = self.worker_info(worker)
                await self.queue.beat_worker(worker.worker_id, info, self.config.dead_worker_timeout)
            except RedisError as exc:
                log.warning("could not record a heartbeat", extra={"worker_id": worker.worker_id, "error": str(exc)})
        elif isinstance(message, proto.Config):
            # the worker (re)started or stopped its llama-server: whatever it cached is gone
            reset_pool = self.pool.pool(worker.model)
            if reset_pool is not None:
                reset_pool.on_worker_reset(worker)
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
            await self._dispatch_worker_pool(worker)
        elif isinstance(message, proto.Error):
            log.warning("worker reported an error", extra={"worker_id": worker.worker_id, "error": message.error})
        else:
            log.warning("unexpected message from worker", extra={"worker_id": worker.worker_id, "type": message.type})

    async def _check_reported_jobs(self, worker: WorkerConnection, reported: set[str]) -> None:
        """Give up on jobs the worker no longer runs. Frames on one socket keep their order, so a
        job sent before a heartbeat was written is listed by the next one, or was finished before
        it: two heartbeats in a row without a job mean it ended without a word."""
        for job_id, running in list(worker.running.items()):
            if job_id in reported:
                running.unreported = 0
                continue
            running.unreported += 1
            if running.unreported < 2:
                continue
            worker.running.pop(job_id, None)
            self._capacity_changed(worker)
            log.error(
                "a worker stopped running a job without a result",
                extra={"job_id": job_id, "worker_id": worker.worker_id},
            )
            self.route(running.job.reply_to, proto.WorkerLost(job_id, "the worker dropped the job without a result"))
            await self.ack([running.entry_id], running.job.model)

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

    async def ack_all(self, acks: list[tuple[str, str]]) -> None:
        """Finish ``(model, entry id)`` pairs of several models (one round trip per model)."""
        by_model: dict[str, list[str]] = {}
        for model, entry_id in acks:
            by_model.setdefault(model, []).append(entry_id)
        for model, ids in by_model.items():
            await self.ack(ids, model)

    async def _stop_on_worker(self, worker: WorkerConnection, job_id: str) -> None:
        running = worker.running.pop(job_id, None)
        if running is None:
            return
        self._capacity_changed(worker)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await worker.send(proto.Cancel(job_id))
        await self.ack([running.entry_id], running.job.model)
        await self._dispatch_worker_pool(worker)

    async def _dispatch_worker_pool(self, worker: WorkerConnection) -> None:
        """``worker`` has room now: its pool's backlog gets the slot at once."""
        pool = self.pool.pool(worker.model)
        if pool is not None and pool.backlog:
            await self._dispatch_backlog(pool)

    async def worker_gone(self, worker: WorkerConnection, reason: str) -> None:
        """A worker's socket closed: its running jobs go back to their owners to retry or fail."""
        self.pool.remove(worker)
        for job_id in list(worker.side_jobs):  # a count waiting on this worker answers at once
            self.tracker.deliver(proto.Error(job_id=job_id, error=f"the worker went away ({reason})", status=502))
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

    async def cancel_side_job(self, worker: WorkerConnection, job_id: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await worker.send(proto.Cancel(job_id))

    async def cancel_job(self, job_id: str, dispatched_to: tuple[str, str] | None) -> None:
        """Stop a job whose caller left: skip it at dispatch, or tell its worker to abort."""
        try:
            found = self.pool.find_job(job_id)
            if found is not None:
                await self._stop_on_worker(found[0], job_id)
            elif dispatched_to is not None and dispatched_to[0] != self.instance_id:
                self.relay.send(dispatched_to[0], proto.encode(proto.Cancel(job_id)))
            elif not await self._drop_from_backlog(job_id):
                await self.queue.mark_cancelled(job_id)
        except RedisError as exc:
            log.warning("could not record a cancellation", extra={"job_id": job_id, "error": str(exc)})

    async def _drop_from_backlog(self, job_id: str) -> bool:
        """A job read ahead into one of this instance's backlogs whose caller left: finish it now
        rather than when a slot would reach it (it no longer counts as waiting)."""
        for pool in self.pool.pools.values():
            entry = pool.backlog.remove(job_id)
            if entry is not None:
                pool.routing.forget_job(job_id)
                await self.ack([entry[0]], pool.name)
                return True
        return False

    async def on_relayed(self, raw: bytes) -> None:
        """A message another instance relayed to this one."""
        try:
            decoded = proto.decode(raw)
        except proto.ProtocolError:
            log.error("unreadable relay message")
            return
        # the messages of one loop turn for this instance travel as one batch (RelayPublisher)
        for message in decoded.messages if type(decoded) is proto.Batch else (decoded,):
            await self._on_relayed_message(message)

    async def _on_relayed_message(self, message: proto.Message) -> None:
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
            extras = fresh.load_extras(catalog)
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
        self.extras = extras
        self.profiles.reset_names(catalog.names)
        self.queue.single_stream = self.single_model
        self.models_file_mtime = self._models_file_mtime()
        self._set_default()
        removed = [pool for name, pool in self.pool.pools.items() if catalog.get(name) is None]
        for spec in catalog.specs:
            pool = self.pool.pools.get(spec.name)
            if pool is None:
                pool = self.pool.pools[spec.name] = self.new_pool(spec)
                if self.running:
                    pool.dispatcher = asyncio.create_task(self.supervise_dispatcher(pool), name=f"dispatch-{spec.name}")
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
        """The policy for one worker serving ``spec`` (the default model when None), with the
        largest frame it will be sent."""
        policy = self._model_policy_for(caps, spec)
        return dataclasses.replace(policy, max_message_bytes=self.config.max_ws_message_bytes)

    def _model_policy_for(self, caps: proto.Capabilities, spec: ModelSpec | None) -> proto.Policy:
        """With quantization ``auto``, the best quantization that fits the VRAM it reported."""
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
        job.timeout_s = timeout
        handle = JobHandle(job=job, deadline=time.time() + timeout, side_worker=worker)
        self.tracker.handles[job.job_id] = handle
        worker.side_jobs.add(job.job_id)
        try:
            await worker.send(job)
            final = await wait_final(self, handle)
        except (ConnectionError, RuntimeError):
            return None
        finally:
            worker.side_jobs.discard(job.job_id)
            self.tracker.abandon(handle)
        if isinstance(final, proto.Complete):
            return final.input_tokens
        return None

    # --- metrics --------------------------------------------------------------------------------

    async def metrics_exposition(self) -> bytes:
        """``/metrics``: this process's counters and workers, plus the cluster gauges if this
        instance holds the metrics lease (always, with the embedded Redis)."""
        workers = list(self.pool.workers.values())
        self.metrics.set_local(
            workers=len(workers),
            total_slots=sum(w.slots for w in workers),
            free_slots=self.pool.total_free(),
            running=sum(len(w.running) for w in workers),
            in_flight=self.in_flight,
        )
        rows = {
            name: ModelGauges(
                workers=len(pool.workers),
                total_slots=sum(w.slots for w in pool.workers.values()),
                free_slots=pool.total_free(),
                running=sum(len(w.running) for w in pool.workers.values()),
                backlog=len(pool.backlog),
            )
            for name, pool in self.pool.pools.items()
        }
        view: ClusterView | None = None
        try:
            if await self._holds_metrics_lease():
                for name, row in rows.items():
                    row.queue_depth = await self.queue.depth(name)
                depth = sum(row.queue_depth or 0 for row in rows.values())
                depth += sum(len(pool.backlog) for pool in self.pool.pools.values())
                local = [w.info(self.instance_id) for w in workers]
                others = [w for w in self.cluster_view if w.get("instance") != self.instance_id]
                cluster = local + others
                total = sum(int(w.get("total_slots", 0)) for w in cluster)
                active = sum(int(w.get("active_jobs", 0)) for w in cluster)
                view = ClusterView(depth, len(cluster), total, max(total - active, 0))
        except RedisError as exc:
            log.warning("cluster metrics unavailable", extra={"error": str(exc)})
        self.metrics.set_models(rows)
        self.metrics.set_cluster(view)
        return self.metrics.exposition()

    async def _holds_metrics_lease(self) -> bool:
        """One instance of a cluster reports the cluster gauges: the holder of a Redis key that
        it renews on each scrape and that expires with the liveness timeout when it goes away."""
        if not self.queue.shared:
            return True
        key, ttl = f"{self.config.redis_prefix}metrics:reporter", max(int(self.config.dead_worker_timeout), 1)
        if await self.redis.set(key, self.instance_id, nx=True, ex=ttl):
            return True
        holder = await self.redis.get(key)
        if holder not in (self.instance_id, self.instance_id.encode()):
            return False
        await self.redis.expire(key, ttl)
        return True

    # --- keys, limits, usage, queue position ---------------------------------------------------

    async def refresh_keys(self) -> None:
        """Take up added, changed and revoked keys (polled every AUXOT_KEYS_REFRESH); workers whose
        GPU key is gone are disconnected."""
        if not await self.key_cache.poll():
            return

        def hashes(role: str) -> list[NamedHash]:
            return [NamedHash(r.name, r.phc, r.tag) for r in self.key_cache.of_role(role)]

        self.api_keys.replace_hashes(self.config.api_key_hashes + hashes("api"))
        self.gpu_hashes = self.config.admin_key_hashes + hashes("gpu")
        self.admin_keys.replace_hashes(self.gpu_hashes)
        self.usage_admins.replace_hashes(hashes("admin"))
        log.info("keys reloaded", extra={"keys": len(self.key_cache.records)})
        valid = {(h.name, h.phc) for h in self.gpu_hashes}
        for worker in list(self.pool.workers.values()):
            if (worker.key_name, worker.key_phc) not in valid:
                log.warning("disconnecting a worker: its GPU key was revoked", extra={"worker_id": worker.worker_id})
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await worker.ws.close(code=4003, message=b"GPU key revoked")

    async def admit(self, request: web.Request) -> Ticket:
        """Check the caller's limits before queueing; raises RateLimitedError (a 429)."""
        name = request.get("auxot_key_name", "")
        record = self.key_cache.get("api", name)
        own = {f: getattr(record, f) for f in keystore.LIMIT_FIELDS} if record is not None else {}
        limits = resolve_limits(own, self.config.default_limits)
        lease = secrets.token_hex(8)
        decision = await self.limiter.admit(name, limits, lease)
        ticket = Ticket(name, record.priority if record is not None else 1, limits, lease, decision)
        request["auxot_ticket"] = ticket
        if not decision.allowed:
            self.usage.add(name, rejected=1)
            raise RateLimitedError(refusal_message(decision, limits), decision.reason)
        return ticket

    def settle(self, ticket: Ticket) -> None:
        """At the job's end: its tokens count against TPM and the day, its slot is free, and its
        usage is recorded."""
        handle = ticket.handle
        final = handle.final if handle is not None else None
        counts = {"requests": 1}
        tokens = 0
        if isinstance(final, proto.Complete):
            tokens = final.input_tokens + final.output_tokens
            busy_ms = final.duration_ms or (
                int((time.monotonic() - handle.dispatched_at) * 1000) if handle and handle.dispatched_at else 0
            )
            counts.update(
                prompt_tokens=final.input_tokens,
                cached_tokens=final.cache_tokens,
                completion_tokens=final.output_tokens,
                gpu_ms=busy_ms,
            )
            self.job_seconds = busy_ms / 1000 if not self.job_seconds else 0.8 * self.job_seconds + 0.2 * busy_ms / 1000
        elif isinstance(final, proto.Error):
            counts["errors"] = 1
        elif handle is not None and handle.dispatched_at:
            # the caller left while its job ran: the worker was told to stop and never reports
            # usage, so charge an estimate (prompt and streamed text at ~4 bytes a token) rather
            # than nothing, or hanging up would be a way around the tokens-per-minute limit
            tokens = estimated_tokens(handle)
            streamed = handle.streamed_chars // 4
            counts.update(prompt_tokens=tokens - streamed, completion_tokens=streamed)
        upstream = ticket.upstream_usage
        if upstream is not None:  # the answer came from an upstream provider: no GPU time here
            tokens = upstream.input_tokens + upstream.output_tokens
            counts = {
                "requests": 1,
                "prompt_tokens": upstream.input_tokens,
                "completion_tokens": upstream.output_tokens,
            }
        self.limiter.settle(ticket.key_name, ticket.limits, ticket.lease, tokens)
        self.usage.add(ticket.key_name, **counts)

    def queue_notice(self, job: proto.Job) -> QueueNotice:
        """Where a waiting job stands: its place in its model's fair backlog (or behind it, if it
        has not been read yet) and an estimate from the average job time and the slots."""
        pool = self.pool.pool(job.model)
        if pool is None:
            return QueueNotice(None, None)
        position = pool.backlog.position(job.job_id)
        if position is None and not self.queue.shared:
            position = len(pool.backlog) + 1
        slots = sum(w.slots for w in pool.workers.values())
        eta = None
        if position is not None and slots and self.job_seconds:
            eta = int(((position - 1) // slots + 1) * self.job_seconds * 1000)
        return QueueNotice(position, eta)

    # --- health ---------------------------------------------------------------------------------

    def worker_info(self, worker: WorkerConnection) -> dict[str, Any]:
        """What /health shows of a worker: its slots, and its prompt-cache hit ratio."""
        info = worker.info(self.instance_id)
        pool = self.pool.pool(worker.model)
        if pool is not None:
            info["cache"] = pool.routing.worker_stats(worker.worker_id)
        return info

    async def refresh_cluster_view(self) -> None:
        """What /health reports beyond this instance: read in the background, so that a health
        probe never scans Redis and answers at once even while Redis is slow or away."""
        try:
            if self.queue.shared:  # other instances read our workers' load fresh, not a heartbeat old
                infos = {w.worker_id: self.worker_info(w) for w in self.pool.workers.values()}
                await self.queue.beat_workers(infos, self.config.dead_worker_timeout)
                for gone in infos.keys() - self.pool.workers.keys():  # left meanwhile: not a ghost
                    await self.queue.drop_worker(gone)
            depths = await self.queue.unfinished([spec.name for spec in self.catalog.specs])
            cluster = await self.queue.cluster_workers() if self.queue.shared else []
        except RedisError as exc:
            self.redis_error = str(exc) or type(exc).__name__
            return
        self.model_depths, self.cluster_view, self.redis_error = depths, cluster, ""

    async def health(self) -> tuple[int, dict[str, Any]]:
        local = [self.worker_info(w) for w in self.pool.workers.values()]
        body: dict[str, Any] = {
            "status": "ok",
            "version": VERSION,
            "instance": self.instance_id,
            "model": self.model_name,
        }
        status = 200
        depth = 0
        cluster = self.cluster_view
        if self.redis_error:
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
            slots = sum(int(w.get("total_slots", 0)) for w in served)
            busy = sum(int(w.get("active_jobs", 0)) for w in served)
            if depth < 0:
                model_depth = -1
            elif self.queue.shared:  # unfinished entries (refreshed in the background) less running
                model_depth = max(self.model_depths.get(spec.name, 0) - busy, 0)
            else:  # the embedded queue counts locally, no I/O: not read yet, and read ahead
                model_depth = await self.queue.depth(spec.name) + len(pool.backlog)
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
        if depth >= 0:  # waiting in the streams or read ahead into a backlog, not running
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
RESPONSE_STORE = web.AppKey("response_store", ResponseStore)


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
    403: "invalid_request_error",
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


def api_of(request: web.Request) -> str:
    """Which API a request is for: ``openai``, ``anthropic``, ``worker`` (the hub) or ``router``."""
    path = request.path
    if is_anthropic(request):
        return "anthropic"
    if path.startswith(("/api/openai", "/v1/")):
        return "openai"
    return "worker" if path == "/ws" else "router"


KEY_NAME = "auxot_key_name"  # request key: the matching key's name, or a fingerprint of a bad key
JOB_STATS = "auxot_job"  # request key: the JobStats of the request's job


@web.middleware
async def access_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Counts every request by API, route and status, and writes one access log line."""
    started, wall = time.monotonic(), time.time()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the caller went away before the response was complete
        raise
    finally:
        router = request.app[ROUTER]
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        api = api_of(request)
        router.metrics.requests.labels(api, route, str(status)).inc()
        if router.config.access_log:
            job: JobStats | None = request.get(JOB_STATS)
            access_log.info(
                "access",
                extra=access_record(
                    started_wall=wall,
                    total_seconds=time.monotonic() - started,
                    method=request.method,
                    path=request.path,
                    status=status,
                    api=api,
                    model=job.model if job is not None else None,
                    key=request.get(KEY_NAME),
                    client=request_client(request),
                    job=job,
                ),
            )


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
        # /health serves a view refreshed in the background: say at once what callers just saw
        request.app[ROUTER].redis_error = str(exc) or type(exc).__name__
        return error_response(request, 503, "the job queue is unavailable; try again shortly", retry_after=2)
    except RateLimitedError as exc:  # Retry-After and the rate-limit headers: add_account_headers
        if is_anthropic(request):
            return error_response(request, 429, exc.message)
        kind = "tokens" if exc.reason in ("tokens", "daily_tokens") else "requests"
        body = error_body(exc.message, kind, code="rate_limit_exceeded")
        return web.json_response(body, status=429, dumps=_dumps)
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


OPEN_PATHS = frozenset({"/health", "/ws", "/ping", "/metrics"})  # /metrics checks its own token


def is_websocket_refusal(request: web.Request) -> bool:
    """A WebSocket upgrade on a Responses path: it is refused without a key (Codex's built-in
    provider sends none on that attempt), so that the client falls back to HTTP at once."""
    return request.path.endswith("/responses") and request.headers.get("Upgrade", "").lower() == "websocket"


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """API routes need a valid ``rtr_`` key. A key verified before is never refused; Argon2 work
    on unknown keys is limited per client address (behind a trusted proxy, the address it names)."""
    if request.path in OPEN_PATHS or is_websocket_refusal(request):
        return await handler(request)
    router = request.app[ROUTER]
    key = presented_key(request)
    if request.path.startswith(ADMIN_PATH_PREFIX):  # usage admins' keys (keys add NAME --admin)
        admin = await router.usage_admins.authenticate(key, request_client(request)) if key else None
        if admin is None or admin.outcome is not Outcome.VALID:
            return error_response(request, 401, "an admin key (keys add NAME --admin) is required")
        request["auxot_key_name"] = admin.name
        return await handler(request)
    if not key:
        missing = (
            "missing API key: set the x-api-key header or use Bearer"
            if is_anthropic(request)
            else "missing Bearer token"
        )
        return error_response(request, 401, missing)
    result = await router.api_keys.authenticate(key, request_client(request))
    if result.outcome is Outcome.LIMITED:
        message = "too many failed authentication attempts; slow down"
        return error_response(request, 429, message, retry_after=math.ceil(result.retry_after))
    if result.outcome is Outcome.INVALID:
        router.metrics.auth_failures.labels("api").inc()
        request[KEY_NAME] = key_fingerprint(key)
        return error_response(request, 401, "invalid API key")
    request["auxot_key_name"] = result.name  # the access log, limits and usage name the key by this
    return await handler(request)


ADMIN_PATH_PREFIX = "/admin/"


async def add_account_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Rate-limit headers on every response of an admitted (or refused) job request, and the
    time it waited for a slot."""
    ticket: Ticket | None = request.get("auxot_ticket")
    if ticket is None:
        return
    anthropic_api = is_anthropic(request)  # type: ignore[arg-type]
    response.headers.update(ratelimit_headers(ticket.decision, ticket.limits, anthropic=anthropic_api))
    if ticket.handle is not None:
        response.headers["x-auxot-queue-ms"] = str(ticket.handle.queue_ms())


def request_client(request: web.Request) -> str:
    """The caller's address: the peer, or what a trusted proxy says (AUXOT_TRUSTED_PROXIES)."""
    return client_address(request.remote, request.headers, request.app[ROUTER].config.trusted_proxies)


UNMETERED_PATHS = frozenset({"/health", "/ping", "/metrics"})  # platform checks and scrapes, even while draining


@web.middleware
async def admission_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse new work while draining, and beyond AUXOT_MAX_REQUESTS requests in flight."""
    router = request.app[ROUTER]
    if request.path in UNMETERED_PATHS:
        return await handler(request)
    if router.draining:
        return error_response(request, 503, "the router is shutting down; retry on another instance", retry_after=1)
    if request.path == "/ws":  # worker sockets have their own bound and never use a request slot
        if len(router.pool.workers) >= router.config.max_workers:
            return error_response(request, 503, "too many workers are connected (AUXOT_MAX_WORKERS)", retry_after=30)
        return await handler(request)
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


# --- automatic model choice and upstream providers (issue 15): the policy is in
# auxot_common/autoroute.py and auxot_common/upstreams.py; these helpers only wire it in -----------

OVERFLOW_POLL_S = 0.05  # how often a job with an overflow fallback looks whether a worker took it


@dataclass(slots=True)
class Route:
    """Where one request goes: a local model's queue (``spec``), or an upstream provider; with
    ``overflow``, the job waits in our queue at most ``overflow.after_s`` before going upstream."""

    spec: ModelSpec | None
    upstream: upstreams.UpstreamSpec | None = None
    overflow: upstreams.FallbackSpec | None = None
    headers: dict[str, str] = field(default_factory=dict)  # x-auxot-routed-model, x-auxot-route-reason
    auto: bool = False
    signature: bool = False

    def go_upstream(self, upstream: upstreams.UpstreamSpec, reason: str) -> None:
        self.spec, self.upstream, self.overflow = None, upstream, None
        if self.auto:
            reason = f"{self.headers.get(autoroute.ROUTE_REASON_HEADER, '')}; {reason}".lstrip("; ")
        self.headers[autoroute.ROUTED_MODEL_HEADER] = upstream.name
        self.headers[autoroute.ROUTE_REASON_HEADER] = autoroute.Choice(upstream.name, reason).header_reason


def observe_profile(profiles: autoroute.ProfileBook, model: str, message: proto.Complete) -> None:
    """A job this instance's worker finished: its prefill and decode speeds update the model's profile."""
    decode_ms = max(message.duration_ms - message.prompt_ms, 0.0)
    profiles.observe(
        model,
        prompt_tokens=message.input_tokens,
        cached_tokens=message.cache_tokens,
        prefill_s=message.prompt_ms / 1000,
        output_tokens=message.output_tokens,
        decode_s=decode_ms / 1000,
    )


def workers_serving(router: Router, model: str) -> int:
    """Workers connected to this instance that serve ``model`` now (slots announced)."""
    pool = router.pool.pools.get(model)
    return sum(1 for w in pool.workers.values() if w.slots > 0) if pool is not None else 0


def find_upstream(router: Router, requested: str) -> upstreams.UpstreamSpec | None:
    wanted = requested.strip().lower()
    return next((u for u in router.extras.upstreams.values() if u.name.lower() == wanted), None)


def relayable(upstream: upstreams.UpstreamSpec, api: str) -> bool:
    """Whether a request of ``api`` can go to ``upstream`` (legacy completions never do; the
    Responses API is passed through, so it needs an OpenAI-compatible upstream)."""
    return api in ("chat", "messages") or (api == "responses" and upstream.api == "openai")


async def route_request(request: web.Request, requested: str, chat: JobRequest | None, *, api: str) -> Route:
    """Pick where a request goes: ``auto`` (constraints, then the rules or the classifier), an
    upstream named as a model, or a local model (with its fallback). Raises RequestError."""
    router = request.app[ROUTER]
    key_name = request.get("auxot_key_name", "")
    extras = router.extras
    auto = extras.auto
    if auto is not None and chat is not None and auto.is_auto(requested):
        allowed = {n: u for n, u in extras.upstreams.items() if relayable(u, api)}
        served = {spec.name: workers_serving(router, spec.name) for spec in router.catalog.specs}
        pool = candidates(router.catalog, served, router.profiles, upstreams=allowed, key_name=key_name)
        traits = autoroute.traits_from(
            chat.messages,
            chat.tools,
            max_tokens=chat.max_tokens,
            reasoning_effort=chat.reasoning_effort,
            params=chat.params,
            key_name=key_name,
        )
        classifier = (lambda prompt: run_classifier(router, prompt)) if auto.policy == "classify" else None
        started = time.monotonic()
        try:
            choice = await autoroute.choose(auto, traits, pool, classifier)
        except autoroute.AutoRouteError as exc:
            raise RequestError(exc.status, exc.message, param="model") from None
        log.info(
            "auto route",
            extra={"model": choice.model, "reason": choice.reason, "ms": round((time.monotonic() - started) * 1000, 1)},
        )
        headers = {autoroute.ROUTED_MODEL_HEADER: choice.model, autoroute.ROUTE_REASON_HEADER: choice.header_reason}
        upstream = extras.upstreams.get(choice.model)
        if upstream is not None:
            return Route(None, upstream, headers=headers, auto=True)
        spec = router.catalog.get(choice.model)
        if spec is None:  # pragma: no cover - candidates come from the catalog
            raise ModelNotFoundError(choice.model, router.catalog.names)
        route = Route(spec, headers=headers, auto=True, signature=auto.signature)
    else:
        upstream = find_upstream(router, requested)
        if upstream is not None:
            if not upstream.may_use(key_name):
                raise RequestError(403, f"this API key may not use the upstream model {upstream.name}", param="model")
            if not relayable(upstream, api):
                raise RequestError(400, f"the upstream model {upstream.name} cannot serve this API", param="model")
            return Route(None, upstream, headers={autoroute.ROUTED_MODEL_HEADER: upstream.name})
        route = Route(request_model(router, requested))
    spec = route.spec
    fallback = extras.fallbacks.get(spec.name) if spec is not None else None
    if spec is not None and fallback is not None:
        target = extras.upstreams[fallback.upstream]
        if target.may_use(key_name) and relayable(target, api):  # off-premises only for keys allowed
            if fallback.at_arrival(workers_serving(router, spec.name)):
                route.go_upstream(target, f"fallback of {spec.name} ({fallback.when})")
            elif fallback.when == "overflow":
                route.overflow = fallback
    return route


async def run_classifier(router: Router, prompt: autoroute.ClassifierPrompt) -> str:
    """The classifier's few-token completion, as an internal job through our own queue (no key,
    no usage); ``autoroute.choose`` bounds it with its timeout, and a cancelled wait stops the job."""
    auto = router.extras.auto
    assert auto is not None
    job = proto.Job(
        job_id=new_id("classify-"),
        model=auto.classifier,
        messages=prompt.messages,
        max_tokens=prompt.max_tokens,
        temperature=0.0,
        stream=False,
        kind="chat",
        params=prompt.params,
    )
    handle = await router.tracker.submit(job)
    try:
        final = await wait_final(router, handle)
    finally:
        router.tracker.abandon(handle)
    if isinstance(final, proto.Error):
        raise RuntimeError(final.error)
    return final.full_response


async def overflow_due(router: Router, handle: JobHandle, fallback: upstreams.FallbackSpec) -> bool:
    """Wait while the job is in our queue; True when it waited ``after_s`` and no worker took it:
    it is then taken out of the queue (abandoned: no dispatcher runs it), so it never runs twice."""
    while True:
        if handle.finished or handle.dispatched_at or handle.events.pending or time.time() >= handle.deadline:
            return False
        waited = time.monotonic() - handle.submitted
        if fallback.overflow_due(waited, dispatched=handle.dispatched_to is not None):
            router.tracker.abandon(handle, "overflow")
            return True
        await asyncio.sleep(max(0.0, min(OVERFLOW_POLL_S, fallback.after_s - waited)))


def upstream_error_renderer(request: web.Request, api: str) -> upstreams.ErrorRenderer:
    def render(status: int, message: str, retry_after: int | None) -> web.StreamResponse:
        if api == "responses":
            response = responses_error(status, message, "upstream_error")
            if retry_after is not None:
                response.headers["Retry-After"] = str(retry_after)
            return response
        return error_response(request, status, message, retry_after=retry_after)

    return render


async def answer_upstream(request: web.Request, route: Route, api: str, body: dict[str, Any]) -> web.StreamResponse:
    """Relay the request to ``route.upstream``, under the caller's key: admitted against its limits
    (unless the request already holds a ticket: an overflowed job), its tokens settled as usage."""
    router = request.app[ROUTER]
    upstream = route.upstream
    assert upstream is not None
    if router.http is None:
        raise RequestError(503, "upstream providers are not available (the router is not started)")
    ticket: Ticket | None = request.get("auxot_ticket")
    own = ticket is None or ticket.handle is None
    if own:
        ticket = await router.admit(request)
    assert ticket is not None
    stats = router.upstream_stats.setdefault(upstream.name, upstreams.UpstreamStats())
    status = "cancelled"
    try:
        result = await upstreams.relay(
            request,
            router.http,
            upstream,
            caller_api=api,
            body=body,
            render_error=upstream_error_renderer(request, api),
            stats=stats,
            extra_headers=route.headers,
        )
        status = str(result.status)
        ticket.upstream_usage = result.usage
        router.metrics.upstream_tokens.labels(upstream.name, "prompt").inc(result.usage.input_tokens)
        router.metrics.upstream_tokens.labels(upstream.name, "completion").inc(result.usage.output_tokens)
        if result.status >= 400:
            router.usage.add(ticket.key_name, errors=1)
        return result.response
    finally:
        router.metrics.upstream_requests.labels(upstream.name, status).inc()
        if own:
            router.settle(ticket)


class SignedStream:
    """An encoder that appends the ``[auto] signature`` line before the end of the answer."""

    def __init__(self, inner: Any, model: str) -> None:
        self._inner = inner
        self._line = autoroute.signature_line(model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def on_complete(self, msg: proto.Complete) -> bytes:
        msg.full_response += self._line
        return bytes(self._inner.on_token(proto.Token(job_id=msg.job_id, token=self._line))) + bytes(
            self._inner.on_complete(msg)
        )


def sign(route: Route, final: proto.Complete) -> None:
    """The signature line on a whole (non-streamed) answer, when ``[auto] signature`` is on."""
    if route.signature and route.spec is not None:
        final.full_response += autoroute.signature_line(route.spec.name)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    raw = await read_json(request)
    chat = parse_chat_request(raw)
    return await run_openai_job(request, chat, "chat", raw)


async def completions(request: web.Request) -> web.StreamResponse:
    raw = await read_json(request)
    chat = parse_completion_request(raw)
    return await run_openai_job(request, chat, "completion", raw)


async def run_openai_job(request: web.Request, chat: ChatRequest, kind: str, raw: Any = None) -> web.StreamResponse:
    router = request.app[ROUTER]
    route = await route_request(request, chat.model or "", chat, api=kind)
    if route.spec is None:
        return await answer_upstream(request, route, kind, raw)
    spec = route.spec
    completion_id = new_id("chatcmpl-" if kind == "chat" else "cmpl-")
    model = spec.name if route.auto else served_name(router, chat.model, spec)
    created = int(time.time())
    job = job_from(chat, kind, completion_id, spec.name)
    job.session = session_hint(request.headers, chat.params)
    async with submitted(request, job, kind) as handle:
        if route.overflow is not None and await overflow_due(router, handle, route.overflow):
            route.go_upstream(router.extras.upstreams[route.overflow.upstream], f"overflow of {spec.name}")
            return await answer_upstream(request, route, kind, raw)
        if not chat.stream:
            final = await wait_final(router, handle)
            if isinstance(final, proto.Error):
                return job_error_response(request, final, route.headers)
            sign(route, final)
            build = chat_completion_body if kind == "chat" else completion_body
            body = build(final, completion_id=completion_id, model=model, created=created)
            return json_response(body, headers={**route.headers, **served_by_headers(handle, final)})
        encoder_cls = OpenAIChatStream if kind == "chat" else OpenAICompletionStream
        encoder: StreamEncoder = encoder_cls(completion_id, model, created, chat.include_usage)
        if route.signature:
            encoder = SignedStream(encoder, spec.name)
        return await stream_job(request, router, handle, encoder, headers=route.headers)


@contextlib.asynccontextmanager
async def submitted(request: web.Request, job: proto.Job, api: str) -> AsyncIterator[JobHandle]:
    """Admit the caller's key (its limits: a 429 when over), queue the job, and always end both:
    the job is abandoned if it still runs when the handler leaves (caller gone, error), and the
    key's limits and usage are settled with what the job really used."""
    router = request.app[ROUTER]
    ticket = await router.admit(request)
    try:
        handle = await router.tracker.submit(job, ticket)
        request[JOB_STATS] = handle.stats
        fields = {"job_id": job.job_id, "kind": api, "model": job.model, "stream": job.stream}
        log.info("job accepted", extra=fields)
        try:
            yield handle
        finally:
            router.tracker.abandon(handle)
    finally:
        router.settle(ticket)


async def wait_final(router: Router, handle: JobHandle) -> proto.Complete | proto.Error:
    async for batch in router.tracker.events(handle, router.config.sse_keepalive):
        for message in batch:
            if isinstance(message, proto.Complete | proto.Error):
                return message
    return proto.Error(job_id=handle.job.job_id, error="the job ended without a result", status=502)


def served_by_headers(handle: JobHandle, final: proto.Complete | None = None) -> dict[str, str]:
    """``x-auxot-worker`` (known at dispatch) and, once the job is complete,
    ``x-auxot-cached-tokens``. A stream's headers leave before the end: its cached tokens are in
    the usage of its last event (OpenAI ``prompt_tokens_details.cached_tokens``, Anthropic
    ``cache_read_input_tokens``)."""
    headers: dict[str, str] = {}
    if handle.dispatched_to is not None:
        headers[WORKER_HEADER] = handle.dispatched_to[1]
    if final is not None:
        headers[CACHED_TOKENS_HEADER] = str(final.cache_tokens)
    return headers


def job_error_response(
    request: web.Request, error: proto.Error, headers: dict[str, str] | None = None
) -> web.Response:
    """A job failure as an HTTP error: llama-server's 4xx (prompt too long) stay 400s."""
    status = error.status if error.status in (502, 503, 504) else 400 if 400 <= error.status < 500 else 500
    message = error.error + (f": {error.details}" if error.details else "")
    response = error_response(request, status, message)
    if headers:
        response.headers.update(headers)
    return response


class StreamEncoder(Protocol):
    """What :func:`stream_job` needs from an API's SSE encoder."""

    def start(self) -> bytes: ...
    def on_token(self, msg: proto.Token) -> bytes: ...
    def on_tool_call_delta(self, msg: proto.ToolCallDelta) -> bytes: ...
    def on_complete(self, msg: proto.Complete) -> bytes: ...
    def on_error(self, message: str) -> bytes: ...


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def stream_job(
    request: web.Request,
    router: Router,
    handle: JobHandle,
    encoder: StreamEncoder,
    keepalive: bytes = KEEPALIVE,
    *,
    early_error: Callable[[proto.Error], web.Response] | None = None,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    """Relay a job as SSE.

    Headers go out with the first event, or after one keep-alive interval with nothing to say:
    an error that comes quickly (a prompt longer than the context) is still a proper HTTP 400,
    and a long wait in the queue still keeps proxies from cutting the connection.
    """
    try:
        return await _stream_events(
            request, router, handle, encoder, keepalive=keepalive, early_error=early_error, headers=headers
        )
    finally:
        handle.events.direct = None  # nothing may write to the response once the handler is done


async def _stream_events(
    request: web.Request,
    router: Router,
    handle: JobHandle,
    encoder: StreamEncoder,
    *,
    keepalive: bytes,
    early_error: Callable[[proto.Error], web.Response] | None,
    headers: dict[str, str] | None,
) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    write_timeout = router.config.write_timeout
    async for batch in router.tracker.events(handle, router.config.sse_keepalive):
        if response is None:
            first = batch[0] if batch else None
            if isinstance(first, proto.Error):
                return early_error(first) if early_error else job_error_response(request, first)
            progress = next((m for m in batch if isinstance(m, proto.PromptProgress)), None)
            if progress is not None and hasattr(encoder, "on_prompt_size"):
                encoder.on_prompt_size(progress.total, progress.cached)  # message_start's input_tokens
            response = web.StreamResponse(headers={**SSE_HEADERS, **(headers or {}), **served_by_headers(handle)})
            await response.prepare(request)
            if batch and not isinstance(batch[0], QueueNotice):  # the start and the first events: one write
                start = encoder.start()
                await write_within(request, response, start + encode_batch(handle, encoder, batch), write_timeout)
                direct_tokens(router, request, response, handle, encoder)
                continue
            await write_within(request, response, encoder.start(), write_timeout)
            direct_tokens(router, request, response, handle, encoder)
        if not batch:
            await write_within(request, response, keepalive, write_timeout)
            continue
        if isinstance(batch[0], QueueNotice):  # alone in its batch: the job waits for a slot
            await write_within(request, response, batch[0].comment(), write_timeout)
            continue
        await write_within(request, response, encode_batch(handle, encoder, batch), write_timeout)
    if response is None:  # pragma: no cover - events() always yields a final message
        raise web.HTTPInternalServerError()
    return response


def direct_tokens(
    router: Router, request: web.Request, response: web.StreamResponse, handle: JobHandle, encoder: StreamEncoder
) -> None:
    """From now on, tokens that find the handler parked are written where they arrive."""
    if router.config.direct_tokens and not response.compression:
        handle.events.direct = DirectTokens(request, response, handle, encoder)


WRITE_FAST_PATH_BYTES = 16 * 1024  # below asyncio's default 64 KiB high-water mark
DIRECT_TOKEN_CHARS = 2048  # encoded (JSON escapes at most 6×, plus the event's frame) within the above


class DirectTokens:
    """Writes a streamed job's tokens from the socket reader that received them, while the
    caller's handler is parked with nothing queued: no wake-up of the handler, no task switch and
    no pass through its middleware stack per token (the byte proxy pays one such switch per
    token; the router paid one per token too, on top of its frame decoding). Only a write that
    cannot wait goes this way: nothing buffered for the caller, a small chunk, no compression.
    Everything else (a slow reader, the end, an error, a lost worker) wakes the handler as before,
    and since the handler only parks once it has written all it took, the order is kept."""

    __slots__ = ("_encoder", "_handle", "_request", "_response")

    def __init__(self, request: web.Request, response: web.StreamResponse, handle: JobHandle, encoder: StreamEncoder):
        self._request, self._response, self._handle, self._encoder = request, response, handle, encoder

    def __call__(self, message: proto.Message) -> bool:
        if type(message) is not proto.Token or len(message.token) > DIRECT_TOKEN_CHARS:
            return False
        transport = self._request.transport
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        handle = self._handle
        handle.last_yield = now = time.monotonic()  # no keep-alive due
        handle.content_delivered(len(message.token), now)
        data = self._encoder.on_token(message)
        if not data:
            return True
        # aiohttp's own write (chunked framing, byte counts), run to its end here: it hands the
        # chunk to the transport before anything it could wait for (a drain, impossible with an
        # empty buffer), so a write that did suspend has still sent the chunk and is dropped
        write = self._response.write(data)
        try:
            write.send(None)
        except StopIteration:
            return True
        except Exception as exc:  # the connection broke under us: end it as a hang-up would
            log.info("a direct token write failed; closing the stream", extra={"error": str(exc)})
            transport.abort()
            return True
        write.close()
        return True



async def write_within(request: web.Request, response: web.StreamResponse, data: bytes, timeout: float) -> None:
    """A write that gives up when the caller stops reading: the connection is closed, the
    handler ends (its caller ``abandon``s the job) and the request slot is free."""
    if not data:
        return
    transport = request.transport
    if transport is not None and len(data) <= WRITE_FAST_PATH_BYTES and not transport.get_write_buffer_size():
        # nothing waits in the socket's buffer and this fits below its high-water mark: the write
        # cannot wait for the caller, so it needs no timer (the common case: one per token batch)
        await response.write(data)
        return
    try:
        async with asyncio.timeout(timeout):
            await response.write(data)
    except TimeoutError:
        log.warning("the caller stopped reading; closing its stream", extra={"path": request.path})
        if request.transport is not None:
            request.transport.abort()
        # as if the caller had hung up (aiohttp cancels the handler then): the job is abandoned,
        # the access log says 499, and aiohttp does not log it as a handler failure
        raise asyncio.CancelledError("the caller stopped reading") from None


def encode_batch(handle: JobHandle, encoder: StreamEncoder, batch: list[proto.Message | QueueNotice]) -> bytes:
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
    if not spec.embedding:  # issue 15: capabilities and the measured profile (automatic choice reads them)
        listed = candidates(router.catalog, {spec.name: serving}, router.profiles)
        candidate = next((c for c in listed if c.name == spec.name), None)
        if candidate is not None:
            obj["auxot"] = autoroute.model_listing_fields(candidate, router.profiles.get(spec.name))
    return obj


def virtual_entries(router: Router, anthropic_shape: bool) -> list[dict[str, Any]]:
    """``auto`` and the upstream models, after the local ones (upstreams show no key, no URL)."""
    names: list[tuple[str, dict[str, Any]]] = []
    auto = router.extras.auto
    if auto is not None:
        names.append((auto.name, {"auto": True, "aliases": list(auto.aliases), "policy": auto.policy}))
    for upstream in router.extras.upstreams.values():
        names.append((upstream.name, {"upstream": upstream.public()}))
    out = []
    for name, extra in names:
        obj = anthropic.model_object(name) if anthropic_shape else model_object(name, router.started)
        obj.update(extra)
        out.append(obj)
    return out


async def list_models(request: web.Request) -> web.Response:
    """``/models`` in the shape of the API asking (``/v1/models`` serves both): every configured
    model, the default first."""
    router = request.app[ROUTER]
    specs = sorted(router.catalog.specs, key=lambda s: s is not router.catalog.default)
    shape = is_anthropic(request)
    data = [model_entry(router, spec, shape) for spec in specs] + virtual_entries(router, shape)
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
    async with submitted(request, job, "embeddings") as handle:
        final = await wait_final(router, handle)
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


# === Handlers: OpenAI Responses ===================================================================


def responses_error(status: int, message: str, code: str, *, param: str | None = None) -> web.Response:
    error_type = _OPENAI_TYPES.get(status, "server_error")
    return json_response(error_body(message, error_type, param=param, code=code), status=status)


def responses_job_error(error: proto.Error) -> web.Response:
    """A job failure before any event: llama-server's 4xx stay 400s; a prompt over the context
    carries ``context_length_exceeded`` (Codex reads the code and compacts instead of retrying)."""
    status = error.status if error.status in (502, 503, 504) else 400 if 400 <= error.status < 500 else 500
    message = error.error + (f": {error.details}" if error.details else "")
    return responses_error(status, message, responses.error_code(message, status))


async def create_response(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return refuse_websocket(request)
    router = request.app[ROUTER]
    store = request.app[RESPONSE_STORE]
    body = await read_json(request)
    history: list[dict[str, Any]] | None = None
    previous = responses.previous_response_id(body)
    if previous is not None:
        record = await store.get(previous)
        if record is None:
            return responses_error(
                404,
                f"Previous response with id '{previous}' not found.",
                "previous_response_not_found",
                param="previous_response_id",
            )
        history = [*record.get("history", []), *record["response"].get("output", [])]
    parsed = responses.parse_request(body, history)
    if parsed.dropped_tools:
        log.info("responses: hosted tools dropped", extra={"tools": sorted(set(parsed.dropped_tools))})
    response_id = responses.new_id("resp_")
    route = await route_request(request, parsed.chat.model or "", parsed.chat, api="responses")
    if route.spec is None:
        return await answer_upstream(request, route, "responses", body)
    spec = route.spec
    model = spec.name if route.auto else served_name(router, parsed.chat.model, spec)
    created = int(time.time())
    job = job_from(parsed.chat, "chat", new_id("chatcmpl-"), spec.name)
    job.session = session_hint(request.headers, body if isinstance(body, dict) else {})  # prompt_cache_key
    headers = {"x-auxot-dropped-tools": ",".join(sorted(set(parsed.dropped_tools)))} if parsed.dropped_tools else {}
    headers.update(route.headers)
    async with submitted(request, job, "responses") as handle:
        if route.overflow is not None and await overflow_due(router, handle, route.overflow):
            route.go_upstream(router.extras.upstreams[route.overflow.upstream], f"overflow of {spec.name}")
            return await answer_upstream(request, route, "responses", body)
        if not parsed.chat.stream:
            final = await wait_final(router, handle)
            if isinstance(final, proto.Error):
                return responses_job_error(final)
            sign(route, final)
            result = responses.response_body(final, parsed, response_id=response_id, model=model, created_at=created)
            result["store"] = parsed.store and await store_response(store, result, parsed)
            return json_response(result, headers={**headers, **served_by_headers(handle, final)})
        encoder = responses.ResponsesStream(parsed, response_id, model, created)
        signed: StreamEncoder = SignedStream(encoder, spec.name) if route.signature else encoder
        streamed = await stream_job(
            request, router, handle, signed, early_error=responses_job_error, headers=route.headers
        )
        if encoder.final is not None and parsed.store:
            await store_response(store, encoder.final, parsed)
        return streamed


async def store_response(store: ResponseStore, result: dict[str, Any], parsed: responses.ResponsesRequest) -> bool:
    try:
        return await store.put(result, parsed.input_items)
    except RedisError as exc:
        log.error("responses: could not store a response", extra={"error": str(exc)})
        return False


async def get_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    record = await request.app[RESPONSE_STORE].get(response_id)
    if record is None:
        return responses_error(404, f"Response with id '{response_id}' not found.", "not_found")
    return json_response(record["response"])


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if not await request.app[RESPONSE_STORE].delete(response_id):
        return responses_error(404, f"Response with id '{response_id}' not found.", "not_found")
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


def refuse_websocket(request: web.Request) -> web.Response:
    """Codex first tries the Responses WebSocket transport; 426 makes it use HTTP at once."""
    return responses_error(
        426, "WebSocket transport is not supported here; use HTTP POST with server-sent events", "websocket_unsupported"
    )


async def responses_get(request: web.Request) -> web.Response:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return refuse_websocket(request)
    return error_response(request, 405, f"method {request.method} is not allowed on {request.path}")


# === Handlers: Anthropic ==========================================================================


async def anthropic_messages(request: web.Request) -> web.StreamResponse:
    router = request.app[ROUTER]
    body = await read_json(request)
    requested: str = body["model"] if isinstance(body, dict) and isinstance(body.get("model"), str) else ""
    auto = router.extras.auto
    if auto is not None and auto.is_auto(requested):  # the traits need the translated request first
        try:
            chat = anthropic.translate_request(body)
        except anthropic.AnthropicError as exc:
            return error_response(request, exc.status, exc.message)
        route = await route_request(request, requested, chat, api="messages")
    else:
        route = await route_request(request, requested, None, api="messages")
    if route.spec is None:
        return await answer_upstream(request, route, "messages", body)
    spec = route.spec
    try:
        chat = anthropic.translate_request(body, max_output_tokens=spec.resolution.context_size)
    except anthropic.AnthropicError as exc:
        return error_response(request, exc.status, exc.message)
    message_id = new_id("msg_")
    model = spec.name if route.auto else served_name(router, chat.model, spec)
    stop_sequences = body.get("stop_sequences") if isinstance(body.get("stop_sequences"), list) else None
    job = job_from(chat, "chat", new_id("chatcmpl-"), spec.name)
    job.session = session_hint(request.headers, chat.params)
    async with submitted(request, job, "messages") as handle:
        if route.overflow is not None and await overflow_due(router, handle, route.overflow):
            route.go_upstream(router.extras.upstreams[route.overflow.upstream], f"overflow of {spec.name}")
            return await answer_upstream(request, route, "messages", body)
        if not chat.stream:
            final = await wait_final(router, handle)
            if isinstance(final, proto.Error):
                return job_error_response(request, final, route.headers)
            sign(route, final)
            return json_response(
                anthropic.build_message(final, message_id=message_id, model=model, stop_sequences=stop_sequences),
                headers={**route.headers, **served_by_headers(handle, final)},
            )
        encoder: StreamEncoder = anthropic.AnthropicStream(message_id, model, stop_sequences=stop_sequences)
        if route.signature:
            encoder = SignedStream(encoder, spec.name)
        return await stream_job(
            request, router, handle, encoder, keepalive=anthropic.AnthropicStream.ping(), headers=route.headers
        )


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
    if not await may_list_workers(request):
        body.pop("worker_list", None)  # the counts stay public; who runs where is not
    return json_response(body, status=status)


async def may_list_workers(request: web.Request) -> bool:
    """Whether the caller of /health presented a valid API, GPU or usage-admin key (Bearer or
    ``x-api-key``). The key's prefix picks the one verifier that could know it, so an unknown
    key costs at most one Argon2 computation, limited like any other."""
    router = request.app[ROUTER]
    header = request.headers.get("Authorization", "")
    key = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""
    key = key or request.headers.get("x-api-key", "").strip()
    verifiers = {
        API_KEY_PREFIX: router.api_keys,
        GPU_KEY_PREFIX: router.admin_keys,
        keystore.ADMIN_KEY_PREFIX: router.usage_admins,
    }
    chosen = verifiers.get(key[:4])
    if chosen is None:
        return False
    return (await chosen.authenticate(key, request_client(request))).outcome is Outcome.VALID


PRE_AUTH_MAX_MESSAGE_BYTES = 1024 * 1024  # a hello is a few KiB; nobody unverified sends 64 MiB


async def ping(request: web.Request) -> web.Response:
    """Liveness for platform checks: no auth, no Redis, no JSON."""
    return web.Response(text="pong")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; with AUXOT_METRICS_TOKEN set, only for ``Bearer <token>``."""
    router = request.app[ROUTER]
    token = router.config.metrics_token
    if token:
        client = request_client(request)
        if not router.auth_failures.allowed(client):
            return web.Response(status=429, text="too many failed attempts\n", headers={"Retry-After": "60"})
        header = request.headers.get("Authorization", "")
        presented = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(presented.encode(), token.encode()):
            router.auth_failures.record_failure(client)
            router.metrics.auth_failures.labels("metrics").inc()
            return web.Response(status=401, text="unauthorized\n", headers={"WWW-Authenticate": "Bearer"})
    body = await router.metrics_exposition()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def admin_usage(request: web.Request) -> web.Response:
    """``GET /admin/usage?key=NAME&since=YYYY-MM-DD``: usage rows per key and UTC day."""
    router = request.app[ROUTER]
    since = request.query.get("since") or None
    if since is not None and not _is_date(since):
        return error_response(request, 400, "since must be a date: YYYY-MM-DD")
    data = await router.usage.query(key=request.query.get("key") or None, since=since)
    return json_response({"object": "list", "data": data})


def _is_date(text: str) -> bool:
    import datetime as dt

    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return False
    return True


async def worker_socket(request: web.Request) -> web.WebSocketResponse:
    """The worker hub: hello within a few seconds, key check, policy, then jobs and events.

    Our worker also sends its key in the upgrade request (``Authorization: Bearer adm_…``), so
    it is verified before the socket is accepted and only a verified worker may send large
    frames; a socket without it (a Go worker) is held to small frames for its whole life.
    """
    router = request.app[ROUTER]
    config = router.config
    client = request_client(request)
    header = request.headers.get("Authorization", "")
    early_key = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""
    early = await router.admin_keys.authenticate(early_key, client) if early_key else None
    verified = early is not None and early.outcome is Outcome.VALID
    ws = web.WebSocketResponse(
        heartbeat=config.heartbeat_interval,
        receive_timeout=3 * config.heartbeat_interval + config.hello_timeout,
        max_msg_size=config.max_ws_message_bytes if verified else PRE_AUTH_MAX_MESSAGE_BYTES,
        compress=False,
        decode_text=False,  # frames stay bytes: orjson parses them and the relay forwards them as they are
    )
    await ws.prepare(request)
    hello = await receive_hello(ws, config.hello_timeout)
    if hello is None:
        await ws.close()
        return ws
    if early is not None and hello.gpu_key != early_key:
        early = None  # two different keys: judge the one in the hello
    result = early if early is not None else await router.admin_keys.authenticate(hello.gpu_key, client)
    request[KEY_NAME] = result.name or key_fingerprint(hello.gpu_key)
    if result.outcome is not Outcome.VALID:
        if result.outcome is Outcome.LIMITED:
            log.warning("worker refused for now: too many failed GPU keys", extra={"remote": client})
            refusal = proto.HelloAck(
                success=False,
                error="too many failed authentication attempts from this address; retrying later",
                retryable=True,
                retry_after=max(round(result.retry_after, 1), 1.0),
            )
        else:
            router.metrics.auth_failures.labels("worker").inc()
            log.warning("worker rejected: invalid GPU key", extra={"remote": client})
            refusal = proto.HelloAck(success=False, error="invalid GPU key: authentication failed")
        await ws.send_str(proto.encode(refusal).decode())
        await ws.close()
        return ws
    spec, why_not = choose_model(router, hello)
    if spec is None:
        log.warning("worker rejected: " + why_not, extra={"remote": client, "model": hello.model})
        await ws.send_str(proto.encode(proto.HelloAck(success=False, error=why_not)).decode())
        await ws.close()
        return ws
    worker_id = secrets.token_hex(16)
    ack = proto.HelloAck(
        success=True, gpu_id=worker_id, policy=router.policy_for(hello.capabilities, spec), batch=True
    )
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
        key_name=result.name or "",
        key_phc=next((h.phc for h in router.gpu_hashes if h.name == result.name), ""),
    )
    # a task of its own: each frame then resumes serve_worker's few frames, not the middleware
    # stack above this handler as well (one resume per frame, per token when tokens come alone);
    # cancelling this handler (the connection closed) cancels the task it awaits
    await asyncio.create_task(serve_worker(router, worker), name=f"worker-{worker_id}")
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
    router.metrics.worker_connects.inc()
    await router._dispatch_worker_pool(worker)
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
            if type(message) is proto.Batch:  # events of several jobs that were ready together
                # every job's event goes out first; the entries the batch finished are then
                # acknowledged in one round trip (not one each while the other callers wait)
                acks: list[tuple[str, str]] = []
                try:
                    for inner in message.messages:
                        await router.on_worker_message(worker, None, inner, acks)
                finally:
                    if acks:
                        await router.ack_all(acks)
            else:
                await router.on_worker_message(worker, msg.data, message)
        if worker.ws.close_code not in (None, 1000, 1001):
            reason = f"closed with code {worker.ws.close_code}"
    except TimeoutError:
        reason = "no heartbeat"
    except (ConnectionError, RedisError) as exc:
        reason = str(exc) or type(exc).__name__
    finally:
        await router.worker_gone(worker, reason)
        router.metrics.worker_disconnects.inc()
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


async def refresh_health(router: Router) -> None:
    while True:
        await router.refresh_cluster_view()
        await asyncio.sleep(router.config.health_refresh)


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


async def keys_and_usage(router: Router) -> None:
    """Poll the key store for changes; send usage and limit settlements out every second."""
    last_poll = time.monotonic()
    while True:
        await asyncio.sleep(min(router.config.keys_refresh, 1.0))
        if time.monotonic() - last_poll >= router.config.keys_refresh:
            last_poll = time.monotonic()
            try:
                await router.refresh_keys()
            except (RedisError, OSError, keystore.KeyStoreError) as exc:
                log.error("could not read the key store; keeping the keys known", extra={"error": str(exc)})
        try:
            await router.usage.flush()
            await router.limiter.flush()
        except (RedisError, OSError) as exc:
            log.warning("could not record usage", extra={"error": str(exc)})


async def background_tasks(app: web.Application) -> AsyncIterator[None]:
    router = app[ROUTER]
    for spec in router.catalog.specs:
        await router.queue.ensure_group(spec.name)
    await router.queue.beat_instance(router.config.dead_worker_timeout)
    try:
        await router.refresh_keys()
    except (OSError, keystore.KeyStoreError) as exc:  # the env keys still work; polling retries
        log.error("could not read the key store", extra={"error": str(exc)})
    router.start_dispatchers()
    tasks = [
        asyncio.create_task(keys_and_usage(router), name="keys-and-usage"),
        asyncio.create_task(relay_reader(router), name="relay-reader"),
        asyncio.create_task(liveness(router), name="liveness"),
        asyncio.create_task(balancer(router), name="balancer"),
        asyncio.create_task(router.tracker.tick_forever(router.config.sse_keepalive), name="ticker"),
        asyncio.create_task(refresh_health(router), name="health"),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await router.stop_dispatchers()
    await router.relay.close()
    with contextlib.suppress(RedisError, OSError):
        await router.usage.flush()
        await router.limiter.flush()
    with contextlib.suppress(RedisError):
        await router.queue.drop_instance()
    router.api_keys.close()
    router.admin_keys.close()
    router.usage_admins.close()


async def upstream_session(app: web.Application) -> AsyncIterator[None]:
    """The router's one HTTP client for upstream providers (pooled connections), closed at shutdown."""
    router = app[ROUTER]
    router.http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256), auto_decompress=True, trust_env=False
    )
    try:
        yield
    finally:
        await router.http.close()
        router.http = None


async def drain(router: Router) -> None:
    """Take no new requests and let the ones in flight finish, up to the grace period.

    With the embedded queue this instance is the only one, so it keeps dispatching its queued
    jobs meanwhile; with a shared Redis it stops reading jobs and leaves them to the others.
    """
    router.draining = True
    deadline = time.monotonic() + router.config.shutdown_grace
    if router.queue.shared:  # jobs read ahead into the fair backlogs go back to the others
        for pool in list(router.pool.pools.values()):
            entries = [pool.backlog.popleft() for _ in range(len(pool.backlog))]
            try:
                await router.queue.hand_back(pool.name, entries)
            except RedisError as exc:  # left pending on this instance: the sweeper reclaims them
                log.warning("could not hand back the backlog", extra={"model": pool.name, "error": str(exc)})
            if entries:
                log.info("backlog handed back", extra={"model": pool.name, "jobs": len(entries)})

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
    ("POST", "/responses", create_response),
    ("GET", "/responses", responses_get),
    ("GET", "/responses/{response_id}", get_response),
    ("DELETE", "/responses/{response_id}", delete_response),
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
    app.router.add_get("/ping", ping)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ws", worker_socket)
    app.router.add_get("/admin/usage", admin_usage)
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
        redis, server_blocking = connect_redis(config.redis_url, config.redis_max_connections)
    else:
        server_blocking = not type(redis).__module__.startswith("fakeredis")
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[access_middleware, errors_middleware, admission_middleware, auth_middleware],
        handler_args={"max_field_size": 65536},
    )
    app[ROUTER] = Router(config, redis, server_blocking=server_blocking)
    app[RESPONSE_STORE] = ResponseStore(
        redis, config.redis_prefix, ttl=config.responses_ttl, max_bytes=config.responses_max_bytes
    )
    if config.access_log:  # its own level: AUXOT_LOG_LEVEL=warn does not silence the access log
        access_log.setLevel(logging.INFO)
    add_routes(app)
    app.cleanup_ctx.append(background_tasks)
    app.cleanup_ctx.append(upstream_session)
    app.on_shutdown.append(close_worker_sockets)
    app.on_response_prepare.append(add_account_headers)
    return app


REDIS_MAX_CONNECTIONS = 256


def connect_redis(url: str, max_connections: int = REDIS_MAX_CONNECTIONS) -> tuple[Redis, bool]:
    """The external Redis at ``url``, or the embedded in-process store when ``url`` is empty.

    Both use a *blocking* connection pool: redis-py's default pool raises MaxConnectionsError past
    100 connections, which turned a burst of a few hundred requests into 503s; a blocking pool
    makes the burst wait its turn for a connection instead (AUXOT_REDIS_MAX_CONNECTIONS).
    """
    if not url:
        import fakeredis
        from fakeredis.aioredis import FakeAsyncRedisConnection

        pool = BlockingConnectionPool(
            connection_class=FakeAsyncRedisConnection,
            server=fakeredis.FakeServer(),
            max_connections=max_connections,
            timeout=None,
        )
        return fakeredis.FakeAsyncRedis(connection_pool=pool), False
    # from_url gives connections no retry: after a Redis restart each pooled connection would fail
    # one request. A short, bounded retry reconnects them; a Redis that is down still fails fast.
    real_pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        socket_connect_timeout=3,
        socket_timeout=10,
        health_check_interval=15,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3),
    )
    return Redis(connection_pool=real_pool), True


# === Command line =================================================================================


USAGE = """usage: python auxot_router.py [command]

commands:
  (none)              start the router
  setup [--write-env] [--fly] [--model NAME]
                      generate an API key (rtr_) and a GPU key (adm_) with their Argon2id hashes
  models [--json] [--family F] [--max-vram GB] [--capability C] [--search TEXT]
                      list the models of the registry
  keys add NAME [--rpm N] [--tpm N] [--concurrency N] [--daily-tokens N] [--priority P] [--gpu|--admin]
                      create a named key (printed once); keys list | keys set NAME ... | keys revoke NAME
  usage [--key NAME] [--since YYYY-MM-DD] [--json]
                      usage per key and UTC day
  ping                exit 0 if the router on AUXOT_PORT answers GET /ping (container health checks)
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
    print(f"  run a worker with:     AUXOT_GPU_KEY={gpu_key} python auxot_worker.py --router-url ws://HOST:8080/ws\n")
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
    """``fly secrets set`` for the app of ``./fly.toml`` (when there is one), with a token that
    protects ``/metrics`` (a Fly app is public)."""
    app = ""
    with contextlib.suppress(OSError, ValueError):
        import tomllib

        app = str(tomllib.loads(Path("fly.toml").read_text()).get("app", ""))
    metrics_token = secrets.token_urlsafe(24)
    return (
        "# auxot-router keys. SAVE THESE KEYS NOW: they will not be shown again.\n"
        f"# GPU key (workers):  {gpu_key}\n"
        f"# API key (callers):  {api_key}\n"
        f"# Prometheus scrapes /metrics with:  Authorization: Bearer {metrics_token}\n"
        f"fly secrets set{f' --app {app}' if app else ''} \\\n"
        f"  AUXOT_ADMIN_KEY_HASH='{admin_hash}' \\\n"
        f"  AUXOT_API_KEY_HASH='{api_hash}' \\\n"
        f"  AUXOT_METRICS_TOKEN='{metrics_token}' \\\n"
        f"  AUXOT_MODEL='{model}'\n"
        "# Then deploy:\n#   fly deploy\n"
        "# Workers (the key in the environment, never on the command line):\n"
        f"#   export AUXOT_GPU_KEY='{gpu_key}'\n"
        f"#   python auxot_worker.py --router-url wss://{app or '<app>'}.fly.dev/ws"
    )


def ping_command(env: dict[str, str]) -> int:
    """A liveness probe without curl or wget in the image: GET /ping on this machine."""
    import urllib.request

    port = env.get("AUXOT_PORT", "").strip() or "8080"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=4) as response:
            ok = response.status == 200 and response.read() == b"pong"
    except OSError as exc:
        print(f"auxot-router ping: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


async def serve(config: RouterConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully."""
    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=config.shutdown_grace + 5)
    await runner.setup()
    # several processes (AUXOT_PROCESSES) share the port: the kernel spreads connections over them
    site = web.TCPSite(runner, config.host, config.port, backlog=1024, reuse_port=config.processes > 1 or None)
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
    if command == "ping":
        return ping_command(load_environment())
    if command in ("keys", "usage"):
        from auxot_common.accounts_cli import keys_command, usage_command

        run = keys_command if command == "keys" else usage_command
        return run(args[1:], load_environment())
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
    if config.processes > 1:
        return run_processes(config.processes, lambda _slot: serve_process(config))
    return serve_process(config)


def serve_process(config: RouterConfig) -> int:
    try:
        eventloop.run(serve(config))
    except OSError as exc:
        log.error("cannot listen", extra={"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
