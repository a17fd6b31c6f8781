#!/usr/bin/env python3
"""Auxot worker: runs llama-server on this machine and serves a router's jobs with it.

The worker dials OUT to the router (so a GPU behind NAT can serve): a short policy-only
connection to learn what to serve, then it prepares llama-server (bound to 127.0.0.1 on a port
it owns, with a random API key of its own) and holds a permanent connection that receives jobs
and returns their tokens. Tokens that llama-server delivered together go out in one frame.

Reading order: configuration, llama-server supervision, job execution, the router link,
command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from auxot_common import protocol as proto
from auxot_common.logs import setup_logging
from auxot_common.settings import ConfigError, EnvReader, load_environment

VERSION = "0.1.0"
log = logging.getLogger("auxot.worker")


# === Configuration ================================================================================


@dataclass(slots=True)
class WorkerConfig:
    """Flags override the environment, which overrides ``.env``; see ``--help``."""

    gpu_key: str
    router_url: str = "ws://localhost:8080/ws"
    model_path: str = ""
    llama_server_path: str = ""
    gpu_layers: int = 9999
    threads: int = 0
    max_parallel: int = 0  # 0: what the router's policy says
    heartbeat_interval: float = 10.0
    reconnect_delay: float = 2.0
    reconnect_max_delay: float = 60.0
    ready_timeout: float = 600.0
    shutdown_grace: float = 30.0
    log_level: str = "info"
    extra_llama_args: list[str] = field(default_factory=list)

    @classmethod
    def from_sources(cls, flags: dict[str, str], env: dict[str, str]) -> WorkerConfig:
        read = EnvReader({**env, **{k: v for k, v in flags.items() if v}})
        gpu_key = read.raw("AUXOT_GPU_KEY")
        if gpu_key is None:
            raise ConfigError("GPU key is required: use --gpu-key or set AUXOT_GPU_KEY")
        return cls(
            gpu_key=gpu_key,
            router_url=normalise_router_url(read.str("AUXOT_ROUTER_URL", "ws://localhost:8080/ws")),
            model_path=read.str("AUXOT_MODEL_FILE", ""),
            llama_server_path=read.str("AUXOT_LLAMA_BINARY", ""),
            gpu_layers=read.int("AUXOT_GPU_LAYERS", 9999, minimum=0),
            threads=read.int("AUXOT_THREADS", 0, minimum=0),
            max_parallel=read.int("AUXOT_MAX_PARALLEL", 0, minimum=0, maximum=512),
            heartbeat_interval=read.duration("AUXOT_HEARTBEAT_INTERVAL", 10.0, minimum=0.05),
            reconnect_delay=read.duration("AUXOT_RECONNECT_DELAY", 2.0, minimum=0.01),
            reconnect_max_delay=read.duration("AUXOT_RECONNECT_MAX_DELAY", 60.0, minimum=0.01),
            ready_timeout=read.duration("AUXOT_READY_TIMEOUT", 600.0, minimum=1.0),
            shutdown_grace=read.duration("AUXOT_SHUTDOWN_GRACE", 30.0),
            log_level=read.choice("AUXOT_LOG_LEVEL", "info", ("debug", "info", "warn", "warning", "error")),
            extra_llama_args=read.str("AUXOT_LLAMA_ARGS", "").split(),
        )


FLAG_TO_ENV = {
    "--gpu-key": "AUXOT_GPU_KEY",
    "--router-url": "AUXOT_ROUTER_URL",
    "--model-path": "AUXOT_MODEL_FILE",
    "--llama-server-path": "AUXOT_LLAMA_BINARY",
}


def normalise_router_url(url: str) -> str:
    """``http(s)://`` becomes ``ws(s)://``; a bare host gets ``wss://`` and ``/ws``. A path given
    explicitly is kept, so a router behind a path prefix stays reachable."""
    url = url.strip()
    if not url:
        raise ConfigError("AUXOT_ROUTER_URL is empty")
    if "://" not in url:
        url = "wss://" + url
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if url.startswith(http):
            url = ws + url[len(http) :]
    if not url.startswith(("ws://", "wss://")):
        raise ConfigError(f"AUXOT_ROUTER_URL={url!r} must be ws://, wss://, http:// or https://")
    scheme, _, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if not host:
        raise ConfigError(f"AUXOT_ROUTER_URL={url!r} has no host")
    return f"{scheme}://{host}/{path}" if slash and path else f"{scheme}://{host}/ws"


class FatalError(Exception):
    """An error no retry can fix (a rejected GPU key, a missing model file)."""


# === llama-server supervision =====================================================================


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """One llama-server process bound to 127.0.0.1 with a random API key of its own.

    Parameters:
        binary: the llama-server executable.
        model: the GGUF file (the first shard of a split model).
        parallel: slots (``--parallel``).
        ctx_per_slot: context per slot; llama-server gets ``ctx_per_slot * parallel``.
        gpu_layers, threads: ``--n-gpu-layers`` (0 = CPU only) and ``--threads`` (0 = default).
        extra_args: appended as they are (``AUXOT_LLAMA_ARGS``).
    """

    STDERR_LINES = 50

    def __init__(
        self,
        binary: str,
        model: str,
        *,
        parallel: int,
        ctx_per_slot: int,
        gpu_layers: int = 0,
        threads: int = 0,
        extra_args: list[str] | None = None,
    ) -> None:
        self.binary = binary
        self.model = model
        self.parallel = parallel
        self.ctx_per_slot = ctx_per_slot
        self.gpu_layers = gpu_layers
        self.threads = threads
        self.extra_args = extra_args or []
        self.api_key = secrets.token_urlsafe(32)
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self.stderr_tail: deque[str] = deque(maxlen=self.STDERR_LINES)
        self._stderr_task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [
            self.binary,
            "--model", self.model,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--api-key", self.api_key,
            "--ctx-size", str(self.ctx_per_slot * self.parallel),
            "--parallel", str(self.parallel),
            "--jinja",
            "--metrics",
            "--no-webui",
        ]  # fmt: skip
        if self.gpu_layers > 0:
            args += ["--n-gpu-layers", str(self.gpu_layers)]
        if self.threads > 0:
            args += ["--threads", str(self.threads)]
        return args + self.extra_args

    async def start(self, session: aiohttp.ClientSession, ready_timeout: float) -> None:
        """Start and wait until healthy; retries a port another process took meanwhile."""
        for _ in range(3):
            self.port = free_port()
            self.stderr_tail.clear()
            self.process = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the worker, which stops it
            )
            self._stderr_task = asyncio.create_task(self._read_stderr(self.process))
            log.info("llama-server started", extra={"pid": self.process.pid, "port": self.port, "parallel": self.parallel})
            if await self._wait_ready(session, ready_timeout):
                return
            if not any("bind" in line.lower() for line in self.stderr_tail):
                break
        raise RuntimeError("llama-server did not become ready; its last lines:\n" + "\n".join(self.stderr_tail))

    async def _wait_ready(self, session: aiohttp.ClientSession, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.api_key}"}
        while time.monotonic() < deadline:
            if self.process is None or self.process.returncode is not None:
                await self._drain_stderr()
                return False
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{self.base_url}/health", headers=headers, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return True
            await asyncio.sleep(0.1)
        await self.stop()
        return False

    async def _read_stderr(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.stderr_tail.append(line)
            if any(word in line.lower() for word in ("error", "fatal", "abort", "failed")):
                log.warning("llama-server", extra={"line": line[:500]})

    async def _drain_stderr(self) -> None:
        if self._stderr_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 2.0)

    async def stop(self) -> None:
        """SIGINT, then SIGKILL after 5 s."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        log.info("llama-server stopped", extra={"pid": process.pid})

    async def discover(self, session: aiohttp.ClientSession) -> proto.Capabilities:
        """What the running server actually serves: model name, context per slot, slots."""
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with session.get(f"{self.base_url}/props", headers=headers) as resp:
            props = orjson.loads(await resp.read()) if resp.status == 200 else {}
        async with session.get(f"{self.base_url}/v1/models", headers=headers) as resp:
            models = orjson.loads(await resp.read()) if resp.status == 200 else {}
        data = (models.get("data") or [{}])[0]
        settings = props.get("default_generation_settings") or {}
        return proto.Capabilities(
            backend="llama.cpp",
            model=model_display_name(str(data.get("id") or Path(self.model).name)),
            ctx_size=int(settings.get("n_ctx") or self.ctx_per_slot),
            parameters=format_parameters((data.get("meta") or {}).get("n_params")),
            total_slots=int(props.get("total_slots") or self.parallel),
        )


