#!/usr/bin/env python3
"""Request rate of one router with per-key limits on for 1,000 named keys, against limits off.

Starts a router (embedded queue) and one worker with the fake llama-server, writes 1,000 named
keys into the router's keys file, and runs closed-loop requests (``--concurrency`` at once),
each with the next key in turn, for ``--duration`` seconds: once with every limit on (through
the AUXOT_DEFAULT_* settings, set high enough never to refuse, so every request pays for the
check and the settlement) and once with no limit. Prints one JSON line per run and a summary.

The keys' Argon2id hashes use small parameters (m=8 KiB, t=1) so that making 1,000 of them
takes seconds, not minutes: verification is not what this measures (each key is verified once
and then cached; a warm-up pass does that before the clock starts).

    python bench/keys_bench.py --duration 10 --concurrency 32 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import aiohttp
import orjson
from argon2 import PasswordHasher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from auxot_common.auth import API_KEY_PREFIX, GPU_KEY_PREFIX, generate_key, hash_key
from auxot_common.keys import KeyRecord, lookup_tag
from tests.support.procs import FAKE_LLAMA, Keys, RouterProcess, WorkerProcess

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
LIMITS_ON = {
    "AUXOT_DEFAULT_RPM": "100000000",
    "AUXOT_DEFAULT_TPM": "1000000000",
    "AUXOT_DEFAULT_CONCURRENCY": "1000",
    "AUXOT_DEFAULT_DAILY_TOKENS": "1000000000000",
}


def write_keys(path: Path, count: int) -> list[str]:
    keys = [generate_key(API_KEY_PREFIX) for _ in range(count)]
    records = [KeyRecord(name=f"k{i}", role="api", phc=CHEAP.hash(k), tag=lookup_tag(k)) for i, k in enumerate(keys)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps({"keys": [asdict(r) for r in records]}))
    return keys


async def load(url: str, keys: list[str], concurrency: int, duration: float, max_tokens: int) -> dict[str, float]:
    body = {"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    counter = {"next": 0, "done": 0, "errors": 0}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(key: str) -> bool:
            headers = {"Authorization": f"Bearer {key}"}
            async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
                return r.status == 200

        for start in range(0, len(keys), concurrency):  # warm-up: every key verified once
            await asyncio.gather(*(one(k) for k in keys[start : start + concurrency]))

        deadline = time.monotonic() + duration

        async def loop() -> None:
            while time.monotonic() < deadline:
                key = keys[counter["next"] % len(keys)]
                counter["next"] += 1
                ok = await one(key)
                counter["done" if ok else "errors"] += 1

        began = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    return {"requests": counter["done"], "errors": counter["errors"], "req_per_s": round(counter["done"] / elapsed, 1)}


def run(limits: bool, args: argparse.Namespace, tmp: Path, keys: Keys) -> dict[str, object]:
    settings = {"AUXOT_LOG_LEVEL": "warn", "AUXOT_MAX_PARALLEL": str(args.concurrency), **(LIMITS_ON if limits else {})}
    log_dir = tmp / ("on" if limits else "off")
    api_keys = write_keys(log_dir / "data" / "keys.json", args.keys)  # the router's data directory
    router = RouterProcess(keys, log_dir, "router", None, **settings)
    model = tmp / "fake.gguf"
    worker = WorkerProcess(router, log_dir, model=model, llama=FAKE_LLAMA, AUXOT_LOG_LEVEL="warn")
    try:
        router.start()
        worker.start()
        router.wait_workers(1)
        result = asyncio.run(load(router.url, api_keys, args.concurrency, args.duration, args.max_tokens))
    finally:
        worker.stop()
        router.stop()
    line: dict[str, object] = {"bench": "keys", "limits": "on" if limits else "off", "keys": len(api_keys), **result}
    print(orjson.dumps(line).decode(), flush=True)
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    api_key, gpu_key = generate_key(API_KEY_PREFIX), generate_key(GPU_KEY_PREFIX)
    keys = Keys(api_key=api_key, gpu_key=gpu_key, api_hash=hash_key(api_key), gpu_hash=hash_key(gpu_key))
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "fake.gguf").write_bytes(b"GGUF fake model for the fake llama-server")
        results = []
        for limits in (False, True):
            results.append(run(limits, args, tmp, keys))
    off, on = results[0]["req_per_s"], results[1]["req_per_s"]
    print(f"keys bench: {args.keys} keys, {args.concurrency} concurrent: {on} req/s with limits on, {off} off")
    return 0


if __name__ == "__main__":
    sys.exit(main())
