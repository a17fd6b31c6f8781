"""GPU detection with fake nvidia-smi / rocm-smi / vulkaninfo / sysctl executables on PATH."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from auxot_common.gpu import (
    CPU_WARNING,
    GpuInfo,
    detect_gpus,
    filter_visible,
    gpu_layers_for,
    parse_nvidia_driver,
    parse_nvidia_smi,
    parse_rocm_smi,
    parse_vulkaninfo,
    run_probe,
)

H100_X2 = """\
0, NVIDIA H100 80GB HBM3, 81559, 81003, 550.54.15
1, NVIDIA H100 80GB HBM3, 81559, 80741, 550.54.15
"""

# Without "nounits" nvidia-smi appends the unit; an older driver may not know driver_version.
RTX_WITH_UNITS = """\
0, NVIDIA GeForce RTX 4090, 24564 MiB, 23850 MiB
1, NVIDIA GeForce RTX 3060, 12288 MiB, [N/A]
"""

ROCM_MI300X = """\
WARNING: AMD GPU device(s) is/are in a low-power state. Check power control/runtime_status

{"card0": {"Card Series": "AMD Instinct MI300X OAM", "Card Model": "0x74a1", \
"Card Vendor": "Advanced Micro Devices, Inc. [AMD/ATI]", "Card SKU": "M3000100", \
"Subsystem ID": "0x74a1", "Device Rev": "0x00", "Node ID": "2", "GUID": "28851", \
"GFX Version": "gfx942", "VRAM Total Memory (B)": "206141652992", \
"VRAM Total Used Memory (B)": "297566208"}, \
"card1": {"Card series": "AMD Instinct MI300X OAM", "VRAM Total Memory (B)": "206141652992", \
"VRAM Total Used Memory (B)": "1073741824"}, "system": {"Driver version": "6.8.5"}}
"""

VULKAN_SUMMARY = """\
==========
VULKANINFO
==========

Vulkan Instance Version: 1.3.275


Instance Extensions: count = 24
-------------------------------
VK_EXT_acquire_drm_display             : extension revision 1
VK_KHR_surface                         : extension revision 25

Instance Layers: count = 1
--------------------------
VK_LAYER_MESA_device_select Linux device selection layer 1.3.211  version 1

Devices:
========
GPU0:
\tapiVersion         = 1.3.278
\tdriverVersion      = 24.0.5
\tvendorID           = 0x1002
\tdeviceID           = 0x744c
\tdeviceType         = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU
\tdeviceName         = AMD Radeon RX 7900 XTX (RADV NAVI31)
\tdriverID           = DRIVER_ID_MESA_RADV
\tdriverName         = radv
\tdriverInfo         = Mesa 24.0.5-1ubuntu1
\tconformanceVersion = 1.3.0.0
\tdeviceUUID         = 00000000-0300-0000-0000-000000000000
\tdriverUUID         = 414d442d-4d45-5341-2d44-525600000000
GPU1:
\tapiVersion         = 1.3.278
\tdriverVersion      = 0.0.1
\tvendorID           = 0x10005
\tdeviceID           = 0x0000
\tdeviceType         = PHYSICAL_DEVICE_TYPE_CPU
\tdeviceName         = llvmpipe (LLVM 17.0.6, 256 bits)
\tdriverID           = DRIVER_ID_MESA_LLVMPIPE
\tdriverName         = llvmpipe
"""

VULKAN_FULL_HEAPS = """\
GPU0:
VkPhysicalDeviceProperties:
---------------------------
\tapiVersion        = 1.3.278
\tdeviceType        = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU
\tdeviceName        = AMD Radeon RX 7900 XTX (RADV NAVI31)
VkPhysicalDeviceMemoryProperties:
=================================
memoryHeaps: count = 3
\tmemoryHeaps[0]:
\t\tsize   = 25753026560 (0x5ff000000) (23.98 GiB)
\t\tbudget = 25210093568 (0x5de800000) (23.48 GiB)
\t\tusage  = 0 (0x00000000) (0.00 B)
\t\tflags:
\t\t\tMEMORY_HEAP_DEVICE_LOCAL_BIT
\tmemoryHeaps[1]:
\t\tsize   = 33475203072 (0x7cb4d0000) (31.18 GiB)
\t\tbudget = 33475203072 (0x7cb4d0000) (31.18 GiB)
\t\tflags:
\t\t\tNone
\tmemoryHeaps[2]:
\t\tsize   = 268435456 (0x10000000) (256.00 MiB)
\t\tbudget = 260000000 (0xf7f4900) (247.96 MiB)
\t\tflags:
\t\t\tMEMORY_HEAP_DEVICE_LOCAL_BIT
"""


@pytest.fixture
def bindir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory that is the whole PATH, so real tools on the host cannot interfere."""
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", str(directory))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return directory


