"""End to end, the Anthropic Messages API: the official ``anthropic`` SDK and Claude Code's own
requests against real router and worker processes.

``cluster`` runs the real llama-server with the tiny model (a valid tool call whenever tools are
offered), ``fake_cluster`` the fake llama-server whose ``FAKE:<scenario>`` prompts give exact
chunk sequences. Streams are checked twice: event by event against the Messages streaming
protocol (what a hand-written client relies on), and through the SDK's own accumulator (what
SDK users get).
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import importlib.util
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from pydantic import TypeAdapter

from auxot_common.anthropic_api import count_tokens_request, translate_request
from tests.conftest import Cluster
from tests.support import http
from tests.support.llama_server import LlamaServer
from tests.support.procs import REPO, RouterProcess

CAPTURES = REPO / "tests" / "data" / "client-captures"
CLAUDE_CODE = sorted(CAPTURES.glob("claude-code-*.json"))
FIRST_REQUEST = CAPTURES / "claude-code-2.1.330-first-request.json"
HELLO = [{"role": "user", "content": "Say something."}]
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
}
TIME = {
    "name": "get_time",
    "description": "Current time in a timezone.",
    "input_schema": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
}
THINKING = {"type": "enabled", "budget_tokens": 1024}
GREEDY = {"temperature": 0}  # this SDK version has no temperature parameter
# Room for Claude Code's ~32,000-token first request on the tiny model (trained for 4096).
LONG_CONTEXT = "--override-kv llama.context_length=int:65536"

_EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


def _fake_module() -> Any:
    path = REPO / "bench" / "fake_llama_server.py"
    spec = importlib.util.spec_from_file_location("fake_llama_server_for_anthropic_tests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


FAKE = _fake_module()


# --- clients and stream checking ---------------------------------------------------------------


def sdk(router: RouterProcess, base: str = "/api/anthropic", *, bearer: bool = False, key: str | None = None) -> Any:
    """The official client, typed loosely (the tests send plain dicts).

    ``base`` is what a user puts in ANTHROPIC_BASE_URL; the SDK adds ``/v1/messages``."""
    secret = key if key is not None else router.keys.api_key
    auth: dict[str, Any] = {"auth_token": secret, "api_key": None} if bearer else {"api_key": secret}
    return anthropic.Anthropic(base_url=f"{router.url}{base}", max_retries=0, timeout=120, **auth)


def anthropic_headers(router: RouterProcess) -> dict[str, str]:
    return {"x-api-key": router.keys.api_key, "anthropic-version": "2023-06-01", "content-type": "application/json"}


def parse_sse(body: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    """``(event name, data)`` of each SSE event, in order."""
    events: list[tuple[str | None, dict[str, Any]]] = []
    for block in body.decode().split("\n\n"):
        name: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if data:
            events.append((name, orjson.loads("\n".join(data))))
    return events


_BLOCK_DELTAS = {
    "text": {"text_delta", "citations_delta"},
    "tool_use": {"input_json_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
}
_STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"}


class CheckedStream:
    """A Messages stream checked against the streaming protocol, and accumulated by the SDK."""

    def __init__(self, body: bytes, *, complete: bool = True) -> None:
        self.events = parse_sse(body)
        assert self.events, body[:300]
        self.names = [name for name, _ in self.events]
        self.final: Any = None
        self.error: dict[str, Any] | None = None
        self.json_deltas: dict[int, list[str]] = {}
        snapshot: Any = None
        json_bufs: dict[int, bytes] = {}
        open_index: int | None = None
        open_type = ""
        next_index = 0
        assert self.names[:2] == ["message_start", "ping"], self.names[:5]
        for position, (name, data) in enumerate(self.events):
            assert name is not None, f"event without an event: line (the SDK would skip it): {data}"
            assert data.get("type") == name, (name, data)
            if name == "ping":
                continue
            if name == "error":
                assert position == len(self.events) - 1, "nothing may follow an error event"
                assert set(data["error"]) >= {"type", "message"}
                self.error = data
                break
            event = _EVENTS.validate_python(data)  # the SDK's own types
            if name == "message_start":
                assert position == 0
                message = data["message"]
                assert message["content"] == [] and message["role"] == "assistant" and message["id"].startswith("msg_")
                assert message["stop_reason"] is None
                assert isinstance(message["usage"]["input_tokens"], int)
            elif name == "content_block_start":
                assert open_index is None, f"block {data['index']} opened while {open_index} is open"
                assert data["index"] == next_index, (data["index"], next_index)
                block = data["content_block"]
                open_index, open_type = data["index"], block["type"]
                if open_type == "text":
                    assert block["text"] == ""
                elif open_type == "tool_use":
                    assert block["input"] == {} and block["id"].startswith("toolu_") and block["name"]
                elif open_type == "thinking":
                    assert block["thinking"] == ""
                else:
                    raise AssertionError(f"unexpected block type {open_type}")
            elif name == "content_block_delta":
                assert data["index"] == open_index, f"delta for block {data['index']} while {open_index} is open"
                assert data["delta"]["type"] in _BLOCK_DELTAS[open_type], (open_type, data)
                if data["delta"]["type"] == "input_json_delta":
                    self.json_deltas.setdefault(data["index"], []).append(data["delta"]["partial_json"])
            elif name == "content_block_stop":
                assert data["index"] == open_index, (data["index"], open_index)
                open_index = None
                next_index += 1
            elif name == "message_delta":
                assert open_index is None, "message_delta with a block still open"
                assert data["delta"]["stop_reason"] in _STOP_REASONS
                usage = data["usage"]
                for key in ("input_tokens", "output_tokens", "cache_read_input_tokens"):
                    assert isinstance(usage.get(key), int), (key, usage)
            elif name == "message_stop":
                assert position == len(self.events) - 1, "nothing may follow message_stop"
                assert self.names[position - 1] == "message_delta"
            snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
        self.snapshot = snapshot
        if complete:
            assert self.error is None, self.error
            assert self.names[-1] == "message_stop", self.names[-5:]
            assert next_index >= 1, "an answer always holds a block"
            self.final = Message.model_validate(snapshot.to_dict())

    @property
    def message_delta(self) -> dict[str, Any]:
        return next(data for name, data in self.events if name == "message_delta")


def post_stream(
    router: RouterProcess, body: dict[str, Any], path: str = "/api/anthropic/v1/messages", **check: Any
) -> CheckedStream:
    resp = http.post(f"{router.url}{path}", {**body, "stream": True}, headers=anthropic_headers(router), timeout=300)
    assert resp.status == 200, resp.body[:500]
    assert resp.headers["content-type"].startswith("text/event-stream")
    return CheckedStream(resp.body, **check)


def post_message(router: RouterProcess, body: dict[str, Any], path: str = "/api/anthropic/v1/messages") -> Any:
    resp = http.post(f"{router.url}{path}", {**body, "stream": False}, headers=anthropic_headers(router), timeout=300)
    assert resp.status == 200, resp.body[:500]
    assert resp.headers["content-type"].startswith("application/json")
    return Message.model_validate(resp.json())


def blocks(message: Any) -> list[tuple[str, Any]]:
    """``(type, payload)`` per content block: the text, the thinking, or (name, input)."""
    out: list[tuple[str, Any]] = []
    for block in message.content:
        if block.type == "text":
            out.append(("text", block.text))
        elif block.type == "thinking":
            out.append(("thinking", block.thinking))
        elif block.type == "tool_use":
            out.append(("tool_use", (block.name, block.input)))
        else:
            out.append((block.type, None))
    return out


def check_tool_input(name: str, arguments: Any, tools: list[dict[str, Any]]) -> None:
    """The input names an offered tool and is an object with the schema's required keys."""
    schema = next(t["input_schema"] for t in tools if t["name"] == name)
    assert isinstance(arguments, dict)
    for key in schema.get("required", []):
        assert key in arguments, (name, arguments)
    for key, value in arguments.items():
        prop = schema["properties"].get(key, {})
        if prop.get("type") == "string":
            assert isinstance(value, str)
        if "enum" in prop:
            assert value in prop["enum"]