def model_display_name(model_id: str) -> str:
    name = Path(model_id).name
    for suffix in (".gguf", ".GGUF"):
        name = name.removesuffix(suffix)
    return name


def format_parameters(n_params: Any) -> str:
    if not isinstance(n_params, int) or n_params <= 0:
        return ""
    return f"{n_params // 1_000_000_000}B" if n_params >= 1_000_000_000 else f"{n_params // 1_000_000}M"


# === Job execution ================================================================================


ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def llama_request_body(job: proto.Job) -> dict[str, Any]:
    """The body sent to llama-server: the caller's fields, always streamed, usage included."""
    body: dict[str, Any] = dict(job.params)
    if job.kind == "chat":
        body["messages"] = [normalise_message(m) for m in job.messages]
        if job.tools:
            body["tools"] = job.tools
    if job.temperature is not None:
        body["temperature"] = job.temperature
    if job.max_tokens is not None:
        body["max_tokens"] = job.max_tokens
    if job.reasoning_effort:
        if job.reasoning_effort.lower() == "none":
            kwargs = dict(body.get("chat_template_kwargs") or {})
            kwargs.setdefault("enable_thinking", False)
            body["chat_template_kwargs"] = kwargs
        else:
            body["reasoning_effort"] = job.reasoning_effort
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return body


