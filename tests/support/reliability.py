"""Helpers for the reliability tests: an SSE client that reads as a user would, process faults.

Every check is on what a caller of the OpenAI API sees: the HTTP status, the SSE bytes (content
deltas, keep-alive comments, an ``error`` object, ``[DONE]``) and how long it all took.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.support.procs import RouterProcess, WorkerProcess, pid_alive

TOKEN = " tok"


def chat_body(content: str = "Say tok.", *, stream: bool, max_tokens: int = 5, **extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }


def is_clean_text(text: str, max_tokens: int) -> bool:
    """The fake's output is " tok" repeated: a clean prefix (no repetition, nothing else)."""
    count = text.count(TOKEN)
    return text == TOKEN * count and count <= max_tokens


@dataclass
class Reply:
    """What the caller got: status, headers, and for streams the parsed SSE."""

    status: int
    headers: dict[str, str]
    raw: bytes = b""
    events: list[Any] = field(default_factory=list)  # dicts, or "[DONE]"
    keepalives: int = 0
    elapsed: float = 0.0
    first_content_at: float | None = None  # seconds after the request was sent

    @property
    def json(self) -> Any:
        return orjson.loads(self.raw)

    @property
    def text(self) -> str:
        """Streamed content, or the non-streaming message content (either API)."""
        if self.events:
            parts: list[str] = []
            for e in self.events:
                if not isinstance(e, dict):
                    continue
                if e.get("choices"):  # OpenAI chunk
                    parts.append((e["choices"][0].get("delta") or {}).get("content") or "")
                elif e.get("type") == "content_block_delta":  # Anthropic
                    parts.append(e["delta"].get("text") or "")
            return "".join(parts)
        if self.status == 200 and self.raw:
            body = self.json
            if body.get("type") == "message":
                return "".join(block.get("text", "") for block in body["content"] if block.get("type") == "text")
            return body["choices"][0]["message"]["content"] or ""
        return ""

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Error objects in the stream: OpenAI ``{"error": ...}``, Anthropic ``event: error``."""
        return [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]

    @property
    def done(self) -> bool:
        """The stream's proper end: OpenAI ``[DONE]``, Anthropic ``message_stop``."""
        return bool(self.events) and (
            self.events[-1] == "[DONE]"
            or (isinstance(self.events[-1], dict) and self.events[-1].get("type") == "message_stop")
        )

    @property
    def pings(self) -> int:
        """Anthropic keep-alive ``ping`` events."""
        return sum(1 for e in self.events if isinstance(e, dict) and e.get("type") == "ping")

    @property
    def finish_reasons(self) -> list[str]:
        """OpenAI ``finish_reason`` values / Anthropic ``stop_reason`` values in the stream."""
        found: list[str] = []
        for e in self.events:
            if not isinstance(e, dict):
                continue
            if e.get("choices") and e["choices"][0].get("finish_reason"):
                found.append(e["choices"][0]["finish_reason"])
            elif e.get("type") == "message_delta" and (e.get("delta") or {}).get("stop_reason"):
                found.append(e["delta"]["stop_reason"])
        return found


def parse_sse(buffer: bytes, reply: Reply) -> bytes:
    """Consume complete SSE blocks from ``buffer`` into ``reply``; returns the unparsed rest."""
    while b"\n\n" in buffer:
        block, buffer = buffer.split(b"\n\n", 1)
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                reply.keepalives += 1
            elif line.startswith(b"data: "):
                payload = line[6:]
                reply.events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return buffer


class Caller:
    """One API caller (an aiohttp session) against one router."""

    def __init__(self, router: RouterProcess, session: aiohttp.ClientSession, api: str = "openai") -> None:
        self.router = router
        self.session = session
        self.api = api
        if api == "openai":
            self.url = f"{router.url}/v1/chat/completions"
            self.headers = router.headers()
        else:
            self.url = f"{router.url}/v1/messages"
            self.headers = {
                "x-api-key": router.keys.api_key,
                "anthropic-version": "2023-06-01",
                "content-type": "application/json",
            }

    async def call(self, body: dict[str, Any], *, timeout: float = 30.0) -> Reply:
        """The whole request; for streams the SSE is parsed."""
        started = time.monotonic()
        async with self.session.post(
            self.url, json=body, headers=self.headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            reply = Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()})
            if not body.get("stream") or resp.status != 200:
                reply.raw = await resp.read()
            else:
                buffer = b""
                async for chunk in resp.content.iter_any():
                    reply.raw += chunk
                    buffer = parse_sse(buffer + chunk, reply)
                    if reply.first_content_at is None and reply.text:
                        reply.first_content_at = time.monotonic() - started
        reply.elapsed = time.monotonic() - started
        return reply

    def open(self, body: dict[str, Any]) -> OpenStream:
        return OpenStream(self, {**body, "stream": True})


