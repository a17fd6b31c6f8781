"""A local stand-in for Hugging Face's ``resolve`` endpoint, its CDN and GitHub release downloads.

Usage::

    async with FakeHF() as hf:
        sha = hf.add_file("org/model-GGUF", "model-Q4_K_M.gguf", data)
        hf.add_file("org/gated-GGUF", "m.gguf", data, gated=True)      # needs hf.token
        hf.add_release_asset("b11434", "llama-b11434-bin-ubuntu-x64.tar.gz", archive)
        ... download_model_files(session, repo=..., endpoint=hf.base_url, token=hf.token)
        ... ensure_llama_server(session, base_url=hf.releases_url, ...)

Behaviour, as on huggingface.co: ``/{org}/{repo}/resolve/{rev}/{path}`` answers an LFS file
with a 302 to ``/cdn/<sha256>?sig=…`` carrying ``X-Linked-Size``, ``X-Linked-Etag: "<sha256>"``
and ``ETag``; a non-LFS file (``lfs=False``) is served directly with a git-style sha1 ETag. A
gated repository answers 401 (``X-Error-Code: GatedRepo``) without ``Authorization: Bearer
<token>``; an unknown repository answers 401 ``RepoNotFound``, an unknown file 404. Bodies
honour ``Range`` (206 with ``Content-Range``; 416 past the end). With ``cdn_host="localhost"``
the redirect goes to another origin (same port), so a client that forwards the token is seen.

Fault switches (each consumed by the next matching GET of a body unless stated): ``cut_after``
bytes then drop the connection; ``corrupt_next`` flips a byte; ``fail_next(status)`` answers a
status instead (any request kind, HEAD included unless ``methods`` says otherwise);
``throttle_bps`` slows every body (persistent); ``ignore_range`` answers 200 to a Range request
(persistent). ``requests`` records every request; ``bytes_sent`` counts body bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web

SEND_CHUNK = 64 * 1024


@dataclass(slots=True)
class FakeFile:
    data: bytes
    sha256: str
    gated: bool = False
    lfs: bool = True


@dataclass(slots=True)
class SeenRequest:
    method: str
    path: str
    range: str | None
    authorization: str | None
    host: str


@dataclass(slots=True)
class _Failure:
    status: int
    methods: frozenset[str]


@dataclass
class FakeHF:
    token: str = "hf_fake_token"
    cdn_host: str | None = None
    # fault switches
    cut_after: int | None = None
    corrupt_next: bool = False
    throttle_bps: float | None = None
    ignore_range: bool = False
    # observations
    requests: list[SeenRequest] = field(default_factory=list)
    bytes_sent: int = 0

    def __post_init__(self) -> None:
        self._repos: dict[str, dict[str, FakeFile]] = {}
        self._by_sha: dict[str, FakeFile] = {}
        self._assets: dict[tuple[str, str], bytes] = {}
        self._failures: list[_Failure] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> FakeHF:
        app = web.Application()
        app.router.add_route("*", "/{org}/{name}/resolve/{revision}/{path:.+}", self._resolve)
        app.router.add_route("*", "/cdn/{sha}", self._cdn)
        app.router.add_route("*", "/releases/download/{tag}/{asset}", self._release)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeHF:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- content ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The ``HF_ENDPOINT`` to use."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def releases_url(self) -> str:
        """The base for ``<base>/<tag>/<asset>`` release downloads."""
        return f"{self.base_url}/releases/download"

    @property
    def cdn_url(self) -> str:
        host = self.cdn_host or "127.0.0.1"
        return f"http://{host}:{self.port}"

    def add_file(self, repo: str, path: str, data: bytes, *, gated: bool = False, lfs: bool = True) -> str:
        """Publish ``data`` as ``path`` in ``repo``; returns its sha256 hex."""
        sha = hashlib.sha256(data).hexdigest()
        entry = FakeFile(data, sha, gated, lfs)
        self._repos.setdefault(repo, {})[path] = entry
        self._by_sha[sha] = entry
        return sha

    def add_release_asset(self, tag: str, name: str, data: bytes) -> None:
        self._assets[(tag, name)] = data

    def fail_next(self, status: int, *, times: int = 1, methods: tuple[str, ...] = ("GET", "HEAD")) -> None:
        """The next ``times`` matching requests are answered with ``status``."""
        self._failures += [_Failure(status, frozenset(methods))] * times

    def reset_counters(self) -> None:
        self.requests.clear()
        self.bytes_sent = 0

    def seen(self, method: str | None = None, prefix: str = "") -> list[SeenRequest]:
        """Recorded requests, filtered by method and path prefix."""
        return [r for r in self.requests if (method is None or r.method == method) and r.path.startswith(prefix)]

    # -- handlers -----------------------------------------------------------------------------

    def _record(self, request: web.Request) -> None:
        self.requests.append(
            SeenRequest(
                request.method,
                request.path,
                request.headers.get("Range"),
                request.headers.get("Authorization"),
                request.host,
            )
        )

    def _take_failure(self, method: str) -> int | None:
        for i, failure in enumerate(self._failures):
            if method in failure.methods:
                del self._failures[i]
                return failure.status
        return None

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if (status := self._take_failure(request.method)) is not None:
            return web.Response(status=status, text=f"injected {status}")
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        files = self._repos.get(repo)
        if files is None:
            return _error(401, "RepoNotFound", f"Repository not found: {repo}")
        entry = files.get(request.match_info["path"])
        if entry is None:
            return _error(404, "EntryNotFound", f"Entry not found: {request.match_info['path']}")
        if entry.gated and request.headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, "GatedRepo", f"Access to model {repo} is restricted")
        if not entry.lfs:
            git_sha1 = hashlib.sha1(entry.data).hexdigest()  # stands in for the git blob id
            return await self._serve(request, entry.data, etag=git_sha1)
        headers = {
            "Location": f"{self.cdn_url}/cdn/{entry.sha256}?sig=abc&expires=9999999999",
            "X-Linked-Size": str(len(entry.data)),
            "X-Linked-Etag": f'"{entry.sha256}"',
            "ETag": f'"{entry.sha256}"',
            "X-Repo-Commit": "0" * 40,
        }
        return web.Response(status=302, headers=headers)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if (status := self._take_failure(request.method)) is not None:
            return web.Response(status=status, text=f"injected {status}")
        entry = self._by_sha.get(request.match_info["sha"])
        if entry is None:
            return web.Response(status=404)
        return await self._serve(request, entry.data, etag=entry.sha256)

    async def _release(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        if (status := self._take_failure(request.method)) is not None:
            return web.Response(status=status, text=f"injected {status}")
        data = self._assets.get((request.match_info["tag"], request.match_info["asset"]))
        if data is None:
            return web.Response(status=404, text="Not Found")
        return await self._serve(request, data, etag=hashlib.md5(data).hexdigest())

    async def _serve(self, request: web.Request, data: bytes, *, etag: str) -> web.StreamResponse:
        start, end = 0, len(data)
        status = 200
        wanted = None if self.ignore_range else request.headers.get("Range")
        if wanted:
            match = re.match(r"^bytes=(\d+)-(\d*)$", wanted.strip())
            if match is None:
                return web.Response(status=400, text="bad range")
            start = int(match[1])
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
            status = 206
        headers = {
            "Content-Length": str(end - start),
            "Accept-Ranges": "bytes",
            "ETag": f'"{etag}"',
            "Content-Type": "application/octet-stream",
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        return await self._stream(request, status, headers, data[start:end])

    async def _stream(
        self, request: web.Request, status: int, headers: dict[str, str], body: bytes
    ) -> web.StreamResponse:
        if self.corrupt_next and body:
            self.corrupt_next = False
            flipped = bytearray(body)
            flipped[len(flipped) // 2] ^= 0xFF
            body = bytes(flipped)
        cut, self.cut_after = self.cut_after, None
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        for offset in range(0, len(body), SEND_CHUNK):
            chunk = body[offset : offset + SEND_CHUNK]
            if cut is not None and offset + len(chunk) >= cut:
                await resp.write(chunk[: cut - offset])
                self.bytes_sent += cut - offset
                _drop_connection(request)
                return resp
            await resp.write(chunk)
            self.bytes_sent += len(chunk)
            if self.throttle_bps:
                await asyncio.sleep(len(chunk) / self.throttle_bps)
        await resp.write_eof()
        return resp


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        headers={"X-Error-Code": code, "X-Error-Message": message},
        text=message,
    )


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()  # what was written so far is flushed, then the client sees EOF early
