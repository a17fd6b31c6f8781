"""The worker's llama-server supervision, in process, with the fake llama-server (fast to start).

Crash restarts with backoff and a limit, out-of-memory dial-down, policy updates (new settings,
a new model downloaded from a fake Hugging Face while the old one serves), the attached
backend, and the settings and help text behind them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

import auxot_worker as worker
from auxot_common import protocol as proto
from auxot_common.datadir import data_dir
from auxot_common.gpu import GpuDevice, GpuInfo
from auxot_common.provision import ModelFiles, dial_down_steps, policy_change, vram_report_gb
from auxot_common.settings import ConfigError
from tests.fake_hf import FakeHF
from tests.support.procs import FAKE_LLAMA

# --- pure rules -------------------------------------------------------------------------------


def test_dial_down_lowers_slots_first_then_halves_context_to_the_floor() -> None:
    assert dial_down_steps(3, 16384) == [(3, 16384), (2, 16384), (1, 16384), (1, 8192), (1, 4096), (1, 2048)]
    assert dial_down_steps(2, 1024) == [(2, 1024), (1, 1024)]  # already below the floor: slots only
    assert dial_down_steps(1, 5000) == [(1, 5000), (1, 2500)]


def test_policy_change_kinds() -> None:
    base = proto.Policy(
        model_name="M", quantization="Q4_K_S", context_size=4096, max_parallelism=2,
        huggingface_id="org/M-GGUF", files=["M-Q4_K_S.gguf"],
    )  # fmt: skip
    assert policy_change(base, proto.Policy(**{**base.to_dict()})) is None
    assert policy_change(base, proto.Policy(**{**base.to_dict(), "capabilities": ["chat", "code"]})) is None
    assert (
        policy_change(base, proto.Policy(**{**base.to_dict(), "quantization": "Q8_0", "files": ["M-Q8_0.gguf"]}))
        == "model"
    )
    assert policy_change(base, proto.Policy(**{**base.to_dict(), "mmproj_file": "mmproj-F16.gguf"})) == "model"
    assert policy_change(base, proto.Policy(**{**base.to_dict(), "context_size": 8192})) == "settings"
    assert policy_change(base, proto.Policy(**{**base.to_dict(), "max_parallelism": 4})) == "settings"


def test_vram_report_prefers_free_memory_in_gb() -> None:
    h100 = GpuInfo("cuda", [GpuDevice("H100", 81559, 81003, 0), GpuDevice("H100", 81559, 80741, 1)])
    assert vram_report_gb(h100) == 169.6  # free MiB of both, in 10^9 bytes
    assert vram_report_gb(GpuInfo("vulkan", [GpuDevice("Arc", 16384, 0, 0)])) == 17.2  # free unknown: total
    assert vram_report_gb(GpuInfo("cpu")) == 0.0


def test_backend_url_is_normalised() -> None:
    assert worker.normalise_backend_url("http://127.0.0.1:11434/v1/") == "http://127.0.0.1:11434"
    assert worker.normalise_backend_url("localhost:8000") == "http://localhost:8000"
    assert worker.normalise_backend_url("https://gpu.example/vllm/v1") == "https://gpu.example/vllm"
    with pytest.raises(ConfigError):
        worker.normalise_backend_url("ftp://x")


def test_config_defaults_and_overrides() -> None:
    config = worker.WorkerConfig.from_sources({"AUXOT_GPU_KEY": "adm_x"}, {})
    assert config.gpu_layers is None  # decided by GPU detection
    data = data_dir({"AUXOT_GPU_KEY": "adm_x"})  # ~/.auxot, or a GPU cloud's volume (auxot_common/datadir.py)
    assert (config.models_dir, config.llama_cache_dir) == (str(data / "models"), str(data / "llama-server"))
    assert (config.max_restarts, config.restart_delay, config.backend_url) == (5, 1.0, "")
    env = {
        "AUXOT_GPU_KEY": "adm_x", "AUXOT_GPU_LAYERS": "0", "AUXOT_LLAMA_URL": "127.0.0.1:9/v1",
        "AUXOT_LLAMA_MAX_RESTARTS": "2", "AUXOT_LLAMA_RESTART_DELAY": "250ms", "HF_ENDPOINT": "http://mirror",
    }  # fmt: skip
    config = worker.WorkerConfig.from_sources(worker.parse_flags(["--backend-api-key", "k"]), env)
    assert config.gpu_layers == 0
    assert (config.backend_url, config.backend_api_key) == ("http://127.0.0.1:9", "k")
    assert (config.max_restarts, config.restart_delay) == (2, 0.25)
    assert config.environ["HF_ENDPOINT"] == "http://mirror"


def test_help_lists_every_flag_and_setting() -> None:
    import inspect

    source = inspect.getsource(worker.WorkerConfig.from_sources)
    names = {part.split('"')[0] for part in source.split('"AUXOT_')[1:]}
    assert names, "no settings found"
    for name in names:
        assert f"AUXOT_{name}" in worker.USAGE, name
    for flag in worker.FLAG_TO_ENV:
        assert flag in worker.USAGE, flag
    for variable in ("HF_ENDPOINT", "HF_TOKEN"):
        assert variable in worker.USAGE


def test_llama_server_command_line() -> None:
    server = worker.LlamaServer(
        "llama-server", "/m/model.gguf", parallel=3, ctx_per_slot=4096, mmproj="/m/mmproj.gguf", gpu_layers=9999
    )
    args = server.command()
    assert args[args.index("--ctx-size") + 1] == "12288"
    assert args[args.index("--parallel") + 1] == "3"
    assert args[args.index("--reasoning-format") + 1] == "deepseek"
    assert args[args.index("--mmproj") + 1] == "/m/mmproj.gguf"
    assert args[args.index("--n-gpu-layers") + 1] == "9999"
    assert "--reasoning-budget" not in args  # Go's HEAD passed 0, which turned thinking off
    plain = worker.LlamaServer("llama-server", "/m/model.gguf", parallel=1, ctx_per_slot=1024).command()
    assert "--mmproj" not in plain and "--n-gpu-layers" not in plain


# --- supervision with the fake llama-server -----------------------------------------------------


def config(**overrides: object) -> worker.WorkerConfig:
    base = worker.WorkerConfig(gpu_key="adm_x", ready_timeout=20.0, restart_delay=0.05, shutdown_grace=2.0)
    for key, value in overrides.items():
        setattr(base, key, value)
    return base


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "first.gguf"
    path.write_bytes(b"GGUF fake")
    return path


def fake_binary(tmp_path: Path, condition: str = "true", name: str = "llama-server") -> Path:
    """A llama-server stand-in: the fake llama-server when the shell ``condition`` on its
    arguments (``$args``: them all, space-separated and padded) holds, else an out-of-memory
    exit like llama.cpp's."""
    script = tmp_path / name
    script.write_text(
        "#!/bin/sh\n"
        f'args=" $* "\nif {condition}; then exec "{sys.executable}" "{FAKE_LLAMA}" "$@"; fi\n'
        "echo 'ggml_backend_cuda_buffer_type_alloc_buffer: allocating 9216.00 MiB on device 0: "
        "cudaMalloc failed: out of memory' >&2\n"
        "echo 'llama_init_from_model: failed to initialize the context' >&2\nexit 1\n"
    )
    script.chmod(0o755)
    return script


