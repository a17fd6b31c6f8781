#!/usr/bin/env python3
"""Auxot worker: provisions llama-server on this machine and serves a router's jobs with it.

The worker dials OUT to the router (so a GPU behind NAT can serve). Its life:

1. detect the GPUs, which the policy-only hello reports so that the router can pick the
   quantization that fits this machine;
2. a short policy-only connection learns what to serve: the model's Hugging Face repository
   and files, the context per slot and the slots;
3. the llama-server binary (the release build for this GPU) and the model, downloaded with
   resume and integrity checks into caches, unless the user names local ones; or, with
   ``--backend-url``, an OpenAI-compatible server that already runs (no download, no spawn);
4. llama-server on 127.0.0.1 with a random API key of its own; when it runs out of memory at
   start it is retried with fewer slots, then with less context per slot;
5. the permanent connection: jobs in, tokens out (tokens that arrived together share a frame).

A supervisor restarts llama-server when it crashes, with backoff and a limit, reporting zero
slots to the router meanwhile, and applies the router's ``policy_update`` (another model is
downloaded while the old one still serves). SIGTERM lets running jobs finish, stops
llama-server and exits 0; a download in progress resumes at the next start.

Reading order: configuration, llama-server supervision, job execution, the router link, the
worker's lifecycle and command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import secrets
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import orjson

from auxot_common import eventloop
from auxot_common import protocol as proto
from auxot_common.datadir import data_dir
from auxot_common.downloads import DownloadError
from auxot_common.gpu import GpuInfo, detect_gpus, gpu_layers_for
from auxot_common.llama_binary import DEFAULT_ASSET_BASE_URL
from auxot_common.logs import setup_logging
from auxot_common.provision import (
    ModelFiles,
    ProvisionError,
    dial_down_steps,
    policy_change,
    provide_binary,
    provide_model,
    vram_report_gb,
)
from auxot_common.routing import host_ram_bytes, llama_cache_args
from auxot_common.sendbatch import DEFAULT_MAX_FRAME_BYTES, FrameBatcher
from auxot_common.settings import ConfigError, EnvReader, load_environment
from auxot_common.stopwords import StopMatcher, stop_sequences
from auxot_common.textparse import REASONING, TextParser

VERSION = "0.1.0"
log = logging.getLogger("auxot.worker")
_T = TypeVar("_T")


# === Configuration ================================================================================


@dataclass(slots=True)
class WorkerConfig:
    """Flags override the environment, which overrides ``.env``; see ``--help``."""

    gpu_key: str
    router_url: str = "ws://localhost:8080/ws"
    model: str = ""  # --model / AUXOT_WORKER_MODEL: serve this configured model, never be moved
    model_path: str = ""
    mmproj_path: str = ""
    llama_server_path: str = ""
    models_dir: str = "~/.auxot/models"
    llama_cache_dir: str = "~/.auxot/llama-server"
    llama_asset_url: str = DEFAULT_ASSET_BASE_URL
    backend_url: str = ""
    backend_api_key: str = ""
    gpu_layers: int | None = None  # None: every layer on a GPU, none without one
    threads: int = 0
    max_parallel: int = 0  # 0: what the router's policy says
    heartbeat_interval: float = 10.0
    reconnect_delay: float = 2.0
    reconnect_max_delay: float = 60.0
    ready_timeout: float = 600.0
    max_restarts: int = 5  # llama-server crash restarts within restart_window before giving up
    restart_window: float = 600.0
    restart_delay: float = 1.0  # doubles per restart in the window, up to restart_max_delay
    restart_max_delay: float = 30.0
    shutdown_grace: float = 30.0
    log_level: str = "info"
    extra_llama_args: list[str] = field(default_factory=list)
    cache_ram_mib: int | None = None  # llama-server --cache-ram; None: a quarter of the host's RAM
    environ: dict[str, str] = field(default_factory=dict)  # HF_ENDPOINT, HF_TOKEN (.env included)

    @classmethod
    def from_sources(cls, flags: dict[str, str], env: dict[str, str]) -> WorkerConfig:
        merged = {**env, **{k: v for k, v in flags.items() if v}}
        read = EnvReader(merged)
        gpu_key = read_gpu_key(read)
        backend_url = read.text("AUXOT_BACKEND_URL", read.text("AUXOT_LLAMA_URL", ""))
        return cls(
            gpu_key=gpu_key,
            router_url=normalise_router_url(read.text("AUXOT_ROUTER_URL", "ws://localhost:8080/ws")),
            model=read.text("AUXOT_WORKER_MODEL", ""),
            model_path=read.text("AUXOT_MODEL_FILE", ""),
            mmproj_path=read.text("AUXOT_MMPROJ_FILE", ""),
            llama_server_path=read.text("AUXOT_LLAMA_BINARY", ""),
            models_dir=read.text("AUXOT_MODELS_DIR", str(data_dir(merged) / "models")),
            llama_cache_dir=read.text("AUXOT_LLAMA_CACHE_DIR", str(data_dir(merged) / "llama-server")),
            llama_asset_url=read.text("AUXOT_LLAMA_ASSET_URL", DEFAULT_ASSET_BASE_URL).strip().rstrip("/"),
            backend_url=normalise_backend_url(backend_url) if backend_url else "",
            backend_api_key=read.text("AUXOT_BACKEND_API_KEY", ""),
            gpu_layers=None if read.raw("AUXOT_GPU_LAYERS") is None else read.integer("AUXOT_GPU_LAYERS", 0, minimum=0),
            threads=read.integer("AUXOT_THREADS", 0, minimum=0),
            max_parallel=read.integer("AUXOT_MAX_PARALLEL", 0, minimum=0, maximum=512),
            heartbeat_interval=read.duration("AUXOT_HEARTBEAT_INTERVAL", 10.0, minimum=0.05),
            reconnect_delay=read.duration("AUXOT_RECONNECT_DELAY", 2.0, minimum=0.01),
            reconnect_max_delay=read.duration("AUXOT_RECONNECT_MAX_DELAY", 60.0, minimum=0.01),
            ready_timeout=read.duration("AUXOT_READY_TIMEOUT", 600.0, minimum=1.0),
            max_restarts=read.integer("AUXOT_LLAMA_MAX_RESTARTS", 5, minimum=0),
            restart_delay=read.duration("AUXOT_LLAMA_RESTART_DELAY", 1.0, minimum=0.01),
            shutdown_grace=read.duration("AUXOT_SHUTDOWN_GRACE", 30.0),
            log_level=read.choice("AUXOT_LOG_LEVEL", "info", ("debug", "info", "warn", "warning", "error")),
            extra_llama_args=read.text("AUXOT_LLAMA_ARGS", "").split(),
            cache_ram_mib=None
            if read.raw("AUXOT_CACHE_RAM_MIB") is None
            else read.integer("AUXOT_CACHE_RAM_MIB", 0, minimum=-1),
            environ=merged,
        )


def read_gpu_key(read: EnvReader) -> str:
    """The GPU key from ``AUXOT_GPU_KEY``, or the first line of ``AUXOT_GPU_KEY_FILE`` (a file
    keeps the key out of ``ps`` and shell history; ``--gpu-key`` on the command line does not)."""
    key = read.raw("AUXOT_GPU_KEY")
    path = read.raw("AUXOT_GPU_KEY_FILE")
    if key is None and path is not None:
        try:
            lines = Path(path).expanduser().read_text(encoding="utf-8").split()
        except OSError as exc:
            raise ConfigError(f"AUXOT_GPU_KEY_FILE: cannot read {path}: {exc.strerror or exc}") from None
        key = lines[0] if lines else None
        if key is None:
            raise ConfigError(f"AUXOT_GPU_KEY_FILE: {path} is empty")
    if key is None:
        raise ConfigError(
            "GPU key is required: set AUXOT_GPU_KEY, or AUXOT_GPU_KEY_FILE / --gpu-key-file to a file holding it"
        )
    return key


FLAG_TO_ENV = {
    "--gpu-key": "AUXOT_GPU_KEY",
    "--gpu-key-file": "AUXOT_GPU_KEY_FILE",
    "--router-url": "AUXOT_ROUTER_URL",
    "--model": "AUXOT_WORKER_MODEL",
    "--model-path": "AUXOT_MODEL_FILE",
    "--mmproj-path": "AUXOT_MMPROJ_FILE",
    "--llama-server-path": "AUXOT_LLAMA_BINARY",
    "--backend-url": "AUXOT_BACKEND_URL",
    "--backend-api-key": "AUXOT_BACKEND_API_KEY",
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


def normalise_backend_url(url: str) -> str:
    """The base URL of an OpenAI-compatible server, without a trailing ``/`` or ``/v1``
    (the job runner appends ``/v1/chat/completions``); a bare ``host:port`` gets ``http://``."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")) or not url.partition("://")[2].strip("/"):
        raise ConfigError(f"AUXOT_BACKEND_URL={url!r} must be an http:// or https:// URL")
    url = url.rstrip("/")
    return url.removesuffix("/v1").rstrip("/")