def fake_tool(bindir: Path, name: str, stdout: str = "", *, exit_code: int = 0, body: str = "") -> Path:
    """A Python script named ``name`` that prints ``stdout`` and exits with ``exit_code``."""
    path = bindir / name
    path.write_text(
        f"#!{sys.executable}\nimport os, sys, time\n{body}\nsys.stdout.write({stdout!r})\nsys.exit({exit_code})\n"
    )
    path.chmod(0o755)
    return path


# -- parsers --------------------------------------------------------------------------------


def test_parse_nvidia_smi() -> None:
    devices = parse_nvidia_smi(H100_X2)
    assert [(d.index, d.name, d.vram_total_mb, d.vram_free_mb) for d in devices] == [
        (0, "NVIDIA H100 80GB HBM3", 81559, 81003),
        (1, "NVIDIA H100 80GB HBM3", 81559, 80741),
    ]
    assert parse_nvidia_driver(H100_X2) == "550.54.15"
    rtx = parse_nvidia_smi(RTX_WITH_UNITS)
    assert [(d.name, d.vram_total_mb, d.vram_free_mb) for d in rtx] == [
        ("NVIDIA GeForce RTX 4090", 24564, 23850),
        ("NVIDIA GeForce RTX 3060", 12288, 0),
    ]
    assert parse_nvidia_driver(RTX_WITH_UNITS) == ""
    assert parse_nvidia_smi("No devices were found\n") == []


def test_filter_visible() -> None:
    devices = parse_nvidia_smi(H100_X2)
    assert filter_visible(devices, None) == devices
    assert [d.index for d in filter_visible(devices, "1")] == [1]
    assert filter_visible(devices, "") == [] and filter_visible(devices, "-1") == []
    assert filter_visible(devices, "GPU-8f2c1e4a-0000") == devices


def test_parse_rocm_smi() -> None:
    devices = parse_rocm_smi(ROCM_MI300X)
    assert [(d.index, d.name, d.vram_total_mb, d.vram_free_mb) for d in devices] == [
        (0, "AMD Instinct MI300X OAM", 196592, 196309),
        (1, "AMD Instinct MI300X OAM", 196592, 195568),
    ]
    assert parse_rocm_smi("not json") == []
    assert parse_rocm_smi("[1, 2]") == []


def test_parse_vulkaninfo() -> None:
    devices = parse_vulkaninfo(VULKAN_SUMMARY)
    assert [(d.index, d.name, d.vram_total_mb) for d in devices] == [(0, "AMD Radeon RX 7900 XTX (RADV NAVI31)", 0)]
    [full] = parse_vulkaninfo(VULKAN_FULL_HEAPS)
    assert (full.vram_total_mb, full.vram_free_mb) == (24560, 24042)
    assert parse_vulkaninfo("GPU0:\n\tdeviceName = llvmpipe (LLVM 15.0.6, 256 bits)\n") == []


def test_gpu_info_helpers() -> None:
    info = GpuInfo("cuda", parse_nvidia_smi(H100_X2), driver_version="550.54.15")
    assert (info.total_vram_mb, info.free_vram_mb, info.vram_gb) == (163118, 161744, 159.3)
    assert info.to_dicts()[1] == {
        "index": 1, "name": "NVIDIA H100 80GB HBM3", "vram_total_mb": 81559, "vram_free_mb": 80741, "backend": "cuda",
    }
    assert gpu_layers_for(info) == 9999
    assert gpu_layers_for(GpuInfo("cpu")) == 0


# -- detection ------------------------------------------------------------------------------


async def test_two_h100(bindir: Path) -> None:
    fake_tool(bindir, "nvidia-smi", H100_X2)
    fake_tool(bindir, "vulkaninfo", VULKAN_SUMMARY)  # NVIDIA wins over Vulkan
    info = await detect_gpus(system="Linux", machine="x86_64")
    assert info.backend == "cuda"
    assert [d.name for d in info.devices] == ["NVIDIA H100 80GB HBM3"] * 2
    assert info.total_vram_mb == 2 * 81559
    assert info.driver_version == "550.54.15"
    assert info.warning == ""