def normalise_message(message: dict[str, Any]) -> dict[str, Any]:
    """Fix shapes llama-server rejects: bare-string image URLs and empty tool arguments."""
    content = message.get("content")
    if isinstance(content, list) and any(isinstance(p, dict) and isinstance(p.get("image_url"), str) for p in content):
        message = {
            **message,
            "content": [
                {**p, "image_url": {"url": p["image_url"]}} if isinstance(p.get("image_url"), str) else p
                for p in content
            ],
        }
    calls = message.get("tool_calls")
    if isinstance(calls, list) and any(not (c.get("function") or {}).get("arguments") for c in calls if isinstance(c, dict)):
        message = {
            **message,
            "tool_calls": [
                {**c, "function": {**c.get("function", {}), "arguments": c.get("function", {}).get("arguments") or "{}"}}
                for c in calls
            ],
        }
    return message


class LlamaHTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class JobResult:
    """What one job accumulated from llama-server's stream."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)

    def merge_tool_deltas(self, deltas: list[dict[str, Any]]) -> None:
        for delta in deltas:
            index = delta.get("index", 0)
            call = self.tool_calls.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            if delta.get("id"):
                call["id"] = delta["id"]
            function = delta.get("function") or {}
            if function.get("name"):
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] += function.get("arguments") or ""

    def complete(self, job_id: str, duration_ms: int) -> proto.Complete:
        usage, timings = self.usage, self.timings
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or timings.get("cache_n") or 0)
        prompt = int(usage.get("prompt_tokens") or (timings.get("prompt_n", 0) + timings.get("cache_n", 0)))
        output = int(usage.get("completion_tokens") or timings.get("predicted_n") or 0)
        calls = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return proto.Complete(
            job_id=job_id,
            full_response="".join(self.text),
            finish_reason=self.finish_reason or ("tool_calls" if calls else "stop"),
            duration_ms=duration_ms,
            input_tokens=prompt,
            output_tokens=output,
            cache_tokens=cached,
            tool_calls=calls,
            reasoning_content="".join(self.reasoning),
        )


class JobRunner:
    """Runs jobs against llama-server and sends their events to the router.

    Parameters:
        session: an HTTP session whose connector opens a fresh connection per request
            (llama-server drops pooled keep-alive connections under load).
        llama: the server to use.
        send: sends one protocol message to the router (raises ConnectionError when gone).
    """

    def __init__(self, session: aiohttp.ClientSession, llama: LlamaServer, send: Any) -> None:
        self._session = session
        self._llama = llama
        self._send = send
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, job: proto.Job) -> None:
        if job.job_id in self.tasks:
            return
        task = asyncio.create_task(self._run(job), name=f"job-{job.job_id}")
        self.tasks[job.job_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(job.job_id, None))

    def cancel(self, job_id: str) -> None:
        task = self.tasks.get(job_id)
        if task is not None:
            task.cancel()

    def cancel_all(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()

    async def _run(self, job: proto.Job) -> None:
        started = time.monotonic()
        log.info("job started", extra={"job_id": job.job_id, "kind": job.kind, "messages": len(job.messages), "tools": len(job.tools)})
        timeout = job.deadline - time.time() if job.deadline else None
        try:
            async with asyncio.timeout(timeout):
                result = await self._execute(job)
        except asyncio.CancelledError:
            log.info("job cancelled", extra={"job_id": job.job_id})
            raise
        except TimeoutError:
            await self._report(proto.Error(job_id=job.job_id, error="the job timed out on the worker", status=504))
            return
        except LlamaHTTPError as exc:
            await self._report(proto.Error(job_id=job.job_id, error=str(exc), status=exc.status))
            return
        except (aiohttp.ClientError, ValueError) as exc:
            await self._report(proto.Error(job_id=job.job_id, error=f"inference failed: {exc}", status=502))
            return
        complete = result.complete(job.job_id, int((time.monotonic() - started) * 1000))
        log.info(
            "job completed",
            extra={
                "job_id": job.job_id,
                "finish_reason": complete.finish_reason,
                "input_tokens": complete.input_tokens,
                "output_tokens": complete.output_tokens,
                "cache_tokens": complete.cache_tokens,
                "duration_ms": complete.duration_ms,
            },
        )
        await self._report(complete)

    async def _report(self, message: proto.Message) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._send(message)

    async def _execute(self, job: proto.Job) -> JobResult:
        endpoint = ENDPOINTS.get(job.kind)
        if endpoint is None:
            raise LlamaHTTPError(400, f"unsupported job kind {job.kind!r}")
        headers = {"Authorization": f"Bearer {self._llama.api_key}", "Content-Type": "application/json"}
        url = self._llama.base_url + endpoint
        async with self._session.post(url, data=orjson.dumps(llama_request_body(job)), headers=headers) as resp:
            if resp.status != 200:
                message = llama_error_message(resp.status, await resp.read())
                raise LlamaHTTPError(caller_status(resp.status, message), message)
            result = JobResult()
            await self._relay_stream(job, resp, result)
            return result

    async def _relay_stream(self, job: proto.Job, resp: aiohttp.ClientResponse, result: JobResult) -> None:
        """Parse SSE; everything that arrived in one read goes to the router in as few frames."""
        buffer = b""
        async for chunk in resp.content.iter_any():
            buffer += chunk
            lines = buffer.split(b"\n")
            buffer = lines.pop()
            events = [line[6:] for line in lines if line.startswith(b"data: ")]
            if events and await self._handle_events(job, events, result):
                return

    async def _handle_events(self, job: proto.Job, events: list[bytes], result: JobResult) -> bool:
        """Apply a batch of SSE payloads; returns True at ``[DONE]``."""
        outgoing: list[proto.Message] = []
        done = False
        for payload in events:
            if payload.strip() == b"[DONE]":
                done = True
                break
            chunk = orjson.loads(payload)
            if "error" in chunk and not chunk.get("choices"):
                raise LlamaHTTPError(500, llama_error_message(500, payload))
            apply_chunk(job, chunk, result, outgoing)
        for message in outgoing:
            await self._send(message)
        return done


def apply_chunk(job: proto.Job, chunk: dict[str, Any], result: JobResult, outgoing: list[proto.Message]) -> None:
    """Fold one llama-server chunk into the result and the messages to send (merged by kind)."""
    if chunk.get("usage"):
        result.usage = chunk["usage"]
    if chunk.get("timings"):
        result.timings = chunk["timings"]
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if delta is None:  # legacy completions carry text instead of a delta
            text = choice.get("text")
            delta = {"content": text} if text else {}
        reasoning, content, calls = delta.get("reasoning_content"), delta.get("content"), delta.get("tool_calls")
        if reasoning:
            result.reasoning.append(reasoning)
            add_token(outgoing, job, reasoning, reasoning=True)
        if content:
            result.text.append(content)
            add_token(outgoing, job, content, reasoning=False)
        if calls:
            result.merge_tool_deltas(calls)
            if job.stream:
                last = outgoing[-1] if outgoing else None
                if isinstance(last, proto.ToolCallDelta):
                    last.tool_calls.extend(calls)
                else:
                    outgoing.append(proto.ToolCallDelta(job_id=job.job_id, tool_calls=list(calls)))


def add_token(outgoing: list[proto.Message], job: proto.Job, text: str, *, reasoning: bool) -> None:
    if not job.stream:
        return
    last = outgoing[-1] if outgoing else None
    if isinstance(last, proto.Token) and last.reasoning == reasoning:
        last.token += text
    else:
        outgoing.append(proto.Token(job_id=job.job_id, token=text, reasoning=reasoning))


def caller_status(status: int, message: str) -> int:
    """llama-server answers 500 for requests the model cannot serve (an image without a vision
    projector); those are the caller's to fix, so they become 400s."""
    if status >= 500 and "not supported" in message:
        return 400
    return status