def fake(scenario: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": f"FAKE:{scenario}"}],
        **extra,
    }


# --- the SDK against the fake llama-server ------------------------------------------------------


def test_sdk_streaming_and_not_on_every_path_spelling(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router)
    for base in ("/api/anthropic", "/api/anthropic/v1", ""):  # 1, 2 and 0 /v1 segments before /messages
        client = sdk(router, base)
        message = client.messages.create(model="claude-test", max_tokens=5, messages=HELLO)
        assert blocks(message) == [("text", " tok" * 5)], base
        assert message.stop_reason == "max_tokens"  # llama-server stopped on the limit
        assert message.model == "claude-test" and message.id.startswith("msg_")
        assert message.usage.output_tokens == 5 and message.usage.input_tokens > 0
        with client.messages.stream(model="claude-test", max_tokens=5, messages=HELLO) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == " tok" * 5 and blocks(final) == [("text", " tok" * 5)]
        assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    # Claude Code's client sends ?beta=true; it changes nothing.
    beta = sdk(router).beta.messages.create(
        model="claude-test", max_tokens=3, messages=HELLO, betas=["interleaved-thinking-2025-05-14"]
    )
    assert [b.text for b in beta.content if b.type == "text"] == [" tok" * 3]


def test_x_api_key_and_bearer_both_authenticate(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router)
    for bearer in (False, True):
        message = sdk(router, bearer=bearer).messages.create(model="m", max_tokens=2, messages=HELLO)
        assert blocks(message) == [("text", " tok tok")]


