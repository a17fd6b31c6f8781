#!/usr/bin/env python3
"""Build single-file zipapps that run with nothing but CPython: ``dist/auxot-{role}-{platform}.pyz``.

Each file holds our code, ``registry.json`` and the dependencies of ``requirements.txt`` as wheels
for every supported CPython on one platform (``pip install --target --platform``, so any build
machine can build for every platform). Files that are the same for every Python version are
stored once. The dependencies are cached under ``~/.cache/auxot/zipapp-deps`` keyed by
``requirements.txt``, platform and Python version, so a rebuild only re-zips.

    python scripts/build_zipapp.py                      # every platform, both roles
    python scripts/build_zipapp.py --platform linux-x86_64 --python 3.12 --role router --out DIR

``dist/auxot-{role}.pyz`` is a copy of the build for the machine running the build, when there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "scripts" / "zipapp_main.py.tmpl"
FORMAT = "1"  # bump when the layout of the cached dependency trees changes


@dataclass(frozen=True, slots=True)
class Platform:
    name: str
    machines: tuple[str, ...]  # platform.machine() spellings
    tags: tuple[str, ...]  # wheel platform tags pip may use
    glibc: str  # the oldest glibc those tags allow


PLATFORMS = {
    p.name: p
    for p in (
        Platform("linux-x86_64", ("x86_64", "amd64"), ("manylinux_2_17_x86_64", "manylinux2014_x86_64"), "2.17"),
        Platform("linux-aarch64", ("aarch64", "arm64"), ("manylinux_2_17_aarch64", "manylinux2014_aarch64"), "2.17"),
    )
}
PYTHONS = ("3.11", "3.12", "3.13", "3.14")
ROLES = ("router", "worker")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "auxot" / "zipapp-deps"


# Optional speed-ups left out of the one-file builds: uvloop's wheels would double each file (one
# build per Python version), and both roles run on asyncio's own loop without it.
LEFT_OUT = ("uvloop",)


def zipapp_requirements() -> str:
    """requirements.txt without the optional packages of LEFT_OUT."""
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return "\n".join(line for line in lines if not line.strip().startswith(LEFT_OUT)) + "\n"


def requirements_key() -> str:
    digest = hashlib.sha256(FORMAT.encode() + zipapp_requirements().encode())
    return digest.hexdigest()[:16]


def dependencies(plat: Platform, python: str) -> Path:
    """The installed dependency tree for one platform and Python version (cached)."""
    target = cache_dir() / requirements_key() / plat.name / f"cp{python.replace('.', '')}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    abi = f"cp{python.replace('.', '')}"
    requirements = staging.parent / f".{staging.name}-requirements.txt"
    requirements.write_text(zipapp_requirements())
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
        "--target", str(staging), "--only-binary=:all:", "--implementation", "cp", "--python-version", python,
        "--abi", abi, "--abi", "abi3", "--abi", "none", "-r", str(requirements),
    ]  # fmt: skip
    for tag in plat.tags:
        command += ["--platform", tag]
    try:
        subprocess.run(command, check=True)
        shutil.rmtree(staging / "bin", ignore_errors=True)  # console scripts with this machine's paths
        for cache in staging.rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():
            raise
    finally:
        requirements.unlink(missing_ok=True)
    return target


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def our_files() -> dict[str, bytes]:
    out = {"registry.json": (REPO / "registry.json").read_bytes()}
    for name in ("auxot_router.py", "auxot_worker.py"):
        out[name] = (REPO / name).read_bytes()
    for path in sorted((REPO / "auxot_common").glob("*.py")):
        out[f"auxot_common/{path.name}"] = path.read_bytes()
    return out


def build(role: str, plat: Platform, pythons: tuple[str, ...], out: Path) -> Path:
    trees = {python: files(dependencies(plat, python)) for python in pythons}
    # A package cannot span directories: a top-level entry (package, module, dist-info) is shared
    # only if it is identical for every Python version, else each version gets its own copy.
    def top(name: str) -> str:
        return name.split("/", 1)[0]

    entries: dict[str, set[tuple[str, ...]]] = {}
    for tree in trees.values():
        grouped: dict[str, list[str]] = {}
        for name, data in tree.items():
            grouped.setdefault(top(name), []).append(name + ":" + hashlib.sha256(data).hexdigest())
        for entry, signature in grouped.items():
            entries.setdefault(entry, set()).add(tuple(sorted(signature)))
    shared = {entry for entry, variants in entries.items() if len(variants) == 1}
    shared = {entry for entry in shared if all(any(top(n) == entry for n in tree) for tree in trees.values())}
    common = {name: data for name, data in trees[pythons[0]].items() if top(name) in shared}
    members: dict[str, bytes] = dict(our_files())
    for name, data in common.items():
        members[f"_auxot_deps/common/{name}"] = data
    for python, tree in trees.items():
        tag = f"cp{python.replace('.', '')}"
        for name, data in tree.items():
            if name not in common:
                members[f"_auxot_deps/{tag}/{name}"] = data
    digest = hashlib.sha256()
    for name in sorted(members):
        digest.update(name.encode() + b"\0" + hashlib.sha256(members[name]).digest())
    values = {
        "ROLE": role,
        "BUILD_ID": digest.hexdigest()[:16],
        "PYTHONS": " ".join(pythons),
        "MACHINES": " ".join(plat.machines),
        "PLATFORM": f"Linux {plat.name.split('-', 1)[1]} (glibc {plat.glibc}+)",
        "GLIBC": plat.glibc,
    }
    main = TEMPLATE.read_text()
    for key, val in values.items():
        main = main.replace(f"@{key}@", val)
    members["__main__.py"] = main.encode()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"auxot-{role}-{plat.name}.pyz"
    partial = path.with_suffix(".partial")
    with partial.open("wb") as fh:
        fh.write(b"#!/usr/bin/env python3\n")
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as bundle:
            for name in sorted(members):
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # reproducible
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                bundle.writestr(info, members[name], compresslevel=6)
    partial.chmod(0o755)
    partial.replace(path)
    return path


def host_platform() -> str | None:
    machine = platform.machine().lower()
    if not sys.platform.startswith("linux"):
        return None
    return next((p.name for p in PLATFORMS.values() if machine in p.machines), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platform", action="append", choices=sorted(PLATFORMS), help="default: all")
    parser.add_argument("--python", action="append", choices=PYTHONS, help="default: all")
    parser.add_argument("--role", action="append", choices=ROLES, help="default: both")
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    args = parser.parse_args()
    platforms = args.platform or list(PLATFORMS)
    pythons = tuple(p for p in PYTHONS if p in (args.python or PYTHONS))
    host = host_platform()
    for role in args.role or ROLES:
        for name in platforms:
            path = build(role, PLATFORMS[name], pythons, args.out)
            print(f"{path}  {path.stat().st_size / 1e6:.1f} MB  CPython {', '.join(pythons)}")
            if name == host:
                shutil.copyfile(path, args.out / f"auxot-{role}.pyz")
                (args.out / f"auxot-{role}.pyz").chmod(0o755)
    return 0


if __name__ == "__main__":
    sys.exit(main())
