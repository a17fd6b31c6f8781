"""A raw WebSocket "worker" speaking the real protocol, for tests where the fault or the
pattern under test is the worker's own: it says hello, heartbeats while idle, and hands each job
to the test's ``on_job``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp

from auxot_common import protocol as proto
from tests.support.procs import RouterProcess

OnJob = Callable[[aiohttp.ClientWebSocketResponse, proto.Job], Coroutine[Any, Any, None]]


async def scripted_worker(
    router: RouterProcess,
    on_job: OnJob,
    *,
    slots: int = 1,
    ctx_size: int = 1024,
    report_running: bool = True,
    close_on_job: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Runs until the router closes the socket, ``stop()`` is true, or (``close_on_job``) the
    first job arrived. Each job runs ``on_job`` in a task of its own; heartbeats list those still
    running, or none with ``report_running=False`` (a worker that drops its jobs silently)."""
    caps = proto.Capabilities(backend="llama.cpp", model="m", ctx_size=ctx_size, total_slots=slots)
    headers = {"Authorization": f"Bearer {router.keys.gpu_key}"}
    running: dict[str, asyncio.Task[None]] = {}
    async with aiohttp.ClientSession() as session, session.ws_connect(router.ws_url, headers=headers) as ws:
        await ws.send_str(proto.encode(proto.Hello(gpu_key=router.keys.gpu_key, capabilities=caps)).decode())
        ack = proto.decode((await ws.receive(timeout=10)).data)
        assert isinstance(ack, proto.HelloAck) and ack.success
        while not stop():
            try:
                msg = await ws.receive(timeout=0.2)
            except TimeoutError:
                jobs = [job_id for job_id, task in running.items() if not task.done()] if report_running else []
                await ws.send_str(proto.encode(proto.Heartbeat(jobs=jobs)).decode())
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                return
            message = proto.decode(msg.data)
            if isinstance(message, proto.Job):
                running[message.job_id] = asyncio.create_task(on_job(ws, message))
                if close_on_job:
                    await ws.close()
                    return
