#!/usr/bin/env python3
"""Soak test: thousands of requests through 2 routers and 3 workers on a real redis-server
while workers are SIGKILLed at random (and restarted) and one router is SIGKILLed and restarted.

    python bench/soak.py [--requests 2000] [--concurrency 24] [--max-seconds 280]
                         [--inflight-kills 0.5] [--relay]

Everything runs on loopback: ``redis-server`` (must be on PATH), two ``auxot_router.py`` sharing
it, three ``auxot_worker.py`` each with the fake llama-server (bench/fake_llama_server.py) at a
modest token rate. Callers pick a router at random (a refused connection, while a router is
down, is retried on the other one, as a load balancer would); half stream, half do not; some
ask for a slow first token so that a worker death often hits a job before its first token.
A share of the kills (``--inflight-kills``, default half) waits for the instant a worker's
llama-server is streaming tokens (its generated count rising between two polls 20 ms apart) and
SIGKILLs the worker then, so that tokens and the worker's loss reach a router in one batch.
``--relay``: every worker connects to router A and every caller asks router B first, so every
token crosses Redis (the relay), where many messages arrive in one read.

Every request ends in exactly one of:
  completed          HTTP 200 with exactly " tok" x max_tokens (and [DONE] when streamed)
  explicit_error     an HTTP error status, or a stream ending with an error event and [DONE]
  cut_by_router_kill the connection to the router that was SIGKILLed closed mid-request
  lost               no answer by the per-request deadline (hung)
and separately
  duplicated         text that is not a clean run of " tok" (repeated or more than asked):
                     a streamed answer must never repeat what it already sent.
``retried`` counts the jobs re-queued after a worker loss (router logs: "re-queueing job"); a
watchdog counts router hangs (a router that accepts connections but leaves /health unanswered
for 5 s). Lost, duplicated and hangs must be 0: the script exits non-zero otherwise.

Prints a summary table and writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script, only bench/ is on the path
    sys.path.insert(0, str(ROOT))

from auxot_common.auth import API_KEY_PREFIX, GPU_KEY_PREFIX, generate_key, hash_key  # noqa: E402
from tests.support.procs import FAKE_LLAMA, Keys, RouterProcess, WorkerProcess, fake_stats  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.reliability import kill_if_same, process_identity  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "soak.json"
TOKEN = " tok"


@dataclass
class Options:
    requests: int = 2000
    concurrency: int = 24
    max_seconds: float = 280.0
    deadline: float = 60.0  # per request: past it the request counts as lost
    tokens_per_sec: float = 100.0
    kill_every: float = 4.0  # seconds between worker kills (on average)
    router_restart_at: float = 0.4  # fraction of requests sent when router B is SIGKILLed
    seed: int = 1
    router_script: str = ""  # another auxot_router.py to run (e.g. a patched copy); default the repo's
    inflight_kills: float = 0.5  # share of worker kills timed while its tokens are streaming
    relay: bool = False  # workers on router A only, callers on router B first: every job is relayed


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    explicit_error: int = 0
    cut_by_router_kill: int = 0
    lost: int = 0
    duplicated: int = 0
    refused_then_rerouted: int = 0
    streamed: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def note(self, kind: str, detail: str) -> None:
        self.error_kinds[kind] += 1
        if len(self.samples) < 12:
            self.samples.append(f"{kind}: {detail[:300]}")


def clean(text: str, max_tokens: int) -> bool:
    n = text.count(TOKEN)
    return text == TOKEN * n and n <= max_tokens


# --- the cluster --------------------------------------------------------------------------------


class Soak:
    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        api, gpu = generate_key(API_KEY_PREFIX), generate_key(GPU_KEY_PREFIX)
        self.keys = Keys(api_key=api, gpu_key=gpu, api_hash=hash_key(api), gpu_hash=hash_key(gpu))
        self.model = workdir / "fake.gguf"
        self.model.write_bytes(b"GGUF fake model for the fake llama-server")
        self.redis = RedisServer(workdir / "redis")
        self.routers: list[RouterProcess] = []
        self.router_logs: list[RouterProcess] = []  # every router instance ever started
        self.workers: list[WorkerProcess | None] = [None, None, None]
        self.worker_home = [0, 0, 0] if opts.relay else [0, 0, 1]  # router index each worker connects to
        self.orphans: list[int] = []
        self.kills = 0
        self.inflight_kills = 0  # kills made while the worker's llama-server was streaming tokens
        self.router_restarts = 0
        self.hangs = 0  # /health probes a router left unanswered for 5 s
        self.rng = random.Random(opts.seed)
        self._generation = 0

    def new_router(self, name: str, port: int | None) -> RouterProcess:
        router = RouterProcess(self.keys, self.workdir, name=name, port=port, **self.router_settings())
        if self.opts.router_script:
            router.args[1] = self.opts.router_script
        return router

    def router_settings(self) -> dict[str, str]:
        return {
            "AUXOT_REDIS_URL": self.redis.url,
            "AUXOT_LOG_LEVEL": "info",
            "AUXOT_MAX_PARALLEL": "4",
            "AUXOT_MAX_ATTEMPTS": "3",
            "AUXOT_JOB_TIMEOUT": "45s",
            "AUXOT_HEARTBEAT_INTERVAL": "1s",
            "AUXOT_DEAD_WORKER_TIMEOUT": "3s",
            "AUXOT_SWEEP_INTERVAL": "0.5s",
            "AUXOT_SSE_KEEPALIVE": "2s",
            "AUXOT_MAX_QUEUE": "10000",
            "AUXOT_SHUTDOWN_GRACE": "5s",
        }

    def start(self) -> None:
        self.redis.start()
        for name in ("router-a", "router-b"):
            router = self.new_router(name, None)
            router.start()
            self.routers.append(router)
            self.router_logs.append(router)
        for index in range(3):
            self.start_worker(index, wait=False)
        deadline = time.monotonic() + 60
        while sum(r.health().get("workers", 0) for r in self.routers[:1]) < 3:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not connect")
            time.sleep(0.1)

    def start_worker(self, index: int, *, wait: bool) -> None:
        self._generation += 1
        worker = WorkerProcess(
            self.routers[self.worker_home[index]],
            self.workdir,
            model=self.model,
            llama=FAKE_LLAMA,
            name=f"worker{index}-{self._generation}",
            AUXOT_LOG_LEVEL="info",
            AUXOT_RECONNECT_DELAY="0.2s",
            AUXOT_RECONNECT_MAX_DELAY="1s",
            FAKE_LLAMA_TOKENS_PER_SEC=str(self.opts.tokens_per_sec),
        )
        worker.start()
        self.workers[index] = worker
        deadline = time.monotonic() + 30
        while wait and "worker ready" not in worker.log() and time.monotonic() < deadline:
            if not worker.alive():
                raise RuntimeError(f"worker {index} exited:\n{worker.log()[-2000:]}")
            time.sleep(0.1)

    def kill_worker(self, index: int) -> None:
        worker = self.workers[index]
        if worker is None:
            return
        if not worker.alive():
            return
        children = [process_identity(pid) for pid in worker.llama_children()]
        worker.signal(signal.SIGKILL)
        with contextlib.suppress(Exception):
            worker.wait(10)
        for identity in children:  # should the fake outlive its worker (it gets PDEATHSIG)
            kill_if_same(identity)
        self.kills += 1

    def restart_router(self, index: int) -> None:
        old = self.routers[index]
        old.signal(signal.SIGKILL)
        old.wait(10)
        time.sleep(0.5)
        new = self.new_router(f"router-{'ab'[index]}-again", old.port)
        new.start()
        self.routers[index] = new
        self.router_logs.append(new)
        self.router_restarts += 1

    def stop(self) -> None:
        for worker in self.workers:
            if worker is not None:
                children = [process_identity(pid) for pid in worker.llama_children()] if worker.alive() else []
                worker.stop(timeout=10)
                for identity in children:
                    kill_if_same(identity)
        for router in self.routers:
            router.stop(timeout=10)
        self.redis.stop()

    def retried(self) -> int:
        return sum(r.log().count("re-queueing job") for r in self.router_logs)

    @staticmethod
    def _depth(router: RouterProcess) -> int | str:
        try:
            return int(router.health().get("queue_depth", -1))
        except OSError as exc:
            return f"unreachable: {exc}"

    def stuck(self) -> dict[str, Any]:
        pending = self.redis.command("XPENDING", "auxot:jobs", "workers")
        length = self.redis.command("XLEN", "auxot:jobs")
        return {
            "xpending": int(pending[0]) if isinstance(pending, list) else -1,  # type: ignore[call-overload]
            "xlen": length,
            "queue_depth": [self._depth(r) for r in self.routers],
        }


# --- the callers ----------------------------------------------------------------------------------


async def one_request(soak: Soak, session: aiohttp.ClientSession, tally: Tally, rng: random.Random) -> None:
    stream = rng.random() < 0.5
    max_tokens = rng.randint(4, 40)
    content = "FAKE:slow_first_token:0.5" if rng.random() < 0.2 else "Say tok."
    body = orjson.dumps({
        "model": "m", "stream": stream, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
    })  # fmt: skip
    headers = {"Authorization": f"Bearer {soak.keys.api_key}", "Content-Type": "application/json"}
    tally.sent += 1
    tally.streamed += stream
    order = [1, 0] if soak.opts.relay or rng.random() < 0.5 else [0, 1]
    started = time.monotonic()
    for attempt, index in enumerate(order * 10):
        router = soak.routers[index]
        left = soak.opts.deadline - (time.monotonic() - started)
        if left <= 0:
            break
        try:
            async with asyncio.timeout(left):
                outcome = await call(session, router.url, body, headers, stream, max_tokens)
        except TimeoutError:
            tally.lost += 1
            tally.note("lost", f"no answer in {soak.opts.deadline}s (stream={stream})")
            return
        except aiohttp.ClientConnectorError:
            if attempt == 0:
                tally.refused_then_rerouted += 1
            await asyncio.sleep(0.1)
            continue  # the router is down (being restarted): a load balancer would try another
        except (aiohttp.ClientError, ConnectionError) as exc:
            tally.cut_by_router_kill += 1
            tally.note("cut", f"{type(exc).__name__}: {exc}")
            return
        kind, text, detail = outcome
        if not clean(text, max_tokens) or (kind == "completed" and text != TOKEN * max_tokens):
            tally.duplicated += 1
            tally.note("duplicated", f"max_tokens={max_tokens} text={text[:200]!r} ({detail})")
            return
        if kind == "completed":
            tally.completed += 1
        else:
            tally.explicit_error += 1
            tally.note(kind, detail)
        return
    tally.lost += 1
    tally.note("lost", "no router reachable before the deadline")


async def call(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], stream: bool, max_tokens: int
) -> tuple[str, str, str]:
    """(outcome kind, content text, detail) of one request."""
    async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as resp:
        if resp.status != 200:
            raw = await resp.read()
            return f"http_{resp.status}", "", raw[:200].decode(errors="replace")
        if not stream:
            message = orjson.loads(await resp.read())
            return "completed", message["choices"][0]["message"]["content"] or "", ""
        text: list[str] = []
        buffer, done, error = b"", False, ""
        async for chunk in resp.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                for line in block.split(b"\n"):
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:]
                    if payload == b"[DONE]":
                        done = True
                        continue
                    event = orjson.loads(payload)
                    if "error" in event:
                        error = str(event["error"].get("message"))
                    elif event.get("choices"):
                        text.append((event["choices"][0].get("delta") or {}).get("content") or "")
        if not done:
            raise aiohttp.ClientPayloadError("the stream ended without [DONE]")
        if error:
            return "stream_error", "".join(text), error
        return "completed", "".join(text), ""


def generated(worker: WorkerProcess) -> tuple[int, int]:
    """(tokens generated so far, requests generating now) of a worker's fake llama-server."""
    stats = fake_stats(worker.llama_port())
    return stats["tokens_generated"], stats["active"]