def test_end_turn_when_the_model_stops(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router)
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "FAKE:echo hello there"}]}
    assert post_message(router, body).stop_reason == "end_turn"
    stream = post_stream(router, body)
    assert stream.final.stop_reason == "end_turn"
    assert blocks(stream.final) == [("text", "FAKE:echo hello there")]


def test_stream_event_sequence_for_plain_text(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="200")
    stream = post_stream(router, {"model": "m", "max_tokens": 6, "messages": HELLO})
    assert stream.names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * (stream.names.count("content_block_delta")),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert stream.names.count("content_block_delta") > 1  # tokens stream as they come
    assert blocks(stream.final) == [("text", " tok" * 6)]
    delta = stream.message_delta
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"]["output_tokens"] == 6
    assert delta["usage"]["input_tokens"] + delta["usage"]["cache_read_input_tokens"] > 0


def test_stream_tool_call_fragments_as_input_json_deltas(fake_cluster: Cluster) -> None:
    """tool_call_split: the argument fragments stream as input_json_delta events as they come
    (not one piece at the end); the SDK assembles the exact input; stop_reason tool_use."""
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="100")
    body = fake("tool_call_split", tools=[WEATHER, TIME])
    stream = post_stream(router, body)
    assert blocks(stream.final) == [("tool_use", ("get_weather", {"city": "Paris", "unit": "celsius"}))]
    fragments = stream.json_deltas[0]
    assert "".join(fragments) == FAKE.WEATHER_ARGS
    assert len(fragments) > 3 and FAKE.WEATHER_ARGS not in fragments
    assert stream.message_delta["delta"]["stop_reason"] == "tool_use"
    assert stream.final.content[0].id.startswith("toolu_")
    message = post_message(router, body)
    assert blocks(message) == [("tool_use", ("get_weather", {"city": "Paris", "unit": "celsius"}))]
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize("scenario", ["parallel_tool_calls", "parallel_tool_calls_seq"])
def test_stream_two_tool_calls(fake_cluster: Cluster, scenario: str) -> None:
    """Two calls (interleaved by the server, or one after the other) become two tool_use blocks,
    each closed before the next opens, every fragment inside its own block."""
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="200")
    body = fake(scenario, tools=[WEATHER, TIME])
    expected = [
        ("tool_use", ("get_weather", {"city": "Paris", "unit": "celsius"})),
        ("tool_use", ("get_time", {"timezone": "Europe/Paris"})),
    ]
    stream = post_stream(router, body)
    assert blocks(stream.final) == expected
    assert stream.final.stop_reason == "tool_use"
    assert len({b.id for b in stream.final.content}) == 2
    assert blocks(post_message(router, body)) == expected


def test_stream_thinking_then_text(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="200")
    body = fake("reasoning_then_content", thinking=THINKING)
    expected = [("thinking", "The user wants a greeting."), ("text", "Hello! How can I help?")]
    stream = post_stream(router, body)
    assert blocks(stream.final) == expected
    assert stream.final.stop_reason == "end_turn"
    assert blocks(post_message(router, body)) == expected
    with sdk(router).messages.stream(**body) as sdk_stream:
        thinking = "".join(e.thinking for e in sdk_stream if e.type == "thinking")
    assert thinking == "The user wants a greeting."


def test_think_tags_in_content_become_a_thinking_block(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="200")
    body = fake("think_tags_in_content", thinking=THINKING)
    expected = [("thinking", "Let me think."), ("text", "The answer is 4.")]
    assert blocks(post_stream(router, body).final) == expected
    assert blocks(post_message(router, body)) == expected


def test_xml_tool_call_in_content_becomes_tool_use(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="200")
    body = fake("xml_tool_call_in_content", tools=[WEATHER])
    stream = post_stream(router, body)
    assert blocks(stream.final) == [("tool_use", ("get_weather", {"city": "Paris"}))]
    assert stream.final.stop_reason == "tool_use"
    message = post_message(router, body)
    assert blocks(message) == [("tool_use", ("get_weather", {"city": "Paris"}))]
    assert message.stop_reason == "tool_use"


