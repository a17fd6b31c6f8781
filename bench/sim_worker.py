#!/usr/bin/env python3
"""Many light simulated workers in one process, speaking the real worker protocol.

For the dispatch benchmark: ``--workers`` WebSocket connections to the router, each a worker
with ``--slots`` slots (hello, config, heartbeats, batch frames when the router offers them).
A job gets ``max_tokens`` (default ``--tokens``) " tok" tokens, paced at ``--tokens-per-sec``
per job (0: at once), then its ``complete``; ``cancel`` stops it. No llama-server, no model:
what is measured is the router's dispatch and relay, not the backend's.

    AUXOT_GPU_KEY=... python bench/sim_worker.py --router-url ws://127.0.0.1:8080/ws --workers 100

Prints one line, ``ready N``, on stderr once all N workers are connected; on SIGTERM it
prints ``{"jobs": ..., "tokens": ...}`` on stdout and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from functools import partial
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: auxot_common is at the repository root
    sys.path.append(str(ROOT))

from auxot_common import eventloop  # noqa: E402
from auxot_common import protocol as proto  # noqa: E402
from auxot_common.sendbatch import FrameBatcher  # noqa: E402


class SimWorker:
    def __init__(self, args: argparse.Namespace, session: aiohttp.ClientSession, totals: dict[str, int]) -> None:
        self.args = args
        self.session = session
        self.totals = totals
        self.jobs: dict[str, asyncio.Task[None]] = {}
        self.send = self._unbatched
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def _unbatched(self, payload: bytes) -> None:
        assert self.ws is not None
        await self.ws.send_frame(payload, aiohttp.WSMsgType.TEXT)

    async def connect(self) -> None:
        args = self.args
        caps = proto.Capabilities(
            backend="sim", model=args.model, ctx_size=4096, total_slots=args.slots, model_capabilities=["chat"]
        )
        self.ws = ws = await self.session.ws_connect(args.router_url, heartbeat=10.0, max_msg_size=64 * 1024 * 1024)
        await ws.send_frame(proto.encode(proto.Hello(gpu_key=args.gpu_key, capabilities=caps)), aiohttp.WSMsgType.TEXT)
        ack = proto.decode((await ws.receive(timeout=30)).data)
        if not isinstance(ack, proto.HelloAck) or not ack.success:
            raise SystemExit(f"sim_worker: rejected: {ack}")
        if ack.batch:
            self.send = FrameBatcher(partial(ws.send_frame, opcode=aiohttp.WSMsgType.TEXT)).send
        await self.send(proto.encode(proto.Config(capabilities=caps)))

    async def serve(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            message = proto.decode(msg.data)
            if isinstance(message, proto.Job):
                task = asyncio.create_task(self.run(message))
                self.jobs[message.job_id] = task
                task.add_done_callback(partial(self._done, message.job_id))
            elif isinstance(message, proto.Cancel) and message.job_id in self.jobs:
                self.jobs[message.job_id].cancel()

    def _done(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self.jobs.pop(job_id, None)

    async def run(self, job: proto.Job) -> None:
        n = job.max_tokens if job.max_tokens is not None else self.args.tokens
        loop_time = asyncio.get_running_loop().time
        rate = self.args.tokens_per_sec
        try:
            if job.stream:
                start = loop_time()
                for i in range(n):
                    if rate > 0 and i:  # on a fixed schedule, so a late wake-up does not slow the rate;
                        # the first token at once, as the fake llama-server of the direct row sends it
                        await asyncio.sleep(max(start + i / rate - loop_time(), 0.0))
                    await self.send(proto.encode(proto.Token(job_id=job.job_id, token=" tok")))
            elif rate > 0:
                await asyncio.sleep(n / rate)
            done = proto.Complete(
                job_id=job.job_id, full_response=" tok" * n, finish_reason="length", input_tokens=8, output_tokens=n
            )
            await self.send(proto.encode(done))
            self.totals["jobs"] += 1
            self.totals["tokens"] += n
        except (ConnectionError, RuntimeError):
            pass


async def main_async(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    totals = {"jobs": 0, "tokens": 0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        workers = [SimWorker(args, session, totals) for _ in range(args.workers)]
        await workers[0].connect()  # the router verifies the key once, then serves it from its cache
        for i in range(1, len(workers), 10):  # then in groups: the router's hello timeout is short
            await asyncio.gather(*(w.connect() for w in workers[i : i + 10]))
        print(f"ready {len(workers)}", file=sys.stderr, flush=True)
        serving = [asyncio.create_task(w.serve()) for w in workers]
        await stop.wait()
        for task in serving:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*serving, return_exceptions=True)
    sys.stdout.write(orjson.dumps(totals).decode() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router-url", required=True)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per job without max_tokens")
    parser.add_argument("--tokens-per-sec", type=float, default=0.0, help="per job; 0 = at once")
    parser.add_argument("--model", default="sim")
    args = parser.parse_args()
    args.gpu_key = os.environ.get("AUXOT_GPU_KEY", "")
    if not args.gpu_key:
        parser.error("set AUXOT_GPU_KEY")
    eventloop.run(main_async(args))


if __name__ == "__main__":
    main()
