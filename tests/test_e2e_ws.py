"""The worker hub as a worker sees it: handshake rules, rejection, and the policy-only connection."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import aiohttp
import orjson

from auxot_common import protocol as proto
from tests.conftest import Cluster
from tests.support import http

PROMPT = [{"role": "user", "content": "hi"}]


async def _first_message(url: str, frames: list[str | bytes], wait: float = 10.0) -> aiohttp.WSMessage:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for frame in frames:
            await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
        return await ws.receive(timeout=wait)


def test_hello_must_come_first_and_in_time(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(AUXOT_HELLO_TIMEOUT="0.5s")
    started = time.monotonic()
    silent = asyncio.run(_first_message(router.ws_url, []))
    assert silent.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert time.monotonic() - started < 5
    for frames in (["garbage"], [b"\x00\x01binary"], ['{"type":"token","job_id":"x","token":"hi"}']):
        closed = asyncio.run(_first_message(router.ws_url, frames))
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), frames
    assert router.health()["workers"] == 0
    assert http.get(f"{router.url}/health").status == 200  # still serving


def test_bad_gpu_key_gets_an_explicit_rejection(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    for key in ("adm_wrong", "", router.keys.api_key):
        hello = proto.encode(proto.Hello(gpu_key=key)).decode()
        reply = asyncio.run(_first_message(router.ws_url, [hello]))
        ack = proto.decode(reply.data)
        assert isinstance(ack, proto.HelloAck) and ack.success is False and "invalid GPU key" in ack.error


def test_policy_only_connection_never_gets_jobs(fake_cluster: Cluster) -> None:
    """The worker's first connection only fetches the policy, even while jobs wait (the Go router
    could hand it a job and strand it)."""
    router = fake_cluster.router()

    async def probe() -> tuple[proto.HelloAck, list[str]]:
        caps = proto.Capabilities(backend="llama.cpp", model="m", ctx_size=1024, total_slots=4)
        hello = proto.encode(proto.Hello(gpu_key=router.keys.gpu_key, capabilities=caps, policy_only=True)).decode()
        async with aiohttp.ClientSession() as session, session.ws_connect(router.ws_url) as ws:
            await ws.send_str(hello)
            ack = proto.decode((await ws.receive(timeout=10)).data)
            assert isinstance(ack, proto.HelloAck)
            others: list[str] = []
            try:
                while True:
                    msg = await ws.receive(timeout=1.0)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    others.append(orjson.loads(msg.data)["type"])
            except TimeoutError:
                pass
            return ack, others

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            http.post,
            f"{router.url}/v1/chat/completions",
            {"messages": PROMPT, "max_tokens": 2},
            headers=router.headers(),
        )
        deadline = time.monotonic() + 10
        while router.health()["queue_depth"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ack, others = asyncio.run(probe())
        assert ack.success and ack.policy is not None and ack.policy.model_name == router.health()["model"]
        assert ack.policy.huggingface_id and ack.policy.files  # the full resolution travels
        assert "job" not in others
        assert router.health()["queue_depth"] == 1 and router.health()["workers"] == 0
        fake_cluster.worker(router)
        assert waiting.result(timeout=30).status == 200
