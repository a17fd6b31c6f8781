"""Model downloads from Hugging Face (or a mirror) with resume and integrity checks.

The Go worker renamed whatever arrived once the connection closed (reference §11.2 item 19):
no byte count, no checksum, and a 416 was taken to mean "complete". Here every file is:

1. probed with a HEAD that does not follow the redirect off Hugging Face, so the first answer
   gives ``X-Linked-Size`` and ``X-Linked-Etag`` (the sha256 of an LFS file);
2. accepted from the cache if it is already there with that size (and, once, that sha256 —
   a ``<file>.verified`` marker remembers the check so that a restart does not re-hash 40 GB);
3. otherwise fetched into ``<file>.partial``, resuming with ``Range: bytes=N-`` and hashing as
   it writes (after re-hashing the prefix already on disk);
4. checked for the exact byte count and the sha256, and only then renamed atomically.

Transient failures (network errors, 5xx, 429) are retried with exponential backoff and jitter,
resuming where the transfer stopped; a hash mismatch deletes the file and fetches it again a
bounded number of times. A ``flock`` on ``.<file>.lock`` makes two workers that share the cache
fetch a file once. Everything runs on the event loop: large hashes yield between chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any, TextIO, TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

log = logging.getLogger("auxot.worker")
_T = TypeVar("_T")

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK_SIZE = 1 << 20
HASH_CHUNK_SIZE = 8 << 20
MAX_REDIRECTS = 10
PARTIAL_SUFFIX = ".partial"
VERIFIED_SUFFIX = ".verified"

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
_CONTENT_RANGE_RE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_TRANSIENT_STATUSES = frozenset({408, 425, 429})
# sock_read bounds a stalled transfer; no total timeout, since a 40 GB file takes a while.
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)


class DownloadError(RuntimeError):
    """A file could not be downloaded."""


class AuthRequiredError(DownloadError):
    """Hugging Face refused the request: a gated or private repository without a good token."""


class RemoteNotFoundError(DownloadError):
    """The repository or the file does not exist."""


class IntegrityError(DownloadError):
    """The downloaded bytes do not match the size or sha256 that the server announced."""


class DiskSpaceError(DownloadError):
    """Not enough free disk space for the file."""


class ModelFileError(RuntimeError):
    """A local (air-gapped) model file is missing or incomplete."""


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """How hard to try.

    ``max_attempts`` bounds consecutive failed attempts that made no progress (an attempt that
    received data resets the count, so a flaky link that keeps moving is not given up on);
    delays grow as ``base_delay_s * 2**(n-1)``, capped at ``max_delay_s``, times a random
    factor in [0.5, 1] so that many workers do not retry in lockstep. ``max_refetches`` bounds
    full re-downloads after a sha256 mismatch.
    """

    max_attempts: int = 6
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    max_refetches: int = 2

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after ``failures`` consecutive failures (``Retry-After`` wins, capped)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay_s)
        backoff = min(self.max_delay_s, self.base_delay_s * 2.0 ** max(failures - 1, 0))
        return backoff * random.uniform(0.5, 1.0)


@dataclass(slots=True, frozen=True)
class HfSettings:
    """Where to download from and with which token."""

    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None


@dataclass(slots=True, frozen=True)
class RemoteMeta:
    """What the server told us about a file before we fetched it."""

    size: int | None = None
    sha256: str | None = None


def hf_settings_from_env(environ: Mapping[str, str] | None = None) -> HfSettings:
    """Read ``HF_ENDPOINT`` and the token the way ``huggingface_hub`` does.

    The token comes from ``HF_TOKEN``, else ``HUGGING_FACE_HUB_TOKEN``, else the file
    ``$HF_TOKEN_PATH`` or ``$HF_HOME/token`` (default ``~/.cache/huggingface/token``) that
    ``huggingface-cli login`` writes. ``environ`` defaults to ``os.environ``.
    """
    env = os.environ if environ is None else environ
    endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")
    token = (env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
    if not token:
        token = _read_token_file(env)
    return HfSettings(endpoint=endpoint, token=token or None)


def _read_token_file(env: Mapping[str, str]) -> str:
    hf_home = env.get("HF_HOME") or str(Path("~/.cache/huggingface").expanduser())
    path = Path(env.get("HF_TOKEN_PATH") or Path(hf_home) / "token").expanduser()
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def hf_resolve_url(endpoint: str, repo: str, file: str, revision: str = "main") -> str:
    """``{endpoint}/{repo}/resolve/{revision}/{file}``, with the path segments quoted."""
    return f"{endpoint.rstrip('/')}/{quote(repo)}/resolve/{quote(revision, safe='')}/{quote(file)}"


def split_shards(file_name: str) -> list[str]:
    """Every shard of a split GGUF, in order, keeping any sub-directory prefix.

    ``Q4/model-00002-of-00003.gguf`` gives the three names ``Q4/model-0000{1,2,3}-of-00003.gguf``;
    a name that is not split (or claims zero shards) is returned alone.
    """
    directory, _, base = file_name.rpartition("/")
    match = _SPLIT_RE.match(base)
    if match is None or int(match["count"]) == 0:
        return [file_name]
    count = int(match["count"])
    head = f"{directory}/" if directory else ""
    return [f"{head}{match['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def expand_model_files(files: Iterable[str]) -> list[str]:
    """The files to fetch: each split name expanded to all of its shards, duplicates dropped."""
    seen: dict[str, None] = {}
    for name in files:
        for shard in split_shards(name):
            seen.setdefault(shard, None)
    return list(seen)


def model_cache_dir(models_dir: Path, repo: str) -> Path:
    """``<models_dir>/<repo with "/" replaced by "_">``."""
    return models_dir / repo.replace("/", "_")


def verify_local_model(path: Path) -> list[Path]:
    """Check an air-gapped model file and return every file of it, first shard first.

    ``path`` must exist. If its name is a split shard (``<prefix>-0000K-of-0000N.gguf``), every
    sibling shard 1..N must exist in the same directory; the error lists the missing ones.
    Raises :class:`ModelFileError`.
    """
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    shards = [path.parent / name for name in split_shards(path.name)]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise ModelFileError(
            f"split model is incomplete — {len(missing)} of {len(shards)} shards missing in "
            f"{path.parent}: {', '.join(missing)}"
        )
    return shards


def _safe_relative(name: str) -> PurePosixPath:
    """Refuse file names from the policy that would land outside the repository directory."""
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise DownloadError(f"refusing unsafe model file name: {name!r}")
    return rel


# ---------------------------------------------------------------------------------------------
# Progress


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressReporter:
    """Reports transfer progress: a bar on a terminal, log lines otherwise.

    On a TTY it redraws one line on ``stream`` (stderr by default) with ``\\r`` at most every
    ``bar_interval_s``. Otherwise it logs "download progress" (fields ``file``, ``bytes``,
    ``total``, ``percent``, ``rate`` in bytes/s) every ``log_interval_s`` or every
    ``log_percent_step`` percent, whichever comes first. ``tty=None`` asks the stream.
    ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        bar_interval_s: float = 0.1,
        log_interval_s: float = 10.0,
        log_percent_step: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = tty if tty is not None else _isatty(self._stream)
        self._bar_interval = bar_interval_s
        self._log_interval = log_interval_s
        self._log_step = log_percent_step
        self._clock = clock
        self._label = ""
        self._total: int | None = None
        self._initial = 0
        self._done = 0
        self._started = 0.0
        self._last_emit = 0.0
        self._next_percent = 0.0
        self._active = False

    @property
    def is_tty(self) -> bool:
        return self._tty

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        """A transfer of ``label`` begins (or resumes) with ``done`` of ``total`` bytes present."""
        self._label, self._total, self._initial, self._done = label, total, done, done
        self._started = self._last_emit = self._clock()
        self._next_percent = self._percent_floor(done) + self._log_step
        self._active = True
        if not self._tty:
            log.info("download started", extra=self._fields(0.0))

    def update(self, done: int) -> None:
        """``done`` bytes of the file are now on disk."""
        self._done = done
        now = self._clock()
        if self._tty:
            if now - self._last_emit >= self._bar_interval:
                self._last_emit = now
                self._draw(now)
            return
        percent = self._percent()
        crossed = percent is not None and percent >= self._next_percent
        if crossed or now - self._last_emit >= self._log_interval:
            self._last_emit = now
            if percent is not None:
                self._next_percent = self._percent_floor(self._done) + self._log_step
            log.info("download progress", extra=self._fields(now - self._started))

    def finish(self) -> None:
        """The transfer ended (complete or not): draw the last state and close the bar line."""
        if self._tty and self._active:
            self._draw(self._clock())
            self._stream.write("\n")
            self._stream.flush()
        self._active = False

    def _percent(self) -> float | None:
        if not self._total:
            return None
        return min(100.0, 100.0 * self._done / self._total)

    def _percent_floor(self, done: int) -> float:
        if not self._total or self._log_step <= 0:
            return 0.0
        percent = 100.0 * done / self._total
        return percent - percent % self._log_step

    def _rate(self, elapsed: float) -> float:
        return (self._done - self._initial) / elapsed if elapsed > 0 else 0.0

    def _fields(self, elapsed: float) -> dict[str, Any]:
        percent = self._percent()
        return {
            "file": self._label,
            "bytes": self._done,
            "total": self._total,
            "percent": None if percent is None else round(percent, 1),
            "rate": int(self._rate(elapsed)),
        }

    def _draw(self, now: float) -> None:
        rate = self._rate(now - self._started)
        name = self._label.rsplit("/", 1)[-1][-40:]
        if self._total:
            frac = min(self._done / self._total, 1.0)
            bar = "#" * int(frac * 24)
            eta = _format_eta((self._total - self._done) / rate) if rate > 0 else "?"
            text = (
                f"{name} [{bar:<24}] {frac * 100:5.1f}% {_human_bytes(self._done)}/"
                f"{_human_bytes(self._total)} {_human_bytes(rate)}/s ETA {eta}"
            )
        else:
            text = f"{name} {_human_bytes(self._done)} {_human_bytes(rate)}/s"
        self._stream.write(f"\r{text:<100}")
        self._stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# HTTP helpers