class OpenStream:
    """A streaming request read step by step; ``close()`` drops the connection like a user
    pressing Ctrl-C."""

    def __init__(self, caller: Caller, body: dict[str, Any]) -> None:
        self.caller = caller
        self.body = body
        self.resp: aiohttp.ClientResponse | None = None
        self.reply = Reply(0, {})
        self._buffer = b""
        self._started = 0.0
        self._pending: asyncio.Future[aiohttp.ClientResponse] | None = None

    async def start(self) -> OpenStream:
        """Send the request. The router sends headers only with the first event or keep-alive
        tick, so this does not wait for them; the reads do."""
        self._started = time.monotonic()
        caller = self.caller
        self._pending = asyncio.ensure_future(caller.session.post(caller.url, json=self.body, headers=caller.headers))
        await asyncio.sleep(0)
        return self

    async def response(self, timeout: float = 30.0) -> aiohttp.ClientResponse:
        """The response, once its headers arrived."""
        if self.resp is None:
            assert self._pending is not None
            self.resp = await asyncio.wait_for(asyncio.shield(self._pending), timeout)
            self.reply.status = self.resp.status
            self.reply.headers = {k.lower(): v for k, v in self.resp.headers.items()}
        return self.resp

    async def read_until(self, condition: Callable[[Reply], bool], timeout: float = 15.0) -> Reply:
        """Read until ``condition(reply)`` holds or the stream ends (then the condition is checked
        by the caller)."""
        deadline = time.monotonic() + timeout
        resp = await self.response(timeout)
        while not condition(self.reply):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"condition not met in {timeout}s; got so far: {self.reply.raw[-600:]!r}")
            try:
                chunk = await asyncio.wait_for(resp.content.readany(), left)
            except TimeoutError:
                continue
            if not chunk:
                break
            self.reply.raw += chunk
            self._buffer = parse_sse(self._buffer + chunk, self.reply)
            if self.reply.first_content_at is None and self.reply.text:
                self.reply.first_content_at = time.monotonic() - self._started
        self.reply.elapsed = time.monotonic() - self._started
        return self.reply

    async def finish(self, timeout: float = 30.0) -> Reply:
        """Read to the end of the stream."""
        deadline = time.monotonic() + timeout
        resp = await self.response(timeout)
        if resp.status != 200:
            self.reply.raw = await resp.read()
            return self.reply
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the stream did not end in {timeout}s; got: {self.reply.raw[-600:]!r}")
            chunk = await asyncio.wait_for(resp.content.readany(), left)
            if not chunk:
                break
            self.reply.raw += chunk
            self._buffer = parse_sse(self._buffer + chunk, self.reply)
            if self.reply.first_content_at is None and self.reply.text:
                self.reply.first_content_at = time.monotonic() - self._started
        self.reply.elapsed = time.monotonic() - self._started
        return self.reply

    def close(self) -> None:
        """Drop the connection (the client goes away)."""
        if self.resp is not None:
            self.resp.close()
        elif self._pending is not None:
            self._pending.cancel()


# --- process faults ---------------------------------------------------------------------------


def process_identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time in clock ticks since boot): tells a process from a later one that got the
    same PID (PIDs are recycled quickly on a busy machine with pid_max 32768)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return pid, fields[19]  # field 22 of stat: starttime (fields[0] is field 3, the state)


