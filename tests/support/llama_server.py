"""Run a real llama-server (built by scripts/build_llama_server.sh) from tests."""

from __future__ import annotations

import functools
import http.client
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_llama_server.sh"
HEALTH_TIMEOUT_S = 60.0
LOG_TAIL_BYTES = 4000
BIND_ATTEMPTS = 3
BIND_ERROR = "couldn't bind HTTP server socket"


@functools.cache
def llama_server_binary() -> Path:
    """Path of the cached llama-server binary, building it first if needed (minutes, once)."""
    result = subprocess.run([str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    # The script logs to stderr and prints only the binary path on its last stdout line.
    path = Path(result.stdout.strip().splitlines()[-1])
    if not path.is_file():
        raise RuntimeError(f"build script printed {path}, which is not a file")
    return path


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LlamaServer:
    """A llama-server process serving ``model``; use as a context manager.

    Output goes to ``log_path`` (default: next to the model) so a failing test can show it.
    """

    def __init__(
        self,
        model: Path,
        *,
        parallel: int = 2,
        ctx_size: int = 4096,
        api_key: str | None = None,
        port: int | None = None,
        log_path: Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.model = Path(model)
        self.parallel = parallel
        self.ctx_size = ctx_size
        self.api_key = api_key
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.log_path = log_path or self.model.with_name(f"llama-server-{self.port}.log")
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            str(llama_server_binary()),
            "-m", str(self.model),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "-np", str(self.parallel),
            "-c", str(self.ctx_size),
            "--metrics",
            "--no-webui",
        ]  # fmt: skip
        if self.api_key is not None:
            cmd += ["--api-key", self.api_key]
        return cmd + self.extra_args

    def start(self) -> LlamaServer:
        llama_server_binary()  # build first if needed, before any health clock starts
        for attempt in range(BIND_ATTEMPTS):
            try:
                self._start_once()
                return self
            except RuntimeError:
                # Another process may have taken the free port between free_port() and bind.
                lost_port = BIND_ERROR in self.log_tail()
                if self._fixed_port or not lost_port or attempt == BIND_ATTEMPTS - 1:
                    raise
                self.port = free_port()
        return self

    def _start_once(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}:\n{self.log_tail()}")
            # Re-check the process: a foreign server on a stolen port would answer too.
            if self._health_ok() and self.process.poll() is None:
                return
            time.sleep(0.05)
        raise TimeoutError(f"llama-server not healthy after {HEALTH_TIMEOUT_S:.0f}s:\n{self.log_tail()}")

    def _health_ok(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def log_tail(self) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-LOG_TAIL_BYTES:].decode(errors="replace")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s); safe to call twice.

        ``.process`` stays set so callers can read its return code afterwards."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
