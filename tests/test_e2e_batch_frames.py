"""Batch frames through real processes: a worker whose llama-server hands out the tokens of many
jobs at the same instant (GPU-style decode steps) sends them to the router in shared frames,
and every caller still gets exactly its own text."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson

from tests.conftest import Cluster
from tests.support.reliability import TOKEN, Caller, chat_body


async def test_tokens_of_jobs_decoded_together_share_frames_and_reach_each_caller(
    fake_cluster: Cluster, session: aiohttp.ClientSession
) -> None:
    router = fake_cluster.router(AUXOT_MAX_PARALLEL="8")
    worker = fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="20", FAKE_LLAMA_GPU_STEPS="1")
    caller = Caller(router, session)
    replies = await asyncio.gather(*(caller.call(chat_body(stream=True, max_tokens=12)) for _ in range(8)))
    for reply in replies:
        assert reply.done and not reply.errors
        assert reply.text == TOKEN * 12
    anthropic = await Caller(router, session, api="anthropic").call(chat_body(stream=True, max_tokens=5))
    assert anthropic.text == TOKEN * 5

    worker.stop()
    lines = [orjson.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    sent = [line for line in lines if line.get("msg", line.get("message")) == "disconnected from the router"]
    assert sent, worker.log()[-2000:]
    frames, messages = sent[-1]["frames"], sent[-1]["messages"]
    # 8 jobs × (12 tokens + complete) + config + heartbeats: some frames carried several of them
    assert messages >= 8 * 13
    assert frames < messages, (frames, messages)
    assert not re.search(r"bad message from worker|unexpected message", router.log())
