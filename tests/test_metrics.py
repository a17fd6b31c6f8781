"""/metrics, /ping and the access log: scraped and parsed as Prometheus and a log shipper would."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import fakeredis
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from auxot_common.auth import NamedHash
from auxot_common.metrics import JobStats, access_record, key_fingerprint
from auxot_router import RouterConfig, create_app
from tests.conftest import Cluster
from tests.support import http

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

ACCESS_FIELDS = {
    "time", "method", "path", "status", "api", "model", "key", "worker", "prompt_tokens", "cached_tokens",
    "completion_tokens", "queue_ms", "ttft_ms", "total_ms", "client",
}  # fmt: skip


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    response = http.get(f"{url}/metrics", headers=headers)
    assert response.status == 200, response.body
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.body.decode())


def access_lines(log: str) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "auxot.access"]


def test_metrics_and_access_log_follow_real_requests(cluster: Cluster) -> None:
    router = cluster.router(AUXOT_CTX_SIZE="1024", AUXOT_MAX_PARALLEL="2", AUXOT_LOG_LEVEL="warn")
    cluster.worker(router)
    model = router.health()["model"]
    before = scrape(router.url)
    assert value(before, "auxot_workers_connected") == 1
    assert value(before, "auxot_slots") == 2 == value(before, "auxot_slots_free")
    assert value(before, "auxot_queue_depth") == 0
    assert value(before, "auxot_worker_connects_total") == 1
    # the same, per model (the only model here)
    assert value(before, "auxot_model_workers", model=model) == 1
    assert value(before, "auxot_model_slots", model=model) == 2 == value(before, "auxot_model_slots_free", model=model)
    assert value(before, "auxot_model_queue_depth", model=model) == 0

    chat_url = f"{router.url}/api/openai/v1/chat/completions"
    prompt = [{"role": "user", "content": "Count from one to ten, please."}]
    usages = []
    for _ in range(2):  # the second run of the same prompt hits llama-server's prompt cache
        reply = http.post(chat_url, {"messages": prompt, "max_tokens": 8, "temperature": 0}, headers=router.headers())
        assert reply.status == 200, reply.body
        usages.append(reply.json()["usage"])
    streamed = http.post(
        chat_url,
        {"messages": prompt, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}},
        headers=router.headers(),
    )
    assert streamed.status == 200
    usage_chunk = [orjson.loads(line[6:]) for line in streamed.body.split(b"\n") if line.startswith(b"data: {")][-1]
    usages.append(usage_chunk["usage"])
    message = http.post(
        f"{router.url}/api/anthropic/v1/messages",
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]},
        headers={"x-api-key": router.keys.api_key, "anthropic-version": "2023-06-01"},
    )
    assert message.status == 200, message.body
    bad_key = "rtr_" + "x" * 43
    denied = http.post(chat_url, {"messages": prompt}, headers={"Authorization": f"Bearer {bad_key}"})
    assert denied.status == 401
    assert http.get(f"{router.url}/ping").body == b"pong"

    after = scrape(router.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    anthropic_usage = message.json()["usage"]  # input_tokens there excludes the cache hits
    anthropic_cached = anthropic_usage.get("cache_read_input_tokens", 0)
    prompt_tokens = sum(u["prompt_tokens"] for u in usages) + anthropic_usage["input_tokens"] + anthropic_cached
    cached = sum(u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for u in usages) + anthropic_cached
    completion = sum(u["completion_tokens"] for u in usages) + message.json()["usage"]["output_tokens"]
    assert cached > 0  # the repeated prompt was served from the cache
    assert moved("auxot_prompt_tokens_total", model=model) == prompt_tokens
    assert moved("auxot_cached_prompt_tokens_total", model=model) == cached
    assert moved("auxot_completion_tokens_total", model=model) == completion
    assert moved("auxot_jobs_total", model=model, outcome="complete") == 4
    assert moved("auxot_time_to_first_token_seconds_count", model=model) == 1  # only a stream has a first token
    assert moved("auxot_job_duration_seconds_count", model=model) == 4
    assert moved("auxot_queue_wait_seconds_count", model=model) == 4
    openai_route = {"api": "openai", "route": "/api/openai/v1/chat/completions"}
    assert moved("auxot_http_requests_total", **openai_route, status="200") == 3
    assert moved("auxot_http_requests_total", **openai_route, status="401") == 1
    assert moved("auxot_http_requests_total", api="anthropic", route="/api/anthropic/v1/messages", status="200") == 1
    assert moved("auxot_http_requests_total", api="router", route="/ping", status="200") == 1
    assert moved("auxot_auth_failures_total", kind="api") == 1
    assert value(after, "auxot_jobs_running") == 0

    log = router.log()
    assert router.keys.api_key not in log and bad_key not in log and router.keys.gpu_key not in log
    lines = access_lines(log)  # written although AUXOT_LOG_LEVEL=warn
    assert all(set(line) >= ACCESS_FIELDS for line in lines)
    chats = [line for line in lines if line["path"] == "/api/openai/v1/chat/completions"]
    assert [line["status"] for line in chats] == [200, 200, 200, 401]
    for line, usage in zip(chats, usages, strict=False):
        assert line["method"] == "POST" and line["api"] == "openai" and line["model"] == model
        assert line["key"] == "key1"  # the name of the configured hash, never the key
        assert line["worker"] and line["client"] == "127.0.0.1"
        assert line["prompt_tokens"] == usage["prompt_tokens"]
        assert line["cached_tokens"] == usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        assert line["completion_tokens"] == usage["completion_tokens"]
        assert 0 <= line["queue_ms"] <= line["total_ms"]
    assert [line["ttft_ms"] is None for line in chats[:3]] == [True, True, False]  # only the stream has one
    assert chats[2]["queue_ms"] <= chats[2]["ttft_ms"] <= chats[2]["total_ms"]
    assert chats[-1]["key"] == key_fingerprint(bad_key) and chats[-1]["worker"] is None
    anthropic_line = next(line for line in lines if line["path"] == "/api/anthropic/v1/messages")
    assert anthropic_line["api"] == "anthropic" and anthropic_line["completion_tokens"] == completion - sum(
        u["completion_tokens"] for u in usages
    )
    sockets = [line for line in lines if line["path"] == "/ws"]  # the worker's policy-fetching connection
    assert sockets and all(line["api"] == "worker" and line["key"] == "key1" for line in sockets)


# --- in-process: several apps, the token, the switch ---------------------------------------------


def config(keys: Any, **changes: Any) -> RouterConfig:
    data = Path(tempfile.mkdtemp(prefix="auxot-metrics-"))  # named keys and usage stay out of ~/.auxot
    cfg = RouterConfig(
        api_key_hashes=[NamedHash("alice", keys.api_hash)],
        admin_key_hashes=[NamedHash("gpu", keys.gpu_hash)],
        keys_file=str(data / "keys.json"),
        usage_file=str(data / "usage.json"),
    )
    for name, val in changes.items():
        setattr(cfg, name, val)
    return cfg


async def test_several_apps_in_one_process_keep_their_own_metrics(aiohttp_client: Any, keys: Any) -> None:
    first = await aiohttp_client(create_app(config(keys), redis=fakeredis.FakeAsyncRedis()))
    second = await aiohttp_client(create_app(config(keys), redis=fakeredis.FakeAsyncRedis()))
    for _ in range(3):
        assert (await first.get("/ping")).status == 200
    assert await (await second.get("/ping")).text() == "pong"
    one = parse(await (await first.get("/metrics")).text())
    two = parse(await (await second.get("/metrics")).text())
    assert value(one, "auxot_http_requests_total", api="router", route="/ping", status="200") == 3
    assert value(two, "auxot_http_requests_total", api="router", route="/ping", status="200") == 1


async def test_metrics_token_and_access_log_switch(
    aiohttp_client: Any, keys: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(config(keys, metrics_token="s3cret-token", access_log=False), redis=fakeredis.FakeAsyncRedis())
    client = await aiohttp_client(app)
    with caplog.at_level(logging.INFO, logger="auxot.access"):
        assert (await client.get("/metrics")).status == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status == 401
        ok = await client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status == 200
        assert value(parse(await ok.text()), "auxot_auth_failures_total", kind="metrics") == 2
        assert (await client.get("/ping")).status == 200
    assert not [r for r in caplog.records if r.name == "auxot.access"]


def test_access_record_never_holds_more_than_it_is_given() -> None:
    stats = JobStats(model="m", queued_at=10.0, dispatched_at=10.5, first_token_at=11.0, finished_at=12.0)
    stats.worker_id, stats.prompt_tokens, stats.cached_tokens, stats.completion_tokens = "w1", 30, 20, 5
    record = access_record(
        started_wall=0.0, total_seconds=2.25, method="POST", path="/v1/messages", status=200, api="anthropic",
        model=None, key="alice", client="10.0.0.1", job=stats,
    )  # fmt: skip
    assert set(record) == ACCESS_FIELDS
    assert record["queue_ms"] == 500.0 and record["ttft_ms"] == 1000.0 and record["total_ms"] == 2250.0
    assert record["model"] == "m" and record["time"] == "1970-01-01T00:00:00.000+00:00"
    assert key_fingerprint("rtr_secret").startswith("sha256:") and "secret" not in key_fingerprint("rtr_secret")


def test_grafana_dashboard_uses_metrics_the_router_exports() -> None:
    import re

    from auxot_common.metrics import ClusterView, RouterMetrics
    from tests.support.procs import REPO

    dashboard = orjson.loads((REPO / "deploy" / "grafana-dashboard.json").read_bytes())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {re.sub(r"_(bucket|total)$", "", name) for expr in exprs for name in re.findall(r"\bauxot_\w+", expr)}
    metrics = RouterMetrics(version="0", instance="i")
    metrics.set_cluster(ClusterView(queue_depth=0, workers=0, total_slots=0, free_slots=0))
    metrics.observe_job(JobStats(model="m", outcome="complete", dispatched_at=1.0, first_token_at=2.0, finished_at=3.0))
    metrics.requests.labels("openai", "/v1/chat/completions", "200").inc()
    metrics.auth_failures.labels("api").inc()
    exported = {family.name for family in text_string_to_metric_families(metrics.exposition().decode())}
    assert used and used <= exported, used - exported


async def test_with_several_routers_one_reports_the_cluster(aiohttp_client: Any, keys: Any, tmp_path: Any) -> None:
    """Two routers on one real Redis: both report their own counters, one the cluster gauges."""
    from redis.asyncio import Redis

    from tests.support.redis_server import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        clients = [
            await aiohttp_client(create_app(config(keys, redis_url=server.url), redis=Redis.from_url(server.url)))
            for _ in range(2)
        ]
        scrapes = [parse(await (await c.get("/metrics")).text()) for c in clients for _ in range(2)]
        reporters = [("auxot_queue_depth", frozenset()) in samples for samples in scrapes]
        assert reporters in ([True, True, False, False], [False, False, True, True]), reporters
        assert all(value(samples, "auxot_workers_connected") == 0 for samples in scrapes)
        for second in (scrapes[1], scrapes[3]):  # each counts its own first scrape, not the other's
            assert value(second, "auxot_http_requests_total", api="router", route="/metrics", status="200") == 1
    finally:
        server.stop()
