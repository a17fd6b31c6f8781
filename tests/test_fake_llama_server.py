"""The fake llama-server (bench/fake_llama_server.py) keeps llama-server's wire format and its fault scenarios.

Each test talks to a real subprocess on a free loopback port, as a worker would.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import orjson
import pytest

FAKE = Path(__file__).resolve().parents[1] / "bench" / "fake_llama_server.py"
KEY = "sk-fake-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
# the worker's real command line plus flags the fake must skip, with and without values
EXTRA_FLAGS = ["--jinja", "--metrics", "--no-webui", "--batch-size", "512", "--n-gpu-layers", "99",
               "--reasoning-format", "deepseek", "--threads", "4", "-ctk", "q8_0", "--seed", "-1", "-fa"]  # fmt: skip


def _load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fake_llama_server", FAKE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


fake = _load_module()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeProcess:
    def __init__(self, tmp: Path, parallel: int = 2, env: dict[str, str] | None = None) -> None:
        model = tmp / "tiny.gguf"
        model.write_bytes(b"GGUF")
        self.model = str(model)  # llama-server names the model by its -m argument
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(FAKE), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
               "-np", str(parallel), "-c", str(4096 * parallel), "--api-key", KEY, *EXTRA_FLAGS]  # fmt: skip
        full_env = {**os.environ, "FAKE_LLAMA_TOKENS_PER_SEC": "0", "FAKE_LLAMA_DEFAULT_TOKENS": "8", **(env or {})}
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("fake llama-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeProcess]:
    proc = FakeProcess(tmp_path_factory.mktemp("fake"))
    yield proc
    proc.stop()


def chat_body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "x", "messages": [{"role": "user", "content": text}], **extra}


def parse_sse(raw: bytes) -> list[Any]:
    """Each ``data:`` event as JSON, or the string "[DONE]"; checks the framing on the way."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    events: list[Any] = []
    for block in raw[:-2].split(b"\n\n"):
        assert block.startswith(b"data: "), block[:80]
        payload = block[len(b"data: ") :]
        events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return events


