"""Regression tests for issue 8 items the first hardening pass left untested or open: a caller
that stops reading, /health's worker list behind a key, and no duplicated text when a worker
dies with a batch of tokens in flight behind two routers relaying through a real Redis."""

from __future__ import annotations

import socket
import time
from typing import Any

import orjson

from tests.conftest import Cluster
from tests.support import http

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
    worker = fake_cluster.worker(router)
    # 30 MB of text, far more than the kernel's socket buffers on both sides hold
    tokens = 30_000
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
    finally:
        reader.close()
    # the request slot is free again: AUXOT_MAX_REQUESTS=1 would refuse this with a 503
    reply = http.post(
        f"{router.url}/v1/chat/completions", {"messages": USER, "max_tokens": 3}, headers=router.headers()
    )
    assert reply.status == 200, reply.body[:300]
    assert reply.json()["choices"][0]["message"]["content"]