def test_error_mid_stream_is_an_error_event(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="200")
    body = fake("error_mid_stream")
    stream = post_stream(router, body, complete=False)
    assert stream.error is not None and stream.error["error"]["type"] in ("api_error", "overloaded_error")
    assert "message_stop" not in stream.names and "message_delta" not in stream.names
    assert stream.snapshot.content[0].text == " tok" * 3  # what was generated before the failure
    with pytest.raises(anthropic.APIStatusError), sdk(router).messages.stream(**body) as sdk_stream:
        for _ in sdk_stream:
            pass
    with pytest.raises(anthropic.InternalServerError):
        sdk(router).messages.create(**body)


# --- errors in Anthropic's shape ------------------------------------------------------------------


def error_of(resp: http.Response, status: int, kind: str) -> str:
    assert resp.status == status, (resp.status, resp.body[:300])
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"], body
    assert body["request_id"].startswith("req_")
    return str(body["error"]["message"])


def test_errors_have_anthropic_shape(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(AUXOT_MAX_BODY_BYTES="65536")
    fake_cluster.worker(router)
    url, headers = f"{router.url}/api/anthropic/v1/messages", anthropic_headers(router)
    assert "max_tokens" in error_of(
        http.post(url, {"model": "m", "messages": HELLO}, headers=headers), 400, "invalid_request_error"
    )
    error_of(http.post(url, {"model": "m", "max_tokens": 5}, headers=headers), 400, "invalid_request_error")
    error_of(http.post(url, b"{not json", headers=headers), 400, "invalid_request_error")
    error_of(
        http.post(
            url, {"model": "m", "max_tokens": 5, "messages": HELLO}, headers={**headers, "x-api-key": "rtr_wrong"}
        ),
        401,
        "authentication_error",
    )
    no_key = {k: v for k, v in headers.items() if k != "x-api-key"}
    error_of(
        http.post(url, {"model": "m", "max_tokens": 5, "messages": HELLO}, headers=no_key), 401, "authentication_error"
    )
    error_of(
        http.post(
            f"{router.url}/v1/messages",
            {"model": "m", "max_tokens": 5, "messages": HELLO},
            headers={**no_key, "Authorization": "Bearer rtr_wrong"},
        ),
        401,
        "authentication_error",
    )
    error_of(http.get(f"{router.url}/api/anthropic/v1/models/no-such-model", headers=headers), 404, "not_found_error")
    big = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 70_000}]}
    error_of(http.post(url, big, headers=headers), 413, "request_too_large")

    client = sdk(router)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="m", max_tokens=0, messages=HELLO)
    with pytest.raises(anthropic.AuthenticationError):
        sdk(router, key="rtr_nope").messages.create(model="m", max_tokens=2, messages=HELLO)
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("no-such-model")
    # still serving
    assert blocks(client.messages.create(model="m", max_tokens=2, messages=HELLO)) == [("text", " tok tok")]


def test_unknown_anthropic_endpoint_is_an_anthropic_error(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    resp = http.get(f"{router.url}/api/anthropic/v1/files", headers=anthropic_headers(router))
    assert resp.status in (404, 501)
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] and body["error"]["message"]