def llama_error_message(status: int, body: bytes) -> str:
    try:
        error = orjson.loads(body).get("error") or {}
        message = error.get("message") or error.get("type") or body.decode(errors="replace")
    except (orjson.JSONDecodeError, AttributeError):
        message = body.decode(errors="replace")
    return f"llama-server returned HTTP {status}: {str(message)[:800]}"


# === The router link ==============================================================================


class RouterLink:
    """The worker's connections to the router: policy fetch, then serve with reconnects.

    Parameters:
        config: the worker's configuration.
        session: for the WebSocket (the llama-server session is separate).
    """

    def __init__(self, config: WorkerConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.draining = False
        self.gpu_id = ""

    async def fetch_policy(self) -> proto.Policy:
        """Phase 1: a policy-only hello (never given jobs), retried with backoff."""
        delay = self.config.reconnect_delay
        while True:
            try:
                ws, ack = await self._connect(proto.Capabilities(), policy_only=True)
                await ws.close()
                if ack.policy is None:
                    raise FatalError("the router sent no policy")
                log.info("policy received", extra={"model": ack.policy.model_name, "parallel": ack.policy.max_parallelism})
                return ack.policy
            except (aiohttp.ClientError, TimeoutError, ConnectionError, proto.ProtocolError) as exc:
                log.warning("cannot reach the router", extra={"url": self.config.router_url, "error": str(exc), "retry_in_s": round(delay, 2)})
                await asyncio.sleep(delay)
                delay = next_delay(delay, self.config.reconnect_max_delay)

    async def _connect(self, caps: proto.Capabilities, *, policy_only: bool) -> tuple[aiohttp.ClientWebSocketResponse, proto.HelloAck]:
        ws = await self.session.ws_connect(
            self.config.router_url,
            heartbeat=self.config.heartbeat_interval,
            max_msg_size=64 * 1024 * 1024,
            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
        )
        try:
            hello = proto.Hello(gpu_key=self.config.gpu_key, capabilities=caps, policy_only=policy_only)
            await ws.send_frame(proto.encode(hello), aiohttp.WSMsgType.TEXT)
            msg = await ws.receive(timeout=30.0)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"the router closed the connection during the handshake ({msg.type.name})")
            ack = proto.decode(msg.data)
            if not isinstance(ack, proto.HelloAck):
                raise proto.ProtocolError(f"expected hello_ack, got {ack.type}")
            if not ack.success:
                raise FatalError(f"the router rejected this worker: {ack.error or 'authentication failed'}")
        except BaseException:
            await ws.close()
            raise
        self.gpu_id = ack.gpu_id
        return ws, ack

    async def serve(self, runner_factory: Any, caps: proto.Capabilities, stop: asyncio.Event) -> None:
        """Phase 2: hold the permanent connection, reconnecting with jittered backoff."""
        delay = self.config.reconnect_delay
        while not stop.is_set():
            try:
                ws, _ = await self._connect(caps, policy_only=False)
            except (aiohttp.ClientError, TimeoutError, ConnectionError, proto.ProtocolError) as exc:
                log.warning("cannot reach the router", extra={"error": str(exc), "retry_in_s": round(delay, 2)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = next_delay(delay, self.config.reconnect_max_delay)
                continue
            delay = self.config.reconnect_delay
            log.info("worker ready", extra={"gpu_id": self.gpu_id, "model": caps.model, "slots": caps.total_slots})
            await self._session_loop(ws, runner_factory(self.send), caps, stop)

    async def _session_loop(self, ws: aiohttp.ClientWebSocketResponse, runner: JobRunner, caps: proto.Capabilities, stop: asyncio.Event) -> None:
        self.ws = ws
        await self.send(proto.Config(capabilities=caps))
        heartbeats = asyncio.create_task(self._heartbeats())
        stopper = asyncio.create_task(self._drain_on(stop, runner, caps))
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                self._on_message(msg.data, runner)
        finally:
            heartbeats.cancel()
            stopper.cancel()
            runner.cancel_all()  # the router re-runs or fails them; results could not be delivered now
            self.ws = None
            log.warning("disconnected from the router", extra={"close_code": ws.close_code})

    def _on_message(self, data: str, runner: JobRunner) -> None:
        try:
            message = proto.decode(data)
        except proto.ProtocolError as exc:
            log.warning("bad message from the router", extra={"error": str(exc)})
            return
        if isinstance(message, proto.Job):
            runner.start(message)
        elif isinstance(message, proto.Cancel):
            runner.cancel(message.job_id)
        elif isinstance(message, proto.ConfigAck) and not message.success:
            log.error("the router refused this worker's configuration", extra={"error": message.error})
        elif not isinstance(message, proto.HeartbeatAck | proto.ConfigAck):
            log.warning("unexpected message from the router", extra={"type": message.type})

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send(proto.Heartbeat())

    async def _drain_on(self, stop: asyncio.Event, runner: JobRunner, caps: proto.Capabilities) -> None:
        """On shutdown: take no new jobs, give running ones the grace period, then close."""
        await stop.wait()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send(proto.Config(capabilities=dataclasses.replace(caps, draining=True)))
        deadline = time.monotonic() + self.config.shutdown_grace
        while runner.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.ws is not None:
            await self.ws.close()

    async def send(self, message: proto.Message) -> None:
        ws = self.ws
        if ws is None or ws.closed:
            raise ConnectionError("not connected to the router")
        await ws.send_frame(proto.encode(message), aiohttp.WSMsgType.TEXT)


def next_delay(delay: float, cap: float) -> float:
    """Doubling backoff with ±25% jitter, so many workers reconnecting at once spread out."""
    return min(cap, delay * 2 * random.uniform(0.75, 1.25))


# === Command line =================================================================================


USAGE = """usage: python auxot_worker.py --gpu-key adm_... [options]

options (environment variable in brackets):
  --gpu-key KEY              GPU key from `auxot_router.py setup` [AUXOT_GPU_KEY]
  --router-url URL           ws://HOST:8080/ws [AUXOT_ROUTER_URL]
  --model-path FILE          serve this GGUF instead of downloading [AUXOT_MODEL_FILE]
  --llama-server-path FILE   use this llama-server [AUXOT_LLAMA_BINARY]
other settings: AUXOT_GPU_LAYERS (9999), AUXOT_THREADS (0 = auto), AUXOT_MAX_PARALLEL (the policy's),
AUXOT_HEARTBEAT_INTERVAL (10s), AUXOT_RECONNECT_DELAY (2s), AUXOT_RECONNECT_MAX_DELAY (60s),
AUXOT_SHUTDOWN_GRACE (30s), AUXOT_LLAMA_ARGS (extra llama-server flags), AUXOT_LOG_LEVEL (info)
"""


def parse_flags(args: list[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        env = FLAG_TO_ENV.get(name)
        if env is None:
            raise ConfigError(f"unknown argument {args[i]!r} (see --help)")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{name} needs a value")
            i += 1
            value = args[i]
        flags[env] = value
        i += 1
    return flags


async def run(config: WorkerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with (
        aiohttp.ClientSession() as ws_session,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        ) as llama_session,
    ):
        link = RouterLink(config, ws_session)
        policy = await link.fetch_policy()
        llama = await prepare_llama(config, policy, llama_session)
        try:
            caps = await llama.discover(llama_session)
            caps.model_capabilities = list(policy.capabilities)
            await link.serve(lambda send: JobRunner(llama_session, llama, send), caps, stop)
        finally:
            await llama.stop()
    return 0


async def prepare_llama(config: WorkerConfig, policy: proto.Policy, session: aiohttp.ClientSession) -> LlamaServer:
    if not config.model_path:
        raise FatalError("no model: pass --model-path (air-gapped mode); downloads need the policy's repository")
    if not Path(config.model_path).is_file():
        raise FatalError(f"model file not found: {config.model_path}")
    if not config.llama_server_path:
        raise FatalError("no llama-server: pass --llama-server-path")
    parallel = config.max_parallel or policy.max_parallelism
    llama = LlamaServer(
        config.llama_server_path,
        config.model_path,
        parallel=parallel,
        ctx_per_slot=policy.context_size,
        gpu_layers=config.gpu_layers,
        threads=config.threads,
        extra_args=config.extra_llama_args,
    )
    await llama.start(session, config.ready_timeout)
    return llama


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("help", "--help", "-h"):
        print(USAGE)
        return 0
    if args and args[0] == "version":
        print(f"auxot-worker v{VERSION}")
        return 0
    try:
        config = WorkerConfig.from_sources(parse_flags(args), load_environment())
    except ConfigError as exc:
        print(f"auxot-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    try:
        return asyncio.run(run(config))
    except FatalError as exc:
        log.error("fatal", extra={"error": str(exc)})
        print(f"auxot-worker: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        log.error("fatal", extra={"error": str(exc)})
        print(f"auxot-worker: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
