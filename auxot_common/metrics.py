"""Prometheus metrics and the access log record of the router.

Everything here is independent of the router: the router fills a :class:`JobStats` per job, calls
:meth:`RouterMetrics.observe_job` when the job ends, sets the gauges from its state before each
scrape, and builds one access log record per request with :func:`access_record`.

Each application gets its own :class:`~prometheus_client.CollectorRegistry`, so several routers
in one process (tests) never collide in prometheus_client's global registry.

Several routers on one Redis: each process reports what it holds (requests, jobs, its workers);
the cluster view (queue depth, every worker's slots) comes only from the instance that holds the
metrics lease in Redis, so a ``sum()`` over instances never counts the cluster twice.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
RATE_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 500, 1000)

OUTCOMES = ("complete", "error", "timeout", "cancelled")


@dataclass(slots=True)
class JobStats:
    """What happened to one job, in monotonic seconds (``None``: did not happen)."""

    model: str
    kind: str = "chat"
    queued_at: float = field(default_factory=time.monotonic)
    dispatched_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    worker_id: str = ""
    prompt_tokens: int = 0  # the whole prompt, cache hits included
    cached_tokens: int = 0
    completion_tokens: int = 0
    outcome: str = ""

    def queue_seconds(self) -> float | None:
        return None if self.dispatched_at is None else max(self.dispatched_at - self.queued_at, 0.0)

    def ttft_seconds(self) -> float | None:
        return None if self.first_token_at is None else max(self.first_token_at - self.queued_at, 0.0)


@dataclass(slots=True)
class ClusterView:
    """The cluster gauges, reported by one instance only (see the module docstring)."""

    queue_depth: int
    workers: int
    total_slots: int
    free_slots: int


@dataclass(slots=True)
class ModelGauges:
    """One model's pool on this router (``queue_depth``: its stream, reported once per cluster
    like the other cluster gauges; None on the other instances)."""

    workers: int
    total_slots: int
    free_slots: int
    running: int
    backlog: int
    queue_depth: int | None = None


class _ModelCollector(Collector):
    """Per-model gauges from the pools as they are at scrape time (a model that left the
    catalog disappears instead of keeping its last values)."""

    def __init__(self) -> None:
        self.rows: dict[str, ModelGauges] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "workers": GaugeMetricFamily(
                "auxot_model_workers", "Workers serving the model on this router", labels=["model"]
            ),
            "total_slots": GaugeMetricFamily(
                "auxot_model_slots", "Slots for the model on this router", labels=["model"]
            ),
            "free_slots": GaugeMetricFamily(
                "auxot_model_slots_free", "Free slots for the model on this router", labels=["model"]
            ),
            "running": GaugeMetricFamily(
                "auxot_model_jobs_running", "Jobs of the model running on this router's workers", labels=["model"]
            ),
            "backlog": GaugeMetricFamily(
                "auxot_model_backlog", "Jobs of the model read by this router and waiting for a slot", labels=["model"]
            ),
        }
        depth = GaugeMetricFamily(
            "auxot_model_queue_depth", "Jobs of the model waiting in its stream (cluster)", labels=["model"]
        )
        for model, row in self.rows.items():
            for field_name, family in families.items():
                family.add_metric([model], getattr(row, field_name))
            if row.queue_depth is not None:
                depth.add_metric([model], row.queue_depth)
        yield from families.values()
        yield depth

    def describe(self) -> Iterable[Any]:
        return []


class _ClusterCollector(Collector):
    def __init__(self) -> None:
        self.view: ClusterView | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self.view
        if view is None:
            return
        yield GaugeMetricFamily(
            "auxot_queue_depth", "Jobs waiting in the shared queue (cluster)", value=view.queue_depth
        )
        yield GaugeMetricFamily(
            "auxot_cluster_workers", "Workers connected to any router (cluster)", value=view.workers
        )
        yield GaugeMetricFamily("auxot_cluster_slots", "Slots of all workers (cluster)", value=view.total_slots)
        yield GaugeMetricFamily(
            "auxot_cluster_slots_free", "Free slots of all workers (cluster)", value=view.free_slots
        )

    def describe(self) -> Iterable[Any]:
        return []


class RouterMetrics:
    """The router's metrics in a private registry."""

    def __init__(self, *, version: str, instance: str) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=False)
        model = ["model"]
        self.requests = Counter(
            "auxot_http_requests",
            "HTTP requests by API, route and status",
            ["api", "route", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "auxot_prompt_tokens", "Prompt tokens of finished jobs, cache hits included", model, registry=registry
        )
        self.cached_tokens = Counter(
            "auxot_cached_prompt_tokens",
            "Prompt tokens served from llama-server's prompt cache",
            model,
            registry=registry,
        )
        self.completion_tokens = Counter("auxot_completion_tokens", "Generated tokens", model, registry=registry)
        # prompt-cache routing: a job is a hit when llama-server reused at least half of its prompt
        # (the policy's own definition, routing.CacheAwarePolicy.on_complete)
        self.cache_jobs = Counter(
            "auxot_prompt_cache_jobs", "Finished jobs by prompt-cache result (hit, miss)", ["model", "result"],
            registry=registry,
        )  # fmt: skip
        self.cache_hit_ratio = Gauge(
            "auxot_prompt_cache_hit_ratio", "Cached share of prompt tokens on this router since start", model,
            registry=registry,
        )  # fmt: skip
        self.sticky_forwarded = Counter(
            "auxot_sticky_forwarded_jobs", "Jobs moved to another router instance whose worker held their prompt",
            model, registry=registry,
        )  # fmt: skip
        self.dispatcher_restarts = Counter(
            "auxot_dispatcher_restarts", "Dispatcher loops restarted after an unexpected error (a bug: see the log)",
            model, registry=registry,
        )  # fmt: skip
        self._prompt_totals: dict[str, list[int]] = {}  # model -> [prompt, cached] tokens
        self.jobs = Counter("auxot_jobs", "Finished jobs by outcome", ["model", "outcome"], registry=registry)
        self.queue_wait = Histogram(
            "auxot_queue_wait_seconds", "Time from enqueue to dispatch", model, buckets=QUEUE_BUCKETS, registry=registry
        )
        self.ttft = Histogram(
            "auxot_time_to_first_token_seconds",
            "Time from arrival to the first token",
            model,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.job_duration = Histogram(
            "auxot_job_duration_seconds", "Time from arrival to the end of the job", model,
            buckets=DURATION_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tokens_per_second = Histogram(
            "auxot_generation_tokens_per_second", "Completion tokens per second after the first token", model,
            buckets=RATE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.retries = Counter(
            "auxot_job_retries", "Jobs re-queued after their worker went away", model, registry=registry
        )
        self.cancellations = Counter(
            "auxot_job_cancellations", "Jobs cancelled because the caller left", model, registry=registry
        )
        self.timeouts = Counter("auxot_job_timeouts", "Jobs past AUXOT_JOB_TIMEOUT", model, registry=registry)
        self.auth_failures = Counter(
            "auxot_auth_failures", "Rejected keys (api: callers, worker: GPU keys)", ["kind"], registry=registry
        )
        self.worker_connects = Counter("auxot_worker_connects", "Workers accepted on this router", registry=registry)
        self.worker_disconnects = Counter("auxot_worker_disconnects", "Worker sockets closed", registry=registry)
        self.upstream_requests = Counter(
            "auxot_upstream_requests", "Requests relayed to an upstream provider, by outcome (HTTP status)",
            ["upstream", "status"], registry=registry,
        )  # fmt: skip
        self.upstream_tokens = Counter(
            "auxot_upstream_tokens", "Tokens an upstream provider reported (direction: prompt, completion)",
            ["upstream", "direction"], registry=registry,
        )  # fmt: skip
        self.jobs_running = Gauge("auxot_jobs_running", "Jobs running on this router's workers", registry=registry)
        self.workers = Gauge("auxot_workers_connected", "Workers connected to this router", registry=registry)
        self.slots_total = Gauge("auxot_slots", "Slots of this router's workers", registry=registry)
        self.slots_free = Gauge("auxot_slots_free", "Free slots of this router's workers", registry=registry)
        self.requests_in_flight = Gauge("auxot_requests_in_flight", "HTTP requests being served", registry=registry)
        info = Gauge(
            "auxot_router_info", "Version and instance id of this router", ["version", "instance"], registry=registry
        )
        info.labels(version=version, instance=instance).set(1)
        self._cluster = _ClusterCollector()
        registry.register(self._cluster)
        self._models = _ModelCollector()
        registry.register(self._models)

    def observe_job(self, stats: JobStats) -> None:
        """Record a finished job (once). Token counts come from the worker's ``complete``."""
        if stats.kind == "tokenize":  # count_tokens: no generation, not a job for the dashboards
            return
        model = stats.model
        self.jobs.labels(model, stats.outcome or "error").inc()
        if stats.prompt_tokens:
            self.prompt_tokens.labels(model).inc(stats.prompt_tokens)
        if stats.cached_tokens:
            self.cached_tokens.labels(model).inc(stats.cached_tokens)
        if stats.completion_tokens:
            self.completion_tokens.labels(model).inc(stats.completion_tokens)
        if stats.prompt_tokens and stats.outcome == "complete":
            hit = stats.cached_tokens * 2 >= stats.prompt_tokens
            self.cache_jobs.labels(model, "hit" if hit else "miss").inc()
            totals = self._prompt_totals.setdefault(model, [0, 0])
            totals[0] += stats.prompt_tokens
            totals[1] += stats.cached_tokens
            self.cache_hit_ratio.labels(model).set(totals[1] / totals[0])
        queued = stats.queue_seconds()
        if queued is not None:
            self.queue_wait.labels(model).observe(queued)
        ttft = stats.ttft_seconds()
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        if stats.finished_at is not None:
            self.job_duration.labels(model).observe(max(stats.finished_at - stats.queued_at, 0.0))
            if stats.first_token_at is not None and stats.completion_tokens > 1:
                generating = stats.finished_at - stats.first_token_at
                if generating > 0:
                    self.tokens_per_second.labels(model).observe((stats.completion_tokens - 1) / generating)
        if stats.outcome == "timeout":
            self.timeouts.labels(model).inc()
        elif stats.outcome == "cancelled":
            self.cancellations.labels(model).inc()

    def set_local(self, *, workers: int, total_slots: int, free_slots: int, running: int, in_flight: int) -> None:
        self.workers.set(workers)
        self.slots_total.set(total_slots)
        self.slots_free.set(free_slots)
        self.jobs_running.set(running)
        self.requests_in_flight.set(in_flight)

    def set_models(self, rows: dict[str, ModelGauges]) -> None:
        """Workers, slots, running jobs, backlog (and, once per cluster, queue depth) per model."""
        self._models.rows = rows

    def set_cluster(self, view: ClusterView | None) -> None:
        """The cluster gauges for the next scrape; ``None`` omits them (another instance reports)."""
        self._cluster.view = view

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def key_fingerprint(key: str) -> str:
    """A short, non-reversible tag of a presented key, to tell keys apart in logs."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def access_record(
    *,
    started_wall: float,
    total_seconds: float,
    method: str,
    path: str,
    status: int,
    api: str,
    model: str | None,
    key: str | None,
    client: str | None,
    job: JobStats | None,
) -> dict[str, Any]:
    """One access log line. ``key`` is the key's configured name or :func:`key_fingerprint`,
    never the key itself."""
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(started_wall, UTC).isoformat(timespec="milliseconds"),
        "method": method,
        "path": path,
        "status": status,
        "api": api,
        "model": model,
        "key": key,
        "worker": None,
        "prompt_tokens": None,
        "cached_tokens": None,
        "completion_tokens": None,
        "queue_ms": None,
        "ttft_ms": None,
        "total_ms": round(total_seconds * 1000, 1),
        "client": client,
    }
    if job is not None:
        record.update(
            model=job.model,
            worker=job.worker_id or None,
            prompt_tokens=job.prompt_tokens,
            cached_tokens=job.cached_tokens,
            completion_tokens=job.completion_tokens,
            queue_ms=ms(job.queue_seconds()),
            ttft_ms=ms(job.ttft_seconds()),
        )
    return record