def test_full_queue_is_529_overloaded(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(AUXOT_MAX_QUEUE="1")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(lambda: sdk(router).messages.create(model="m", max_tokens=2, messages=HELLO))
        deadline = time.monotonic() + 10
        while router.health()["queue_depth"] < 1:
            assert time.monotonic() < deadline, "the first request never reached the queue"
            time.sleep(0.05)
        resp = http.post(
            f"{router.url}/v1/messages",
            {"model": "m", "max_tokens": 2, "messages": HELLO},
            headers=anthropic_headers(router),
        )
        error_of(resp, 529, "overloaded_error")
        assert int(resp.headers["retry-after"]) > 0
        with pytest.raises(anthropic.APIStatusError) as info:
            sdk(router).messages.create(model="m", max_tokens=2, messages=HELLO)
        assert info.value.status_code == 529
        fake_cluster.worker(router)
        assert blocks(waiting.result(timeout=30)) == [("text", " tok tok")]


# --- models and count_tokens ------------------------------------------------------------------------


def test_models(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    name = router.health()["model"]
    models = list(sdk(router).models.list())
    assert [m.id for m in models] == [name]
    assert models[0].type == "model" and models[0].display_name
    assert sdk(router, "").models.retrieve(name).id == name
    resp = http.get(f"{router.url}/api/anthropic/models", headers=anthropic_headers(router))
    assert resp.status == 200 and resp.json()["data"][0]["id"] == name


def fake_count(body: dict[str, Any]) -> int:
    """What the fake llama-server's /apply-template + /tokenize give for this request."""
    translated = count_tokens_request(body)
    return int(FAKE.count_tokens(FAKE.render_chatml(translated.messages, translated.tools)))


def test_count_tokens_exact_through_a_worker_and_estimated_without(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    body = {
        "model": "m",
        "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "How many tokens is this sentence, exactly?"}],
        "tools": [WEATHER, TIME],
    }
    url = f"{router.url}/api/anthropic/v1/messages/count_tokens"
    estimate = http.post(url, body, headers=anthropic_headers(router))
    assert estimate.status == 200 and estimate.headers["x-auxot-token-count"] == "estimate"
    assert estimate.json()["input_tokens"] > 0

    fake_cluster.worker(router)
    for path in (
        "/api/anthropic/v1/messages/count_tokens",
        "/api/anthropic/messages/count_tokens",
        "/v1/messages/count_tokens?beta=true",
    ):
        exact = http.post(f"{router.url}{path}", body, headers=anthropic_headers(router))
        assert exact.status == 200, (path, exact.body[:300])
        assert exact.headers["x-auxot-token-count"] == "exact"
        assert MessageTokensCount.model_validate(exact.json()).input_tokens == fake_count(body), path
    counted = sdk(router).messages.count_tokens(
        model="m", messages=body["messages"], system=body["system"], tools=body["tools"]
    )
    assert counted.input_tokens == fake_count(body)
    # the same prompt, generated: llama-server's prompt size is the count
    generated = post_message(router, {**body, "max_tokens": 1})
    assert generated.usage.input_tokens + (generated.usage.cache_read_input_tokens or 0) == fake_count(body)
    error_of(http.post(url, {"model": "m"}, headers=anthropic_headers(router)), 400, "invalid_request_error")


# --- Claude Code's own requests -----------------------------------------------------------------------

_DROP_HEADERS = {"host", "content-length", "accept-encoding", "connection", "x-api-key", "authorization"}


def replay(router: RouterProcess, request: dict[str, Any]) -> http.Response:
    """Send a captured request as Claude Code sent it, with our key in the same header."""
    headers = {k: v for k, v in request["headers"].items() if k.lower() not in _DROP_HEADERS}
    if "authorization" in request["headers"]:
        headers["authorization"] = f"Bearer {router.keys.api_key}"
    elif "x-api-key" in request["headers"]:
        headers["x-api-key"] = router.keys.api_key
    path = request["path"] + (f"?{request['query']}" if request.get("query") else "")
    body = orjson.dumps(request["body"]) if request.get("body") is not None else None
    return http.request(request["method"], f"{router.url}{path}", body=body, headers=headers, timeout=600)


def check_replayed(request: dict[str, Any], resp: http.Response, tools_offered: list[dict[str, Any]]) -> Any:
    """The answer is what the SDK accepts for this kind of request."""
    where = f"{request['method']} {request['path']}"
    if request["method"] == "HEAD":
        assert resp.status < 500, where  # a preflight Claude Code ignores the answer to
        return None
    assert resp.status == 200, (where, resp.body[:500])
    if request["path"].endswith("/count_tokens"):
        assert resp.headers["x-auxot-token-count"] in ("exact", "estimate")
        return MessageTokensCount.model_validate(resp.json())
    if request["body"].get("stream"):
        assert resp.headers["content-type"].startswith("text/event-stream")
        message = CheckedStream(resp.body).final
    else:
        message = Message.model_validate(resp.json())
    assert message.stop_reason in ("end_turn", "max_tokens", "tool_use")
    for block in message.content:
        if block.type == "tool_use":
            assert block.name in {t["name"] for t in tools_offered}
            assert isinstance(block.input, dict)
    return message


def _captured(path: Path) -> list[dict[str, Any]]:
    return list(orjson.loads(path.read_bytes())["requests"])


def test_claude_code_captures_replay_against_the_fake(fake_cluster: Cluster) -> None:
    """Every request Claude Code 2.1.330 sent in the captures gets a well-formed answer."""
    router = fake_cluster.router(AUXOT_CTX_SIZE="24576")
    fake_cluster.worker(router)
    seen = 0
    for path in CLAUDE_CODE:
        for request in _captured(path):
            body = request.get("body") or {}
            resp = replay(router, request)
            result = check_replayed(request, resp, body.get("tools") or [])
            if isinstance(result, MessageTokensCount):
                assert resp.headers["x-auxot-token-count"] == "exact"
                assert result.input_tokens == fake_count(body), path.name
            seen += 1
    assert seen >= 40  # 15 files, 43 requests


def test_claude_code_first_request_against_llama_server(cluster: Cluster) -> None:
    """Claude Code's real first request (~32,000 tokens, 12 tools, adaptive thinking), streamed
    by the real llama-server: a valid tool_use (the tiny model calls a tool when offered)."""
    router = cluster.router(AUXOT_CTX_SIZE="40960", AUXOT_MAX_PARALLEL="1")
    cluster.worker(router, AUXOT_LLAMA_ARGS=LONG_CONTEXT)
    request = _captured(FIRST_REQUEST)[0]
    message = check_replayed(request, replay(router, request), request["body"]["tools"])
    assert message.stop_reason == "tool_use"
    call = next(b for b in message.content if b.type == "tool_use")
    schema = next(t["input_schema"] for t in request["body"]["tools"] if t["name"] == call.name)
    assert set(schema.get("required", [])) <= set(call.input)
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 20_000


# --- the SDK against the real llama-server --------------------------------------------------------


def llama_direct_prompt_tokens(
    model: Path,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    *,
    ctx: int = 4096,
    extra: list[str] | None = None,
) -> tuple[int, int]:
    """(chat completion prompt_tokens, /apply-template + /tokenize count) from llama-server itself."""
    with LlamaServer(model, parallel=1, ctx_size=ctx, extra_args=extra) as direct:
        headers = {"Authorization": f"Bearer {direct.api_key}"} if direct.api_key else None
        body: dict[str, Any] = {"messages": messages}
        if tools:
            body["tools"] = tools
        rendered = http.post(f"{direct.base_url}/apply-template", body, headers=headers, timeout=120)
        assert rendered.status == 200, rendered.body[:300]
        tokens = http.post(
            f"{direct.base_url}/tokenize",
            {"content": rendered.json()["prompt"], "parse_special": True},
            headers=headers,
            timeout=120,
        )
        chat = http.post(
            f"{direct.base_url}/v1/chat/completions", {**body, "max_tokens": 1}, headers=headers, timeout=300
        )
        assert chat.status == 200, chat.body[:300]
        return int(chat.json()["usage"]["prompt_tokens"]), len(tokens.json()["tokens"])


def test_sdk_against_llama_server(cluster: Cluster) -> None:
    router = cluster.router(AUXOT_CTX_SIZE="1024")
    cluster.worker(router)
    client = sdk(router)
    message = client.messages.create(model="tiny", max_tokens=12, extra_body=GREEDY, messages=HELLO)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 12
    [(kind, text)] = blocks(message)
    assert kind == "text" and text
    with client.messages.stream(model="tiny", max_tokens=12, extra_body=GREEDY, messages=HELLO) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text and blocks(final) == [("text", text)]
    assert final.stop_reason == "max_tokens"
    raw = post_stream(router, {"model": "tiny", "max_tokens": 12, "temperature": 0, "messages": HELLO})
    assert blocks(raw.final) == [("text", text)]

    translated = translate_request({"model": "tiny", "max_tokens": 12, "messages": HELLO})
    with LlamaServer(cluster.model, parallel=1, ctx_size=1024) as direct:
        reference = http.post(
            f"{direct.base_url}/v1/chat/completions",
            {"messages": translated.messages, "max_tokens": 12, "temperature": 0, **translated.params},
        ).json()
    assert text == reference["choices"][0]["message"]["content"]
    assert (
        message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == reference["usage"]["prompt_tokens"]
    )


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_then_tool_result_then_next_turn(cluster: Cluster, stream: bool) -> None:
    router = cluster.router(AUXOT_CTX_SIZE="2048")
    cluster.worker(router)
    client = sdk(router)
    tools = [WEATHER, TIME]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]

    def turn(messages: list[dict[str, Any]]) -> Any:
        request = {"model": "tiny", "max_tokens": 200, "extra_body": GREEDY, "tools": tools, "messages": messages}
        if not stream:
            return client.messages.create(**request)
        with client.messages.stream(**request) as s:
            events = list(s)
            final = s.get_final_message()
        assert any(e.type == "input_json" for e in events)
        return final

    first = turn(ask)
    assert first.stop_reason == "tool_use"
    calls = [b for b in first.content if b.type == "tool_use"]
    assert calls and all(c.id.startswith("toolu_") for c in calls)
    for call in calls:
        check_tool_input(call.name, call.input, tools)
    history: list[dict[str, Any]] = [
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": c.id, "content": "21 degrees and sunny"} for c in calls],
        },
    ]
    second = turn(history)
    assert second.stop_reason == "tool_use"  # tools are still offered: the tiny model calls again
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) > first.usage.input_tokens + (
        first.usage.cache_read_input_tokens or 0
    )
    for call in (b for b in second.content if b.type == "tool_use"):
        check_tool_input(call.name, call.input, tools)
    # the history really reached the model: the prompt is the one llama-server renders for it
    translated = translate_request({"model": "tiny", "max_tokens": 200, "tools": tools, "messages": history})
    direct, _ = llama_direct_prompt_tokens(cluster.model, translated.messages, translated.tools, ctx=2048)
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) == direct


