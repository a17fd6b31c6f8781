"""Upstream providers: configuration, translation, error mapping, and relaying real HTTP streams
from both official SDKs through ``upstreams.relay`` to a local fake provider."""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from auxot_common import anthropic_api
from auxot_common.openai_api import error_body
from auxot_common.upstreams import (
    AnthropicReader,
    ConfigError,
    FallbackSpec,
    OpenAIReader,
    SSEParser,
    UpstreamSpec,
    UpstreamStats,
    Usage,
    map_upstream_error,
    openai_to_anthropic,
    parse_fallback,
    parse_upstreams,
    relay,
)
from tests.support.fake_provider import FakeProvider, ServerThread

SECRET = "sk-upstream-secret-value-123"


# --- configuration -----------------------------------------------------------------------------


def test_parse_upstreams_reads_the_key_from_the_named_variable_and_never_shows_it() -> None:
    specs = parse_upstreams(
        {
            "oa": {
                "api": "openai",
                "base_url": "https://api.example/v1/",
                "model": "gpt-x",
                "key_env": "OA_KEY",
                "keys": ["ci"],
            }
        },
        {"OA_KEY": SECRET},
    )
    spec = specs["oa"]
    assert spec.key == SECRET and spec.base_url == "https://api.example/v1"
    assert SECRET not in repr(spec) and SECRET not in str(spec.public()) and "OA_KEY" not in str(spec.public())
    assert spec.may_use("ci") and not spec.may_use("other") and not spec.may_use("")
    assert parse_upstreams({"x": {"base_url": "http://h/v1", "model": "m", "keys": ["*"]}}, {})["x"].may_use("any")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"base_url": "http://h/v1", "model": "m", "key_env": "MISSING"}, "MISSING is not set"),
        ({"base_url": "ftp://h", "model": "m"}, "base_url"),
        ({"base_url": "http://h/v1"}, "model"),
        ({"base_url": "http://h/v1", "model": "m", "api": "gemini"}, "api must be"),
        ({"base_url": "http://h/v1", "model": "m", "key": "sk-inline"}, "unknown setting 'key'"),
    ],
)
def test_upstream_config_errors(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_upstreams({"u": table}, {})


def test_fallback_modes() -> None:
    ups = parse_upstreams({"u": {"base_url": "http://h/v1", "model": "m"}}, {})
    assert parse_fallback("u", ups, "small") == FallbackSpec("u", "no-worker", 30.0)
    with pytest.raises(ConfigError, match="not configured"):
        parse_fallback({"upstream": "v"}, ups, "small")
    with pytest.raises(ConfigError, match="when must be"):
        parse_fallback({"upstream": "u", "when": "sometimes"}, ups, "small")
    no_worker = FallbackSpec("u", "no-worker")
    assert no_worker.at_arrival(0) and not no_worker.at_arrival(1)
    assert FallbackSpec("u", "always").at_arrival(3)
    overflow = FallbackSpec("u", "overflow", after_s=5)
    assert not overflow.at_arrival(0)
    assert overflow.overflow_due(5.0, dispatched=False)
    assert not overflow.overflow_due(4.9, dispatched=False) and not overflow.overflow_due(60, dispatched=True)


# --- translation and parsing -------------------------------------------------------------------


def test_openai_request_as_anthropic_messages() -> None:
    body = {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"city":"Oslo"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
            {"role": "tool", "tool_call_id": "call_2", "content": "snow"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "w", "description": "weather", "parameters": {"type": "object"}}}
        ],
        "tool_choice": "required",
        "temperature": 1.7,
        "stop": "END",
    }
    out = openai_to_anthropic(body, "claude-x")
    assert out["model"] == "claude-x" and out["system"] == "be brief" and out["stream"] is True
    assert out["max_tokens"] == 4096 and out["temperature"] == 1.0 and out["stop_sequences"] == ["END"]
    user, assistant, results = out["messages"]
    assert user["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
    }
    assert assistant["content"] == [{"type": "tool_use", "id": "call_1", "name": "w", "input": {"city": "Oslo"}}]
    assert [b["content"] for b in results["content"]] == ["rain", "snow"]  # one user turn for both results
    assert out["tools"] == [{"name": "w", "description": "weather", "input_schema": {"type": "object"}}]
    assert out["tool_choice"] == {"type": "any"}


