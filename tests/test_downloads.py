"""Model downloads against a local fake of Hugging Face (tests/fake_hf.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import aiohttp
import pytest
from fake_hf import FakeHF

from auxot_common import downloads
from auxot_common.downloads import (
    AuthRequiredError,
    DiskSpaceError,
    DownloadError,
    IntegrityError,
    ModelFileError,
    ProgressReporter,
    RemoteNotFoundError,
    RetryPolicy,
    download_model_files,
    expand_model_files,
    hf_resolve_url,
    hf_settings_from_env,
    split_shards,
    verify_local_model,
)

REPO = "org/model-GGUF"
REPO_DIR = "org_model-GGUF"
FAST = RetryPolicy(base_delay_s=0.001, max_delay_s=0.01)
REPO_ROOT = Path(__file__).resolve().parents[1]


def quiet() -> ProgressReporter:
    return ProgressReporter(tty=False)


def blob(size: int, seed: int = 1) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"x" * (size % 32)


async def fetch(hf: FakeHF, models: Path, files: list[str], *, repo: str = REPO, token: str | None = None,
                retry: RetryPolicy = FAST) -> list[Path]:
    async with aiohttp.ClientSession() as session:
        return await download_model_files(
            session, repo=repo, files=files, models_dir=models, endpoint=hf.base_url, token=token,
            progress=quiet(), retry=retry,
        )


# -- names and local files ------------------------------------------------------------------


def test_split_shards() -> None:
    assert split_shards("m-Q4_K_M.gguf") == ["m-Q4_K_M.gguf"]
    assert split_shards("Q4/m-00002-of-00003.gguf") == [
        "Q4/m-00001-of-00003.gguf", "Q4/m-00002-of-00003.gguf", "Q4/m-00003-of-00003.gguf",
    ]
    assert split_shards("m-00001-of-00000.gguf") == ["m-00001-of-00000.gguf"]
    assert expand_model_files(["a-00001-of-00002.gguf", "a-00002-of-00002.gguf", "mmproj.gguf"]) == [
        "a-00001-of-00002.gguf", "a-00002-of-00002.gguf", "mmproj.gguf",
    ]


def test_hf_settings_from_env(tmp_path: Path) -> None:
    assert hf_settings_from_env({"HF_HOME": str(tmp_path)}).token is None
    settings = hf_settings_from_env({"HF_ENDPOINT": "https://mirror.example/", "HF_TOKEN": " hf_x "})
    assert (settings.endpoint, settings.token) == ("https://mirror.example", "hf_x")
    (tmp_path / "token").write_text("hf_from_file\n")
    assert hf_settings_from_env({"HF_HOME": str(tmp_path)}).token == "hf_from_file"
    assert hf_settings_from_env({}).endpoint == "https://huggingface.co"
    assert hf_resolve_url("https://h.co", "o/r", "dir/a b.gguf") == "https://h.co/o/r/resolve/main/dir/a%20b.gguf"


def test_verify_local_model(tmp_path: Path) -> None:
    single = tmp_path / "m.gguf"
    with pytest.raises(ModelFileError, match="not found"):
        verify_local_model(single)
    single.write_bytes(b"GGUF")
    assert verify_local_model(single) == [single]
    shard2 = tmp_path / "big-00002-of-00004.gguf"
    shard2.write_bytes(b"GGUF")
    (tmp_path / "big-00001-of-00004.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelFileError) as err:
        verify_local_model(shard2)
    message = str(err.value)
    assert "2 of 4 shards missing" in message
    assert "big-00003-of-00004.gguf" in message and "big-00004-of-00004.gguf" in message
    for i in (3, 4):
        (tmp_path / f"big-0000{i}-of-00004.gguf").write_bytes(b"GGUF")
    assert [p.name for p in verify_local_model(shard2)] == [f"big-0000{i}-of-00004.gguf" for i in range(1, 5)]


def test_unsafe_names_refused() -> None:
    for name in ("../evil.gguf", "/etc/passwd", "a/../../b.gguf", ""):
        with pytest.raises(DownloadError, match="unsafe"):
            downloads._safe_relative(name)


# -- downloads ------------------------------------------------------------------------------


async def test_plain_download_verifies_sha256(tmp_path: Path) -> None:
    data = blob(300_000)
    async with FakeHF() as hf:
        sha = hf.add_file(REPO, "model-Q4_K_M.gguf", data)
        paths = await fetch(hf, tmp_path, ["model-Q4_K_M.gguf"])
        assert paths == [tmp_path / REPO_DIR / "model-Q4_K_M.gguf"]
        assert paths[0].read_bytes() == data
        assert not (tmp_path / REPO_DIR / "model-Q4_K_M.gguf.partial").exists()
        assert (tmp_path / REPO_DIR / "model-Q4_K_M.gguf.verified").read_text().strip() == sha
        assert [r.method for r in hf.requests] == ["HEAD", "GET", "GET"]  # HEAD stops at the 302
        assert hf.bytes_sent == len(data)


async def test_resume_after_cut_connection(tmp_path: Path) -> None:
    data = blob(1_000_000)
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", data)
        hf.cut_after = 400_000
        [path] = await fetch(hf, tmp_path, ["m.gguf"])
        assert path.read_bytes() == data
        gets = hf.seen("GET", "/cdn/")
        assert len(gets) == 2
        assert gets[0].range is None
        assert gets[1].range == "bytes=400000-"
        assert hf.bytes_sent == len(data)  # the second transfer fetched only the rest


async def test_corrupted_download_is_fetched_again(tmp_path: Path) -> None:
    data = blob(500_000)
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", data)
        hf.corrupt_next = True
        [path] = await fetch(hf, tmp_path, ["m.gguf"])
        assert path.read_bytes() == data
        assert len(hf.seen("GET", "/cdn/")) == 2
        assert hf.bytes_sent == 2 * len(data)


async def test_persistent_corruption_gives_up(tmp_path: Path) -> None:
    data = blob(10_000)
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", data)

        hf_serve = hf._serve

        async def always_corrupt(request, body, *, etag):  # type: ignore[no-untyped-def]
            hf.corrupt_next = True
            return await hf_serve(request, body, etag=etag)

        hf._serve = always_corrupt  # type: ignore[method-assign]
        with pytest.raises(IntegrityError, match="sha256"):
            await fetch(hf, tmp_path, ["m.gguf"], retry=RetryPolicy(base_delay_s=0.001, max_refetches=2))
        assert len(hf.seen("GET", "/cdn/")) == 3
        assert not (tmp_path / REPO_DIR / "m.gguf").exists()
        assert not (tmp_path / REPO_DIR / "m.gguf.partial").exists()


async def test_split_model_downloads_every_shard(tmp_path: Path) -> None:
    shards = {f"Q8/big-0000{i}-of-00003.gguf": blob(50_000 + i, seed=i) for i in (1, 2, 3)}
    async with FakeHF() as hf:
        for name, data in shards.items():
            hf.add_file(REPO, name, data)
        paths = await fetch(hf, tmp_path, ["Q8/big-00001-of-00003.gguf"])  # the first shard is enough
        assert [p.relative_to(tmp_path / REPO_DIR).as_posix() for p in paths] == list(shards)
        for path, data in zip(paths, shards.values(), strict=True):
            assert path.read_bytes() == data


async def test_gated_repo_needs_token(tmp_path: Path) -> None:
    data = blob(20_000)
    async with FakeHF() as hf:
        hf.add_file("meta/gated-GGUF", "g.gguf", data, gated=True)
        with pytest.raises(AuthRequiredError, match="gated or private repo: set HF_TOKEN"):
            await fetch(hf, tmp_path, ["g.gguf"], repo="meta/gated-GGUF")
        with pytest.raises(AuthRequiredError):
            await fetch(hf, tmp_path, ["g.gguf"], repo="meta/gated-GGUF", token="hf_wrong")
        [path] = await fetch(hf, tmp_path, ["g.gguf"], repo="meta/gated-GGUF", token=hf.token)
        assert path.read_bytes() == data


async def test_token_is_not_forwarded_to_another_host(tmp_path: Path) -> None:
    data = blob(20_000)
    async with FakeHF(cdn_host="localhost") as hf:
        hf.add_file("meta/gated-GGUF", "g.gguf", data, gated=True)
        [path] = await fetch(hf, tmp_path, ["g.gguf"], repo="meta/gated-GGUF", token=hf.token)
        assert path.read_bytes() == data
        assert all(r.authorization == f"Bearer {hf.token}" for r in hf.seen(prefix="/meta/"))
        cdn = hf.seen("GET", "/cdn/")
        assert cdn and cdn[0].host.startswith("localhost") and cdn[0].authorization is None


async def test_unknown_repo_and_file(tmp_path: Path) -> None:
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", b"abc")
        with pytest.raises(AuthRequiredError, match="not found, or it is private"):
            await fetch(hf, tmp_path, ["m.gguf"], repo="nobody/nothing")
        with pytest.raises(RemoteNotFoundError, match="404"):
            await fetch(hf, tmp_path, ["missing.gguf"])


async def test_503_then_success(tmp_path: Path) -> None:
    data = blob(100_000)
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", data)
        hf.fail_next(503, methods=("HEAD",))
        hf.fail_next(503, times=2, methods=("GET",))
        [path] = await fetch(hf, tmp_path, ["m.gguf"])
        assert path.read_bytes() == data
        assert len(hf.seen("HEAD")) == 2
        assert len(hf.seen("GET", "/org/")) == 3


async def test_retries_are_bounded(tmp_path: Path) -> None:
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", blob(1000))
        hf.fail_next(503, times=100, methods=("GET",))
        with pytest.raises(DownloadError, match="giving up after 4"):
            await fetch(hf, tmp_path, ["m.gguf"], retry=RetryPolicy(max_attempts=4, base_delay_s=0.001))
        assert len(hf.seen("GET")) == 4


async def test_disk_space_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9 - 1000, 1000))
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", blob(250_000))
        with pytest.raises(DiskSpaceError, match=r"250000 bytes \(244.1 KiB\) needed .* only 1000 bytes"):
            await fetch(hf, tmp_path, ["m.gguf"])
        assert not hf.seen("GET")


async def test_two_downloads_of_one_file_at_once_fetch_it_once(tmp_path: Path) -> None:
    data = blob(400_000)
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", data)
        hf.throttle_bps = 4_000_000
        first, second = await asyncio.gather(fetch(hf, tmp_path, ["m.gguf"]), fetch(hf, tmp_path, ["m.gguf"]))
        assert first == second and first[0].read_bytes() == data
        assert hf.bytes_sent == len(data)
        assert len(hf.seen("GET", "/cdn/")) == 1


async def test_existing_complete_file_not_downloaded_again(tmp_path: Path) -> None:
    data = blob(200_000)
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", data)
        await fetch(hf, tmp_path, ["m.gguf"])
        hf.reset_counters()
        [path] = await fetch(hf, tmp_path, ["m.gguf"])
        assert path.read_bytes() == data
        assert [r.method for r in hf.requests] == ["HEAD"]


async def test_cached_file_without_marker_is_verified_once(tmp_path: Path) -> None:
    data = blob(200_000)
    dest = tmp_path / REPO_DIR / "m.gguf"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(data)
    async with FakeHF() as hf:
        sha = hf.add_file(REPO, "m.gguf", data)
        await fetch(hf, tmp_path, ["m.gguf"])
        assert not hf.seen("GET")
        assert (tmp_path / REPO_DIR / "m.gguf.verified").read_text().strip() == sha


async def test_cached_file_with_right_size_but_wrong_bytes_is_replaced(tmp_path: Path) -> None:
    data = blob(200_000)
    dest = tmp_path / REPO_DIR / "m.gguf"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"\0" * len(data))
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", data)
        await fetch(hf, tmp_path, ["m.gguf"])
        assert dest.read_bytes() == data
        assert hf.bytes_sent == len(data)


async def test_cached_file_used_when_offline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dest = tmp_path / REPO_DIR / "m.gguf"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"cached")
    async with FakeHF() as hf:
        port = hf.port
    # The server is gone: nothing listens on the port any more.
    async with aiohttp.ClientSession() as session:
        with caplog.at_level(logging.WARNING, logger="auxot.worker"):
            paths = await download_model_files(
                session, repo=REPO, files=["m.gguf"], models_dir=tmp_path,
                endpoint=f"http://127.0.0.1:{port}", progress=quiet(), retry=FAST,
            )
    assert paths == [dest]
    assert any("using it as is" in r.getMessage() for r in caplog.records)


async def test_complete_partial_gets_416_and_is_accepted(tmp_path: Path) -> None:
    data = blob(100_000)
    partial = tmp_path / REPO_DIR / "m.gguf.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data)
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", data)
        [path] = await fetch(hf, tmp_path, ["m.gguf"])
        assert path.read_bytes() == data
        assert hf.seen("GET", "/cdn/")[0].range == f"bytes={len(data)}-"
        assert hf.bytes_sent == 0


async def test_partial_with_wrong_prefix_is_detected_and_refetched(tmp_path: Path) -> None:
    data = blob(100_000)
    partial = tmp_path / REPO_DIR / "m.gguf.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\xff" * 30_000)  # garbage left by something else
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", data)
        [path] = await fetch(hf, tmp_path, ["m.gguf"])
        assert path.read_bytes() == data
        ranges = [r.range for r in hf.seen("GET", "/cdn/")]
        assert ranges == ["bytes=30000-", None]


async def test_server_ignoring_range_restarts_cleanly(tmp_path: Path) -> None:
    data = blob(100_000)
    partial = tmp_path / REPO_DIR / "m.gguf.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:40_000])
    async with FakeHF() as hf:
        hf.add_file(REPO, "m.gguf", data)
        hf.ignore_range = True
        [path] = await fetch(hf, tmp_path, ["m.gguf"])
        assert path.read_bytes() == data
        assert hf.bytes_sent == len(data)


async def test_non_lfs_file_is_served_directly(tmp_path: Path) -> None:
    data = b'{"architectures": ["LlamaForCausalLM"]}'
    async with FakeHF() as hf:
        hf.add_file(REPO, "config.json", data, lfs=False)
        [path] = await fetch(hf, tmp_path, ["config.json"])
        assert path.read_bytes() == data
        assert not (tmp_path / REPO_DIR / "config.json.verified").exists()  # a git sha1 is no sha256


KILL_SCRIPT = """
import asyncio, sys
from pathlib import Path
import aiohttp
from auxot_common.downloads import ProgressReporter, RetryPolicy, download_model_files