# --- a Claude Code-shaped conversation on the real llama-server ------------------------------------


def _png_1x1() -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    raw = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(raw).decode()


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    return {"name": name, "description": description, "input_schema": schema}


S = {"type": "string"}
CC_TOOLS = [
    _tool(
        "Bash",
        "Run a shell command.",
        {
            "command": S,
            "timeout": {"type": "integer", "minimum": 0, "maximum": 600000},
            "description": S,
            "run_in_background": {"type": "boolean"},
        },
        ["command"],
    ),
    _tool(
        "Read",
        "Read a file.",
        {"file_path": S, "offset": {"type": "integer"}, "limit": {"type": "integer"}},
        ["file_path"],
    ),
    _tool("Write", "Write a file.", {"file_path": S, "content": S}, ["file_path", "content"]),
    _tool(
        "Edit",
        "Replace text in a file.",
        {"file_path": S, "old_string": S, "new_string": S, "replace_all": {"type": "boolean", "default": False}},
        ["file_path", "old_string", "new_string"],
    ),
    _tool(
        "MultiEdit",
        "Several edits to one file.",
        {
            "file_path": S,
            "edits": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {"old_string": S, "new_string": S},
                    "required": ["old_string", "new_string"],
                    "additionalProperties": False,
                },
            },
        },
        ["file_path", "edits"],
    ),
    _tool("Glob", "Find files by pattern.", {"pattern": S, "path": S}, ["pattern"]),
    _tool(
        "Grep",
        "Search file contents.",
        {
            "pattern": S,
            "path": S,
            "output_mode": {"type": "string", "enum": ["content", "files_with_matches", "count"]},
            "-n": {"type": "boolean"},
        },
        ["pattern"],
    ),
    _tool(
        "TodoWrite",
        "Update the todo list.",
        {
            "todos": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "content": {"type": "string", "minLength": 1},
                        "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
                    },
                    "required": ["content", "status"],
                },
            }
        },
        ["todos"],
    ),
    _tool("WebFetch", "Fetch a URL.", {"url": {"type": "string", "format": "uri"}, "prompt": S}, ["url", "prompt"]),
    _tool(
        "WebSearch",
        "Search the web.",
        {"query": {"type": "string", "minLength": 2}, "allowed_domains": {"type": "array", "items": S}},
        ["query"],
    ),
    _tool(
        "NotebookEdit",
        "Edit a notebook cell.",
        {"notebook_path": S, "new_source": S, "cell_type": {"type": "string", "enum": ["code", "markdown"]}},
        ["notebook_path", "new_source"],
    ),
    _tool(
        "Agent", "Start a sub-agent.", {"description": S, "prompt": S, "subagent_type": S}, ["description", "prompt"]
    ),
    _tool(
        "AskUserQuestion",
        "Ask the user.",
        {
            "questions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "question": S,
                        "options": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"label": S, "description": S},
                                "required": ["label"],
                            },
                        },
                        "multiSelect": {"type": "boolean"},
                    },
                    "required": ["question", "options"],
                },
            }
        },
        ["questions"],
    ),
    _tool("ExitPlanMode", "Leave plan mode.", {"plan": S}, ["plan"]),
    _tool("BashOutput", "Output of a background shell.", {"bash_id": S}, ["bash_id"]),
    _tool("KillShell", "Stop a background shell.", {"shell_id": S}, ["shell_id"]),
    _tool(
        "Config",
        "Change a setting.",
        {"setting": S, "value": {"anyOf": [S, {"type": "boolean"}, {"type": "number"}]}},
        ["setting"],
    ),
]