def test_sse_parser_across_chunk_boundaries() -> None:
    parser = SSEParser()
    stream = b'event: a\ndata: {"x":1}\n\ndata: [DONE]\r\n\r\n'
    events = []
    for i in range(len(stream)):
        events += parser.feed(stream[i : i + 1])
    assert [(e, d) for _, e, d in events] == [("a", '{"x":1}'), ("", "[DONE]")]
    with pytest.raises(ValueError):
        SSEParser(limit=10).feed(b"data: " + b"x" * 20)


def test_readers_turn_streams_into_protocol_messages() -> None:
    openai_reader = OpenAIReader()
    openai_reader.on_event('{"model":"m","choices":[{"delta":{"content":"Hi"}}]}')
    openai_reader.on_event(
        '{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}'
    )
    openai_reader.on_event('{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}')
    done = openai_reader.complete()
    assert (done.full_response, done.finish_reason, done.input_tokens, done.output_tokens) == ("Hi", "tool_calls", 5, 2)
    assert done.tool_calls[0]["function"] == {"name": "f", "arguments": "{}"}
    reader = AnthropicReader()
    reader.on_event(
        "message_start",
        '{"type":"message_start","message":{"model":"c","usage":{"input_tokens":4,"cache_read_input_tokens":6}}}',
    )
    reader.on_event(
        "content_block_delta",
        '{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hm"}}',
    )
    reader.on_event(
        "message_delta", '{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":9}}'
    )
    done = reader.complete()
    assert (done.reasoning_content, done.finish_reason, done.input_tokens, done.cache_tokens, done.output_tokens) == (
        "hm", "length", 10, 6, 9,
    )  # fmt: skip


def test_upstream_errors_map_to_ours() -> None:
    limited = map_upstream_error("oa", 429, b'{"error":{"message":"quota"}}', "7")
    assert (limited.status, limited.retry_after) == (429, 7) and "quota" in limited.message
    assert map_upstream_error("oa", 429, b"", None).retry_after == 1
    creds = map_upstream_error("oa", 401, b'{"error":{"message":"Incorrect API key provided: sk-abc"}}', None)
    assert creds.status == 502 and "sk-abc" not in creds.message
    assert map_upstream_error("an", 529, b'{"type":"error","error":{"message":"busy"}}', "2").status == 503
    assert map_upstream_error("oa", 400, b'{"error":{"message":"bad tool"}}', None).message == "upstream oa: bad tool"
    assert map_upstream_error("oa", 500, b"<html>", None).status == 502


# --- relaying real requests ----------------------------------------------------------------------


