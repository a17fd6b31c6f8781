"""llama-server from an explicit path, the cache, or a (fake) llama.cpp release host."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest
from fake_hf import FakeHF

from auxot_common.downloads import ProgressReporter, RemoteNotFoundError, RetryPolicy
from auxot_common.llama_binary import (
    LLAMA_CPP_TAG,
    LlamaBinaryError,
    NoAssetError,
    UnsafeArchiveError,
    asset_base_url_from_env,
    ensure_llama_server,
    plan_assets,
    select_asset,
    unpack_archive,
)

TAG = LLAMA_CPP_TAG
FAST = RetryPolicy(base_delay_s=0.001, max_delay_s=0.01)

SERVER_SCRIPT = """#!/bin/sh
if [ "$1" = "--list-devices" ]; then
  echo "Available devices:"
  echo "  CUDA0: NVIDIA H100 80GB HBM3 (81079 MiB, 80532 MiB free)"
  exit 0
fi
echo "version: 11434 (0123abcd)" >&2
echo "built with cc (GCC) 12.2.0 for x86_64-linux-gnu" >&2
exit 0
"""
CPU_ONLY_SCRIPT = SERVER_SCRIPT.replace("CUDA0: NVIDIA H100 80GB HBM3", "CPU: AMD EPYC")
BROKEN_SCRIPT = """#!/bin/sh
echo "llama-server: error while loading shared libraries: libgomp.so.1: cannot open shared object file" >&2
exit 127
"""

Entry = tuple[str, str, str | bytes]  # (name, "file" | "exec" | "symlink" | "hardlink" | "dir" | "fifo", payload)


def tar_gz(entries: Sequence[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            data = payload.encode() if isinstance(payload, str) else payload
            if kind in ("file", "exec"):
                info.size, info.mode = len(data), 0o755 if kind == "exec" else 0o644
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = data.decode() if kind in ("symlink", "hardlink") else ""
            info.mode = 0o755
            tar.addfile(info)
    return buffer.getvalue()


def zip_bytes(entries: Sequence[Entry]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, kind, payload in entries:
            info = zipfile.ZipInfo(name)
            mode = {"file": stat.S_IFREG | 0o644, "exec": stat.S_IFREG | 0o755, "symlink": stat.S_IFLNK | 0o777}[kind]
            info.external_attr = mode << 16
            zf.writestr(info, payload)
    return buffer.getvalue()


def release_tree(script: str = SERVER_SCRIPT, top: str = f"llama-{TAG}") -> list[Entry]:
    return [
        (f"{top}", "dir", ""),
        (f"{top}/llama-server", "exec", script),
        (f"{top}/libggml-base.so.0.9.4", "file", b"\x7fELF fake library"),
        (f"{top}/libggml-base.so.0", "symlink", "libggml-base.so.0.9.4"),
        (f"{top}/libggml-base.so", "symlink", "libggml-base.so.0"),
        (f"{top}/LICENSE", "file", "MIT"),
    ]


async def ensure(hf: FakeHF | None, cache: Path, backend: str = "cpu", **kwargs: object) -> Path:
    kwargs.setdefault("system", "Linux")
    kwargs.setdefault("machine", "x86_64")
    async with aiohttp.ClientSession() as session:
        return await ensure_llama_server(
            session,
            explicit_path=kwargs.pop("explicit_path", None),  # type: ignore[arg-type]
            cache_dir=cache,
            backend=backend,
            base_url=hf.releases_url if hf else "http://127.0.0.1:9/none",
            progress=ProgressReporter(tty=False),
            retry=FAST,
            **kwargs,  # type: ignore[arg-type]
        )


# -- asset names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "machine", "backend", "driver", "expected"),
    [
        ("Linux", "x86_64", "cpu", "", f"llama-{TAG}-bin-ubuntu-x64.tar.gz"),
        ("Linux", "x86_64", "vulkan", "", f"llama-{TAG}-bin-ubuntu-vulkan-x64.tar.gz"),
        ("Linux", "x86_64", "rocm", "", f"llama-{TAG}-bin-ubuntu-rocm-10.0-x64.tar.gz"),
        ("Linux", "x86_64", "cuda", "580.95.05", f"llama-{TAG}-bin-ubuntu-cuda-13.4-x64.tar.gz"),
        ("Linux", "x86_64", "cuda", "570.172.08", f"llama-{TAG}-bin-ubuntu-cuda-12.8-x64.tar.gz"),
        ("Linux", "x86_64", "cuda", "", f"llama-{TAG}-bin-ubuntu-cuda-13.4-x64.tar.gz"),
        ("Linux", "x86_64", "cuda", "550.54.15", None),
        ("Linux", "aarch64", "cpu", "", f"llama-{TAG}-bin-ubuntu-arm64.tar.gz"),
        ("Linux", "aarch64", "vulkan", "", f"llama-{TAG}-bin-ubuntu-vulkan-arm64.tar.gz"),
        ("Linux", "aarch64", "cuda", "580.65.06", f"llama-{TAG}-bin-ubuntu-cuda-13.4-arm64.tar.gz"),
        ("Linux", "aarch64", "cuda", "570.172.08", None),
        ("Linux", "aarch64", "rocm", "", None),
        ("Linux", "x86_64", "metal", "", None),
        ("Linux", "riscv64", "cpu", "", None),
        ("Darwin", "arm64", "metal", "", f"llama-{TAG}-bin-macos-arm64.tar.gz"),
        ("Darwin", "arm64", "cpu", "", f"llama-{TAG}-bin-macos-arm64.tar.gz"),
        ("Darwin", "x86_64", "cpu", "", f"llama-{TAG}-bin-macos-x64.tar.gz"),
        ("Darwin", "x86_64", "metal", "", None),
        ("Windows", "AMD64", "cpu", "", f"llama-{TAG}-bin-win-cpu-x64.zip"),
        ("Windows", "AMD64", "cuda", "581.57", f"llama-{TAG}-bin-win-cuda-13.4-x64.zip"),
        ("Windows", "AMD64", "cuda", "560.94", f"llama-{TAG}-bin-win-cuda-12.4-x64.zip"),
        ("Windows", "AMD64", "vulkan", "", f"llama-{TAG}-bin-win-vulkan-x64.zip"),
        ("Windows", "ARM64", "cpu", "", f"llama-{TAG}-bin-win-cpu-arm64.zip"),
        ("FreeBSD", "amd64", "cpu", "", None),
    ],
)
def test_select_asset(system: str, machine: str, backend: str, driver: str, expected: str | None) -> None:
    assert select_asset(system, machine, backend, TAG, driver_version=driver) == expected


def test_cuda_plans_bring_the_runtime_libraries() -> None:
    linux = plan_assets("Linux", "x86_64", "cuda", "b1", driver_version="575.51.03")
    assert linux is not None
    assert linux.companions == ("cudart-llama-b1-bin-ubuntu-cuda-12.8-x64.tar.gz",)
    windows = plan_assets("Windows", "AMD64", "cuda", "b1", driver_version="581.57")
    assert windows is not None
    assert windows.companions == ("cudart-llama-bin-win-cuda-13.4-x64.zip",)


def test_asset_base_url_from_env() -> None:
    assert asset_base_url_from_env({}) == "https://github.com/ggml-org/llama.cpp/releases/download"
    assert asset_base_url_from_env({"AUXOT_LLAMA_ASSET_URL": "http://mirror.lan/llama/"}) == "http://mirror.lan/llama"


# -- install --------------------------------------------------------------------------------


async def test_download_unpack_and_version_check(tmp_path: Path) -> None:
    async with FakeHF() as hf:
        hf.add_release_asset(TAG, f"llama-{TAG}-bin-ubuntu-x64.tar.gz", tar_gz(release_tree()))
        binary = await ensure(hf, tmp_path / "cache")
    target = tmp_path / "cache" / f"{TAG}-cpu-linux-x64"
    assert binary == target / "llama-server"
    assert os.access(binary, os.X_OK) and stat.S_IMODE(binary.stat().st_mode) == 0o755
    assert os.readlink(target / "libggml-base.so") == "libggml-base.so.0"
    assert (target / "libggml-base.so").read_bytes() == b"\x7fELF fake library"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    assert "version: 11434" in out.stderr
    assert not list((tmp_path / "cache" / ".downloads").glob("llama-*"))  # the archive is gone
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(f".{TAG}-cpu")] == [
        f".{TAG}-cpu-linux-x64.lock"
    ]  # no staging directory left behind


async def test_cuda_build_gets_runtime_libraries_beside_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    name = "bin-ubuntu-cuda-13.4-x64"
    cudart_top = f"cudart-llama-{TAG}-{name}"
    cudart = [(f"{cudart_top}/libcudart.so.13", "file", b"cudart"), (f"{cudart_top}/libcublas.so.13", "file", b"blas")]
    async with FakeHF() as hf:
        hf.add_release_asset(TAG, f"llama-{TAG}-{name}.tar.gz", tar_gz(release_tree()))
        hf.add_release_asset(TAG, f"cudart-llama-{TAG}-{name}.tar.gz", tar_gz(cudart))
        with caplog.at_level(logging.INFO, logger="auxot.worker"):
            binary = await ensure(hf, tmp_path / "cache", "cuda", driver_version="580.95.05")
    assert binary == tmp_path / "cache" / f"{TAG}-cuda-linux-x64" / "llama-server"
    assert (binary.parent / "libcudart.so.13").read_bytes() == b"cudart"
    assert (binary.parent / "libcublas.so.13").read_bytes() == b"blas"
    assert not any("not loaded" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage() == "llama.cpp binary" and getattr(r, "source", "") == "download" for r in caplog.records)


async def test_gpu_backend_that_does_not_load_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with FakeHF() as hf:
        hf.add_release_asset(TAG, f"llama-{TAG}-bin-ubuntu-vulkan-x64.tar.gz", tar_gz(release_tree(CPU_ONLY_SCRIPT)))
        with caplog.at_level(logging.WARNING, logger="auxot.worker"):
            await ensure(hf, tmp_path / "cache", "vulkan")
    assert any("gpu backend not loaded" in r.getMessage() for r in caplog.records)


async def test_zip_release_installs(tmp_path: Path) -> None:
    entries: list[Entry] = [("llama-server.exe", "exec", SERVER_SCRIPT), ("ggml-base.dll", "file", b"dll")]
    async with FakeHF() as hf:
        hf.add_release_asset(TAG, f"llama-{TAG}-bin-win-cpu-x64.zip", zip_bytes(entries))
        binary = await ensure(hf, tmp_path / "cache", system="Windows", machine="AMD64")
    assert binary == tmp_path / "cache" / f"{TAG}-cpu-windows-x64" / "llama-server.exe"
    assert (binary.parent / "ggml-base.dll").read_bytes() == b"dll"


async def test_explicit_path_wins(tmp_path: Path) -> None:
    mine = tmp_path / "my-llama-server"
    mine.write_text(SERVER_SCRIPT)
    mine.chmod(0o755)
    async with FakeHF() as hf:
        assert await ensure(hf, tmp_path / "cache", explicit_path=mine) == mine
        assert hf.requests == []
    with pytest.raises(LlamaBinaryError, match="not found"):
        await ensure(None, tmp_path / "cache", explicit_path=tmp_path / "missing")
    mine.chmod(0o644)
    with pytest.raises(LlamaBinaryError, match="not executable"):
        await ensure(None, tmp_path / "cache", explicit_path=mine)


async def test_cached_binary_is_reused_without_a_request(tmp_path: Path) -> None:
    target = tmp_path / "cache" / f"{TAG}-vulkan-linux-x64"
    target.mkdir(parents=True)
    (target / "llama-server").write_text(SERVER_SCRIPT)
    (target / "llama-server").chmod(0o755)
    async with FakeHF() as hf:
        assert await ensure(hf, tmp_path / "cache", "vulkan") == target / "llama-server"
        assert hf.requests == []


async def test_no_asset_explains_the_source_build(tmp_path: Path) -> None:
    with pytest.raises(NoAssetError) as err:
        await ensure(None, tmp_path / "cache", "cuda", driver_version="535.183.01")
    message = str(err.value)
    assert "535.183.01 is too old" in message
    assert 'EXTRA_CMAKE="-DGGML_CUDA=ON" scripts/build_llama_server.sh' in message
    assert "--llama-server-path" in message
    expected = r"(?s)no prebuilt cpu build for freebsd/x64\. Build .*scripts/build_llama_server\.sh"
    with pytest.raises(NoAssetError, match=expected):
        await ensure(None, tmp_path / "cache", system="FreeBSD", machine="amd64")


async def test_missing_asset_is_a_clear_error(tmp_path: Path) -> None:
    async with FakeHF() as hf:
        with pytest.raises(RemoteNotFoundError, match="404"):
            await ensure(hf, tmp_path / "cache")


async def test_broken_binary_is_not_cached(tmp_path: Path) -> None:
    async with FakeHF() as hf:
        hf.add_release_asset(TAG, f"llama-{TAG}-bin-ubuntu-x64.tar.gz", tar_gz(release_tree(BROKEN_SCRIPT)))
        with pytest.raises(LlamaBinaryError, match=r"exit 127.*libgomp"):
            await ensure(hf, tmp_path / "cache")
    assert not (tmp_path / "cache" / f"{TAG}-cpu-linux-x64").exists()


async def test_two_installs_at_once_download_once(tmp_path: Path) -> None:
    async with FakeHF() as hf:
        padded = [*release_tree(), (f"llama-{TAG}/padding.bin", "file", os.urandom(300_000))]
        hf.add_release_asset(TAG, f"llama-{TAG}-bin-ubuntu-x64.tar.gz", tar_gz(padded))
        hf.throttle_bps = 2_000_000
        first, second = await asyncio.gather(ensure(hf, tmp_path / "cache"), ensure(hf, tmp_path / "cache"))
        assert first == second
        assert len(hf.seen("GET", "/releases/")) == 1


# -- unsafe archives ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("../evil.txt", "file", "x")], "escapes"),
        ([("llama/../../evil.txt", "file", "x")], "escapes"),
        ([("/tmp/evil.txt", "file", "x")], "absolute path"),
        ([("llama/lib", "symlink", "../../outside")], "points outside"),
        ([("llama/passwd", "symlink", "/etc/passwd")], "absolute path"),
        # Lexically "a/.." stays inside, but "a" is a link to ".", so "b" would be the parent.
        ([("a", "symlink", "."), ("b", "symlink", "a/..")], "points outside"),
        ([("llama/hard", "hardlink", "../../etc/passwd")], "escapes"),
        ([("llama/pipe", "fifo", "")], "device or fifo"),
    ],
)
async def test_unsafe_tar_entries_are_rejected(tmp_path: Path, entries: list[Entry], message: str) -> None:
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(tar_gz(entries))
    dest = tmp_path / "deep" / "er" / "dest"
    with pytest.raises(UnsafeArchiveError, match=message):
        await unpack_archive(archive, dest)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "deep" / "evil.txt").exists()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("../evil.txt", "file", "x")], "escapes"),
        ([("..\\evil.txt", "file", "x")], "escapes"),
        ([("lib", "symlink", "../../outside")], "points outside"),
        ([("lib", "symlink", "/etc")], "absolute path"),
    ],
)
async def test_unsafe_zip_entries_are_rejected(tmp_path: Path, entries: list[Entry], message: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(zip_bytes(entries))
    with pytest.raises(UnsafeArchiveError, match=message):
        await unpack_archive(archive, tmp_path / "a" / "dest")
    assert not (tmp_path / "a" / "evil.txt").exists()


async def test_unsafe_release_is_not_installed(tmp_path: Path) -> None:
    entries = [*release_tree(), (f"llama-{TAG}/../../../../escaped", "file", "x")]
    async with FakeHF() as hf:
        hf.add_release_asset(TAG, f"llama-{TAG}-bin-ubuntu-x64.tar.gz", tar_gz(entries))
        with pytest.raises(UnsafeArchiveError):
            await ensure(hf, tmp_path / "cache")
    assert not (tmp_path / "cache" / f"{TAG}-cpu-linux-x64").exists()
    assert not list(tmp_path.rglob("escaped"))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name.startswith(f".{TAG}")]


async def test_safe_zip_symlink_is_recreated(tmp_path: Path) -> None:
    archive = tmp_path / "ok.zip"
    archive.write_bytes(zip_bytes([("lib.so.1", "file", b"lib"), ("lib.so", "symlink", "lib.so.1")]))
    await unpack_archive(archive, tmp_path / "out")
    assert os.readlink(tmp_path / "out" / "lib.so") == "lib.so.1"
    assert (tmp_path / "out" / "lib.so").read_bytes() == b"lib"
