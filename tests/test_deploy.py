"""Deployment files: both Dockerfiles pass hadolint, the router image's build steps work when
performed into an empty directory, and fly.toml matches what `setup --fly` prints.

No container engine runs here, so the Dockerfile test reads the Dockerfile and performs its steps
itself: every absolute path the Dockerfile names (WORKDIR, COPY, ENV) is moved under a fresh root
directory, RUN lines run in bash with the ENV so far, and the ENTRYPOINT and HEALTHCHECK run
from the final stage's ENV, as a container would start them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from auxot_common.auth import verify_hash
from auxot_router import RouterConfig
from tests.support import http
from tests.support.llama_server import free_port
from tests.support.procs import REPO, Keys, Process

HADOLINT = Path(sys.executable).parent / "hadolint"


def test_hadolint_passes_on_both_dockerfiles() -> None:
    result = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "style", "Dockerfile", "Dockerfile.worker"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@dataclass
class Stage:
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)
    user: str = ""


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        lines.append((keyword.upper(), rest.strip()))
        current = ""
    return lines


def perform(dockerfile: Path, context: Path, root: Path) -> Stage:
    """The Dockerfile's steps with every absolute path under ``root``; returns the final stage."""

    def rebase(value: str) -> str:
        return ":".join(str(root) + part if part.startswith("/") else part for part in value.split(":"))

    stage, workdir = Stage(), root
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            stage, workdir = Stage(env={"PATH": os.environ["PATH"], "HOME": str(root)}), root
        elif keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                stage.env[name] = rebase(value.replace("$PATH", "\0")).replace("\0", os.environ["PATH"])
        elif keyword == "WORKDIR":
            workdir = Path(rebase(rest))
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            args = shlex.split(rest)
            from_stage = any(a.startswith("--from=") for a in args)
            *sources, dest = [a for a in args if not a.startswith("--")]
            target = Path(rebase(dest)) if dest.startswith("/") else workdir / dest
            for source in sources:
                origin = Path(rebase(source)) if from_stage else context / source
                if from_stage and origin == target:
                    continue  # the same path in both stages, already there
                if origin.is_dir():
                    shutil.copytree(origin, target, dirs_exist_ok=True)
                elif dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(origin, target / origin.name)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(origin, target)
        elif keyword == "RUN":
            command = ["bash", "-ec", rest]
            done = subprocess.run(command, cwd=workdir, env=stage.env, capture_output=True, text=True, check=False)
            assert done.returncode == 0, f"RUN {rest}\n{done.stdout}\n{done.stderr}"
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = orjson.loads(rest)
        elif keyword == "HEALTHCHECK":
            stage.healthcheck = orjson.loads(rest[rest.index("CMD") + 3 :])
        elif keyword == "USER":
            stage.user = rest
    return stage


def test_router_image_steps_build_a_router_that_starts(tmp_path: Path, keys: Keys) -> None:
    context = tmp_path / "context"
    ignored = [*(REPO / ".dockerignore").read_text().split(), "build", "*.egg-info"]
    shutil.copytree(REPO, context, ignore=shutil.ignore_patterns(*ignored))
    root = tmp_path / "root"
    root.mkdir()
    image = perform(REPO / "Dockerfile", context, root)
    assert image.user.split(":")[0] not in ("", "0", "root")  # runs as a non-root user
    assert image.entrypoint == ["auxot-router"] and image.healthcheck == ["auxot-router", "ping"]

    port = free_port()  # not 8080: AUXOT_PORT is honoured by the server and by the health check
    env = {
        **image.env,
        "AUXOT_PORT": str(port),
        "AUXOT_HOST": "127.0.0.1",
        "AUXOT_API_KEY_HASH": keys.api_hash,
        "AUXOT_ADMIN_KEY_HASH": keys.gpu_hash,
        "AUXOT_TEST_CWD": str(root),
    }
    executable = shutil.which(image.entrypoint[0], path=env["PATH"])
    assert executable is not None and executable.startswith(str(root))  # the installed command, not ours

    def healthcheck() -> int:
        probe = subprocess.run([executable, *image.healthcheck[1:]], env=env, capture_output=True, check=False)
        return probe.returncode

    assert healthcheck() == 1  # nothing listens yet
    router = Process([executable, *image.entrypoint[1:]], env, tmp_path / "router.log")
    router.start()
    try:
        deadline = time.monotonic() + 30
        while healthcheck() != 0:
            assert router.alive() and time.monotonic() < deadline, router.log()[-3000:]
            time.sleep(0.1)
        assert http.get(f"http://127.0.0.1:{port}/ping").body == b"pong"
        assert http.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
    finally:
        router.stop()


def test_fly_toml_matches_the_image_and_setup(tmp_path: Path) -> None:
    fly = tomllib.loads((REPO / "fly.toml").read_text())
    service = fly["http_service"]
    assert (REPO / fly["build"]["dockerfile"]).is_file()
    assert service["internal_port"] == int(fly["env"]["AUXOT_PORT"]) == 8080
    assert service["auto_stop_machines"] == "off" and service["min_machines_running"] >= 1
    assert [c["path"] for c in service["checks"]] == ["/ping"]
    assert "mounts" not in fly  # the router keeps no files

    shutil.copy(REPO / "fly.toml", tmp_path / "fly.toml")
    out = subprocess.run(
        [sys.executable, str(REPO / "auxot_router.py"), "setup", "--fly"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    api_key = re.search(r"API key \(callers\):\s+(rtr_\S+)", out)
    gpu_key = re.search(r"GPU key \(workers\):\s+(adm_\S+)", out)
    assert api_key and gpu_key
    command = out[out.index("fly secrets set") :].split("\n#")[0].replace("\\\n", " ")
    words = shlex.split(command)
    assert words[:5] == ["fly", "secrets", "set", "--app", fly["app"]]
    secrets = dict(word.split("=", 1) for word in words[5:])
    assert set(secrets) == {"AUXOT_ADMIN_KEY_HASH", "AUXOT_API_KEY_HASH", "AUXOT_METRICS_TOKEN", "AUXOT_MODEL"}
    assert verify_hash(secrets["AUXOT_API_KEY_HASH"], api_key.group(1))
    assert verify_hash(secrets["AUXOT_ADMIN_KEY_HASH"], gpu_key.group(1))
    config = RouterConfig.from_env({**fly["env"], **secrets})
    assert config.metrics_token == secrets["AUXOT_METRICS_TOKEN"] and config.port == service["internal_port"]
    assert config.trusted_proxies  # behind Fly's proxy, Fly-Client-IP names the caller
    assert f"wss://{fly['app']}.fly.dev/ws" in out