class Events:
    """Records the supervisor's hooks."""

    def __init__(self) -> None:
        self.log: list[str] = []

    async def down(self, reason: str) -> None:
        self.log.append(f"down: {reason}")

    async def up(self) -> None:
        self.log.append("up")


def supervised(
    binary: Path, model: Path, session: aiohttp.ClientSession, cfg: worker.WorkerConfig, events: Events
) -> worker.LlamaSupervisor:
    server = worker.LlamaServer(str(binary), str(model), parallel=2, ctx_per_slot=1024)
    sup = worker.LlamaSupervisor(server, session, cfg)
    sup.on_down, sup.on_up = events.down, events.up
    return sup


async def props(session: aiohttp.ClientSession, server: worker.LlamaServer) -> proto.Capabilities:
    return await server.discover(session)


async def test_crash_is_reported_and_restarted(tmp_path: Path, model: Path, session: aiohttp.ClientSession) -> None:
    events = Events()
    sup = supervised(fake_binary(tmp_path), model, session, config(), events)
    await sup.start(2, 1024)
    watch = asyncio.create_task(sup.watch())
    try:
        first = sup.server.process
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        async with asyncio.timeout(15):
            while events.log != ["down: llama-server crashed", "up"]:
                await asyncio.sleep(0.02)
        assert sup.server.process is not first and sup.server.process.returncode is None
        caps = await props(session, sup.server)
        assert (caps.total_slots, caps.ctx_size) == (2, 1024)  # the same settings again
        assert len(sup.restarts) == 1
    finally:
        watch.cancel()
        await sup.close()