class _TransientError(Exception):
    """A failure worth retrying (5xx, 429, a short read, a wrong resume offset)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


_RETRYABLE = (aiohttp.ClientError, TimeoutError, ConnectionError, _TransientError)


def _is_transient(status: int) -> bool:
    return status >= 500 or status in _TRANSIENT_STATUSES


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return float(headers.get("Retry-After", ""))
    except ValueError:
        return None


async def _request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    token: str | None,
    headers: Mapping[str, str],
    stop: Callable[[aiohttp.ClientResponse], bool] = lambda _resp: False,
) -> aiohttp.ClientResponse:
    """Send ``method`` and follow redirects by hand.

    The bearer token only goes to the origin of ``url`` (Hugging Face redirects LFS files to a
    CDN whose signed URL must not see it). ``stop(resp)`` ends the walk early at a redirect.
    The caller must release the returned response.
    """
    origin = URL(url).origin()
    current = URL(url, encoded=True)
    for _ in range(MAX_REDIRECTS + 1):
        send = dict(headers)
        if token and current.origin() == origin:
            send["Authorization"] = f"Bearer {token}"
        resp = await session.request(
            method, current, headers=send, allow_redirects=False, timeout=_TIMEOUT
        )
        location = resp.headers.get("Location")
        if resp.status not in _REDIRECT_STATUSES or not location or stop(resp):
            return resp
        resp.release()
        current = current.join(URL(location, encoded=True))
    raise DownloadError(f"too many redirects for {url}")


def _raise_for_denied(resp: aiohttp.ClientResponse, url: str, label: str) -> None:
    """Turn Hugging Face's 401/403/404 into errors that say what to do."""
    code = resp.headers.get("X-Error-Code", "")
    detail = resp.headers.get("X-Error-Message", "")
    suffix = f" ({detail})" if detail else ""
    if resp.status in (401, 403):
        if code == "RepoNotFound":
            raise AuthRequiredError(
                f"{label}: repository not found, or it is private: check the repo name, or set "
                f"HF_TOKEN to a token that can read it (HTTP {resp.status}){suffix}"
            )
        raise AuthRequiredError(
            f"{label}: gated or private repo: set HF_TOKEN to a Hugging Face token that has "
            f"access (and accept the model's license on its page) (HTTP {resp.status} from "
            f"{URL(url).origin()}){suffix}"
        )
    if resp.status == 404:
        raise RemoteNotFoundError(f"{label}: not found at {url} (HTTP 404){suffix}")


