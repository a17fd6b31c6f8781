#!/usr/bin/env python3
"""Dispatch rate and TTFT with several models against one, on loopback:

    python bench/models_bench.py [--seconds 5] [--concurrency 64]

Starts the real router (``auxot_router.py``, embedded queue) with a registry of four models,
and light simulated workers in this process that speak the real worker protocol over the
WebSocket (hello with ``model``, config with slots, heartbeats; each job is answered at once
with one token and a ``complete``), so what is measured is the router's queueing and dispatch.
Two layouts with the same 32 workers and 64 slots: 4 models x 8 workers (callers spread evenly
over the models) and 1 model x 32 workers. Prints one line per layout: completed requests/s
(the dispatch rate) and time to first token p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from auxot_common import protocol as proto  # noqa: E402
from auxot_common.auth import API_KEY_PREFIX, GPU_KEY_PREFIX, generate_key, hash_key  # noqa: E402

MODELS = ("Bench-A", "Bench-B", "Bench-C", "Bench-D")
SLOTS_PER_WORKER = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registry(path: Path) -> Path:
    entries = [
        {
            "id": f"{name.lower()}-q4",
            "model_name": name,
            "huggingface_id": f"bench/{name}-GGUF",
            "quantization": "Q4_K_S",
            "family": "Dense",
            "parameters": "1B",
            "default_context_size": 4096,
            "max_context_size": 4096,
            "vram_requirements_gb": 1.0,
            "capabilities": ["chat"],
            "file_name": f"{name}.gguf",
        }
        for name in MODELS
    ]
    path.write_bytes(orjson.dumps({"version": "bench", "models": entries}))
    return path


async def simulated_worker(url: str, gpu_key: str, model: str, stop: asyncio.Event) -> None:
    """One worker: serves every job it gets with one token and a complete."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
        caps = proto.Capabilities(backend="sim", model=model, ctx_size=4096, total_slots=SLOTS_PER_WORKER)
        caps.policy_model = model
        await ws.send_str(proto.encode(proto.Hello(gpu_key=gpu_key, capabilities=caps, model=model)).decode())
        await ws.receive()  # hello_ack
        await ws.send_str(proto.encode(proto.Config(capabilities=caps)).decode())
        async for msg in ws:
            if stop.is_set() or msg.type != aiohttp.WSMsgType.TEXT:
                break
            message = proto.decode(msg.data)
            if isinstance(message, proto.Job):
                await ws.send_str(proto.encode(proto.Token(message.job_id, " tok")).decode())
                done = proto.Complete(job_id=message.job_id, full_response=" tok", input_tokens=5, output_tokens=1)
                await ws.send_str(proto.encode(done).decode())


async def caller(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str, until: float, ttfts: list[float]
) -> int:
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    done = 0
    while time.monotonic() < until:
        started = time.monotonic()
        async with session.post(url, data=body, headers=headers) as resp:
            first = True
            async for _chunk in resp.content.iter_any():
                if first:
                    ttfts.append(time.monotonic() - started)
                    first = False
        done += 1
    return done


async def layout(models: tuple[str, ...], workers_per_model: int, seconds: float, concurrency: int) -> str:
    api_key, gpu_key = generate_key(API_KEY_PREFIX), generate_key(GPU_KEY_PREFIX)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AUXOT_")},
            "AUXOT_API_KEY_HASH": hash_key(api_key),
            "AUXOT_ADMIN_KEY_HASH": hash_key(gpu_key),
            "AUXOT_REGISTRY_FILE": str(registry(Path(tmp) / "registry.json")),
            "AUXOT_MODELS": ",".join(models),
            "AUXOT_HOST": "127.0.0.1",
            "AUXOT_PORT": str(port),
            "AUXOT_LOG_LEVEL": "warn",
            "AUXOT_CTX_SIZE": "4096",
        }
        router = subprocess.Popen([sys.executable, str(ROOT / "auxot_router.py")], env=env, cwd=tmp)
        stop = asyncio.Event()
        try:
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
                for _ in range(200):
                    try:
                        async with session.get(f"{base}/health") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
                sims = [
                    asyncio.create_task(simulated_worker(f"ws://127.0.0.1:{port}/ws", gpu_key, m, stop))
                    for m in models
                    for _ in range(workers_per_model)
                ]
                total = len(models) * workers_per_model
                while True:
                    async with session.get(f"{base}/health") as resp:
                        if (await resp.json())["total_slots"] >= total * SLOTS_PER_WORKER:
                            break
                    await asyncio.sleep(0.05)
                headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
                url = f"{base}/v1/chat/completions"
                # one unmeasured request first: the key's Argon2 check is cached after it (64
                # callers verifying at once would measure the two-thread hashing pool instead)
                await caller(session, url, headers, models[0], time.monotonic() + 0.001, [])
                ttfts: list[float] = []
                until = time.monotonic() + seconds
                counts = await asyncio.gather(
                    *(caller(session, url, headers, models[i % len(models)], until, ttfts) for i in range(concurrency))
                )
                stop.set()
                for task in sims:
                    task.cancel()
                await asyncio.gather(*sims, return_exceptions=True)
        finally:
            router.terminate()
            router.wait(30)
    ttfts.sort()
    p50 = ttfts[len(ttfts) // 2] * 1000
    p99 = ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000
    return (
        f"{len(models)} model(s) x {workers_per_model} workers, {concurrency} callers: "
        f"{sum(counts) / seconds:.0f} requests/s, TTFT p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    print(await layout(MODELS, 8, args.seconds, args.concurrency))
    print(await layout(MODELS[:1], 32, args.seconds, args.concurrency))


if __name__ == "__main__":
    asyncio.run(main())
