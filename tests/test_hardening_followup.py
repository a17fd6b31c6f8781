"""Regression tests for issue 8 items the first hardening pass left untested or open: a caller
that stops reading, /health's worker list behind a key, and no duplicated text when a worker
dies with a batch of tokens in flight behind two routers relaying through a real Redis."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import Cluster
from tests.support import http
from tests.support.procs import REPO

USER = [{"role": "user", "content": "hi"}]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --- 9. /health: counts for everyone, the worker list for key holders ---------------------------


def test_health_lists_workers_only_to_a_key_holder(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router)
    anonymous = router.health(key="")
    assert anonymous["workers"] == 1 and anonymous["available"] >= 1  # counts stay public
    assert "worker_list" not in anonymous
    assert "worker_list" not in router.health(key="rtr_not-a-key")
    for key in (router.keys.api_key, router.keys.gpu_key):  # API key or GPU (admin) key
        [worker] = router.health(key=key)["worker_list"]
        assert worker["instance"] == anonymous["instance"]
    via_header = http.get(f"{router.url}/health", headers={"x-api-key": router.keys.api_key}).json()
    assert len(via_header["worker_list"]) == 1


# --- 10. a caller that stops reading -----------------------------------------------------------


def test_a_caller_that_stops_reading_is_cut_off_and_its_job_cancelled(fake_cluster: Cluster) -> None:
    """A raw client with a tiny receive buffer asks for a huge stream and never reads: the
    router's write deadline closes its connection, the worker aborts the generation on
    llama-server, and the request slot (AUXOT_MAX_REQUESTS=1) serves the next caller."""
    router = fake_cluster.router(AUXOT_WRITE_TIMEOUT="1", AUXOT_MAX_REQUESTS="1")
    # 40 MB of text at 2 MB/s: far more than the kernel's socket buffers on both sides hold,
    # and still generating long after the write deadline
    worker = fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="2000")
    tokens = 40_000
    prompt = [{"role": "user", "content": "FAKE:long_tokens:1024"}]
    body = orjson.dumps({"messages": prompt, "max_tokens": tokens, "stream": True})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {router.keys.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        reader.connect(("127.0.0.1", router.port))
        reader.sendall(head + body)
        wait_for(lambda: worker.fake_stats()["requests_started"] == 1, 30, "the job to start")
        # never read: the router's buffers fill, its write misses the deadline
        wait_for(lambda: "the caller stopped reading" in router.log(), 60, "the write deadline")
        wait_for(lambda: worker.fake_stats()["requests_aborted"] == 1, 30, "llama-server to see the abort")
        stats = worker.fake_stats()
        assert stats["active"] == 0 and stats["requests_completed"] == 0
        # the connection was closed: what was buffered drains, then EOF or a reset
        reader.settimeout(30)
        received = 0
        try:
            while chunk := reader.recv(65536):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < tokens * 1024  # cut off long before the end
        assert '"status":499' in router.log() and "Error handling request" not in router.log()
    finally:
        reader.close()
    # the request slot is free again: AUXOT_MAX_REQUESTS=1 would refuse this with a 503
    reply = http.post(
        f"{router.url}/v1/chat/completions", {"messages": USER, "max_tokens": 3}, headers=router.headers()
    )
    assert reply.status == 200, reply.body[:300]
    assert reply.json()["choices"][0]["message"]["content"]


# --- 4. no duplicated text: a worker killed with tokens in flight, two routers relaying ----------


def _soak_module() -> Any:
    path = REPO / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("auxot_soak_for_tests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_no_duplicated_text_when_a_worker_dies_mid_stream_behind_two_routers(tmp_path: Path) -> None:
    """The soak, small: every caller asks router B, every worker serves router A, so every token
    crosses the relay (real redis-server); workers are SIGKILLed at the instant their
    llama-server streams tokens. Each answer is exactly the asked text, or an explicit error
    after a clean prefix: never repeated text, never a hang."""
    soak_module = _soak_module()
    opts = soak_module.Options(
        requests=300, concurrency=8, max_seconds=90, deadline=60, tokens_per_sec=200, kill_every=1.0,
        router_restart_at=10.0, inflight_kills=1.0, relay=True,
    )  # fmt: skip
    soak = soak_module.Soak(opts, tmp_path)
    try:
        soak.start()
        tally, _ = asyncio.run(soak_module.run_load(soak))
        retried = soak.retried()
    finally:
        soak.stop()
    assert soak.inflight_kills >= 3, "no worker was killed while streaming"
    assert tally.duplicated == 0, tally.samples
    assert tally.lost == 0 and soak.hangs == 0, tally.samples
    assert retried + tally.explicit_error > 0  # the kills hit jobs: re-run, or ended explicitly
    assert tally.completed > tally.sent // 2