def _meta_from(resp: aiohttp.ClientResponse) -> RemoteMeta:
    sha = resp.headers.get("X-Linked-Etag", "").strip().removeprefix("W/").strip('"').lower()
    size_text = resp.headers.get("X-Linked-Size")
    if size_text is None and resp.status == 200:
        size_text = resp.headers.get("Content-Length")
    size = int(size_text) if size_text and size_text.strip().isdigit() else None
    return RemoteMeta(size=size, sha256=sha if _SHA256_RE.match(sha) else None)


async def probe(
    session: aiohttp.ClientSession,
    url: str,
    *,
    token: str | None = None,
    retry: RetryPolicy | None = None,
    label: str | None = None,
) -> RemoteMeta:
    """Ask for a file's size and sha256 without fetching it.

    A HEAD that stops at the first redirect carrying Hugging Face's ``X-Linked-*`` headers;
    otherwise it follows redirects and takes ``Content-Length`` from the final 200. A server
    that does not answer HEAD usefully gives an empty :class:`RemoteMeta`. Raises
    :class:`AuthRequiredError` / :class:`RemoteNotFoundError`, or :class:`DownloadError` once
    the retries for transient failures are spent.
    """
    name = label or url
    policy = retry or RetryPolicy()

    async def once() -> RemoteMeta:
        headers = {"Accept-Encoding": "identity"}
        resp = await _request(
            session, "HEAD", url, token=token, headers=headers, stop=_has_linked_headers
        )
        async with resp:
            if resp.status in _REDIRECT_STATUSES or resp.status == 200:
                return _meta_from(resp)
            if resp.url.origin() == URL(url).origin():
                _raise_for_denied(resp, url, name)
            if _is_transient(resp.status):
                raise _TransientError(f"HTTP {resp.status}", _retry_after(resp.headers))
            return RemoteMeta()  # e.g. a CDN whose signed URL only allows GET

    return await _with_retries(once, policy, name, what="probe")