async def test_too_many_crashes_give_up(tmp_path: Path, model: Path, session: aiohttp.ClientSession) -> None:
    events = Events()
    sup = supervised(fake_binary(tmp_path), model, session, config(max_restarts=1), events)
    await sup.start(2, 1024)
    watch = asyncio.create_task(sup.watch())
    try:
        for expected in (
            ["down: llama-server crashed", "up"],
            ["down: llama-server crashed", "up", "down: llama-server crashed"],
        ):
            process = sup.server.process
            assert process is not None
            os.kill(process.pid, signal.SIGKILL)
            async with asyncio.timeout(15):
                while events.log != expected:
                    await asyncio.sleep(0.02)
        async with asyncio.timeout(5):
            with pytest.raises(worker.FatalError, match="crashed 2 times within 10 minutes"):
                await watch
    finally:
        watch.cancel()
        await sup.close()


async def test_restart_backoff_doubles(tmp_path: Path, model: Path, session: aiohttp.ClientSession) -> None:
    """A llama-server that keeps dying at start: 1x, 2x, 4x the first delay, then give up."""
    slept: list[float] = []

    async def record(delay: float) -> None:
        slept.append(delay)

    sup = supervised(fake_binary(tmp_path), model, session, config(restart_delay=1.0, max_restarts=3), Events())
    sup.sleep = record
    await sup.start(2, 1024)
    sup.server.binary = str(fake_binary(tmp_path, "false", "broken-llama-server"))  # every restart now fails
    process = sup.server.process
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)
    try:
        with pytest.raises(worker.FatalError, match="AUXOT_LLAMA_MAX_RESTARTS=3"):
            await asyncio.wait_for(sup.watch(), 30)
    finally:
        await sup.close()
    assert slept == [1.0, 2.0, 4.0]


async def test_out_of_memory_dials_down(tmp_path: Path, model: Path, session: aiohttp.ClientSession) -> None:
    """Fails unless one slot and at most 4096 tokens of context: 3x16384 → 1x4096."""
    binary = fake_binary(tmp_path, 'case "$args" in *" --ctx-size 4096 --parallel 1 "*) true;; *) false;; esac')
    sup = supervised(binary, model, session, config(), Events())
    try:
        await sup.start(3, 16384)
        caps = await props(session, sup.server)
        assert (caps.total_slots, caps.ctx_size) == (1, 4096)
    finally:
        await sup.close()


async def test_start_failure_quotes_llama_server(tmp_path: Path, model: Path, session: aiohttp.ClientSession) -> None:
    sup = supervised(fake_binary(tmp_path, "false"), model, session, config(), Events())
    with pytest.raises(worker.LlamaStartError, match="out of memory") as info:
        await sup.start(2, 4096)
    assert "parallel 1, context 2048 per slot" in str(info.value)  # every step was tried


# --- policy updates ------------------------------------------------------------------------------


@pytest.fixture
async def fake_hf() -> AsyncIterator[FakeHF]:
    async with FakeHF() as hf:
        yield hf


async def running_worker(
    tmp_path: Path, model: Path, session: aiohttp.ClientSession, policy: proto.Policy, **overrides: object
) -> worker.Worker:
    """A Worker past provisioning (as after its start), not connected to any router."""
    cfg = config(models_dir=str(tmp_path / "models"), **overrides)
    w = worker.Worker(cfg, session, session, asyncio.Event())
    w.policy, w.model = policy, ModelFiles(model)
    sup = supervised(fake_binary(tmp_path), model, session, cfg, Events())
    sup.on_down, sup.on_up, sup.wait_idle = w._on_down, w._on_up, w._wait_idle
    w.supervisor, w.requested = sup, (policy.max_parallelism, policy.context_size)
    await sup.start(policy.max_parallelism, policy.context_size)
    await w._on_up()
    return w


def first_policy() -> proto.Policy:
    return proto.Policy(
        model_name="Tiny", quantization="Q8_0", context_size=1024, max_parallelism=2,
        huggingface_id="tiny-org/Tiny-GGUF", files=["first.gguf"], capabilities=["chat"],
    )  # fmt: skip