async def post(url: str, body: dict[str, Any], path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(url + path, json=body, headers=AUTH) as resp:
        return resp.status, await resp.read()


def open_stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    """A streaming request, usable with ``async with`` or ``await``."""
    return session.post(url + "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH)


async def stream(url: str, body: dict[str, Any]) -> list[Any]:
    status, raw = await post(url, {**body, "stream": True})
    assert status == 200, raw
    return parse_sse(raw)


def deltas(events: list[Any]) -> list[dict[str, Any]]:
    return [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e.get("choices")]


def stats(url: str) -> dict[str, int]:
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=2) as sock:
        sock.sendall(b"GET /fake/stats HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    result: dict[str, int] = orjson.loads(data.split(b"\r\n\r\n", 1)[1])
    return result


# --- streaming format -----------------------------------------------------------------------------


async def test_stream_without_usage_has_role_tokens_finish_and_done(server: FakeProcess) -> None:
    events = await stream(server.url, chat_body(max_tokens=5))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == server.model and c["system_fingerprint"] == fake.SYSTEM_FINGERPRINT
        assert "usage" not in c
    role = {"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}
    assert chunks[0]["choices"][0] == role
    assert [c["choices"][0]["delta"] for c in chunks[1:-1]] == [{"content": " tok"}] * 5
    final = chunks[-1]
    assert final["choices"] == [{"finish_reason": "length", "index": 0, "delta": {}}]
    assert final["timings"]["predicted_n"] == 5


async def test_stream_bytes_follow_llama_server_key_order(server: FakeProcess) -> None:
    async with aiohttp.ClientSession() as session, open_stream(session, server.url, chat_body(max_tokens=1)) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    token = raw.split(b"\n\n")[1]
    head = b'data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" tok"}}],"created":'
    model = orjson.dumps(server.model)
    tail = b',"model":' + model + b',"system_fingerprint":"b11434-unknown","object":"chat.completion.chunk"}'
    assert token.startswith(head) and token.endswith(tail)


async def test_include_usage_adds_a_usage_chunk_with_timings(server: FakeProcess) -> None:
    body = chat_body("x" * 40, max_tokens=3, stream_options={"include_usage": True})
    events = await stream(server.url, body)
    finish, usage_chunk, done = events[-3:]
    assert done == "[DONE]"
    assert finish["choices"][0]["finish_reason"] == "length" and "timings" not in finish
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3
    assert usage["prompt_tokens"] == fake.count_tokens(fake.render_chatml(body["messages"]))
    assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}
    assert usage_chunk["timings"]["predicted_n"] == 3


async def test_without_max_tokens_default_count_and_stop(server: FakeProcess) -> None:
    events = await stream(server.url, chat_body())
    assert sum(d.get("content") == " tok" for d in deltas(events)) == 8  # FAKE_LLAMA_DEFAULT_TOKENS
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_non_streaming_body_has_usage_and_timings(server: FakeProcess) -> None:
    status, raw = await post(server.url, chat_body(max_tokens=4))
    body = orjson.loads(raw)
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0] == {"finish_reason": "length", "index": 0,
                                  "message": {"role": "assistant", "content": " tok" * 4}}  # fmt: skip
    assert body["usage"]["completion_tokens"] == 4
    assert body["timings"]["predicted_n"] == 4


async def test_repeated_prompt_reports_cached_tokens(server: FakeProcess) -> None:
    body = chat_body("a long enough prompt to be cached " * 4, max_tokens=1)
    await post(server.url, body)
    status, raw = await post(server.url, body)
    assert status == 200
    usage = orjson.loads(raw)["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1


async def test_host_ram_cache_restores_an_evicted_prompt(tmp_path: Path) -> None:
    """One slot, RAM cache on: a prompt pushed out of the slot by another is restored from RAM
    (cached, with timings.cache_n), and uncached tokens cost the configured prefill time."""
    env = {"FAKE_LLAMA_CACHE_RAM_TOKENS": "100000", "FAKE_LLAMA_PREFILL_MS_PER_TOKEN": "0.2"}
    fake = FakeProcess(tmp_path, parallel=1, env=env)
    try:
        first, other = chat_body("conversation one " * 200, max_tokens=1), chat_body("another " * 200, max_tokens=1)
        for body in (first, other):
            _, raw = await post(fake.url, body)
            cold = orjson.loads(raw)
            usage = cold["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] < 0.1 * usage["prompt_tokens"]  # the template
            assert cold["timings"]["prompt_ms"] >= 0.2 * cold["timings"]["prompt_n"]
        _, raw = await post(fake.url, first)
        again = orjson.loads(raw)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
        assert again["timings"]["cache_n"] == again["usage"]["prompt_tokens"] - 1
    finally:
        fake.stop()


async def test_legacy_completions_stream(server: FakeProcess) -> None:
    status, raw = await post(server.url, {"prompt": "hi", "max_tokens": 2, "stream": True}, "/v1/completions")
    events = parse_sse(raw)
    assert [e["choices"][0]["text"] for e in events[:2]] == [" tok", " tok"]
    assert events[2]["choices"][0]["finish_reason"] == "length" and events[2]["usage"]["completion_tokens"] == 2
    assert events[3] == "[DONE]"
    status, raw = await post(server.url, {"prompt": "hi", "max_tokens": 3}, "/v1/completions")
    assert status == 200
    assert orjson.loads(raw)["choices"][0]["text"] == " tok" * 3


# --- auth and the other endpoints -----------------------------------------------------------------


async def test_api_key_is_enforced(server: FakeProcess) -> None:
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with session.post(server.url + "/v1/chat/completions", json=chat_body(), headers=headers) as resp:
                assert resp.status == 401
                error = {"message": "Invalid API Key", "type": "authentication_error", "code": 401}
                assert await resp.json() == {"error": error}
        async with session.get(server.url + "/v1/models", headers={"X-Api-Key": KEY}) as resp:
            assert resp.status == 200
        async with session.get(server.url + "/health") as resp:  # public, as in llama-server
            assert await resp.json() == {"status": "ok"}


async def test_models_props_tokenize_apply_template(server: FakeProcess) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.get(server.url + "/v1/models") as resp:
            model = (await resp.json())["data"][0]
        assert model["id"] == server.model and model["meta"]["n_params"] > 0 and model["meta"]["n_ctx"] == 4096
        async with session.get(server.url + "/props") as resp:
            props = await resp.json()
        assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 4096
        assert "im_start" in props["chat_template"]
        async with session.post(server.url + "/tokenize", json={"content": "abcdefghi"}) as resp:
            assert len((await resp.json())["tokens"]) == 3  # one token per 4 bytes, rounded up
        messages = [{"role": "user", "content": "hi"}]
        async with session.post(server.url + "/apply-template", json={"messages": messages}) as resp:
            prompt = (await resp.json())["prompt"]
        system = f"<|im_start|>system\n{fake.DEFAULT_SYSTEM}<|im_end|>\n"
        assert prompt == system + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_rendering_matches_real_llama_server_qwen25_template() -> None:
    # the expected prompt is what b11434's /apply-template returned for the tiny test model
    weather = {"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
    call = {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    messages = [
        {"role": "system", "content": "S"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "1", "content": "warm"},
    ]  # fmt: skip
    expected = (
        "<|im_start|>system\nS" + fake.TOOLS_INTRO
        + '\n{"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string"}}}}}' + fake.TOOLS_OUTRO
        + "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )  # fmt: skip
    assert fake.render_chatml(messages, [weather]) == expected


def test_command_line_skips_unknown_flags_with_and_without_values() -> None:
    argv = ["--jinja", "-m", "m.gguf", "-ctk", "q8_0", "--seed", "-1", "-np", "3", "--ctx-size=99", "-fa",
            "--api-key", "-a", "--api-key", "b", "--no-webui"]  # fmt: skip
    assert fake.parse_args(argv) == {"model_path": "m.gguf", "parallel": "3", "ctx_size": "99", "api_keys": "-a,b"}


# --- fault scenarios ------------------------------------------------------------------------------


def assemble_tool_calls(ds: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for d in ds:
        for frag in d.get("tool_calls", []):
            index = frag["index"]
            if index not in calls:  # the first fragment names the call
                assert set(frag) == {"index", "id", "type", "function"} and frag["type"] == "function"
                calls[index] = {"id": frag["id"], "name": frag["function"]["name"], "arguments": ""}
            else:  # later fragments carry only arguments
                assert set(frag) == {"index", "function"} and set(frag["function"]) == {"arguments"}
            calls[index]["arguments"] += frag["function"].get("arguments", "")
    return calls


async def test_tool_call_split(server: FakeProcess) -> None:
    events = await stream(server.url, chat_body("FAKE:tool_call_split"))
    ds = deltas(events)
    calls = assemble_tool_calls(ds[1:-1])
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and len(calls[0]["id"]) == 32
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert len(ds) > 8  # many small fragments
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_parallel_tool_calls_interleave(server: FakeProcess) -> None:
    events = await stream(server.url, chat_body("FAKE:parallel_tool_calls"))
    ds = deltas(events)
    order = [d["tool_calls"][0]["index"] for d in ds if "tool_calls" in d]
    assert order[:4] == [0, 1, 0, 1]
    calls = assemble_tool_calls(ds)
    assert orjson.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert orjson.loads(calls[1]["arguments"]) == {"timezone": "Europe/Paris"}
    assert calls[0]["id"] != calls[1]["id"]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    status, raw = await post(server.url, chat_body("FAKE:parallel_tool_calls"))
    assert status == 200
    message = orjson.loads(raw)["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]


async def test_parallel_tool_calls_seq_come_one_after_the_other(server: FakeProcess) -> None:
    ds = deltas(await stream(server.url, chat_body("FAKE:parallel_tool_calls_seq")))
    order = [d["tool_calls"][0]["index"] for d in ds if "tool_calls" in d]
    assert order == sorted(order) and order[0] == 0 and order[-1] == 1
    assert list(assemble_tool_calls(ds)) == [0, 1]


async def test_reasoning_then_content(server: FakeProcess) -> None:
    ds = deltas(await stream(server.url, chat_body("FAKE:reasoning_then_content")))[1:-1]
    kinds = [next(iter(d)) for d in ds]
    first_content = kinds.index("content")
    assert first_content > 1 and set(kinds[:first_content]) == {"reasoning_content"}
    assert set(kinds[first_content:]) == {"content"}
    status, raw = await post(server.url, chat_body("FAKE:reasoning_then_content"))
    message = orjson.loads(raw)["choices"][0]["message"]
    assert status == 200 and message["reasoning_content"] == "The user wants a greeting."
    assert message["content"] == "Hello! How can I help?"


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [("xml_tool_call_in_content", fake.XML_TOOL_CALL), ("think_tags_in_content", "".join(fake.THINK_PIECES))],
)
async def test_content_scenarios(server: FakeProcess, scenario: str, expected: str) -> None:
    events = await stream(server.url, chat_body(f"FAKE:{scenario}"))
    pieces = [d["content"] for d in deltas(events)[1:-1]]
    assert len(pieces) > 3 and "".join(pieces) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_error_mid_stream(server: FakeProcess) -> None:
    events = await stream(server.url, chat_body("FAKE:error_mid_stream"))
    assert [d.get("content") for d in deltas(events)] == [None, " tok", " tok", " tok"]
    assert events[-1] == {"error": {"code": 500, "message": "fake: error injected mid-stream", "type": "server_error"}}
    assert all(e != "[DONE]" for e in events)


async def test_context_exceeded(server: FakeProcess) -> None:
    for extra in ({"stream": True}, {}):
        status, raw = await post(server.url, chat_body("FAKE:context_exceeded", **extra))
        error = orjson.loads(raw)["error"]
        assert status == 400 and error["code"] == 400 and error["type"] == "exceed_context_size_error"
        assert error["n_ctx"] == 4096 and error["n_prompt_tokens"] > 4096


async def test_echo_and_unknown_scenario(server: FakeProcess) -> None:
    text = "FAKE:echo héllo  wörld ✓"
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": text}]
    body = {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "x"},
                         {"role": "user", "content": parts}]}  # fmt: skip
    ds = deltas(await stream(server.url, body))
    assert "".join(d.get("content") or "" for d in ds) == text
    status, raw = await post(server.url, chat_body("FAKE:nope"))
    assert status == 400 and b"unknown fake scenario" in raw


async def test_slow_first_token(server: FakeProcess) -> None:
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        open_stream(session, server.url, chat_body("FAKE:slow_first_token:0.3")) as resp,
    ):
        first = await resp.content.readuntil(b"\n\n")
        ttft = time.monotonic() - started
        rest = await resp.read()
    assert b'"role":"assistant"' in first and 0.3 <= ttft < 2
    assert parse_sse(first + rest)[-1] == "[DONE]"


async def test_stall_then_disconnect_counts_an_abort(server: FakeProcess) -> None:
    before = stats(server.url)
    async with aiohttp.ClientSession() as session:
        resp = await open_stream(session, server.url, chat_body("FAKE:stall"))
        first = await resp.content.readuntil(b"\n\n")
        assert b'"role":"assistant"' in first
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(resp.content.read(1), 0.2)
        assert stats(server.url)["active"] == before["active"] + 1
        resp.close()  # drop the connection mid-stream
    for _ in range(100):
        now = stats(server.url)
        if now["requests_aborted"] == before["requests_aborted"] + 1:
            break
        await asyncio.sleep(0.02)
    assert now["requests_aborted"] == before["requests_aborted"] + 1
    assert now["active"] == before["active"]
    assert now["requests_started"] == before["requests_started"] + 1


async def test_parallel_limits_concurrent_generation(server: FakeProcess) -> None:
    started = time.monotonic()
    body = chat_body("FAKE:slow_first_token:0.3", max_tokens=1)
    results = await asyncio.gather(*(post(server.url, body) for _ in range(3)))
    elapsed = time.monotonic() - started
    assert [status for status, _ in results] == [200, 200, 200]
    assert elapsed >= 0.6  # two slots: the third request waited for one to free up
    assert stats(server.url)["max_active"] <= 2


async def test_loadgen_counts_every_token(server: FakeProcess) -> None:
    sys.path.insert(0, str(FAKE.parent))
    try:
        import loadgen
    finally:
        sys.path.remove(str(FAKE.parent))
    summary = await loadgen.run_load(server.url, KEY, 2, requests_per_stream=3, max_tokens=50)
    assert summary["tokens"] == 2 * 3 * 50  # flat out, 16 tokens per write: counted by content
    assert summary["errors"] == 0 and summary["short"] == 0 and summary["ttft_ms"]["p50"] is not None


async def test_crash_exits_the_process(tmp_path: Path) -> None:
    proc = FakeProcess(tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            resp = await open_stream(session, proc.url, chat_body("FAKE:crash"))
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        assert proc.proc.wait(5) == 1
    finally:
        proc.stop()


async def test_rate_limited_stream_takes_its_time(tmp_path: Path) -> None:
    proc = FakeProcess(tmp_path, env={"FAKE_LLAMA_TOKENS_PER_SEC": "50"})
    try:
        started = time.monotonic()
        events = await stream(proc.url, chat_body(max_tokens=11))
        elapsed = time.monotonic() - started
        assert len(deltas(events)) == 1 + 11 + 1  # role, tokens, finish
        assert 0.18 <= elapsed < 1.0  # 10 gaps of 20 ms
    finally:
        proc.stop()
