"""End to end: real router and worker processes, the real llama-server and the official SDK."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import orjson
import pytest

from tests.conftest import Cluster
from tests.support import http
from tests.support.llama_server import LlamaServer
from tests.support.procs import REPO, WorkerProcess, pid_alive

PROMPT = [{"role": "user", "content": "Say something."}]


def sse_events(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order (comments skipped)."""
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


def client(router) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{router.url}/api/openai/v1", api_key=router.keys.api_key, max_retries=0, timeout=60)


# --- the core path against a real llama-server -------------------------------------------------


def test_chat_matches_llama_server_itself(cluster: Cluster) -> None:
    """Content, finish_reason and usage through the router equal llama-server's own answer."""
    router = cluster.router(AUXOT_CTX_SIZE="1024", AUXOT_MAX_PARALLEL="2")
    cluster.worker(router)
    result = client(router).chat.completions.create(model="anything", messages=PROMPT, max_tokens=12, temperature=0)

    with LlamaServer(cluster.model, parallel=2, ctx_size=2048) as direct:
        reference = http.post(
            f"{direct.base_url}/v1/chat/completions",
            {"messages": PROMPT, "max_tokens": 12, "temperature": 0},
            headers={"Authorization": f"Bearer {direct.api_key}"} if direct.api_key else None,
        ).json()

    choice = result.choices[0]
    assert choice.message.content == reference["choices"][0]["message"]["content"]
    assert choice.finish_reason == "length" == reference["choices"][0]["finish_reason"]
    assert result.usage is not None
    assert result.usage.completion_tokens == reference["usage"]["completion_tokens"] == 12
    assert result.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12
    assert result.id.startswith("chatcmpl-")
    assert result.model == "anything"


