"""GPU detection for the worker.

The Go worker only asked whether ``nvidia-smi`` exited 0 and then used the Vulkan build anyway
(reference §8.3, §11.2 item 18). Here the result drives the llama.cpp build, ``--n-gpu-layers``
and the ``capabilities.gpus`` list sent to the router, so each probe is parsed:

* NVIDIA: ``nvidia-smi --query-gpu=...`` (CSV) → ``cuda``;
* AMD: ``rocm-smi --showproductname --showmeminfo vram --json`` → ``rocm``;
* Apple Silicon: ``metal``, VRAM = a share of unified memory (``sysctl hw.memsize``);
* anything else with a Vulkan driver: ``vulkaninfo --summary`` → ``vulkan``;
* otherwise ``cpu``, with a warning.

Probes are found on ``PATH`` and run as asyncio subprocesses with a timeout (a wedged driver can
make ``nvidia-smi`` hang for minutes); the parse functions are pure so tests can feed them text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger("auxot.worker")

Backend = Literal["cuda", "rocm", "metal", "vulkan", "cpu"]

PROBE_TIMEOUT_S = 5.0
GPU_ALL_LAYERS = 9999
NVIDIA_QUERY = "index,name,memory.total,memory.free,driver_version"
CPU_WARNING = (
    "No GPU detected. Using CPU (performance will be severely limited). Consider <= 7B models."
)
# macOS lets the GPU wire about 2/3 of unified memory on machines with up to 36 GiB and about
# 3/4 above that (Metal's recommendedMaxWorkingSetSize); the rest stays with the OS.
APPLE_SMALL_SHARE = 2 / 3
APPLE_LARGE_SHARE = 3 / 4
APPLE_LARGE_MEMORY_MB = 36 * 1024

_MIB = 1024 * 1024
_NUMBER_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)
_UNIT_TO_MB = {"kib": 1 / 1024, "kb": 1 / 1024, "mib": 1, "mb": 1, "gib": 1024, "gb": 1024,
               "tib": 1024 * 1024, "tb": 1024 * 1024}
_SOFTWARE_VULKAN = ("llvmpipe", "lavapipe", "swiftshader", "softpipe")


@dataclass(slots=True)
class GpuDevice:
    """One GPU as the worker reports it. VRAM in MiB (0 when unknown)."""

    name: str
    vram_total_mb: int
    vram_free_mb: int
    index: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "vram_total_mb": self.vram_total_mb,
            "vram_free_mb": self.vram_free_mb,
        }


@dataclass(slots=True)
class GpuInfo:
    """What :func:`detect_gpus` found.

    ``backend`` is the llama.cpp build to use; ``warning`` is non-empty when the result
    deserves a user's attention (CPU only, a probe that timed out); ``driver_version`` is the
    NVIDIA driver (it decides which CUDA build can run) or ``""``.
    """

    backend: Backend
    devices: list[GpuDevice] = field(default_factory=list)
    warning: str = ""
    driver_version: str = ""

    @property
    def total_vram_mb(self) -> int:
        return sum(device.vram_total_mb for device in self.devices)

    @property
    def free_vram_mb(self) -> int:
        return sum(device.vram_free_mb for device in self.devices)

    @property
    def vram_gb(self) -> float:
        """Total VRAM in GiB, one decimal (the protocol's ``capabilities.vram_gb``)."""
        return round(self.total_vram_mb / 1024, 1)

    @property
    def has_gpu(self) -> bool:
        return self.backend != "cpu"

    def to_dicts(self) -> list[dict[str, Any]]:
        """The protocol's ``capabilities.gpus`` list: one object per device."""
        return [device.to_dict() | {"backend": self.backend} for device in self.devices]

    def log_fields(self) -> dict[str, Any]:
        """Fields for the "gpu detected" log line."""
        return {
            "backend": self.backend,
            "gpus": [f"{d.index}: {d.name} ({d.vram_total_mb} MiB)" for d in self.devices],
            "vram_total_mb": self.total_vram_mb,
            "vram_free_mb": self.free_vram_mb,
            "driver": self.driver_version,
            "warning": self.warning,
        }


def gpu_layers_for(info: GpuInfo) -> int:
    """``--n-gpu-layers`` for llama-server: every layer on a GPU, none on the CPU."""
    return GPU_ALL_LAYERS if info.has_gpu else 0


# ---------------------------------------------------------------------------------------------
# Parsers (pure)


def _to_mb(value: str) -> int:
    """``"81559"``, ``"81559 MiB"``, ``"80 GiB"`` → MiB; ``"[N/A]"`` and the like → 0."""
    match = _NUMBER_RE.match(value)
    if match is None:
        return 0
    unit = (match[2] or "MiB").lower()
    return int(float(match[1]) * _UNIT_TO_MB.get(unit, 1))


def parse_nvidia_smi(text: str) -> list[GpuDevice]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.total,memory.free[,driver_version]
    --format=csv,noheader[,nounits]``. Rows that do not fit are skipped."""
    devices: list[GpuDevice] = []
    for line in text.splitlines():
        cols = [col.strip() for col in line.split(",")]
        if len(cols) < 4 or not cols[0].isdigit():
            continue
        devices.append(
            GpuDevice(name=cols[1], vram_total_mb=_to_mb(cols[2]),
                      vram_free_mb=_to_mb(cols[3]), index=int(cols[0]))
        )
    return devices


def parse_nvidia_driver(text: str) -> str:
    """The driver version (5th column of :data:`NVIDIA_QUERY`) from ``nvidia-smi``'s CSV."""
    for line in text.splitlines():
        cols = [col.strip() for col in line.split(",")]
        if len(cols) >= 5 and re.match(r"^\d+(\.\d+)+$", cols[4]):
            return cols[4]
    return ""


def filter_visible(devices: list[GpuDevice], visible: str | None) -> list[GpuDevice]:
    """Keep the devices ``CUDA_VISIBLE_DEVICES`` lets llama.cpp see.

    Only a list of indices is understood (UUIDs keep every device); ``""`` or ``-1`` hide all.
    """
    if visible is None:
        return devices
    items = [item.strip() for item in visible.split(",")]
    if items == [""] or items[0] == "-1":
        return []
    if not all(item.isdigit() for item in items):
        return devices
    wanted = [int(item) for item in items]
    by_index = {device.index: device for device in devices}
    return [by_index[i] for i in wanted if i in by_index]


def parse_rocm_smi(text: str) -> list[GpuDevice]:
    """Parse ``rocm-smi --showproductname --showmeminfo vram --json`` (sizes in bytes).

    rocm-smi may print warnings before the JSON; parsing starts at the first ``{``.
    """
    start = text.find("{")
    if start < 0:
        return []
    try:
        data = json.loads(text[start:])
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    devices: list[GpuDevice] = []
    for key, card in data.items():
        match = re.match(r"^card(\d+)$", str(key))
        if match is None or not isinstance(card, dict):
            continue
        devices.append(_rocm_device(int(match[1]), card))
    return sorted(devices, key=lambda device: device.index)


def _rocm_device(index: int, card: Mapping[str, Any]) -> GpuDevice:
    fields = {str(k).lower(): str(v) for k, v in card.items()}
    name = next(
        (fields[k] for k in ("card series", "device name", "marketing name", "card model")
         if fields.get(k)),
        f"AMD GPU {index}",
    )
    total = _int_or_zero(fields.get("vram total memory (b)")) // _MIB
    used = _int_or_zero(fields.get("vram total used memory (b)")) // _MIB
    return GpuDevice(name=name, vram_total_mb=total, vram_free_mb=max(total - used, 0), index=index)


def _int_or_zero(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def parse_vulkaninfo(text: str) -> list[GpuDevice]:
    """Parse ``vulkaninfo --summary`` (or the full output): one device per ``GPUn:`` block.

    Software rasterisers (llvmpipe and kin, ``PHYSICAL_DEVICE_TYPE_CPU``) are skipped. The
    summary carries no memory sizes, so VRAM is 0 unless ``memoryHeaps`` are present, in which
    case the largest device-local heap counts (its ``budget`` as the free part).
    """
    devices: list[GpuDevice] = []
    for index, block in _vulkan_blocks(text):
        props = _vulkan_props(block)
        name = props.get("devicename", "")
        kind = props.get("devicetype", "")
        if not name or "TYPE_CPU" in kind or any(s in name.lower() for s in _SOFTWARE_VULKAN):
            continue
        total, free = _vulkan_device_local_heap(block)
        devices.append(GpuDevice(name=name, vram_total_mb=total, vram_free_mb=free, index=index))
    return devices


def _vulkan_blocks(text: str) -> list[tuple[int, list[str]]]:
    blocks: list[tuple[int, list[str]]] = []
    for line in text.splitlines():
        match = re.match(r"^GPU(\d+):\s*$", line.strip())
        if match is not None and not line.startswith((" ", "\t")):
            blocks.append((int(match[1]), []))
        elif blocks:
            blocks[-1][1].append(line)
    return blocks


def _vulkan_props(block: Sequence[str]) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in block:
        key, sep, value = line.partition("=")
        if sep and key.strip():
            props.setdefault(key.strip().lower(), value.strip())
    return props


def _vulkan_device_local_heap(block: Sequence[str]) -> tuple[int, int]:
    heaps: list[dict[str, int]] = []
    for line in block:
        stripped = line.strip()
        if stripped.startswith("memoryHeaps["):
            heaps.append({"size": 0, "budget": 0, "local": 0})
        elif heaps and (m := re.match(r"^(size|budget)\s*=\s*(\d+)", stripped)):
            heaps[-1][m[1]] = int(m[2])
        elif heaps and "DEVICE_LOCAL" in stripped:
            heaps[-1]["local"] = 1
    local = [heap for heap in heaps if heap["local"]]
    if not local:
        return 0, 0
    best = max(local, key=lambda heap: heap["size"])
    total = best["size"] // _MIB
    return total, (best["budget"] // _MIB) or total


def apple_gpu_share(memory_mb: int) -> float:
    """The part of unified memory Metal will give the GPU (see :data:`APPLE_SMALL_SHARE`)."""
    return APPLE_LARGE_SHARE if memory_mb > APPLE_LARGE_MEMORY_MB else APPLE_SMALL_SHARE


# ---------------------------------------------------------------------------------------------
# Running probes


async def run_probe(argv: Sequence[str], timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Run ``argv`` (found on ``PATH``) and return its stdout if it exits 0 within ``timeout``.

    Returns None when it is missing, fails or times out; a probe that times out is killed with
    its whole process group, so a helper it spawned cannot keep the pipe open.
    """
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            exe, *argv[1:],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        log.warning("gpu probe failed to start", extra={"probe": argv[0], "error": str(exc)})
        return None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        log.warning("gpu probe timed out", extra={"probe": argv[0], "timeout_s": timeout})
        return None
    finally:
        await reap(proc)
    if proc.returncode != 0:
        log.debug("gpu probe failed", extra={"probe": argv[0], "rc": proc.returncode})
        return None
    return out.decode("utf-8", "replace")


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc``'s process group (it must run with ``start_new_session``) unless it exited."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        await asyncio.wait_for(proc.wait(), 2.0)
    except TimeoutError:
        log.warning("child did not exit after SIGKILL", extra={"pid": proc.pid})


async def _probe_nvidia(timeout: float) -> GpuInfo | None:
    out = await run_probe(
        ["nvidia-smi", f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader,nounits"], timeout
    )
    if out is None:
        return None
    devices = filter_visible(parse_nvidia_smi(out), os.environ.get("CUDA_VISIBLE_DEVICES"))
    if not devices:
        return None
    return GpuInfo("cuda", devices, driver_version=parse_nvidia_driver(out))


async def _probe_rocm(timeout: float) -> GpuInfo | None:
    out = await run_probe(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json"],
                          timeout)
    devices = parse_rocm_smi(out) if out is not None else []
    return GpuInfo("rocm", devices) if devices else None


async def _probe_vulkan(timeout: float) -> GpuInfo | None:
    out = await run_probe(["vulkaninfo", "--summary"], timeout)
    devices = parse_vulkaninfo(out) if out is not None else []
    return GpuInfo("vulkan", devices) if devices else None


async def _probe_apple(timeout: float) -> GpuInfo:
    memsize = await run_probe(["sysctl", "-n", "hw.memsize"], timeout)
    brand = await run_probe(["sysctl", "-n", "machdep.cpu.brand_string"], timeout)
    memory_mb = _int_or_zero((memsize or "").strip()) // _MIB
    share = apple_gpu_share(memory_mb)
    vram = int(memory_mb * share)
    name = (brand or "").strip() or "Apple Silicon GPU"
    warning = "" if memory_mb else "could not read hw.memsize; unified memory size unknown"
    log.info(
        "apple unified memory",
        extra={"memory_mb": memory_mb, "gpu_share": round(share, 2), "vram_mb": vram},
    )
    return GpuInfo("metal", [GpuDevice(name, vram, vram, 0)], warning=warning)


async def detect_gpus(
    *,
    timeout: float = PROBE_TIMEOUT_S,
    system: str | None = None,
    machine: str | None = None,
) -> GpuInfo:
    """Find the GPUs and the llama.cpp backend to use.

    Parameters: ``timeout`` — seconds each probe may take; ``system`` / ``machine`` — override
    ``platform.system()`` / ``platform.machine()`` (tests). Never raises for a missing or
    broken probe: the answer is then ``cpu`` with a warning.
    """
    system = (system or platform.system()).lower()
    machine = (machine or platform.machine()).lower()
    if system == "darwin" and machine in ("arm64", "aarch64"):
        info = await _probe_apple(timeout)
    else:
        info = await _probe_others(timeout, system)
    log.info("gpu detected", extra=info.log_fields())
    return info


async def _probe_others(timeout: float, system: str) -> GpuInfo:
    for probe in (_probe_nvidia, _probe_rocm, _probe_vulkan):
        found = await probe(timeout)
        if found is not None:
            return found
    warning = CPU_WARNING
    if system == "darwin":
        warning += " (Intel Macs: the llama.cpp x64 macOS build has no Metal.)"
    return GpuInfo("cpu", [], warning=warning)
