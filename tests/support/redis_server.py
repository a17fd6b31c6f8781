"""A real ``redis-server`` for tests: free port, its own directory, kill and restart at will.

    server = RedisServer(tmp_path, appendonly=True, password="pw")
    server.start()            # waits until it answers PING
    server.url                # redis://:pw@127.0.0.1:PORT/0
    server.kill()             # SIGKILL: no shutdown save, clients see the connection drop
    server.start()            # again, on the SAME port and directory (AOF data comes back)
    server.flush()            # FLUSHALL between tests sharing one server
    server.stop()

``redis-server`` must be on PATH (scripts/test.sh installs it). Nothing here uses the Python
client, so a helper never hides a client-side problem it is meant to expose; commands go
through a raw RESP socket.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import BinaryIO

from tests.support.llama_server import free_port


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError("redis-server is not on PATH: install it (apt-get install -y redis-server)")
    return path


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1.

    Parameters:
        workdir: its ``dir`` (AOF/RDB files) and log file live here.
        appendonly: persistence with ``appendfsync always``, so a SIGKILL loses nothing.
        password: ``requirepass``; the URL then carries it.
        port: fixed port; a free one by default. A restart always reuses the port.
    """

    def __init__(self, workdir: Path, *, appendonly: bool = False, password: str = "", port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.appendonly = appendonly
        self.password = password
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command_line(self) -> list[str]:
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--save", "",
            "--logfile", str(self.log_path),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        while True:  # after a kill the port may be held for a moment
            self.proc = subprocess.Popen(self.command_line(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            if self._wait_ready(deadline):
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise TimeoutError(f"redis-server on port {self.port} did not start:\n{self.log()[-2000:]}")
            time.sleep(0.1)

    def _wait_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                if self.command("PING") == b"+PONG":
                    return True
            except (OSError, RuntimeError):  # not listening yet, or "-LOADING" the AOF
                pass
            time.sleep(0.02)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> None:
        self.kill()
        self.start()

    def flush(self) -> None:
        assert self.command("FLUSHALL") == b"+OK"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- a raw RESP client, enough for assertions -----------------------------------------------

    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> bytes | int | list[object] | None:
        """Send one command; returns the decoded reply (``+OK`` status lines keep their ``+``)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            reader = sock.makefile("rb")
            if self.password:
                sock.sendall(_encode(("AUTH", self.password)))
                auth = _read_reply(reader)
                if auth != b"+OK":
                    raise RuntimeError(f"AUTH failed: {auth!r}")
            sock.sendall(_encode(args))
            return _read_reply(reader)


def _encode(args: tuple[str | bytes | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _read_reply(reader: BinaryIO) -> bytes | int | list[object] | None:
    line: bytes = reader.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return b"+" + rest
    if kind == b"-":
        raise RuntimeError(f"redis error: {rest.decode(errors='replace')}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)
        return bytes(data[:-2])
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read_reply(reader) for _ in range(size)]
    raise RuntimeError(f"unexpected redis reply: {line!r}")