def kill_if_same(identity: tuple[int, str] | None, sig: int = signal.SIGKILL) -> None:
    """Signal the process only if it is still the one identified earlier."""
    if identity is not None and process_identity(identity[0]) == identity and pid_alive(identity[0]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(identity[0], sig)


class Reaper:
    """Kills what a test orphaned (the llama-server of a SIGKILLed worker, should it survive its
    parent) at the end, and resumes SIGSTOPped workers so that they can be stopped. Processes
    are remembered by PID and start time, so a recycled PID is never signalled."""

    def __init__(self) -> None:
        self.orphans: list[tuple[int, str] | None] = []
        self.stopped: list[int] = []

    def kill_worker(self, worker: WorkerProcess) -> list[int]:
        """SIGKILL the worker process only (as a crash would). Returns its llama-server PIDs."""
        children = worker.llama_children()
        self.orphans += [process_identity(pid) for pid in children]
        worker.signal(signal.SIGKILL)
        worker.wait(10)
        return children

    def kill_llama(self, worker: WorkerProcess) -> list[int]:
        """SIGKILL the worker's llama-server (the worker keeps running)."""
        children = worker.llama_children()
        for pid in children:
            kill_if_same(process_identity(pid))
        return children

    def stop(self, pid: int) -> None:
        """SIGSTOP one of our own (unreaped) child processes."""
        os.kill(pid, signal.SIGSTOP)
        self.stopped.append(pid)

    def cont(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        if pid in self.stopped:
            self.stopped.remove(pid)

    def cleanup(self) -> None:
        for pid in self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for identity in self.orphans:
            kill_if_same(identity)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``condition`` until truthy; fails with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def await_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """``wait_for`` for async tests: the blocking probe runs in a thread, the loop keeps going."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(condition)
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def running_on(workers: list[WorkerProcess]) -> WorkerProcess | None:
    """The worker whose fake llama-server has a request in progress right now."""
    for worker in workers:
        with contextlib.suppress(OSError, RuntimeError):
            if worker.alive() and worker.fake_stats()["active"] > 0:
                return worker
    return None


def started_counts(workers: list[WorkerProcess]) -> list[int]:
    return [w.fake_stats()["requests_started"] for w in workers]


def start_workers(
    cluster: Any, router: RouterProcess, count: int, name: str = "worker", **settings: str
) -> list[WorkerProcess]:
    """Start ``count`` workers at once (not one after another) and wait until all are connected."""
    before = router.health().get("workers", 0)
    workers = [cluster.worker(router, name=f"{name}{i}", wait=False, **settings) for i in range(count)]
    router.wait_workers(before + count, timeout=30)
    return workers


def llama_get(worker: WorkerProcess, path: str) -> Any:
    """GET a path of the worker's llama-server, with the API key the worker gave it."""
    from tests.support import http

    for pid in worker.llama_children():
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--port" in args:
            port = int(args[args.index(b"--port") + 1])
            # the key is in llama-server's environment (LLAMA_API_KEY), never in its command line
            env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
            key = env.get(b"LLAMA_API_KEY", b"").decode()
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return orjson.loads(http.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=5).body)
    raise RuntimeError("the worker has no llama-server child")


def start_routers(cluster: Any, names: list[str], **settings: str) -> list[RouterProcess]:
    """Start several routers at once (same settings) and wait until each answers /health."""
    from tests.support.procs import Process

    routers = [cluster.router(name, start=False, **settings) for name in names]
    for router in routers:
        Process.start(router)  # the process only; the readiness wait below covers all of them
    for router in routers:
        wait_for(functools.partial(_answers, router), 20, f"{router.log_path.name} to answer /health")
    return routers


def _answers(router: RouterProcess) -> bool:
    if not router.alive():
        raise RuntimeError(f"router exited early:\n{router.log()[-3000:]}")
    try:
        router.health()
    except OSError:
        return False
    return True


def start_workers_on(cluster: Any, specs: list[tuple[RouterProcess, str, dict[str, str]]]) -> list[WorkerProcess]:
    """Start workers on several routers sharing one Redis at once; wait until the cluster (as
    the first router's /health sees it) has them all."""
    first = specs[0][0]
    before = first.health().get("workers", 0)
    workers = [cluster.worker(router, name, wait=False, **settings) for router, name, settings in specs]
    first.wait_workers(before + len(specs), timeout=30)
    return workers