class RefusedForNow(ConnectionError):
    """The router refused this worker for a while (too many failed keys from this address):
    not a bad key, so the worker waits and tries again instead of exiting."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalError(Exception):
    """An error no retry can fix (a rejected GPU key, a missing model file, too many crashes)."""


# === llama-server supervision =====================================================================


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Backend(Protocol):
    """What the job runner needs from an inference server: where it is and its key."""

    @property
    def base_url(self) -> str: ...

    @property
    def api_key(self) -> str: ...

    async def discover(self, session: aiohttp.ClientSession) -> proto.Capabilities: ...


class LlamaStartError(RuntimeError):
    """llama-server did not become ready. ``exited``: it died (out of memory shows up so)
    rather than timing out; ``bad_arguments``: it refused its command line."""

    def __init__(self, message: str, *, exited: bool, tail: list[str]) -> None:
        super().__init__(message)
        self.exited = exited
        self.tail = tail

    @property
    def bad_arguments(self) -> bool:
        return any("invalid argument" in line.lower() for line in self.tail)


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` that makes the child get SIGKILL when the worker dies, even
    by SIGKILL: an orphaned llama-server would hold the GPU memory the next worker needs."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


class LlamaServer:
    """One llama-server process bound to 127.0.0.1 with a random API key of its own.

    Parameters:
        binary: the llama-server executable.
        model: the GGUF file (the first shard of a split model).
        mmproj: the vision projector (``--mmproj``), ``""`` for none.
        parallel: slots (``--parallel``).
        ctx_per_slot: context per slot; llama-server gets ``ctx_per_slot * parallel``.
        gpu_layers, threads: ``--n-gpu-layers`` (0 = CPU only) and ``--threads`` (0 = default).
        extra_args: appended as they are (``AUXOT_LLAMA_ARGS``).
        pooling: for an embedding model, ``--embeddings --pooling <pooling>``; ``""`` otherwise.
    """

    STDERR_LINES = 50

    def __init__(
        self,
        binary: str,
        model: str,
        *,
        parallel: int,
        ctx_per_slot: int,
        mmproj: str = "",
        gpu_layers: int = 0,
        threads: int = 0,
        extra_args: list[str] | None = None,
        pooling: str = "",
    ) -> None:
        self.binary = binary
        self.pooling = pooling  # an embedding model: --embeddings --pooling <type>
        self.model = model
        self.mmproj = mmproj
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
        """Reference §8.6 without ``--reasoning-budget 0`` (which turned thinking off): thinking
        is extracted into ``reasoning_content`` and left to the model and the caller."""
        args = [
            self.binary,
            "--model", self.model,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--ctx-size", str(self.ctx_per_slot * self.parallel),
            "--parallel", str(self.parallel),
            "--jinja",
            "--reasoning-format", "deepseek",
            "--metrics",
            "--no-webui",
        ]  # fmt: skip
        if self.mmproj:
            args += ["--mmproj", self.mmproj]
        if self.pooling:
            args += ["--embeddings", "--pooling", self.pooling]
        if self.gpu_layers > 0:
            args += ["--n-gpu-layers", str(self.gpu_layers)]
        if self.threads > 0:
            args += ["--threads", str(self.threads)]
        return args + self.extra_args

    def environment(self) -> dict[str, str]:
        """llama-server's environment: its API key in ``LLAMA_API_KEY`` (argv is public in
        ``ps``), and without the worker's own GPU key, which it has no use for."""
        env = {k: v for k, v in os.environ.items() if k not in ("AUXOT_GPU_KEY", "AUXOT_GPU_KEY_FILE")}
        env["LLAMA_API_KEY"] = self.api_key
        return env

    async def start(self, session: aiohttp.ClientSession, ready_timeout: float) -> None:
        """Start and wait until healthy; retries a port another process took meanwhile.
        Raises :class:`LlamaStartError` quoting llama-server's last lines."""
        outcome = "exited"
        for _ in range(3):
            self.port = free_port()
            self.stderr_tail.clear()
            self.process = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=self.environment(),
                start_new_session=True,  # a Ctrl-C in the terminal reaches the worker, which stops it
                preexec_fn=_die_with_parent(),
            )
            self._stderr_task = asyncio.create_task(self._read_stderr(self.process))
            log.info(
                "llama-server started",
                extra={
                    "pid": self.process.pid,
                    "port": self.port,
                    "parallel": self.parallel,
                    "ctx_per_slot": self.ctx_per_slot,
                },
            )
            outcome = await self._wait_ready(session, ready_timeout)
            if outcome == "ready":
                log.info("llama-server ready", extra={"pid": self.process.pid, "port": self.port})
                return
            if not any("bind" in line.lower() for line in self.stderr_tail):
                break
        what = "exited before becoming ready" if outcome == "exited" else f"was not ready after {ready_timeout:g} s"
        raise LlamaStartError(
            f"llama-server {what} (parallel {self.parallel}, context {self.ctx_per_slot} per slot); its last lines:\n"
            + "\n".join(self.stderr_tail),
            exited=outcome == "exited",
            tail=list(self.stderr_tail),
        )

    async def _wait_ready(self, session: aiohttp.ClientSession, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.api_key}"}
        while time.monotonic() < deadline:
            if self.process is None or self.process.returncode is not None:
                await self._drain_stderr()
                return "exited"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(
                    f"{self.base_url}/health", headers=headers, timeout=aiohttp.ClientTimeout(total=2)
                ) as resp:
                    if resp.status == 200:
                        return "ready"
            await asyncio.sleep(0.1)
        await self.stop()
        return "timeout"

    async def _read_stderr(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.stderr_tail.append(line)
            if any(word in line.lower() for word in ("error", "fatal", "abort", "failed", "out of memory")):
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


async def _no_hook(*_args: Any) -> None:
    return None


class LlamaSupervisor:
    """Keeps one :class:`LlamaServer` serving for the worker's life.

    - :meth:`start`: out of memory at start (llama-server exits) is retried with one slot fewer
      at a time down to 1, then with half the context per slot down to 2048 tokens;
    - :meth:`watch`: a crash is reported (``on_down``: zero slots at the router), then
      llama-server is restarted after 1 s, 2 s, 4 s ... (``config.restart_delay`` doubling, up
      to ``restart_max_delay``); past ``max_restarts`` restarts within ``restart_window`` it
      raises :class:`FatalError` so that a service manager restarts the whole worker;
    - :meth:`reconfigure`: a new model or new settings (``policy_update``): zero slots, running
      jobs get ``shutdown_grace`` to finish, then the restart; a failure goes back to the old.

    After every (re)start ``on_up`` re-announces the slots. Starts, restarts and reconfigures
    never overlap. The hooks are set by the worker.
    """

    def __init__(self, server: LlamaServer, session: aiohttp.ClientSession, config: WorkerConfig) -> None:
        self.server = server
        self.session = session
        self.config = config
        self.up = asyncio.Event()
        self.on_down: Callable[[str], Awaitable[None]] = _no_hook
        self.on_up: Callable[[], Awaitable[None]] = _no_hook
        self.wait_idle: Callable[[float], Awaitable[None]] = _no_hook
        self.restarts: deque[float] = deque()
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # the restart backoff (tests)
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def backend(self) -> LlamaServer:
        return self.server

    async def start(self, parallel: int, ctx_per_slot: int) -> None:
        async with self._lock:
            await self._start_fitting(parallel, ctx_per_slot)

    async def _start_fitting(self, parallel: int, ctx_per_slot: int) -> None:
        steps = dial_down_steps(parallel, ctx_per_slot)
        for i, (slots, ctx) in enumerate(steps):
            self.server.parallel, self.server.ctx_per_slot = slots, ctx
            try:
                await self.server.start(self.session, self.config.ready_timeout)
            except LlamaStartError as exc:
                if not exc.exited or exc.bad_arguments or i + 1 == len(steps):
                    raise
                next_slots, next_ctx = steps[i + 1]
                log.warning(
                    "llama-server failed to start; retrying with less memory",
                    extra={
                        "parallel": slots,
                        "ctx_per_slot": ctx,
                        "next_parallel": next_slots,
                        "next_ctx_per_slot": next_ctx,
                        "last_lines": exc.tail[-5:],
                    },
                )
                continue
            if (slots, ctx) != (parallel, ctx_per_slot):
                log.warning(
                    "llama-server runs with reduced settings to fit in memory",
                    extra={
                        "parallel": slots,
                        "ctx_per_slot": ctx,
                        "asked_parallel": parallel,
                        "asked_ctx_per_slot": ctx_per_slot,
                    },
                )
            self.up.set()
            return

    async def watch(self) -> None:
        """Restart llama-server whenever it exits unasked. Raises :class:`FatalError` past the limit."""
        while not self._closed:
            process = self.server.process
            if process is None:
                return
            await process.wait()
            async with self._lock:
                if self._closed or self.server.process is not process:
                    continue  # an intentional stop (reconfigure, shutdown)
                await self._recover(process.returncode)

    async def _recover(self, code: int | None) -> None:
        log.error(
            "llama-server exited unexpectedly",
            extra={"exit_code": code, "last_lines": list(self.server.stderr_tail)[-20:]},
        )
        self.up.clear()
        await self.on_down("llama-server crashed")
        window = self.config.restart_window
        while True:
            now = time.monotonic()
            while self.restarts and now - self.restarts[0] > window:
                self.restarts.popleft()
            if len(self.restarts) >= self.config.max_restarts:
                raise FatalError(
                    f"llama-server crashed {len(self.restarts) + 1} times within {window / 60:g} minutes "
                    f"(AUXOT_LLAMA_MAX_RESTARTS={self.config.max_restarts}); exiting so that a service manager "
                    "restarts the worker. Its last lines:\n" + "\n".join(list(self.server.stderr_tail)[-20:])
                )
            self.restarts.append(now)
            delay = min(self.config.restart_max_delay, self.config.restart_delay * 2 ** (len(self.restarts) - 1))
            log.warning("restarting llama-server", extra={"restart": len(self.restarts), "delay_s": delay})
            await self.sleep(delay)
            try:
                await self.server.start(self.session, self.config.ready_timeout)
            except LlamaStartError as exc:
                log.error("llama-server restart failed", extra={"error": str(exc)[-2000:]})
                continue
            break
        log.info("llama-server recovered", extra={"restarts_in_window": len(self.restarts)})
        self.up.set()
        await self.on_up()

    async def reconfigure(self, model: ModelFiles, parallel: int, ctx_per_slot: int, pooling: str = "") -> bool:
        """Restart with another model or settings; False when they failed and the old ones run
        again. Raises :class:`LlamaStartError` when even the old ones no longer start."""
        async with self._lock:
            self.up.clear()
            await self.on_down("restarting llama-server for a new policy")
            await self.wait_idle(self.config.shutdown_grace)
            server = self.server
            old = (server.model, server.mmproj, server.parallel, server.ctx_per_slot, server.pooling)
            await server.stop()
            server.model, server.mmproj, server.pooling = str(model.model), str(model.mmproj or ""), pooling
            applied = True
            try:
                await self._start_fitting(parallel, ctx_per_slot)
            except LlamaStartError as exc:
                log.error(
                    "llama-server failed with the new policy; going back to the previous one",
                    extra={"error": str(exc)[-2000:]},
                )
                server.model, server.mmproj, server.pooling = old[0], old[1], old[4]
                await self._start_fitting(old[2], old[3])
                applied = False
            await self.on_up()
            return applied

    async def close(self) -> None:
        self._closed = True
        await self.server.stop()


class AttachedBackend:
    """An OpenAI-compatible server that someone else runs (``--backend-url``): Ollama, vLLM,
    a user-managed llama-server. Nothing is downloaded or spawned; the worker only watches that
    it answers, reporting zero slots while it does not.

    Slots: ``max_parallel`` (``AUXOT_MAX_PARALLEL``), else ``/props`` ``total_slots`` (a
    llama-server), else the policy's. The model name comes from ``/v1/models``.
    """

    def __init__(
        self, url: str, api_key: str, config: WorkerConfig, policy: proto.Policy, session: aiohttp.ClientSession
    ) -> None:
        self.base_url = url
        self.api_key = api_key
        self.config = config
        self.policy = policy
        self.session = session
        self.model_id = ""  # the id /v1/models gives; vLLM and Ollama want it as the request's "model"
        self.up = asyncio.Event()
        self.on_down: Callable[[str], Awaitable[None]] = _no_hook
        self.on_up: Callable[[], Awaitable[None]] = _no_hook
        self.wait_idle: Callable[[float], Awaitable[None]] = _no_hook

    @property
    def backend(self) -> AttachedBackend:
        return self

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        async with self.session.get(
            self.base_url + path, headers=self._headers(), timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            body = await resp.read()
            try:
                return resp.status, orjson.loads(body) if resp.status == 200 else None
            except orjson.JSONDecodeError:
                return resp.status, None

    async def healthy(self) -> bool:
        try:
            status, _ = await self._get("/v1/models")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False
        return status == 200

    async def start(self) -> None:
        """Wait until ``GET /v1/models`` answers 200 (``ready_timeout``)."""
        deadline = time.monotonic() + self.config.ready_timeout
        problem = ""
        while time.monotonic() < deadline:
            try:
                status, _ = await self._get("/v1/models")
                if status == 200:
                    log.info("backend ready", extra={"url": self.base_url})
                    self.up.set()
                    return
                problem = f"HTTP {status}" + (" (wrong --backend-api-key?)" if status in (401, 403) else "")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = str(exc) or type(exc).__name__
            await asyncio.sleep(0.5)
        raise FatalError(
            f"the backend at {self.base_url} did not answer GET /v1/models "
            f"within {self.config.ready_timeout:g} s: {problem}"
        )

    async def discover(self, session: aiohttp.ClientSession) -> proto.Capabilities:
        _, models = await self._get("/v1/models")
        status, props = await self._get("/props")
        data = ((models or {}).get("data") or [{}])[0] if isinstance(models, dict) else {}
        props = props if status == 200 and isinstance(props, dict) else {}
        settings = props.get("default_generation_settings") or {}
        self.model_id = str(data.get("id") or "")
        return proto.Capabilities(
            backend="llama.cpp" if settings else "openai-compatible",
            model=model_display_name(self.model_id or self.policy.model_name),
            # llama-server: n_ctx per slot; vLLM: max_model_len; else the policy's
            ctx_size=int(settings.get("n_ctx") or data.get("max_model_len") or self.policy.context_size),
            parameters=format_parameters((data.get("meta") or {}).get("n_params")),
            total_slots=self.config.max_parallel or int(props.get("total_slots") or 0) or self.policy.max_parallelism,
        )

    async def watch(self) -> None:
        """Poll the backend every heartbeat interval; zero slots while it does not answer."""
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            healthy = await self.healthy()
            if healthy and not self.up.is_set():
                log.info("backend answers again", extra={"url": self.base_url})
                self.up.set()
                await self.on_up()
            elif not healthy and self.up.is_set():
                log.error("backend does not answer", extra={"url": self.base_url})
                self.up.clear()
                await self.on_down("backend unreachable")

    async def close(self) -> None:
        return None


# === Job execution ================================================================================


ENDPOINTS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def llama_request_body(job: proto.Job) -> dict[str, Any]:
    """The body sent to llama-server: the caller's fields, always streamed, usage included."""
    body: dict[str, Any] = dict(job.params)
    if job.kind in ("chat", "tokenize"):
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
    if isinstance(calls, list) and any(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and not c["function"].get("arguments")
        for c in calls
    ):
        message = {
            **message,
            "tool_calls": [
                {**c, "function": {**c["function"], "arguments": c["function"].get("arguments") or "{}"}}
                if isinstance(c, dict) and isinstance(c.get("function"), dict)
                else c
                for c in calls
            ],
        }
    return message


IMAGE_NOTE = "[an image was here; the model serving this conversation cannot see images]"


def has_images(messages: list[dict[str, Any]]) -> bool:
    return any(
        isinstance(part, dict) and part.get("type") in ("image_url", "input_image")
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
    )


def without_images(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = [
        {"type": "text", "text": IMAGE_NOTE}
        if isinstance(p, dict) and p.get("type") in ("image_url", "input_image")
        else p
        for p in content
    ]
    return {**message, "content": parts}


class LlamaHTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class JobResult:
    """What one job accumulated from llama-server's stream.

    Content and reasoning pass through a :class:`TextParser`, which catches ``<think>`` tags and
    XML/JSON tool calls that some chat templates leak into the content.
    """

    parser: TextParser = field(default_factory=TextParser)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    unsent_logprobs: list[dict[str, Any]] = field(default_factory=list)  # text held back by the parser
    sent_any: bool = False  # something of this job reached the router
    progress_sent: bool = False  # the prompt size went out (once, before the first token)
    finish_reason: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    embeddings: list[list[float]] = field(default_factory=list)
    stops: StopMatcher | None = None  # the job's stop strings, matched here (see auxot_common/stopwords.py)

    def merge_tool_deltas(self, deltas: list[dict[str, Any]]) -> None:
        for delta in deltas:
            index = delta.get("index", 0)
            call = self.tool_calls.setdefault(
                index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
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
        finish = self.finish_reason or "stop"
        if calls and finish == "stop":  # calls recovered from the text
            finish = "tool_calls"
        return proto.Complete(
            job_id=job_id,
            full_response=self.parser.content,
            finish_reason=finish,
            duration_ms=duration_ms,
            input_tokens=prompt,
            output_tokens=output,
            cache_tokens=cached,
            prompt_ms=float(timings.get("prompt_ms") or 0.0),
            tool_calls=calls,
            reasoning_content=self.parser.reasoning,
            logprobs={"content": self.logprobs} if self.logprobs else None,
            embeddings=self.embeddings,
            stop_sequence=self.stops.matched if self.stops is not None else "",
        )


class JobRunner:
    """Runs jobs against llama-server and sends their events to the router.

    Parameters:
        session: an HTTP session whose connector opens a fresh connection per request
            (llama-server drops pooled keep-alive connections under load).
        llama: the server to use.
        send: sends one protocol message to the router (raises ConnectionError when gone).
    """

    def __init__(self, session: aiohttp.ClientSession, llama: Backend, send: Any) -> None:
        self._session = session
        self._llama = llama
        self._send = send
        self._vision: bool | None = None  # learnt from /props the first time a job has images
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
        log.info(
            "job started",
            extra={"job_id": job.job_id, "kind": job.kind, "messages": len(job.messages), "tools": len(job.tools)},
        )
        # the router sends the time left, never an absolute time: the two clocks may differ
        timeout = job.timeout_s if job.timeout_s > 0 else None
        result = new_result(job)
        try:
            async with asyncio.timeout(timeout):
                await self._execute(job, result)
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
            # llama-server went away (crashed, restarting): if the caller has seen nothing yet,
            # the router runs the job again on another worker
            retryable = isinstance(exc, aiohttp.ClientError) and not result.sent_any
            error = proto.Error(job_id=job.job_id, error=f"inference failed: {exc}", status=502, retryable=retryable)
            await self._report(error)
            return
        except Exception as exc:  # whatever went wrong, the job ends and its slot is free
            log.exception("job failed unexpectedly", extra={"job_id": job.job_id})
            reason = f"the worker failed on this request: {type(exc).__name__}"
            error = proto.Error(job_id=job.job_id, error=reason, status=500)
            await self._report(error)
            return
        try:
            complete = result.complete(job.job_id, int((time.monotonic() - started) * 1000))
        except (TypeError, ValueError, AttributeError):  # a backend's odd usage numbers: drop them
            log.warning("unreadable usage from the backend", extra={"job_id": job.job_id})
            result.usage, result.timings = {}, {}
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

    async def _execute(self, job: proto.Job, result: JobResult) -> None:
        if job.kind in ("chat", "tokenize") and has_images(job.messages) and not await self._has_vision():
            job.messages = [without_images(m) for m in job.messages]
        if job.kind == "tokenize":
            await self._count_prompt_tokens(job, result)
            return
        if job.kind == "embeddings":
            await self._embed(job, result)
            return
        endpoint = ENDPOINTS.get(job.kind)
        if endpoint is None:
            raise LlamaHTTPError(400, f"unsupported job kind {job.kind!r}")
        url = self._llama.base_url + endpoint
        async with self._session.post(url, data=orjson.dumps(self._body(job)), headers=self._headers()) as resp:
            if resp.status != 200:
                message = llama_error_message(resp.status, await resp.read())
                raise LlamaHTTPError(caller_status(resp.status, message), message)
            await self._relay_stream(job, resp, result)
            await self._finish_text(job, result)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._llama.api_key}", "Content-Type": "application/json"}

    def _body(self, job: proto.Job) -> dict[str, Any]:
        body = llama_request_body(job)
        if job.kind in ENDPOINTS and isinstance(self._llama, LlamaServer) and stop_sequences(body.pop("stop", None)):
            # the worker matches the stop strings itself (to name the one that matched) and
            # closes the stream then, before the final chunk: usage comes with every chunk.
            # Other backends keep their own stop (and their usage); the matcher sees cut text.
            body["timings_per_token"] = True
        if job.stream and job.kind == "chat" and isinstance(self._llama, LlamaServer):
            body["return_progress"] = True  # the prompt size before the first token (Anthropic's message_start)
        model_id = getattr(self._llama, "model_id", "")  # vLLM and Ollama need the model named
        if model_id:
            body["model"] = model_id
        return body

    async def _has_vision(self) -> bool:
        """Whether the backend takes images; a text-only model gets a note in their place, so a
        conversation that once held a screenshot (Claude Code sends its whole history) goes on."""
        if self._vision is None:
            try:
                async with self._session.get(self._llama.base_url + "/props", headers=self._headers()) as resp:
                    props = orjson.loads(await resp.read()) if resp.status == 200 else {}
            except (aiohttp.ClientError, orjson.JSONDecodeError):
                return True  # unknown: let the backend decide
            modalities = props.get("modalities") if isinstance(props, dict) else None
            self._vision = bool(modalities.get("vision", True)) if isinstance(modalities, dict) else True
        return self._vision

    async def _finish_text(self, job: proto.Job, result: JobResult) -> None:
        """Release text the parser held back and adopt tool calls it found in the text."""
        outgoing: list[proto.Message] = []
        if result.stops is not None:  # no stop string matched: what it held back is text
            for kind, text in result.parser.feed(result.stops.flush()):
                add_token(outgoing, job, text, reasoning=kind == REASONING)
        segments, calls = result.parser.finish()
        for kind, text in segments:
            add_token(outgoing, job, text, reasoning=kind == REASONING)
        if result.unsent_logprobs and job.stream:
            attach_logprobs(outgoing, result)
        for message in outgoing:
            await self._send(message)
        if calls and not result.tool_calls:
            result.tool_calls = dict(enumerate(calls))

    async def _count_prompt_tokens(self, job: proto.Job, result: JobResult) -> None:
        """The prompt size exactly as a chat request would have it: rendered with the model's
        chat template (``/apply-template``), then tokenized the way the server tokenizes prompts
        (special tokens added and parsed)."""
        headers = self._headers()
        body = llama_request_body(job)
        for key in ("stream", "stream_options", "max_tokens"):
            body.pop(key, None)
        prompt = await self._post_json("/apply-template", body, headers)
        tokens = await self._post_json(
            "/tokenize", {"content": prompt.get("prompt", ""), "add_special": True, "parse_special": True}, headers
        )
        result.usage = {"prompt_tokens": len(tokens.get("tokens") or [])}
        result.finish_reason = "stop"

    async def _embed(self, job: proto.Job, result: JobResult) -> None:
        """``/v1/embeddings`` of llama-server (started with ``--embeddings``): one float vector
        per input, in input order, and the prompt tokens it counted."""
        body: dict[str, Any] = {"input": job.params.get("input"), "encoding_format": "float"}
        model_id = getattr(self._llama, "model_id", "")
        if model_id:
            body["model"] = model_id
        data = await self._post_json("/v1/embeddings", body, self._headers())
        items = sorted(data.get("data") or [], key=lambda item: int(item.get("index", 0)))
        result.embeddings = [list(item.get("embedding") or []) for item in items]
        result.usage = {"prompt_tokens": int((data.get("usage") or {}).get("prompt_tokens") or 0)}
        result.finish_reason = "stop"

    async def _post_json(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        async with self._session.post(self._llama.base_url + path, data=orjson.dumps(body), headers=headers) as resp:
            raw = await resp.read()
            if resp.status != 200:
                message = llama_error_message(resp.status, raw)
                raise LlamaHTTPError(caller_status(resp.status, message), message)
            data = orjson.loads(raw)
            return data if isinstance(data, dict) else {}

    async def _relay_stream(self, job: proto.Job, resp: aiohttp.ClientResponse, result: JobResult) -> None:
        """Parse SSE; everything that arrived in one read goes to the router in as few frames."""
        buffer = b""
        async for received in resp.content.iter_any():
            lines = (buffer + received if buffer else received).split(b"\n")
            buffer = lines.pop()
            events = [line[6:] for line in lines if line.startswith(b"data: ")]
            if events and await self._handle_events(job, events, result):
                return

    async def _handle_events(self, job: proto.Job, events: list[bytes], result: JobResult) -> bool:
        """Apply a batch of SSE payloads; returns True at ``[DONE]``."""
        outgoing: list[proto.Message] = []
        done = False
        failure: LlamaHTTPError | None = None
        for payload in events:
            if payload.strip() == b"[DONE]":
                done = True
                break
            chunk = orjson.loads(payload)
            if "error" in chunk and not chunk.get("choices"):
                failure = LlamaHTTPError(500, llama_error_message(500, payload))
                break
            text = plain_content(chunk)
            if text is not None and result.stops is None and not result.unsent_logprobs:
                add_content(outgoing, job, result, text)  # the common token: no other field to read
                continue
            apply_chunk(job, chunk, result, outgoing)
            if result.stops is not None and result.stops.matched:
                done = True  # leaving the stream closes it: llama-server stops generating
                break
        if not result.sent_any and any(type(m) is not proto.PromptProgress for m in outgoing):
            result.sent_any = True
        for message in outgoing:  # what came before a failure still reaches the caller
            await self._send(message)
        if failure is not None:
            raise failure
        return done


_PLAIN_CHUNK_KEYS = frozenset({"choices", "created", "id", "model", "system_fingerprint", "object"})


def plain_content(chunk: dict[str, Any]) -> str | None:
    """The text of a chunk that is one choice's ``delta.content`` and nothing else (no usage,
    timings, progress, logprobs, finish reason or other delta field): most chunks of a stream.
    ``None`` for anything else, which :func:`apply_chunk` reads field by field."""
    choices = chunk.get("choices")
    if type(choices) is not list or len(choices) != 1 or not _PLAIN_CHUNK_KEYS.issuperset(chunk):
        return None
    choice = choices[0]
    if type(choice) is not dict or choice.get("finish_reason") is not None or choice.get("logprobs") is not None:
        return None
    delta = choice.get("delta")
    if type(delta) is not dict or len(delta) != 1:
        return None
    text = delta.get("content")
    return text if type(text) is str and text else None


def apply_chunk(job: proto.Job, chunk: dict[str, Any], result: JobResult, outgoing: list[proto.Message]) -> None:
    """Fold one llama-server chunk into the result and the messages to send (merged by kind)."""
    if chunk.get("usage"):
        result.usage = chunk["usage"]
    if chunk.get("timings"):
        result.timings = chunk["timings"]
    progress = chunk.get("prompt_progress")
    if isinstance(progress, dict) and not result.progress_sent and job.stream:
        result.progress_sent = True
        total, cached = progress.get("total"), progress.get("cache")
        if isinstance(total, int) and isinstance(cached, int):
            outgoing.append(proto.PromptProgress(job_id=job.job_id, total=total, cached=cached))
    for choice in chunk.get("choices") or []:
        if result.stops is not None and result.stops.matched:
            break
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
        logprobs = choice.get("logprobs")
        if logprobs and isinstance(logprobs.get("content"), list):
            result.logprobs.extend(logprobs["content"])
            result.unsent_logprobs.extend(logprobs["content"])
        delta = choice.get("delta")
        if delta is None:  # legacy completions carry text instead of a delta
            text = choice.get("text")
            delta = {"content": text} if text else {}
        reasoning, content, calls = delta.get("reasoning_content"), delta.get("content"), delta.get("tool_calls")
        if reasoning:
            for _, text in result.parser.feed(reasoning, reasoning=True):
                add_token(outgoing, job, text, reasoning=True)
        if content and result.stops is not None:
            content, matched = result.stops.feed(content)
            if matched:
                result.finish_reason = "stop"
        if content:
            add_content(outgoing, job, result, content)
        if result.unsent_logprobs and job.stream:
            attach_logprobs(outgoing, result)
        if calls:
            result.merge_tool_deltas(calls)
            if job.stream:
                add_tool_deltas(outgoing, job, calls)


def add_tool_deltas(outgoing: list[proto.Message], job: proto.Job, calls: list[dict[str, Any]]) -> None:
    """Queue tool-call fragments; argument fragments of one call that arrived together become
    one fragment, as OpenAI never repeats an index within a chunk."""
    last = outgoing[-1] if outgoing else None
    if not isinstance(last, proto.ToolCallDelta):
        last = proto.ToolCallDelta(job_id=job.job_id, tool_calls=[])
        outgoing.append(last)
    for call in calls:
        previous = last.tool_calls[-1] if last.tool_calls else None
        function = call.get("function") or {}
        continues = previous is not None and previous.get("index", 0) == call.get("index", 0)
        if continues and previous is not None and set(call) <= {"index", "function"} and set(function) <= {"arguments"}:
            merged = dict(previous.get("function") or {})
            merged["arguments"] = (merged.get("arguments") or "") + (function.get("arguments") or "")
            last.tool_calls[-1] = {**previous, "function": merged}
        elif previous is not None and any(c.get("index", 0) == call.get("index", 0) for c in last.tool_calls):
            last = proto.ToolCallDelta(job_id=job.job_id, tool_calls=[call])  # keep one entry per index per chunk
            outgoing.append(last)
        else:
            last.tool_calls.append(call)


def attach_logprobs(outgoing: list[proto.Message], result: JobResult) -> None:
    """Logprobs ride on the content they describe; while the parser holds text back they wait."""
    for message in reversed(outgoing):
        if isinstance(message, proto.Token) and not message.reasoning:
            message.logprobs = message.logprobs + result.unsent_logprobs
            result.unsent_logprobs = []
            return


def new_result(job: proto.Job) -> JobResult:
    """Chat output is checked for leaked ``<think>`` tags and tool calls; legacy completions are
    raw text and pass through as they are."""
    stops = stop_sequences(job.params.get("stop")) if job.kind in ENDPOINTS else []
    matcher = StopMatcher(stops) if stops else None
    if job.kind == "completion":
        return JobResult(parser=TextParser(extract_tools=False, split_think=False), stops=matcher)
    # with tool_choice "none" the caller wants no calls, whatever the model writes
    return JobResult(
        parser=TextParser(job.tools, extract_tools=bool(job.tools) and job.params.get("tool_choice") != "none"),
        stops=matcher,
    )


def add_content(outgoing: list[proto.Message], job: proto.Job, result: JobResult, content: str) -> None:
    """``delta.content`` through the parser (leaked think tags and tool calls), then queued."""
    for kind, text in result.parser.feed(content):
        add_token(outgoing, job, text, reasoning=kind == REASONING)


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

    ``caps`` is what the worker serves now (sent in the hello and in every ``config``);
    ``backend_up`` is clear while llama-server is down, when the router is told zero slots and
    no new connection is made; ``on_policy_update`` receives the router's ``policy_update``.
    """

    def __init__(self, config: WorkerConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.draining = False
        self.gpu_id = ""
        self.caps = proto.Capabilities()
        self.backend_up = asyncio.Event()
        self.on_policy_update: Callable[[proto.Policy], None] = lambda _policy: None
        self.runner: JobRunner | None = None
        self.max_message_bytes = 64 * 1024 * 1024  # until the router's policy says
        self.batcher: FrameBatcher | None = None  # when the router reads batch frames

    async def fetch_policy(self, caps: proto.Capabilities) -> proto.Policy:
        """Phase 1: a policy-only hello (never given jobs) carrying the GPU report, retried with backoff."""
        delay = self.config.reconnect_delay
        while True:
            try:
                ws, ack = await self._connect(caps, policy_only=True)
                await ws.close()
                if ack.policy is None:
                    raise FatalError("the router sent no policy")
                policy = ack.policy
                log.info("policy received", extra=policy_fields(policy))
                return policy
            except (aiohttp.ClientError, TimeoutError, ConnectionError, proto.ProtocolError) as exc:
                wait = max(delay, getattr(exc, "retry_after", 0.0))
                log.warning(
                    "cannot reach the router",
                    extra={"url": self.config.router_url, "error": str(exc), "retry_in_s": round(wait, 2)},
                )
                await asyncio.sleep(wait)
                delay = next_delay(delay, self.config.reconnect_max_delay)

    async def _connect(
        self, caps: proto.Capabilities, *, policy_only: bool
    ) -> tuple[aiohttp.ClientWebSocketResponse, proto.HelloAck]:
        ws = await self.session.ws_connect(
            self.config.router_url,
            heartbeat=self.config.heartbeat_interval,
            max_msg_size=self.max_message_bytes,
            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            # verified before the socket is accepted: only then may this worker send large frames
            headers={"Authorization": f"Bearer {self.config.gpu_key}"},
        )
        try:
            hello = proto.Hello(
                gpu_key=self.config.gpu_key, capabilities=caps, policy_only=policy_only, model=self.config.model
            )
            await ws.send_frame(proto.encode(hello), aiohttp.WSMsgType.TEXT)
            msg = await ws.receive(timeout=30.0)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"the router closed the connection during the handshake ({msg.type.name})")
            ack = proto.decode(msg.data)
            if not isinstance(ack, proto.HelloAck):
                raise proto.ProtocolError(f"expected hello_ack, got {ack.type}")
            if not ack.success and ack.retryable:
                raise RefusedForNow(f"the router refused this worker for now: {ack.error}", ack.retry_after)
            if not ack.success:
                raise FatalError(f"the router rejected this worker: {ack.error or 'authentication failed'}")
            if ack.policy is not None and ack.policy.max_message_bytes > 0:
                self.max_message_bytes = ack.policy.max_message_bytes  # jobs as large as the router sends
        except BaseException:
            await ws.close()
            raise
        self.gpu_id = ack.gpu_id
        self.batcher = None
        if ack.batch:  # batches stay well inside the router's frame limit (AUXOT_MAX_WS_MESSAGE_BYTES)
            frame_bytes = min(DEFAULT_MAX_FRAME_BYTES, max(self.max_message_bytes // 2, 16 * 1024))
            self.batcher = FrameBatcher(partial(ws.send_frame, opcode=aiohttp.WSMsgType.TEXT), frame_bytes)
        return ws, ack

    async def serve(
        self, runner_factory: Callable[[Callable[[proto.Message], Awaitable[None]]], JobRunner], stop: asyncio.Event
    ) -> None:
        """Phase 2: hold the permanent connection, reconnecting with jittered backoff; no
        connection is made while the backend is down."""
        delay = self.config.reconnect_delay
        while not stop.is_set():
            if not self.backend_up.is_set():
                await first_of(self.backend_up.wait(), stop.wait())
                continue
            try:
                ws, _ = await self._connect(self.caps, policy_only=False)
            except (aiohttp.ClientError, TimeoutError, ConnectionError, proto.ProtocolError) as exc:
                wait = max(delay, getattr(exc, "retry_after", 0.0))
                log.warning("cannot reach the router", extra={"error": str(exc), "retry_in_s": round(wait, 2)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
                delay = next_delay(delay, self.config.reconnect_max_delay)
                continue
            delay = self.config.reconnect_delay
            log.info(
                "worker ready", extra={"gpu_id": self.gpu_id, "model": self.caps.model, "slots": self.caps.total_slots}
            )
            await self._session_loop(ws, runner_factory(self.send), stop)

    async def _session_loop(self, ws: aiohttp.ClientWebSocketResponse, runner: JobRunner, stop: asyncio.Event) -> None:
        self.ws = ws
        self.runner = runner
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send(proto.Config(capabilities=self._current_caps()))
        heartbeats = asyncio.create_task(self._heartbeats())
        stopper = asyncio.create_task(self._drain_on(stop, runner))
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                self._on_message(msg.data, runner)
        except (aiohttp.ClientError, ConnectionError) as exc:
            # e.g. a process paused (SIGSTOP, a VM freeze) wakes to a socket the router closed:
            # aiohttp's answer to a queued ping fails. A lost connection, not a reason to exit.
            log.warning("the connection to the router broke", extra={"error": str(exc) or type(exc).__name__})
        finally:
            heartbeats.cancel()
            stopper.cancel()
            runner.cancel_all()  # the router re-runs or fails them; results could not be delivered now
            self.ws = None
            self.runner = None
            sent = {"frames": self.batcher.frames, "messages": self.batcher.messages} if self.batcher else {}
            log.warning("disconnected from the router", extra={"close_code": ws.close_code, **sent})

    def _current_caps(self) -> proto.Capabilities:
        """``caps``, or zero slots (``draining``) while the backend is down."""
        if self.backend_up.is_set():
            return self.caps
        return dataclasses.replace(self.caps, total_slots=0, draining=True)

    async def announce(self, caps: proto.Capabilities) -> None:
        """The backend serves (again), maybe with other slots or context: tell the router."""
        self.caps = caps
        self.backend_up.set()
        log.info("announcing slots", extra={"model": caps.model, "slots": caps.total_slots, "ctx_size": caps.ctx_size})
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send(proto.Config(capabilities=caps))

    async def announce_down(self) -> None:
        """The backend is down: zero slots at the router until :meth:`announce`."""
        self.backend_up.clear()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send(proto.Config(capabilities=self._current_caps()))

    def active_jobs(self) -> int:
        return len(self.runner.tasks) if self.runner is not None else 0

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
        elif isinstance(message, proto.PolicyUpdate):
            self.on_policy_update(message.policy)
        elif isinstance(message, proto.ConfigAck) and not message.success:
            log.error("the router refused this worker's configuration", extra={"error": message.error})
        elif not isinstance(message, proto.HeartbeatAck | proto.ConfigAck):
            log.warning("unexpected message from the router", extra={"type": message.type})

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            with contextlib.suppress(ConnectionError, RuntimeError):
                # the jobs running here: the router gives up on one it sent that is not listed
                await self.send(proto.Heartbeat(jobs=sorted(self.runner.tasks) if self.runner is not None else []))

    async def _drain_on(self, stop: asyncio.Event, runner: JobRunner) -> None:
        """On shutdown: take no new jobs, give running ones the grace period, then close."""
        await stop.wait()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send(proto.Config(capabilities=dataclasses.replace(self.caps, draining=True)))
        deadline = time.monotonic() + self.config.shutdown_grace
        while runner.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.ws is not None:
            await self.ws.close()

    async def send(self, message: proto.Message) -> None:
        ws = self.ws
        if ws is None or ws.closed:
            raise ConnectionError("not connected to the router")
        if self.batcher is not None:  # what other jobs send in this loop turn shares the frame
            await self.batcher.send(proto.encode(message))
        else:
            await ws.send_frame(proto.encode(message), aiohttp.WSMsgType.TEXT)


def pooling_of(policy: proto.Policy) -> str:
    """llama-server's ``--pooling`` for an embedding model's policy, ``""`` for a generative one."""
    return (policy.pooling or "mean") if policy.embedding else ""


def policy_fields(policy: proto.Policy) -> dict[str, Any]:
    """A policy's log fields."""
    return {
        "model": policy.model_name,
        "quantization": policy.quantization,
        "repo": policy.huggingface_id,
        "files": policy.files,
        "ctx_per_slot": policy.context_size,
        "parallel": policy.max_parallelism,
    }


def next_delay(delay: float, cap: float) -> float:
    """Doubling backoff with ±25% jitter, so many workers reconnecting at once spread out."""
    return min(cap, delay * 2 * random.uniform(0.75, 1.25))


async def first_of(*aws: Coroutine[Any, Any, Any]) -> None:
    """Wait until the first of ``aws`` finishes; the others are cancelled."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


# === Lifecycle and command line ===================================================================


Supervisor = LlamaSupervisor | AttachedBackend


class Worker:
    """One worker's life: GPU report, policy, provisioning, serving, updates, shutdown.

    Parameters:
        config: the worker's configuration.
        ws_session: the router's WebSocket session.
        llama_session: for llama-server (a fresh connection per request).
        stop: set by SIGTERM/SIGINT.
    """

    def __init__(
        self,
        config: WorkerConfig,
        ws_session: aiohttp.ClientSession,
        llama_session: aiohttp.ClientSession,
        stop: asyncio.Event,
    ) -> None:
        self.config = config
        self.llama_session = llama_session
        self.stop = stop
        self.link = RouterLink(config, ws_session)
        self.link.on_policy_update = self._policy_update_received
        self.gpu = GpuInfo("cpu")
        self.policy = proto.Policy(model_name="")
        self.model: ModelFiles | None = None
        self.requested = (0, 0)  # (parallel, context per slot) asked of llama-server
        self.supervisor: Supervisor | None = None
        self._failure: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._updates: set[asyncio.Task[None]] = set()
        self._update_lock = asyncio.Lock()

    async def run(self) -> int:
        """0 after a shutdown signal; raises :class:`FatalError` (or a provisioning error)."""
        try:
            return await self._run()
        finally:
            for task in list(self._updates):
                task.cancel()
            if self.supervisor is not None:
                await self.supervisor.close()

    async def _run(self) -> int:
        log.info("auxot-worker starting", extra={"version": VERSION, "router": self.config.router_url})
        self.gpu = await detect_gpus()
        if self.gpu.warning:
            log.warning(self.gpu.warning)
        hardware = proto.Capabilities(gpus=self.gpu.to_dicts(), vram_gb=vram_report_gb(self.gpu))
        policy = await self._unless_stopped(self.link.fetch_policy(hardware))
        if policy is None:
            return 0
        self.policy = policy
        supervisor = await self._unless_stopped(self._provide(policy))
        if supervisor is None:
            return 0
        supervisor.on_down = self._on_down
        supervisor.on_up = self._on_up
        supervisor.wait_idle = self._wait_idle
        await self._on_up()
        backend: Backend = supervisor.backend
        runner_backend: Any = backend  # JobRunner's annotation names LlamaServer; it uses base_url and api_key
        serve = asyncio.create_task(
            self.link.serve(lambda send: JobRunner(self.llama_session, runner_backend, send), self.stop)
        )
        watch = asyncio.create_task(supervisor.watch())
        stopped = asyncio.create_task(self.stop.wait())
        waiting: list[asyncio.Future[Any]] = [serve, watch, stopped, self._failure]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        failure = self._failure.result() if self._failure.done() else None
        if failure is None and watch.done() and not watch.cancelled():
            failure = watch.exception()
        self.stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(serve), self.config.shutdown_grace + 10)
        except TimeoutError:
            serve.cancel()
        finally:
            watch.cancel()
            stopped.cancel()
        if failure is not None:
            raise failure
        error = serve.exception() if serve.done() and not serve.cancelled() else None
        if error is not None:
            raise error
        log.info("shutting down")
        return 0

    async def _unless_stopped(self, aw: Coroutine[Any, Any, _T]) -> _T | None:
        """``aw``'s result, or None when a shutdown signal comes first (``aw`` is cancelled:
        a download keeps its ``.partial`` file and resumes at the next start)."""
        task = asyncio.ensure_future(aw)
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("shutting down before serving")
        return None

    async def _provide(self, policy: proto.Policy) -> Supervisor:
        """The backend for ``policy``: attached, or llama-server with its binary and model."""
        config = self.config
        parallel = config.max_parallel or policy.max_parallelism
        if config.backend_url:
            attached = AttachedBackend(config.backend_url, config.backend_api_key, config, policy, self.llama_session)
            self.supervisor = attached
            log.info("using an existing backend", extra={"url": config.backend_url})
            await attached.start()
            return attached
        async with aiohttp.ClientSession() as downloads:
            binary = await provide_binary(
                downloads,
                explicit_path=config.llama_server_path,
                cache_dir=Path(config.llama_cache_dir).expanduser(),
                gpu=self.gpu,
                asset_base_url=config.llama_asset_url,
            )
            self.model = await self._provide_model(downloads, policy)
        gpu_layers = config.gpu_layers if config.gpu_layers is not None else gpu_layers_for(self.gpu)
        server = LlamaServer(
            str(binary),
            str(self.model.model),
            mmproj=str(self.model.mmproj or ""),
            parallel=parallel,
            ctx_per_slot=policy.context_size,
            gpu_layers=gpu_layers,
            threads=config.threads,
            # prompt caching flags first: AUXOT_LLAMA_ARGS comes later and wins
            extra_args=llama_cache_args(config.cache_ram_mib, host_ram_bytes()) + config.extra_llama_args,
            pooling=pooling_of(policy),
        )
        supervisor = LlamaSupervisor(server, self.llama_session, config)
        self.supervisor = supervisor
        self.requested = (parallel, policy.context_size)
        await supervisor.start(parallel, policy.context_size)
        return supervisor

    async def _provide_model(self, session: aiohttp.ClientSession, policy: proto.Policy) -> ModelFiles:
        return await provide_model(
            session,
            policy,
            model_path=self.config.model_path,
            mmproj_path=self.config.mmproj_path,
            models_dir=Path(self.config.models_dir).expanduser(),
            environ=self.config.environ,
        )

    async def _discover(self) -> proto.Capabilities:
        """What the backend serves now, with this machine's GPU report."""
        assert self.supervisor is not None
        backend = self.supervisor.backend
        try:
            caps = await backend.discover(self.llama_session)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("backend discovery failed; announcing the settings asked for", extra={"error": str(exc)})
            caps = dataclasses.replace(self.link.caps, total_slots=self.requested[0] or 1, ctx_size=self.requested[1])
        caps.model_capabilities = list(self.policy.capabilities)
        caps.policy_model = self.policy.model_name
        caps.gpus = self.gpu.to_dicts()
        caps.vram_gb = vram_report_gb(self.gpu)
        return caps

    async def _on_down(self, reason: str) -> None:
        log.warning("reporting zero slots to the router", extra={"reason": reason})
        await self.link.announce_down()

    async def _on_up(self) -> None:
        caps = await self._discover()
        log.info(
            "capabilities",
            extra={"model": caps.model, "ctx_size": caps.ctx_size, "slots": caps.total_slots, "backend": caps.backend},
        )
        await self.link.announce(caps)

    async def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.link.active_jobs() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _policy_update_received(self, policy: proto.Policy) -> None:
        task = asyncio.create_task(self.apply_policy(policy))
        self._updates.add(task)
        task.add_done_callback(self._update_done)

    def _update_done(self, task: asyncio.Task[None]) -> None:
        self._updates.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("policy update failed", extra={"error": str(error)})
        if not self._failure.done() and error is not None:
            self._failure.set_result(error)

    async def apply_policy(self, policy: proto.Policy) -> None:
        """A ``policy_update``: another model is downloaded while the old one serves, then
        llama-server restarts with it; other context or slots only restart it; the same
        policy does nothing. A failed download keeps the old model serving."""
        async with self._update_lock:
            change = policy_change(self.policy, policy)
            log.info("policy update", extra={"change": change or "none", **policy_fields(policy)})
            supervisor = self.supervisor
            if change is None or supervisor is None:
                self.policy = policy
                return
            if not isinstance(supervisor, LlamaSupervisor):
                log.warning("policy update not applied: the backend is managed elsewhere (--backend-url)")
                self.policy = policy
                return
            model = self.model
            if change == "model":
                if self.config.model_path:
                    log.warning(
                        "the router asks for another model, but --model-path pins this one; "
                        "applying context and slots only"
                    )
                    # keep naming the model it runs, so the router sees the move refused
                    policy = dataclasses.replace(policy, model_name=self.policy.model_name)
                else:
                    try:
                        async with aiohttp.ClientSession() as downloads:
                            model = await self._provide_model(downloads, policy)
                    except (DownloadError, ProvisionError) as exc:
                        log.error("cannot download the new model; still serving the old one", extra={"error": str(exc)})
                        return
            assert model is not None
            requested = (self.config.max_parallel or policy.max_parallelism, policy.context_size)
            old_policy, self.policy = self.policy, policy
            if model == self.model and requested == self.requested and pooling_of(policy) == pooling_of(old_policy):
                if change == "model":
                    await self._on_up()  # tell the router which model runs now (the same file)
                return
            if await supervisor.reconfigure(model, *requested, pooling=pooling_of(policy)):
                self.model, self.requested = model, requested
            else:
                self.policy = old_policy
                await self._on_up()  # the capabilities of the old policy again


USAGE = """usage: AUXOT_GPU_KEY=adm_... python auxot_worker.py [--router-url ws://HOST:8080/ws] [options]
       python auxot_worker.py --gpu-key-file FILE [--router-url ws://HOST:8080/ws] [options]

The worker provisions itself: it reports its GPUs, asks the router what to serve, downloads the
llama-server build for this GPU and the model (both cached, downloads resume), starts llama-server
and serves jobs. A crashed llama-server is restarted; an update of the router's policy is applied.

options (environment variable in brackets):
  --gpu-key-file FILE        a file holding the GPU key from `auxot_router.py setup` [AUXOT_GPU_KEY_FILE]
  --gpu-key KEY              the key itself [AUXOT_GPU_KEY]; prefer the variable or a file: a
                             command line is visible to every user in `ps`
  --router-url URL           ws://HOST:8080/ws (http://, https:// and a bare host work too) [AUXOT_ROUTER_URL]
  --model NAME               serve this one of the router's models (name, id or alias) and never be
                             moved to another; without it the router assigns one [AUXOT_WORKER_MODEL]
  --model-path FILE          serve this GGUF (the first shard of a split model) instead of
                             downloading the router's model [AUXOT_MODEL_FILE]
  --mmproj-path FILE         the vision projector for --model-path [AUXOT_MMPROJ_FILE]
  --llama-server-path FILE   use this llama-server instead of the release build [AUXOT_LLAMA_BINARY]
  --backend-url URL          serve with an OpenAI-compatible server that already runs (Ollama, vLLM,
                             your own llama-server): no download, no llama-server of ours
                             [AUXOT_BACKEND_URL, or AUXOT_LLAMA_URL]
  --backend-api-key KEY      that server's API key, if it wants one [AUXOT_BACKEND_API_KEY]
  help, --help, -h           this text
  version                    the version

downloads:
  AUXOT_DATA_DIR             where models and llama-server builds go: /runpod-volume/auxot or
                             /workspace/auxot when that volume exists (RunPod, Vast.ai), else ~/.auxot
  AUXOT_MODELS_DIR           model cache, files land in <dir>/<org>_<repo>/ (<data dir>/models)
  AUXOT_LLAMA_CACHE_DIR      llama-server builds (<data dir>/llama-server)
  AUXOT_LLAMA_ASSET_URL      a mirror of the llama.cpp releases laid out as <url>/<tag>/<asset>
                             (https://github.com/ggml-org/llama.cpp/releases/download)
  HF_ENDPOINT, HF_TOKEN      a Hugging Face mirror, and the token for gated models
                             (also HUGGING_FACE_HUB_TOKEN or the file `huggingface-cli login` writes)
llama-server:
  AUXOT_GPU_LAYERS           --n-gpu-layers (every layer with a GPU, 0 without)
  AUXOT_THREADS              --threads (0 = llama-server's default)
  AUXOT_MAX_PARALLEL         slots (the policy's); fewer if memory is short, then less context per slot
  AUXOT_LLAMA_ARGS           extra llama-server flags, space-separated
  AUXOT_CACHE_RAM_MIB        llama-server's host-RAM prompt cache (--cache-ram; a quarter of RAM)
  AUXOT_READY_TIMEOUT        how long llama-server may take to load the model (10m)
  AUXOT_LLAMA_MAX_RESTARTS   crash restarts allowed within 10 minutes before the worker exits 1 (5)
  AUXOT_LLAMA_RESTART_DELAY  first restart delay, doubling up to 30s (1s)
router connection:
  AUXOT_HEARTBEAT_INTERVAL (10s), AUXOT_RECONNECT_DELAY (2s), AUXOT_RECONNECT_MAX_DELAY (60s),
  AUXOT_SHUTDOWN_GRACE (30s: running jobs may finish after SIGTERM), AUXOT_LOG_LEVEL (info)
A .env file in the working directory is read too; flags win over the environment, which wins over .env.
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
        return await Worker(config, ws_session, llama_session, stop).run()


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
        return eventloop.run(run(config))
    except (FatalError, RuntimeError) as exc:  # provisioning errors (downloads, binary, llama-server) included
        log.error("fatal", extra={"error": str(exc)})
        print(f"auxot-worker: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