async def streaming_worker(soak: Soak, serving: list[int], stop: asyncio.Event, wait: float = 5.0) -> int | None:
    """A serving worker whose llama-server is sending tokens right now: its generated count rose
    between two polls 20 ms apart (None if none did within ``wait`` seconds)."""
    last: dict[int, int] = {}
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not stop.is_set():
        for index in serving:
            worker = soak.workers[index]
            if worker is None or not worker.alive():
                continue
            try:
                tokens, active = await asyncio.to_thread(generated, worker)
            except (OSError, RuntimeError, KeyError, ValueError):
                continue  # its llama-server is starting or gone
            if active and index in last and tokens > last[index]:
                return index
            last[index] = tokens
        await asyncio.sleep(0.02)
    return None


async def faults(soak: Soak, tally: Tally, stop: asyncio.Event) -> None:
    """Every few seconds SIGKILL a serving worker (it is restarted a moment later, in the
    background), a share of them at the instant it streams tokens; SIGKILL and restart router
    B once."""
    rng = random.Random(soak.opts.seed + 1)
    restarted = False
    restarts: set[asyncio.Task[None]] = set()

    async def restart(index: int) -> None:
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        await asyncio.to_thread(soak.start_worker, index, wait=True)

    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(0.5, 1.5) * soak.opts.kill_every)
        if stop.is_set():
            break
        if not restarted and tally.sent >= soak.opts.router_restart_at * soak.opts.requests:
            restarted = True
            await asyncio.to_thread(soak.restart_router, 1)
            continue
        serving = [i for i, w in enumerate(soak.workers) if w is not None and w.alive() and "worker ready" in w.log()]
        if not serving:
            continue
        index: int | None = None
        if rng.random() < soak.opts.inflight_kills:
            index = await streaming_worker(soak, serving, stop)
            if index is not None:
                soak.inflight_kills += 1
        if index is None:
            index = rng.choice(serving)
        await asyncio.to_thread(soak.kill_worker, index)
        task = asyncio.create_task(restart(index))
        restarts.add(task)
        task.add_done_callback(restarts.discard)
    await asyncio.gather(*restarts, return_exceptions=True)