async def main() -> None:
    endpoint, repo, name, models = sys.argv[1:5]
    async with aiohttp.ClientSession() as session:
        await download_model_files(session, repo=repo, files=[name], models_dir=Path(models),
                                   endpoint=endpoint, progress=ProgressReporter(tty=False),
                                   retry=RetryPolicy(base_delay_s=0.01))

asyncio.run(main())
"""


async def run_download_process(hf: FakeHF, models: Path, script: Path) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return await asyncio.create_subprocess_exec(
        sys.executable, str(script), hf.base_url, REPO, "big.gguf", str(models),
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )


async def test_killed_process_resumes_from_partial(tmp_path: Path) -> None:
    data = os.urandom(20 * 1024 * 1024)
    script = tmp_path / "dl.py"
    script.write_text(KILL_SCRIPT)
    partial = tmp_path / "models" / REPO_DIR / "big.gguf.partial"
    async with FakeHF() as hf:
        sha = hf.add_file(REPO, "big.gguf", data)
        hf.throttle_bps = 4_000_000  # 5 s for the whole file: plenty of time to kill it
        proc = await run_download_process(hf, tmp_path / "models", script)
        deadline = asyncio.get_running_loop().time() + 30
        while not (partial.exists() and partial.stat().st_size > 0):
            assert proc.returncode is None, (await proc.communicate())[1].decode()
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        proc.kill()
        await proc.wait()
        kept = partial.stat().st_size
        assert 0 < kept < len(data)

        hf.throttle_bps = None
        hf.reset_counters()
        proc = await run_download_process(hf, tmp_path / "models", script)
        _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        final = tmp_path / "models" / REPO_DIR / "big.gguf"
        assert hashlib.sha256(final.read_bytes()).hexdigest() == sha
        assert [r.range for r in hf.seen("GET", "/cdn/")] == [f"bytes={kept}-"]
        assert hf.bytes_sent == len(data) - kept
        assert not partial.exists()


# -- progress -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_every_ten_percent_or_ten_seconds(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    reporter = ProgressReporter(tty=False, clock=clock)
    with caplog.at_level(logging.INFO, logger="auxot.worker"):
        reporter.start("m.gguf", 1000)
        for done in range(10, 1001, 10):  # 1 % steps, 0.1 s apart
            clock.now += 0.1
            reporter.update(done)
        reporter.finish()
    lines = [r for r in caplog.records if r.getMessage() == "download progress"]
    assert [r.percent for r in lines] == [float(p) for p in range(10, 101, 10)]  # type: ignore[attr-defined]
    last = lines[-1]
    assert (last.file, last.bytes, last.total) == ("m.gguf", 1000, 1000)  # type: ignore[attr-defined]
    assert last.rate == 100  # type: ignore[attr-defined]  # 1000 bytes in 10 s

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="auxot.worker"):
        reporter.start("slow.gguf", 10**9)
        for _ in range(30):
            clock.now += 1.0
            reporter.update(1)
    assert len([r for r in caplog.records if r.getMessage() == "download progress"]) == 3


def test_progress_bar_on_a_tty_is_rate_limited() -> None:
    clock = FakeClock()
    out = io.StringIO()
    reporter = ProgressReporter(stream=out, tty=True, clock=clock)
    reporter.start("dir/m.gguf", 2 * 1024 * 1024)
    for i in range(1, 101):
        clock.now += 0.01  # 100 updates per second
        reporter.update(i * 20_000)
    reporter.finish()
    text = out.getvalue()
    assert 9 <= text.count("\r") <= 12  # ≤ ~10 redraws per second, plus the final one
    assert text.endswith("\n") and "m.gguf [" in text and "%" in text