class Harness:
    """A caller-facing aiohttp app that answers each API through ``relay`` to one upstream."""

    def __init__(self, spec: UpstreamSpec) -> None:
        self.spec = spec
        self.stats = UpstreamStats()
        self.usages: list[Usage] = []
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handler("chat"))
        app.router.add_post("/v1/responses", self._handler("responses"))
        app.router.add_post("/v1/messages", self._handler("messages"))
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    def _handler(self, caller_api: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            if self.session is None:
                self.session = aiohttp.ClientSession()
            body = orjson.loads(await request.read())

            def render(status: int, message: str, retry_after: int | None) -> web.StreamResponse:
                headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
                if caller_api == "messages":
                    error = anthropic_api.error_body(anthropic_api.error_type_for_status(status), message)
                else:
                    error = error_body(message, "rate_limit_error" if status == 429 else "server_error")
                return web.json_response(error, status=status, headers=headers)

            result = await relay(
                request,
                self.session,
                self.spec,
                caller_api=caller_api,
                body=body,
                render_error=render,
                stats=self.stats,
                extra_headers={"x-auxot-routed-model": self.spec.name},
            )
            self.usages.append(result.usage)
            return result.response

        return handle


@pytest.fixture(scope="module")
def provider() -> Iterator[tuple[FakeProvider, str]]:
    fake = FakeProvider()
    with ServerThread(fake.app()) as server:
        yield fake, server.url


@pytest.fixture
def fake(provider: tuple[FakeProvider, str]) -> FakeProvider:
    fake, _ = provider
    fake.requests.clear()
    fake.cancelled.clear()
    fake.finished.clear()
    fake.fail.clear()
    fake.tool_call = None
    fake.delay_s = 0.0
    fake.linger_s = 0.0
    fake.words = ["Hello", " from", " upstream", "."]
    return fake


def serve(provider_url: str, api: str) -> tuple[Harness, ServerThread]:
    spec = UpstreamSpec(
        name=f"fake-{api}",
        api=api,
        base_url=provider_url + "/v1",
        model=f"{api}-model",
        keys=frozenset({"*"}),
        key=SECRET,
    )
    harness = Harness(spec)
    return harness, ServerThread(harness.app())


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_openai_sdk_streams_through_either_upstream(
    provider: tuple[FakeProvider, str], fake: FakeProvider, api: str, caplog: pytest.LogCaptureFixture
) -> None:
    harness, server = serve(provider[1], api)
    caplog.set_level(logging.DEBUG)
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="rtr_caller", max_retries=0)
        stream = client.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Hello from upstream."
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 11
        assert chunks[-1].usage.completion_tokens == 4
        # without include_usage the caller gets no usage chunk, yet the router still counts it
        plain = list(
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], stream=True)
        )
        assert all(c.usage is None for c in plain)
        whole = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "hi"}]
        )
        assert whole.headers["x-auxot-routed-model"] == f"fake-{api}"
        assert whole.parse().choices[0].message.content == "Hello from upstream."
    assert [(u.input_tokens, u.output_tokens, u.cached_tokens) for u in harness.usages] == [(11, 4, 3)] * 3
    assert harness.stats.requests == 3 and harness.stats.input_tokens == 33 and harness.stats.output_tokens == 12
    sent = fake.requests[0]
    if api == "openai":
        assert sent.path == "/v1/chat/completions" and sent.headers["Authorization"] == f"Bearer {SECRET}"
        assert sent.body["stream_options"] == {"include_usage": True}
    else:
        assert sent.path == "/v1/messages" and sent.headers["x-api-key"] == SECRET
        assert sent.body["messages"] == [{"role": "user", "content": "hi"}] and sent.body["max_tokens"] == 4096
    assert sent.body["model"] == f"{api}-model"
    assert SECRET not in caplog.text


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_anthropic_sdk_through_either_upstream_with_tools(
    provider: tuple[FakeProvider, str], fake: FakeProvider, api: str
) -> None:
    harness, server = serve(provider[1], api)
    tools: Any = [
        {
            "name": "get_weather",
            "description": "weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    with server:
        client = anthropic.Anthropic(base_url=server.url, api_key="rtr_caller", max_retries=0)
        with client.messages.stream(
            model="auto", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == "Hello from upstream."
        assert final.stop_reason == "end_turn" and final.usage.output_tokens == 4
        fake.tool_call = ("get_weather", {"city": "Oslo"})
        message = client.messages.create(
            model="auto", max_tokens=64, tools=tools, messages=[{"role": "user", "content": "weather in Oslo?"}]
        )
        block = message.content[-1]
        assert message.stop_reason == "tool_use" and block.type == "tool_use"
        assert block.name == "get_weather" and block.input == {"city": "Oslo"}
    sent = fake.requests[-1]
    if api == "openai":
        assert sent.path == "/v1/chat/completions"
        assert sent.body["tools"][0]["function"]["name"] == "get_weather"
        assert "top_k" not in sent.body and "chat_template_kwargs" not in sent.body
    else:
        assert sent.path == "/v1/messages" and sent.headers["anthropic-version"] == "2023-06-01"
    assert harness.usages[0].input_tokens == 11 and harness.usages[0].output_tokens == 4


def test_openai_sdk_responses_pass_through(provider: tuple[FakeProvider, str], fake: FakeProvider) -> None:
    harness, server = serve(provider[1], "openai")
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="rtr_caller", max_retries=0)
        events = list(client.responses.create(model="auto", input="hi", stream=True))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello from upstream."
        assert client.responses.create(model="auto", input="hi").output_text == "Hello from upstream."
    assert [(u.input_tokens, u.output_tokens) for u in harness.usages] == [(11, 4), (11, 4)]


@pytest.mark.parametrize(
    ("api", "upstream_api"),
    [
        ("chat", "openai"),
        ("messages", "anthropic"),
        ("responses", "openai"),
        ("chat", "anthropic"),  # translated
        ("messages", "openai"),  # translated
    ],
)
def test_usage_counts_when_the_caller_hangs_up_at_the_final_event(
    provider: tuple[FakeProvider, str], fake: FakeProvider, api: str, upstream_api: str
) -> None:
    """The OpenAI SDK closes its stream at ``[DONE]``; a provider may keep the connection open a
    while after its final event. The relay (passed through or translated) must answer at the
    final event, with the real usage, not wait for the upstream's end of stream (the caller
    would wait too) and lose the count when the caller hangs up."""
    harness, server = serve(provider[1], upstream_api)
    fake.linger_s = 30.0
    with server:
        started = time.monotonic()
        if api == "messages":
            claude = anthropic.Anthropic(base_url=server.url, api_key="rtr_caller", max_retries=0)
            with claude.messages.stream(
                model="auto", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                text = "".join(stream.text_stream)
        else:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="rtr_caller", max_retries=0)
            if api == "chat":
                chunks = client.chat.completions.create(
                    model="auto", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                events = client.responses.create(model="auto", input="hi", stream=True)
                text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == "Hello from upstream."
        assert time.monotonic() - started < 15, "the caller waited for the upstream's end of stream"
        deadline = time.monotonic() + 10
        while not harness.usages and time.monotonic() < deadline:
            time.sleep(0.02)
    assert [(u.input_tokens, u.output_tokens) for u in harness.usages] == [(11, 4)]
    assert harness.stats.cancelled == 0 and harness.stats.output_tokens == 4


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_upstream_429_becomes_ours_with_retry_after(
    provider: tuple[FakeProvider, str], fake: FakeProvider, api: str
) -> None:
    harness, server = serve(provider[1], api)
    with server:
        fake.fail_next(429, retry_after="17", message="quota exceeded")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="rtr_caller", max_retries=0)
        with pytest.raises(openai.RateLimitError) as limited:
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert limited.value.response.headers["Retry-After"] == "17"
        assert "quota exceeded" in str(limited.value)
        fake.fail_next(429, retry_after="3")
        claude = anthropic.Anthropic(base_url=server.url, api_key="rtr_caller", max_retries=0)
        with pytest.raises(anthropic.RateLimitError) as caught:
            claude.messages.create(model="auto", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.response.headers["Retry-After"] == "3"
        assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
        fake.fail_next(401, message=f"Incorrect API key provided: {SECRET}")
        with pytest.raises(openai.APIStatusError) as denied:
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
        assert denied.value.status_code == 502 and SECRET not in str(denied.value)
    assert harness.stats.rate_limited == 2 and harness.stats.errors == 3


def test_caller_leaving_closes_the_upstream_stream(provider: tuple[FakeProvider, str], fake: FakeProvider) -> None:
    harness, server = serve(provider[1], "openai")
    fake.words = [f" w{i}" for i in range(200)]
    fake.delay_s = 0.05
    with server:
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        body = orjson.dumps({"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        seen = b""
        while b" w1" not in seen:  # the answer has started streaming
            seen += response.read1(65536)
        conn.sock.close()  # the caller goes away mid-answer
        conn.close()
        deadline = time.monotonic() + 10
        while not fake.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
    assert fake.cancelled == ["/v1/chat/completions"] and not fake.finished
    assert harness.stats.cancelled == 1


def test_unreachable_upstream_is_a_502_in_the_callers_shape(fake: FakeProvider) -> None:
    harness, server = serve("http://127.0.0.1:9", "anthropic")  # discard port: nothing listens
    with server:
        claude = anthropic.Anthropic(base_url=server.url, api_key="rtr_caller", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as caught:
            claude.messages.create(model="auto", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502 and "unreachable" in str(caught.value)
    assert harness.stats.errors == 1


def test_responses_need_an_openai_upstream(provider: tuple[FakeProvider, str], fake: FakeProvider) -> None:
    _, server = serve(provider[1], "anthropic")
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="rtr_caller", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="needs an OpenAI one"):
            client.responses.create(model="auto", input="hi")
    assert not fake.requests