def claude_code_conversation(*, image: bool) -> dict[str, Any]:
    """System blocks with cache_control, 17 tools with nested schemas, thinking enabled, three
    tool_use/tool_result rounds (parallel calls, an error result, list content) and, optionally,
    a screenshot."""
    user_last: list[dict[str, Any]] = [{"type": "text", "text": "Now run it.", "cache_control": {"type": "ephemeral"}}]
    screenshot: list[dict[str, Any]] = (
        [
            {"type": "text", "text": "Here is a screenshot."},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": _png_1x1()}},
        ]
        if image
        else []
    )
    return {
        "model": "claude-code-test",
        "max_tokens": 1024,
        "thinking": {"type": "enabled", "budget_tokens": 512},
        "metadata": {"user_id": "user_0000"},
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.330; cc_entrypoint=cli;"},
            {"type": "text", "text": "You are Claude Code, a coding agent.", "cache_control": {"type": "ephemeral"}},
            {
                "type": "text",
                "text": "# Environment\n - Working directory: /workspace/project\n - Platform: linux",
                "cache_control": {"type": "ephemeral", "ttl": "1h"},
            },
        ],
        "tools": CC_TOOLS,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>\nBe brief.\n</system-reminder>\n"},
                    {"type": "text", "text": "Show me main.py and run it."},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Find the file first.", "signature": "EqQBCkYIBxgCKkBsig"},
                    {"type": "text", "text": "Looking."},
                    {"type": "tool_use", "id": "toolu_01A", "name": "Glob", "input": {"pattern": "**/*.py"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01A",
                        "content": "main.py\nutil.py",
                        "cache_control": {"type": "ephemeral"},
                    }
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "thinking",
                        "thinking": "Read it and list the directory.",
                        "signature": "EqQBCkYIBxgCKkBsig2",
                    },
                    {
                        "type": "tool_use",
                        "id": "toolu_02B",
                        "name": "Read",
                        "input": {"file_path": "/workspace/project/main.py"},
                    },
                    {
                        "type": "tool_use",
                        "id": "toolu_03C",
                        "name": "Bash",
                        "input": {"command": "ls -la", "description": "List files"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_02B",
                        "content": [{"type": "text", "text": "     1\tprint('hi')\n"}],
                    },
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_03C",
                        "is_error": True,
                        "content": "Permission to use Bash has been denied.",
                    },
                    *screenshot,
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "main.py prints hi."},
                    {
                        "type": "tool_use",
                        "id": "toolu_04D",
                        "name": "TodoWrite",
                        "input": {"todos": [{"content": "Run main.py", "status": "in_progress"}]},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_04D", "content": "Todos updated"},
                    *user_last,
                ],
            },
        ],
    }