def _has_linked_headers(resp: aiohttp.ClientResponse) -> bool:
    return "X-Linked-Size" in resp.headers or "X-Linked-Etag" in resp.headers


async def _with_retries(
    func: Callable[[], Awaitable[_T]], policy: RetryPolicy, label: str, *, what: str
) -> _T:
    failures = 0
    while True:
        try:
            return await func()
        except _RETRYABLE as exc:
            failures += 1
            if failures >= policy.max_attempts:
                raise DownloadError(
                    f"{label}: {what} failed after {failures} attempts: {exc!r}"
                ) from exc
            delay = policy.delay(failures, getattr(exc, "retry_after", None))
            log.warning(
                "download retry",
                extra={"file": label, "attempt": failures, "delay_s": round(delay, 2),
                       "error": repr(exc), "stage": what},
            )
            await asyncio.sleep(delay)


# ---------------------------------------------------------------------------------------------
# Hashing


async def hash_file(path: Path, *, limit: int | None = None) -> str:
    """sha256 of ``path`` (or of its first ``limit`` bytes), yielding to the loop per chunk."""
    hasher = hashlib.sha256()
    await _hash_into(hasher, path, limit)
    return hasher.hexdigest()


async def _hash_into(hasher: Any, path: Path, limit: int | None) -> None:
    remaining = limit if limit is not None else -1
    with path.open("rb") as fh:
        while remaining != 0:
            size = HASH_CHUNK_SIZE if remaining < 0 else min(HASH_CHUNK_SIZE, remaining)
            chunk = fh.read(size)
            if not chunk:
                break
            hasher.update(chunk)
            if remaining > 0:
                remaining -= len(chunk)
            await asyncio.sleep(0)  # a 40 GB re-hash must not freeze the loop


def _marker_path(dest: Path) -> Path:
    return dest.with_name(dest.name + VERIFIED_SUFFIX)


def partial_path(dest: Path) -> Path:
    """Where an unfinished download of ``dest`` lives."""
    return dest.with_name(dest.name + PARTIAL_SUFFIX)


# ---------------------------------------------------------------------------------------------
# The partial file