def test_streaming_is_openai_shaped(cluster: Cluster) -> None:
    router = cluster.router()
    cluster.worker(router)
    body = {
        "messages": PROMPT,
        "max_tokens": 9,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = http.post(f"{router.url}/api/openai/chat/completions", body, headers=router.headers())
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.body)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 9
    assert "cached_tokens" in usage["usage"]["prompt_tokens_details"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text and text.isascii()

    # Without include_usage there is no usage chunk at all.
    body.pop("stream_options")
    chunks = [
        orjson.loads(e)
        for e in sse_events(http.post(f"{router.url}/v1/chat/completions", body, headers=router.headers()).body)[:-1]
    ]
    assert all(c["choices"] for c in chunks)


def test_sdk_streaming_and_paths(cluster: Cluster) -> None:
    """The SDK streams, and every documented path spelling reaches the same API."""
    router = cluster.router()
    cluster.worker(router)
    stream = client(router).chat.completions.create(
        model="m", messages=PROMPT, max_tokens=7, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    non_stream = client(router).chat.completions.create(model="m", messages=PROMPT, max_tokens=7, temperature=0)
    assert content == non_stream.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7

    for path in ("/api/openai/chat/completions", "/api/openai/v1/v1/chat/completions", "/v1/chat/completions"):
        resp = http.post(f"{router.url}{path}", {"messages": PROMPT, "max_tokens": 3}, headers=router.headers())
        assert resp.status == 200, path
        assert resp.json()["object"] == "chat.completion"
    for path in ("/api/openai/models", "/api/openai/v1/models", "/v1/models"):
        models = http.get(f"{router.url}{path}", headers=router.headers()).json()
        assert models["object"] == "list" and models["data"][0]["owned_by"] == "auxot", path
    assert [m.id for m in client(router).models.list()] == [router.health()["model"]]


def test_request_fields_reach_llama_server(cluster: Cluster) -> None:
    """stop, seed, top_p, response_format and max_completion_tokens are honoured."""
    router = cluster.router()
    cluster.worker(router)
    sdk = client(router)
    base = sdk.chat.completions.create(model="m", messages=PROMPT, max_completion_tokens=20, temperature=0)
    text = base.choices[0].message.content or ""
    assert base.usage is not None and base.usage.completion_tokens == 20
    stop_at = text[5:7]
    stopped = sdk.chat.completions.create(model="m", messages=PROMPT, max_tokens=20, temperature=0, stop=[stop_at])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop_at not in (stopped.choices[0].message.content or "")
    seeded = [
        sdk.chat.completions.create(model="m", messages=PROMPT, max_tokens=15, temperature=1.0, top_p=0.9, seed=42)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    structured = sdk.chat.completions.create(
        model="m",
        messages=PROMPT,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    if structured.choices[0].finish_reason == "stop":
        assert isinstance(orjson.loads(structured.choices[0].message.content or "")["a"], int)
    else:  # cut by max_tokens: still a JSON prefix constrained by the grammar
        assert (structured.choices[0].message.content or "").lstrip().startswith("{")


def test_image_content_parts_on_a_text_only_model(cluster: Cluster) -> None:
    """Array content reaches the model. The tiny model has no vision projector: an image part is
    replaced by a note instead of failing the request, so a conversation that once held a
    screenshot (agents resend their whole history) keeps working."""
    router = cluster.router()
    cluster.worker(router)
    url, headers = f"{router.url}/v1/chat/completions", router.headers()
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]
    plain = http.post(url, {"messages": [{"role": "user", "content": parts}], "max_tokens": 3}, headers=headers)
    assert plain.status == 200 and plain.json()["choices"][0]["finish_reason"] == "length"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with_image = http.post(
        url, {"messages": [{"role": "user", "content": [*parts, image]}], "max_tokens": 3}, headers=headers
    )
    assert with_image.status == 200
    assert with_image.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]  # the note


def test_prompt_longer_than_context_is_a_400(cluster: Cluster) -> None:
    router = cluster.router(AUXOT_CTX_SIZE="256")
    cluster.worker(router)
    long = [{"role": "user", "content": "word " * 2000}]
    resp = http.post(f"{router.url}/v1/chat/completions", {"messages": long, "max_tokens": 5}, headers=router.headers())
    assert resp.status == 400
    assert "context" in resp.json()["error"]["message"]
    streamed = http.post(
        f"{router.url}/v1/chat/completions",
        {"messages": long, "max_tokens": 5, "stream": True},
        headers=router.headers(),
    )
    assert streamed.status == 400
    ok = http.post(f"{router.url}/v1/chat/completions", {"messages": PROMPT, "max_tokens": 3}, headers=router.headers())
    assert ok.status == 200


# --- concurrency and queueing (fake llama-server for exact timing) --------------------------------


def _timed_stream(router, max_tokens: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(time of the first content chunk, time of the end) for one streaming request."""
    stream = client(router).chat.completions.create(model="m", messages=PROMPT, max_tokens=max_tokens, stream=True)
    first = 0.0
    for chunk in stream:
        if not first and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic()
    return first, time.monotonic()


@pytest.mark.parametrize("slots", [2, 3])
def test_worker_runs_parallel_jobs(fake_cluster: Cluster, slots: int) -> None:
    """AUXOT_MAX_PARALLEL=N: N streams run at the same time on one worker (Go ran one)."""
    router = fake_cluster.router(AUXOT_MAX_PARALLEL=str(slots))
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="20")
    assert router.health()["total_slots"] == slots
    with concurrent.futures.ThreadPoolExecutor(slots) as pool:
        spans = list(pool.map(lambda _: _timed_stream(router, 20), range(slots)))
    latest_start = max(first for first, _ in spans)
    earliest_end = min(end for _, end in spans)
    assert latest_start < earliest_end, f"streams did not overlap: {spans}"


def test_request_waits_for_a_worker(fake_cluster: Cluster) -> None:
    """A request made with no worker connected waits in the queue and is served later."""
    router = fake_cluster.router()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: client(router).chat.completions.create(model="m", messages=PROMPT, max_tokens=4))
        deadline = time.monotonic() + 10
        while router.health()["queue_depth"] < 1:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.05)
        assert not future.done()
        fake_cluster.worker(router)
        result = future.result(timeout=30)
    assert result.choices[0].message.content == " tok" * 4
    assert router.health()["queue_depth"] == 0


def test_health_reports_workers_and_slots(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(AUXOT_MAX_PARALLEL="2")
    assert router.health()["workers"] == 0
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="20")
    health = router.health()
    assert (health["workers"], health["total_slots"], health["available"]) == (1, 2, 2)
    assert health["worker_list"][0]["free_slots"] == 2
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(_timed_stream, router, 40)
        deadline = time.monotonic() + 10
        while router.health()["active_jobs"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert router.health()["worker_list"][0]["free_slots"] == 1
        future.result(timeout=30)
    assert router.health()["active_jobs"] == 0


# --- authentication and bad input ------------------------------------------------------------------


def test_wrong_api_key_is_401(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    for headers in (
        {},
        {"Authorization": "Bearer rtr_wrong"},
        {"Authorization": f"Bearer {router.keys.gpu_key}"},
        {"Authorization": "Bearer " + "x" * 10_000},
    ):
        resp = http.post(f"{router.url}/v1/chat/completions", {"messages": PROMPT}, headers=headers)
        assert resp.status == 401
        error = resp.json()["error"]
        assert error["type"] == "authentication_error" and error["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{router.url}/v1", api_key="rtr_nope", max_retries=0).models.list()


def test_wrong_gpu_key_makes_the_worker_exit(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    bad = WorkerProcess(  # an API key is no GPU key
        router,
        fake_cluster.log_dir,
        model=fake_cluster.model,
        llama=fake_cluster.llama,
        name="bad-worker",
        gpu_key=router.keys.api_key,
    )
    fake_cluster.processes.append(bad)
    bad.start()
    assert bad.wait(timeout=20) != 0
    assert "invalid GPU key" in bad.log()
    assert router.health()["workers"] == 0


def test_bad_input_gets_openai_errors(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(AUXOT_MAX_BODY_BYTES="65536")
    fake_cluster.worker(router)
    url, headers = f"{router.url}/v1/chat/completions", router.headers()
    cases: list[tuple[bytes, int]] = [
        (b"{not json", 400),
        (b"", 400),
        (b"[1,2,3]", 400),
        (b"42", 400),
        (b"null", 400),
        (b"{}", 400),
        (orjson.dumps({"messages": []}), 400),
        (orjson.dumps({"messages": "hi"}), 400),
        (orjson.dumps({"messages": [{"content": "no role"}]}), 400),
        (orjson.dumps({"messages": PROMPT, "n": 2}), 400),
        (orjson.dumps({"messages": PROMPT, "max_tokens": "ten"}), 400),
        (orjson.dumps({"messages": PROMPT, "temperature": "hot"}), 400),
        (b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}", 400),
        (bytes(range(256)) * 4, 400),
        (orjson.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]}), 413),
    ]
    for body, status in cases:
        resp = http.post(url, body, headers=headers)
        assert resp.status == status, (body[:40], resp.body[:200])
        assert resp.headers["content-type"].startswith("application/json")
        error = resp.json()["error"]
        assert error["message"] and error["type"]
    assert http.get(f"{router.url}/no/such/path", headers=headers).status == 404
    assert http.get(f"{router.url}/no/such/path", headers=headers).json()["error"]["type"] == "not_found_error"
    assert http.request("PUT", url, body=b"{}", headers=headers).status == 405
    assert http.post(f"{router.url}/api/openai/embeddings", {"input": "x"}, headers=headers).status == 501
    # The server is still serving.
    ok = http.post(url, {"messages": PROMPT, "max_tokens": 2}, headers=headers)
    assert ok.status == 200 and ok.json()["choices"][0]["message"]["content"] == " tok tok"


def test_health_needs_no_auth_and_leaks_nothing(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router)
    resp = http.get(f"{router.url}/health")
    assert resp.status == 200
    text = resp.body.decode()
    for secret in (router.keys.api_key, router.keys.gpu_key, router.keys.api_hash, router.keys.gpu_hash, "redis://"):
        assert secret not in text


def test_keys_never_appear_in_logs(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    worker = fake_cluster.worker(router)
    http.post(f"{router.url}/v1/chat/completions", {"messages": PROMPT, "max_tokens": 2}, headers=router.headers())
    http.post(
        f"{router.url}/v1/chat/completions", {"messages": PROMPT}, headers={"Authorization": "Bearer rtr_leakcheck"}
    )
    worker.stop()
    router.stop()
    logs = router.log() + worker.log()
    for secret in (router.keys.api_key, router.keys.gpu_key, "rtr_leakcheck"):
        assert secret not in logs
    for line in router.log().splitlines():
        assert isinstance(orjson.loads(line), dict), line  # one JSON object per line


# --- configuration, setup and signals --------------------------------------------------------------


def run_router_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    from tests.support.procs import base_env

    return subprocess.run(
        [sys.executable, str(REPO / "auxot_router.py"), *args],
        capture_output=True, text=True, timeout=60, env=base_env(**(env or {})), cwd=cwd or REPO, check=False,
    )  # fmt: skip


def test_setup_prints_keys_and_hashes(tmp_path: Path) -> None:
    from auxot_common.auth import verify_hash

    out = run_router_cli("setup", cwd=tmp_path)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    gpu_key = next(w for line in lines for w in line.split() if w.startswith("adm_"))
    api_key = next(w for line in lines for w in line.split() if w.startswith("rtr_"))
    exports = {
        line.split("=", 1)[0][7:]: line.split("=", 1)[1].strip("'") for line in lines if line.startswith("export ")
    }
    assert verify_hash(exports["AUXOT_ADMIN_KEY_HASH"], gpu_key)
    assert verify_hash(exports["AUXOT_API_KEY_HASH"], api_key)
    assert not verify_hash(exports["AUXOT_API_KEY_HASH"], gpu_key)

    fly = run_router_cli("setup", "--fly", cwd=tmp_path)
    assert fly.returncode == 0 and "fly secrets set" in fly.stdout and "AUXOT_API_KEY_HASH='$argon2id$" in fly.stdout

    assert run_router_cli("setup", "--write-env", cwd=tmp_path).returncode == 0
    env_file = tmp_path / ".env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert "AUXOT_API_KEY_HASH='$argon2id$" in env_file.read_text()
    again = run_router_cli("setup", "--write-env", cwd=tmp_path)
    assert again.returncode == 1 and ".env already exists" in again.stderr


def test_router_without_keys_says_what_to_do(tmp_path: Path) -> None:
    out = run_router_cli(cwd=tmp_path)
    assert out.returncode == 1
    assert "python auxot_router.py setup" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AUXOT_PORT", "eighty"),
        ("AUXOT_JOB_TIMEOUT", "5 minutes"),
        ("AUXOT_MAX_PARALLEL", "0"),
        ("AUXOT_LOG_LEVEL", "loud"),
    ],
)
def test_invalid_setting_stops_startup_with_one_line(keys, tmp_path: Path, variable: str, value: str) -> None:  # type: ignore[no-untyped-def]
    env = {"AUXOT_API_KEY_HASH": keys.api_hash, "AUXOT_ADMIN_KEY_HASH": keys.gpu_hash, variable: value}
    out = run_router_cli(env=env, cwd=tmp_path)
    assert out.returncode == 1
    assert variable in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_dotenv_file_configures_the_router(keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.support.llama_server import free_port

    port = free_port()
    (tmp_path / ".env").write_text(
        f"AUXOT_API_KEY_HASH='{keys.api_hash}'\nAUXOT_ADMIN_KEY_HASH='{keys.gpu_hash}'\nAUXOT_PORT={port}\nAUXOT_HOST=127.0.0.1\nAUXOT_MODEL=qwen3-coder-30b-a3b\n"
    )
    from tests.support.procs import Process, base_env

    proc = Process(
        [sys.executable, str(REPO / "auxot_router.py")],
        {**base_env(), "AUXOT_TEST_CWD": str(tmp_path)},
        tmp_path / "r.log",
    )
    proc.start()
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                assert http.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["model"] == "Qwen3-Coder-30B-A3B"
                break
            except OSError:
                assert time.monotonic() < deadline, proc.log()
                time.sleep(0.05)
    finally:
        proc.stop()


def test_sigterm_lets_running_streams_finish(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(AUXOT_SHUTDOWN_GRACE="20s")
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="25")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            http.post,
            f"{router.url}/v1/chat/completions",
            {"messages": PROMPT, "max_tokens": 40, "stream": True},
            headers=router.headers(),
        )
        time.sleep(0.5)
        router.signal(signal.SIGTERM)
        time.sleep(0.2)
        try:  # new work is refused: the listener is closed (or a 503 if the connection was open)
            refused: int | None = http.post(
                f"{router.url}/v1/chat/completions", {"messages": PROMPT}, headers=router.headers()
            ).status
        except OSError:
            refused = None
        resp = future.result(timeout=30)
    assert resp.status == 200
    events = sse_events(resp.body)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks[-1]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == " tok" * 40
    assert refused in (None, 503)
    assert router.wait(timeout=20) == 0


def test_worker_sigterm_stops_llama_server(cluster: Cluster) -> None:
    router = cluster.router()
    worker = cluster.worker(router)
    children = worker.llama_children()
    assert children, "the worker should have started llama-server"
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    time.sleep(0.2)
    assert not any(pid_alive(pid) for pid in children)
    deadline = time.monotonic() + 10
    while router.health()["workers"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_model_typo_gets_did_you_mean(keys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {
        "AUXOT_API_KEY_HASH": keys.api_hash,
        "AUXOT_ADMIN_KEY_HASH": keys.gpu_hash,
        "AUXOT_MODEL": "Qwen3-Codr-30B-A3B",
    }
    out = run_router_cli(env=env, cwd=tmp_path)
    assert out.returncode == 1
    assert "not found in registry" in out.stderr and "AUXOT_MODEL=Qwen3-Coder-30B-A3B" in out.stderr


def test_requests_in_flight_are_bounded(fake_cluster: Cluster) -> None:
    """Beyond AUXOT_MAX_REQUESTS concurrent requests the router answers 503 at once, and serves
    again as soon as one finishes."""
    router = fake_cluster.router(AUXOT_MAX_REQUESTS="1")  # worker sockets never use a request slot
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="20")
    body = {"messages": PROMPT, "max_tokens": 20, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(http.post, f"{router.url}/v1/chat/completions", body, headers=router.headers())
        deadline = time.monotonic() + 10
        while router.health()["active_jobs"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = http.post(f"{router.url}/v1/chat/completions", body, headers=router.headers())
        assert refused.status == 503 and refused.headers.get("retry-after")
        assert refused.json()["error"]["message"]
        assert running.result(timeout=30).status == 200
    assert (
        http.post(
            f"{router.url}/v1/chat/completions", {"messages": PROMPT, "max_tokens": 2}, headers=router.headers()
        ).status
        == 200
    )
