"""Tokens written where they arrive (issue 12): while a streaming handler is parked with nothing
queued, the router writes a token from the socket reader that received it instead of waking the
handler. What a caller must still get: every token once, in order, with the start and the end of
its stream around them, in all three APIs, whichever path each token took."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from auxot_common import protocol as proto
from auxot_router import EventChannel
from tests.conftest import Cluster
from tests.support.procs import RouterProcess
from tests.support.scripted_worker import scripted_worker

# --- the channel: who handles an item -----------------------------------------------------------


async def test_a_parked_consumer_is_bypassed_and_anything_else_is_queued_in_order() -> None:
    channel = EventChannel()
    handled: list[str] = []

    def direct(message: proto.Message) -> bool:
        if isinstance(message, proto.Token) and message.token != "no":
            handled.append(message.token)
            return True
        return False

    channel.direct = direct
    channel.put(proto.Token("j", "queued"))  # nobody waits yet: queued
    assert await channel.take() == [proto.Token("j", "queued")]

    taking = asyncio.ensure_future(channel.take())
    await asyncio.sleep(0)  # parked now
    channel.put(proto.Token("j", "a"))
    channel.put(proto.Token("j", "b"))
    await asyncio.sleep(0)
    assert handled == ["a", "b"] and not taking.done()  # written in place, the consumer still parked
    channel.put(proto.Token("j", "no"))  # refused: queued, and the consumer is woken
    channel.put(proto.Token("j", "c"))  # the consumer is awake: queued behind it, not written ahead
    channel.put(proto.Complete("j"))
    assert await taking == [proto.Token("j", "no"), proto.Token("j", "c"), proto.Complete("j")]
    assert handled == ["a", "b"]


# --- a real router, a scripted worker, the official SDKs --------------------------------------------

BIG = "long " * 1000  # over the size written in place: the handler writes it
PIECES = (
    [f" t{i}" for i in range(25)]  # one frame each, with pauses: the handler is parked for each
    + ["é\"\\\n😀"]  # escapes and a character outside the BMP
    + [f" b{i}" for i in range(20)]  # one batch frame
    + [BIG, " after", " big"]  # one batch frame: the big one wakes the handler, the rest queue
    + [f" e{i}" for i in range(10)]
)
EXPECTED = "".join(PIECES)


async def _answer(ws: aiohttp.ClientWebSocketResponse, job: proto.Job) -> None:
    def token(text: str) -> bytes:
        return proto.encode(proto.Token(job.job_id, text))

    for piece in PIECES[:26]:
        await ws.send_str(token(piece).decode())
        await asyncio.sleep(0.003)
    await ws.send_str(proto.encode_batch([token(p) for p in PIECES[26:46]]).decode())
    await asyncio.sleep(0.01)
    await ws.send_str(proto.encode_batch([token(p) for p in PIECES[46:49]]).decode())
    for piece in PIECES[49:]:
        await ws.send_str(token(piece).decode())
    complete = proto.Complete(job.job_id, full_response=EXPECTED, input_tokens=5, output_tokens=len(PIECES))
    await ws.send_str(proto.encode(complete).decode())


def _with_scripted_worker(router: RouterProcess, run: Any) -> list[proto.Job]:
    jobs: list[proto.Job] = []
    stop = threading.Event()
    async def answer(ws: aiohttp.ClientWebSocketResponse, job: proto.Job) -> None:
        jobs.append(job)
        await _answer(ws, job)

    worker = scripted_worker(router, answer, slots=4, ctx_size=100_000, stop=stop.is_set)
    thread = threading.Thread(target=lambda: asyncio.run(worker), daemon=True)
    thread.start()
    try:
        router.wait_workers(1)
        run()
    finally:
        stop.set()
        thread.join(10)
    return jobs


@pytest.mark.parametrize("direct", ["on", "off"])
def test_every_token_arrives_once_in_order_in_all_three_apis(fake_cluster: Cluster, direct: str) -> None:
    router = fake_cluster.router(AUXOT_DIRECT_TOKENS=direct)
    results: dict[str, Any] = {}

    def run() -> None:
        oa = openai.OpenAI(base_url=f"{router.url}/v1", api_key=router.keys.api_key, max_retries=0, timeout=60)
        stream = oa.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=100
        )
        chunks = list(stream)
        results["openai"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        results["openai_finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]

        ant = anthropic.Anthropic(
            base_url=f"{router.url}/api/anthropic", api_key=router.keys.api_key, max_retries=0, timeout=60
        )
        with ant.messages.stream(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as anthropic_stream:
            results["anthropic"] = "".join(anthropic_stream.text_stream)
            final = anthropic_stream.get_final_message()
        results["anthropic_final"] = "".join(b.text for b in final.content if b.type == "text")

        deltas: list[str] = []
        completed = None
        for event in oa.responses.create(model="m", input="hi", stream=True):
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.completed":
                completed = event.response
        results["responses"] = "".join(deltas)
        results["responses_final"] = completed.output_text if completed is not None else None

    jobs = _with_scripted_worker(router, run)
    assert len(jobs) == 3
    assert results["openai"] == EXPECTED and results["openai_finish"] == "stop"
    assert results["anthropic"] == EXPECTED and results["anthropic_final"] == EXPECTED
    assert results["responses"] == EXPECTED and results["responses_final"] == EXPECTED