class _Partial:
    """``<dest>.partial`` opened for appending, with a running sha256 of its contents."""

    def __init__(self, path: Path, fh: IO[bytes], offset: int, hasher: Any) -> None:
        self.path = path
        self.offset = offset
        self._fh = fh
        self._hasher = hasher

    @classmethod
    async def open(cls, path: Path, max_size: int | None) -> _Partial:
        """Open (creating) ``path``; a prefix longer than ``max_size`` is discarded."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = path.open("ab")
        offset = fh.tell()
        if max_size is not None and offset > max_size:
            fh.truncate(0)
            offset = 0
        hasher = hashlib.sha256()
        if offset:
            log.info("download resuming", extra={"file": str(path), "bytes": offset})
            await _hash_into(hasher, path, offset)
        return cls(path, fh, offset, hasher)

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._hasher.update(data)
        self.offset += len(data)

    def restart(self) -> None:
        self._fh.seek(0)
        self._fh.truncate(0)
        self._hasher = hashlib.sha256()
        self.offset = 0

    def digest(self) -> str:
        return str(self._hasher.hexdigest())

    def close(self, *, sync: bool = False) -> None:
        self._fh.flush()
        if sync:
            os.fsync(self._fh.fileno())
        self._fh.close()


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes a-b/total`` → (a, total); ``bytes */total`` → (None, total)."""
    match = _CONTENT_RANGE_RE.match((value or "").strip())
    if match is None:
        return None, None
    start = int(match[1]) if match[1] is not None else None
    total = int(match[3]) if match[3] != "*" else None
    return start, total