async def test_rtx_pair_and_cuda_visible_devices(bindir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tool(bindir, "nvidia-smi", RTX_WITH_UNITS)
    info = await detect_gpus(system="Linux", machine="x86_64")
    assert [(d.name, d.vram_total_mb) for d in info.devices] == [
        ("NVIDIA GeForce RTX 4090", 24564), ("NVIDIA GeForce RTX 3060", 12288),
    ]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    info = await detect_gpus(system="Linux", machine="x86_64")
    assert [d.name for d in info.devices] == ["NVIDIA GeForce RTX 4090"]


async def test_mi300x(bindir: Path) -> None:
    fake_tool(bindir, "rocm-smi", ROCM_MI300X)
    info = await detect_gpus(system="Linux", machine="x86_64")
    assert info.backend == "rocm"
    assert len(info.devices) == 2 and info.devices[0].name == "AMD Instinct MI300X OAM"
    assert info.devices[0].vram_total_mb == 196592


async def test_vulkan_when_nvidia_smi_fails(bindir: Path) -> None:
    fake_tool(bindir, "nvidia-smi", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n",
              exit_code=9)
    fake_tool(bindir, "vulkaninfo", VULKAN_SUMMARY)
    info = await detect_gpus(system="Linux", machine="x86_64")
    assert info.backend == "vulkan"
    assert [d.name for d in info.devices] == ["AMD Radeon RX 7900 XTX (RADV NAVI31)"]


async def test_only_llvmpipe_means_cpu(bindir: Path) -> None:
    fake_tool(bindir, "vulkaninfo", "GPU0:\n\tdeviceType = PHYSICAL_DEVICE_TYPE_CPU\n\tdeviceName = llvmpipe\n")
    info = await detect_gpus(system="Linux", machine="x86_64")
    assert info.backend == "cpu"


async def test_nothing_on_path_means_cpu_with_warning(bindir: Path) -> None:
    info = await detect_gpus(system="Linux", machine="x86_64")
    assert info.backend == "cpu"
    assert info.devices == [] and info.total_vram_mb == 0
    assert info.warning == CPU_WARNING
    assert gpu_layers_for(info) == 0


async def test_apple_silicon_uses_a_share_of_unified_memory(bindir: Path) -> None:
    body = "out = {'hw.memsize': '68719476736\\n', 'machdep.cpu.brand_string': 'Apple M2 Max\\n'}[sys.argv[2]]"
    fake_tool(bindir, "sysctl", body=body + "\nsys.stdout.write(out)")
    info = await detect_gpus(system="Darwin", machine="arm64")
    assert info.backend == "metal"
    assert [(d.name, d.vram_total_mb) for d in info.devices] == [("Apple M2 Max", 49152)]  # 3/4 of 64 GiB
    small = "sys.stdout.write({'hw.memsize': str(16 * 2**30)}.get(sys.argv[2], ''))"
    fake_tool(bindir, "sysctl", body=small)
    info = await detect_gpus(system="Darwin", machine="arm64")
    assert info.devices[0].vram_total_mb == 10922  # 2/3 of 16 GiB
    assert info.devices[0].name == "Apple Silicon GPU"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


async def test_hanging_probe_times_out_and_falls_back(bindir: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # The probe forks a child that keeps stdout open: killing only the probe would not end the read.
    body = (
        "child = os.fork()\n"
        "if child == 0:\n    time.sleep(60)\n"
        f"open({str(pidfile)!r}, 'w').write(str(child))\n"
        "time.sleep(60)"
    )
    fake_tool(bindir, "nvidia-smi", H100_X2, body=body)
    fake_tool(bindir, "vulkaninfo", VULKAN_SUMMARY)
    started = time.monotonic()
    info = await detect_gpus(timeout=0.5, system="Linux", machine="x86_64")
    assert time.monotonic() - started < 4
    assert info.backend == "vulkan"
    child = int(pidfile.read_text())
    for _ in range(100):
        if not _alive(child):
            break
        time.sleep(0.01)
    assert not _alive(child)


async def test_run_probe_missing_and_failing(bindir: Path) -> None:
    assert await run_probe(["no-such-tool"]) is None
    fake_tool(bindir, "broken", "partial", exit_code=3)
    assert await run_probe(["broken"]) is None
    fake_tool(bindir, "fine", "ok\n")
    assert await run_probe(["fine", "--flag"]) == "ok\n"