async def test_policy_update_with_new_settings_restarts_and_reannounces(
    tmp_path: Path, model: Path, session: aiohttp.ClientSession
) -> None:
    w = await running_worker(tmp_path, model, session, first_policy())
    try:
        assert (w.link.caps.total_slots, w.link.caps.ctx_size) == (2, 1024)
        old = w.supervisor.server.process  # type: ignore[union-attr]
        await w.apply_policy(proto.Policy(**{**first_policy().to_dict(), "context_size": 2048, "max_parallelism": 3}))
        assert (w.link.caps.total_slots, w.link.caps.ctx_size) == (3, 2048)  # the Config the router gets
        assert w.link.backend_up.is_set()
        assert w.supervisor.server.process is not old  # type: ignore[union-attr]

        same = w.supervisor.server.process  # type: ignore[union-attr]
        await w.apply_policy(proto.Policy(**{**first_policy().to_dict(), "context_size": 2048, "max_parallelism": 3}))
        assert w.supervisor.server.process is same  # type: ignore[union-attr]  # unchanged: nothing
    finally:
        await w.supervisor.close()  # type: ignore[union-attr]


async def test_policy_update_with_new_model_downloads_then_switches(
    tmp_path: Path, model: Path, session: aiohttp.ClientSession, fake_hf: FakeHF, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hf.add_file("tiny-org/Tiny-GGUF", "Q4_K_S/second-00001-of-00002.gguf", b"GGUF second, shard 1")
    fake_hf.add_file("tiny-org/Tiny-GGUF", "Q4_K_S/second-00002-of-00002.gguf", b"GGUF second, shard 2")
    w = await running_worker(tmp_path, model, session, first_policy(), environ={"HF_ENDPOINT": fake_hf.base_url})
    try:
        assert w.link.caps.model == "first"
        old = w.supervisor.server.process  # type: ignore[union-attr]

        missing = proto.Policy(**{**first_policy().to_dict(), "quantization": "Q6_K", "files": ["nope.gguf"]})
        await w.apply_policy(missing)  # the download fails: the old model keeps serving
        assert w.supervisor.server.process is old and w.link.caps.model == "first"  # type: ignore[union-attr]
        assert w.policy.quantization == "Q8_0"

        second = proto.Policy(
            **{**first_policy().to_dict(), "quantization": "Q4_K_S", "files": ["Q4_K_S/second-00001-of-00002.gguf"]}
        )
        await w.apply_policy(second)
        repo = tmp_path / "models" / "tiny-org_Tiny-GGUF" / "Q4_K_S"
        assert (repo / "second-00002-of-00002.gguf").read_bytes() == b"GGUF second, shard 2"
        assert w.supervisor.server.model == str(repo / "second-00001-of-00002.gguf")  # type: ignore[union-attr]
        assert w.link.caps.model == "second-00001-of-00002"  # what the fake serves now, announced
        assert w.policy.quantization == "Q4_K_S"
    finally:
        await w.supervisor.close()  # type: ignore[union-attr]


OLD_SETTINGS_ONLY = 'case "$args" in *" --ctx-size 2048 --parallel 2 "*) true;; *) false;; esac'


async def test_policy_update_that_fails_to_start_goes_back(
    tmp_path: Path, model: Path, session: aiohttp.ClientSession
) -> None:
    """The new settings fail even dialled down (only the old 2 x 1024 start): the old ones serve again."""
    w = await running_worker(tmp_path, model, session, first_policy())
    try:
        w.supervisor.server.binary = str(fake_binary(tmp_path, OLD_SETTINGS_ONLY, "picky-llama-server"))  # type: ignore[union-attr]
        await w.apply_policy(proto.Policy(**{**first_policy().to_dict(), "context_size": 8192}))
        assert (w.link.caps.total_slots, w.link.caps.ctx_size) == (2, 1024)
        assert w.policy.context_size == 1024
    finally:
        await w.supervisor.close()  # type: ignore[union-attr]


async def test_policy_update_message_reaches_the_worker(
    tmp_path: Path, model: Path, session: aiohttp.ClientSession
) -> None:
    """The router link hands a ``policy_update`` frame to the worker's handler."""
    w = await running_worker(tmp_path, model, session, first_policy())
    try:
        frame = proto.encode(
            proto.PolicyUpdate(policy=proto.Policy(**{**first_policy().to_dict(), "max_parallelism": 1}))
        )
        w.link._on_message(frame.decode(), runner=None)  # type: ignore[arg-type]
        async with asyncio.timeout(15):
            while w.link.caps.total_slots != 1:
                await asyncio.sleep(0.02)
    finally:
        await w.supervisor.close()  # type: ignore[union-attr]