def _check_disk_space(directory: Path, needed: int, label: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise DiskSpaceError(
            f"not enough disk space for {label}: {needed} bytes ({_human_bytes(needed)}) needed "
            f"in {directory}, only {free} bytes ({_human_bytes(free)}) free"
        )


# ---------------------------------------------------------------------------------------------
# Locking


@contextlib.asynccontextmanager
async def file_lock(path: Path, poll_s: float = 0.1) -> AsyncIterator[None]:
    """An exclusive ``flock`` on ``path`` (created if needed), polled so the loop keeps running.

    Two workers on one machine that share a cache then fetch a file once: the second waits and
    finds it done. ``flock`` locks belong to the open file, so this also orders tasks of one
    process. The lock goes away with the process, so a killed worker never leaves it held.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    log.info("waiting for a lock held by another download", extra={"lock": str(path)})
                    announced = True
                await asyncio.sleep(poll_s)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# ---------------------------------------------------------------------------------------------
# Transfer


@dataclass(slots=True)
class _Job:
    session: aiohttp.ClientSession
    url: str
    dest: Path
    token: str | None
    meta: RemoteMeta
    retry: RetryPolicy
    progress: ProgressReporter
    label: str


async def _transfer_once(job: _Job, part: _Partial) -> bool:
    """One GET from ``part.offset``; True when the whole file is on disk."""
    headers = {"Accept-Encoding": "identity"}
    if part.offset:
        headers["Range"] = f"bytes={part.offset}-"
    resp = await _request(job.session, "GET", job.url, token=job.token, headers=headers)
    async with resp:
        total = _prepare_body(job, part, resp)
        if total is not None and part.offset == total and resp.status == 416:
            return True
        job.progress.start(job.label, total, part.offset)
        try:
            async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
                part.write(chunk)
                if total is not None and part.offset > total:
                    part.restart()
                    raise _TransientError("server sent more bytes than the file has")
                job.progress.update(part.offset)
        finally:
            job.progress.finish()
        if total is None or part.offset == total:
            return True
        raise _TransientError(f"connection closed at {part.offset} of {total} bytes")


def _prepare_body(job: _Job, part: _Partial, resp: aiohttp.ClientResponse) -> int | None:
    """Check the status of a GET and return the file's total size (None if unknown)."""
    status = resp.status
    if status in (401, 403, 404) and resp.url.origin() == URL(job.url).origin():
        _raise_for_denied(resp, job.url, job.label)
    if status == 416:
        _, total = _parse_content_range(resp.headers.get("Content-Range"))
        total = job.meta.size if job.meta.size is not None else total
        if total is None or part.offset != total:
            part.restart()
            raise _TransientError("range not satisfiable; starting the file over")
        return total
    if _is_transient(status) or status in (401, 403):  # a CDN hiccup or an expired signature
        raise _TransientError(f"HTTP {status}", _retry_after(resp.headers))
    if status == 206:
        start, total = _parse_content_range(resp.headers.get("Content-Range"))
        if start != part.offset:
            part.restart()
            raise _TransientError(f"server resumed at {start}, not {part.offset}")
    elif status == 200:
        if part.offset:
            log.info("server ignored the range; starting over", extra={"file": job.label})
            part.restart()
        total = resp.content_length
    else:
        raise DownloadError(f"{job.label}: HTTP {status} from {resp.url.origin()}")
    return _reconcile_size(job, part, total)


def _reconcile_size(job: _Job, part: _Partial, total: int | None) -> int | None:
    if job.meta.size is None:
        if total is not None:
            _check_disk_space(job.dest.parent, total - part.offset, job.label)
        return total
    if total is not None and total != job.meta.size:
        raise DownloadError(
            f"{job.label}: the server sends {total} bytes but announced {job.meta.size}; "
            "the file changed upstream while downloading, try again"
        )
    return job.meta.size


async def _transfer(job: _Job) -> tuple[int, str]:
    """Bring ``<dest>.partial`` to the full file; returns (bytes, sha256 of them)."""
    part = await _Partial.open(partial_path(job.dest), job.meta.size)
    failures = 0
    try:
        while True:
            before = part.offset
            try:
                if await _transfer_once(job, part):
                    return part.offset, part.digest()
            except _RETRYABLE as exc:
                failures = 1 if part.offset > before else failures + 1
                if failures >= job.retry.max_attempts:
                    raise DownloadError(
                        f"{job.label}: giving up after {failures} failed attempts: {exc!r} "
                        f"({part.offset} bytes kept in {part.path} for the next try)"
                    ) from exc
                delay = job.retry.delay(failures, getattr(exc, "retry_after", None))
                log.warning(
                    "download retry",
                    extra={"file": job.label, "attempt": failures, "bytes": part.offset,
                           "delay_s": round(delay, 2), "error": repr(exc), "stage": "get"},
                )
                await asyncio.sleep(delay)
    finally:
        part.close(sync=True)


async def _fetch_verified(job: _Job) -> None:
    """Download into the partial file until size and sha256 match, then rename atomically."""
    refetches = 0
    while True:
        nbytes, digest = await _transfer(job)
        problem = _integrity_problem(job.meta, nbytes, digest)
        if problem is None:
            os.replace(partial_path(job.dest), job.dest)
            if job.meta.sha256:
                _write_marker(job.dest, job.meta.sha256)
            return
        _discard(partial_path(job.dest))
        refetches += 1
        log.warning(
            "download corrupted; fetching again",
            extra={"file": job.label, "problem": problem, "refetch": refetches},
        )
        if refetches > job.retry.max_refetches:
            raise IntegrityError(f"{job.label}: {problem} (after {refetches} downloads)")


def _integrity_problem(meta: RemoteMeta, nbytes: int, digest: str) -> str | None:
    if meta.size is not None and nbytes != meta.size:
        return f"got {nbytes} bytes, expected {meta.size}"
    if meta.sha256 is not None and digest != meta.sha256:
        return f"sha256 {digest} does not match the expected {meta.sha256}"
    return None


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _write_marker(dest: Path, sha256: str) -> None:
    _marker_path(dest).write_text(sha256 + "\n", encoding="utf-8")


def _marker_says(dest: Path) -> str:
    try:
        return _marker_path(dest).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _judge_existing(dest: Path, meta: RemoteMeta, label: str) -> bool | None:
    """True: the final file is good; False: it must be downloaded; None: hash it to know."""
    size = _size_of(dest)
    if size is None:
        return False
    if meta.size is not None and size != meta.size:
        log.warning(
            "cached file has the wrong size; downloading again",
            extra={"file": label, "bytes": size, "total": meta.size},
        )
        _discard(dest, _marker_path(dest))
        return False
    if size == 0 and meta.size is None:
        return False
    if meta.sha256 is None or _marker_says(dest) == meta.sha256:
        return True
    return None


async def _accept_existing(dest: Path, meta: RemoteMeta, label: str) -> bool:
    """Is the final file already there and right? Deletes it when it is provably wrong."""
    verdict = _judge_existing(dest, meta, label)
    if verdict is not None or meta.sha256 is None:
        return bool(verdict)
    log.info("verifying cached file", extra={"file": label, "total": meta.size})
    if await hash_file(dest) == meta.sha256:
        _write_marker(dest, meta.sha256)
        return True
    log.warning("cached file is corrupted; downloading again", extra={"file": label})
    _discard(dest, _marker_path(dest))
    return False


async def download_file(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    *,
    token: str | None = None,
    progress: ProgressReporter | None = None,
    retry: RetryPolicy | None = None,
    label: str | None = None,
) -> Path:
    """Make ``dest`` a complete, verified copy of ``url`` and return it.

    Parameters: ``session`` — the aiohttp session to use; ``url`` — what to fetch (redirects
    are followed, the ``token`` is sent as a bearer token to ``url``'s own origin only);
    ``dest`` — the final path (its directory is created); ``progress`` — where to report
    (default: a :class:`ProgressReporter` on stderr/the log); ``retry`` — bounds on retries;
    ``label`` — the name used in logs and errors (default: ``url``).

    When the server cannot be reached but ``dest`` exists, ``dest`` is used as is, with a
    warning, so that a worker restarts without internet. Raises :class:`DownloadError` and
    its subclasses.
    """
    name = label or url
    dest.parent.mkdir(parents=True, exist_ok=True)
    async with file_lock(dest.with_name(f".{dest.name}.lock")):
        return await _download_locked(
            session, url, dest, token=token, progress=progress or ProgressReporter(),
            retry=retry or RetryPolicy(), label=name,
        )


async def _download_locked(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    *,
    token: str | None,
    progress: ProgressReporter,
    retry: RetryPolicy,
    label: str,
) -> Path:
    name = label
    have_final = bool(_size_of(dest))
    # With a cached copy at hand, do not make an offline restart wait through every retry.
    probe_policy = replace(retry, max_attempts=min(retry.max_attempts, 2)) if have_final else retry
    try:
        meta = await probe(session, url, token=token, label=name, retry=probe_policy)
    except DownloadError as exc:
        if not have_final:
            raise
        log.warning(
            "could not check the cached file against the server; using it as is",
            extra={"file": name, "error": str(exc)},
        )
        return dest
    if await _accept_existing(dest, meta, name):
        log.info("download cached", extra={"file": name, "path": str(dest)})
        return dest
    if meta.size is not None:
        have = _size_of(partial_path(dest)) or 0
        _check_disk_space(dest.parent, max(meta.size - min(have, meta.size), 0), name)
    job = _Job(session, url, dest, token, meta, retry, progress, name)
    await _fetch_verified(job)
    log.info(
        "download complete",
        extra={"file": name, "path": str(dest), "bytes": _size_of(dest),
               "sha256": meta.sha256, "verified": meta.sha256 is not None},
    )
    return dest


async def download_model_files(
    session: aiohttp.ClientSession,
    *,
    repo: str,
    files: list[str],
    models_dir: Path,
    endpoint: str = DEFAULT_ENDPOINT,
    token: str | None = None,
    progress: ProgressReporter | None = None,
    retry: RetryPolicy | None = None,
) -> list[Path]:
    """Download every file of a model from Hugging Face and return their local paths.

    Parameters: ``repo`` — the Hugging Face repository (``org/name``); ``files`` — paths inside
    it (a split GGUF name is expanded to all of its shards, so the first shard alone is
    enough); ``models_dir`` — the cache root, files land in
    ``<models_dir>/<repo with "/" → "_">/<file>``; ``endpoint`` / ``token`` — from
    :func:`hf_settings_from_env` (``HF_ENDPOINT`` / ``HF_TOKEN``); ``progress`` / ``retry`` —
    as for :func:`download_file`.

    The returned list keeps the order of the expanded names, so ``[0]`` is what llama-server
    gets (it finds the other shards itself). Files are fetched one after the other.
    """
    reporter = progress or ProgressReporter()
    repo_dir = model_cache_dir(models_dir, repo)
    paths: list[Path] = []
    for name in expand_model_files(files):
        dest = repo_dir / _safe_relative(name)
        url = hf_resolve_url(endpoint, repo, name)
        paths.append(
            await download_file(
                session, url, dest, token=token, progress=reporter, retry=retry, label=name
            )
        )
    return paths