async def watchdog(soak: Soak, stop: asyncio.Event) -> None:
    """A router that accepts connections but does not answer /health within 5 s is hung (a
    refused connection is a router being restarted, not a hang)."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            for router in list(soak.routers):
                try:
                    async with session.get(f"{router.url}/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        await resp.read()
                except TimeoutError:
                    soak.hangs += 1
                    print(f"router {router.log_path.name} did not answer /health in 5 s", file=sys.stderr)
                except aiohttp.ClientError:
                    pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)


async def run_load(soak: Soak) -> tuple[Tally, float]:
    opts = soak.opts
    tally = Tally()
    rng = random.Random(opts.seed)
    stop = asyncio.Event()
    fault_task = asyncio.create_task(faults(soak, tally, stop))
    watch_task = asyncio.create_task(watchdog(soak, stop))
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            while tally.sent < opts.requests and time.monotonic() - started < opts.max_seconds:
                await one_request(soak, session, tally, rng)

        await asyncio.gather(*(client() for _ in range(opts.concurrency)))
    elapsed = time.monotonic() - started
    stop.set()
    await fault_task
    await watch_task
    return tally, elapsed


def summary_table(result: dict[str, Any]) -> str:
    t = result["tally"]
    rows = [
        ("requests sent", t["sent"]),
        ("  of which streamed", t["streamed"]),
        ("completed (exact text)", t["completed"]),
        ("retried after a worker loss (router logs)", result["retried"]),
        ("ended with an explicit error", t["explicit_error"]),
        ("cut by the router SIGKILL", t["cut_by_router_kill"]),
        ("refused while a router was down (re-routed)", t["refused_then_rerouted"]),
        ("LOST (no answer / hung)", t["lost"]),
        ("DUPLICATED text", t["duplicated"]),
        ("worker SIGKILLs / router restarts", f"{result['worker_kills']} / {result['router_restarts']}"),
        ("  of the SIGKILLs, while tokens were streaming", result["inflight_kills"]),
        ("left in Redis (XPENDING / XLEN)", f"{result['stuck']['xpending']} / {result['stuck']['xlen']}"),
        ("router hangs (/health unanswered for 5 s)", result["router_hangs"]),
        ("elapsed", f"{result['elapsed_s']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["| metric | value |", "|---|---|"] + [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=Options.requests)
    parser.add_argument("--concurrency", type=int, default=Options.concurrency)
    parser.add_argument("--max-seconds", type=float, default=Options.max_seconds, help="stop sending after this")
    parser.add_argument("--deadline", type=float, default=Options.deadline, help="per request, then it is lost")
    parser.add_argument("--tokens-per-sec", type=float, default=Options.tokens_per_sec)
    parser.add_argument("--kill-every", type=float, default=Options.kill_every, help="seconds between worker kills")
    parser.add_argument("--seed", type=int, default=Options.seed)
    parser.add_argument(
        "--inflight-kills", type=float, default=Options.inflight_kills, help="share of kills timed mid-stream"
    )
    parser.add_argument("--relay", action="store_true", help="workers on router A, callers on router B")
    parser.add_argument("--router-script", default="", help="run this auxot_router.py instead of the repo's")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temporary directory)")
    args = parser.parse_args()
    opts = Options(
        requests=args.requests, concurrency=args.concurrency, max_seconds=args.max_seconds, deadline=args.deadline,
        tokens_per_sec=args.tokens_per_sec, kill_every=args.kill_every, seed=args.seed,
        router_script=args.router_script, inflight_kills=args.inflight_kills, relay=args.relay,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on the way out
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            workdir = args.workdir
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="auxot-soak-")))
        soak = Soak(opts, workdir)
        try:
            print("starting redis-server, 2 routers, 3 workers ...", file=sys.stderr, flush=True)
            soak.start()
            print(f"sending {opts.requests} requests ({opts.concurrency} at a time) ...", file=sys.stderr, flush=True)
            tally, elapsed = asyncio.run(run_load(soak))
            time.sleep(1.0)  # the sweeper settles what the killed router left
            deadline = time.monotonic() + 15
            stuck = soak.stuck()
            while (stuck["xpending"] or stuck["xlen"]) and time.monotonic() < deadline:
                time.sleep(0.5)
                stuck = soak.stuck()
            retried = soak.retried()
        finally:
            soak.stop()
    tally_dict = asdict(tally)
    tally_dict["error_kinds"] = dict(tally.error_kinds)
    result = {
        "meta": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(),
            "python": platform.python_version(), "options": asdict(opts),
        },
        "tally": tally_dict,
        "retried": retried,
        "worker_kills": soak.kills,
        "inflight_kills": soak.inflight_kills,
        "router_restarts": soak.router_restarts,
        "router_hangs": soak.hangs,
        "stuck": stuck,
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(tally.sent / elapsed, 1) if elapsed else 0.0,
        "pass": tally.lost == 0 and tally.duplicated == 0 and soak.hangs == 0,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(summary_table(result))
    print(
        f"\n{tally.sent} requests in {elapsed:.0f} s across 2 routers and 3 workers on redis-server"
        f"{' (every job relayed)' if opts.relay else ''}, with "
        f"{soak.kills} worker SIGKILLs ({soak.inflight_kills} while tokens streamed) and {soak.router_restarts} "
        f"router SIGKILL+restart: {tally.completed} completed "
        f"with exactly the requested text, {retried} jobs re-run transparently after a worker loss, "
        f"{tally.explicit_error} ended with an explicit error, {tally.cut_by_router_kill} were cut when their router "
        f"was killed, {tally.lost} lost, {tally.duplicated} duplicated."
    )
    if tally.samples:
        print("\nsamples:\n  " + "\n  ".join(tally.samples))
    print(f"\nJSON: {args.output}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