CONVERSATION_CTX = "16384"


@pytest.mark.parametrize("image", [False, True], ids=["text-only", "with-image"])
def test_claude_code_shaped_conversation_on_llama_server(cluster: Cluster, image: bool) -> None:
    router = cluster.router(AUXOT_CTX_SIZE=CONVERSATION_CTX, AUXOT_MAX_PARALLEL="1")
    cluster.worker(router, AUXOT_LLAMA_ARGS=LONG_CONTEXT)
    body = claude_code_conversation(image=image)
    tool_names = {t["name"] for t in CC_TOOLS}

    message = post_message(router, copy.deepcopy(body))
    stream = post_stream(router, copy.deepcopy(body))
    answer: Any
    for answer in (message, stream.final):
        assert answer.stop_reason in ("tool_use", "max_tokens", "end_turn")
        for block in answer.content:
            if block.type == "tool_use":
                assert block.name in tool_names and isinstance(block.input, dict)
                if answer.stop_reason == "tool_use":
                    check_tool_input(block.name, block.input, CC_TOOLS)
        assert (answer.stop_reason == "tool_use") == any(
            b.type == "tool_use" for b in answer.content
        ) or answer.stop_reason == "max_tokens"
    prompt = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    assert prompt > 1000

    # the SDK accepts the same request and its answer
    client = sdk(router)
    sdk_message = client.messages.create(**copy.deepcopy(body))
    assert sdk_message.stop_reason in ("tool_use", "max_tokens", "end_turn")

    # count_tokens is exact: the prompt llama-server processed for the same request
    counted = http.post(
        f"{router.url}/v1/messages/count_tokens?beta=true",
        {k: body[k] for k in ("model", "system", "tools", "messages")},
        headers=anthropic_headers(router),
    )
    assert counted.status == 200, counted.body[:300]
    assert counted.headers["x-auxot-token-count"] == "exact"
    assert counted.json()["input_tokens"] == prompt
    if not image:
        # and it is llama-server's own count of the translated request, computed without the router
        translated = count_tokens_request(body)
        chat_count, template_count = llama_direct_prompt_tokens(
            cluster.model, translated.messages, translated.tools, ctx=int(CONVERSATION_CTX), extra=LONG_CONTEXT.split()
        )
        assert counted.json()["input_tokens"] == chat_count == template_count
