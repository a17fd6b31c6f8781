"""End to end, OpenAI surface beyond plain chat: tool calls, reasoning, text-embedded markup,
errors mid-stream, legacy completions and logprobs.

Real router and worker processes; ``cluster`` runs the real llama-server with the tiny model
(which answers every request that offers tools with a valid tool call), ``fake_cluster`` the
fake llama-server whose ``FAKE:<scenario>`` prompts give exact chunk sequences. Everything is
read through the official ``openai`` SDK, or as raw SSE where the chunk boundaries matter.
"""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from tests.conftest import Cluster
from tests.support import http
from tests.support.llama_server import LlamaServer
from tests.support.procs import RouterProcess

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone.",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# What bench/fake_llama_server.py sends for its scenarios.
FAKE_WEATHER_ARGS = '{"city":"Paris","unit":"celsius"}'
FAKE_TIME_ARGS = '{"timezone":"Europe/Paris"}'


def client(router: RouterProcess) -> Any:
    """The official client (typed loosely: the tests send plain dicts)."""
    return openai.OpenAI(base_url=f"{router.url}/api/openai/v1", api_key=router.keys.api_key, max_retries=0, timeout=60)


def sse_payloads(body: bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body, in order (comments skipped)."""
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


CHAT_PATH = "/api/openai/v1/chat/completions"


def raw_chunks(router: RouterProcess, body: dict[str, Any], path: str = CHAT_PATH) -> list[dict[str, Any]]:
    """POST a streaming request; the parsed chunks (``[DONE]`` checked and removed)."""
    resp = http.post(f"{router.url}{path}", {**body, "stream": True}, headers=router.headers(), timeout=60)
    assert resp.status == 200, resp.body[:500]
    assert resp.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(resp.body)
    assert payloads and payloads[-1] == b"[DONE]", payloads[-3:]
    assert payloads.count(b"[DONE]") == 1
    return [orjson.loads(p) for p in payloads[:-1]]


def accumulate(chunks: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> Any:
    """Run the chunks through the SDK's own stream accumulator: what SDK users get."""
    input_tools: Any = tools or openai.NOT_GIVEN
    state = ChatCompletionStreamState(input_tools=input_tools)
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion()


def tool_deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ``delta.tool_calls`` entry, in order."""
    return [call for c in chunks if c["choices"] for call in c["choices"][0]["delta"].get("tool_calls") or []]


def one_entry_per_call(chunks: list[dict[str, Any]]) -> None:
    """Fragments of one call that travel together are merged: a chunk has at most one entry per
    index, as OpenAI sends them (clients that read ``tool_calls[0]`` of each chunk lose
    arguments otherwise)."""
    for chunk in chunks:
        entries = chunk["choices"][0]["delta"].get("tool_calls") or [] if chunk["choices"] else []
        indexes = [e.get("index", 0) for e in entries]
        assert len(indexes) == len(set(indexes)), entries


def delta_text(chunks: list[dict[str, Any]], key: str) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])


def finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]


def pairs(calls: Any) -> list[tuple[str, str]]:
    """(name, arguments text) of each tool call."""
    return [(c.function.name, c.function.arguments) for c in calls or []]


def parsed(calls: Any) -> list[tuple[str, Any]]:
    """(name, arguments as JSON) of each tool call."""
    return [(c.function.name, orjson.loads(c.function.arguments)) for c in calls or []]


def as_history(calls: Any) -> list[dict[str, Any]]:
    """Tool calls as an assistant message sends them back."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in calls
    ]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def schema_ok(call: Any, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The call names an offered tool and its arguments are a JSON object with the required keys."""
    spec = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    arguments = orjson.loads(call.function.arguments)
    assert isinstance(arguments, dict)
    for key in spec["parameters"].get("required", []):
        assert key in arguments, (call.function.name, arguments)
    for key, value in arguments.items():
        prop = spec["parameters"]["properties"][key]
        assert isinstance(value, str) if prop["type"] == "string" else True
        if "enum" in prop:
            assert value in prop["enum"]
    return arguments


# --- tool calls on the real llama-server --------------------------------------------------------


def test_tool_call_then_result_then_next_turn(cluster: Cluster) -> None:
    """A complete agent loop, non-streaming: call, result, next turn. The second turn's prompt
    (with the call and its result in the history) is the one llama-server itself renders."""
    router = cluster.router(AUXOT_CTX_SIZE="2048")
    cluster.worker(router)
    sdk = client(router)
    first = sdk.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=0, max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and len(choice.message.tool_calls) >= 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id
    schema_ok(call, TOOLS)

    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": choice.message.content, "tool_calls": as_history(choice.message.tool_calls)},
        *({"role": "tool", "tool_call_id": c.id, "content": '{"temp": 21}'} for c in choice.message.tool_calls),
    ]
    # With tools still offered the tiny model calls again; without, it answers in text.
    again = sdk.chat.completions.create(model="m", messages=history, tools=TOOLS, temperature=0, max_tokens=100)
    assert again.choices[0].finish_reason == "tool_calls"
    schema_ok(again.choices[0].message.tool_calls[0], TOOLS)
    answer = sdk.chat.completions.create(model="m", messages=history, temperature=0, max_tokens=8)
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls

    with LlamaServer(cluster.model, parallel=1, ctx_size=2048) as direct:
        same = {"messages": history, "tools": TOOLS, "temperature": 0, "max_tokens": 100}
        reference = http.post(f"{direct.base_url}/v1/chat/completions", same).json()
    assert again.usage is not None and first.usage is not None
    assert again.usage.prompt_tokens == reference["usage"]["prompt_tokens"] > first.usage.prompt_tokens
    ref_call = reference["choices"][0]["message"]["tool_calls"][0]["function"]
    assert pairs(again.choices[0].message.tool_calls)[:1] == [(ref_call["name"], ref_call["arguments"])]


def test_streamed_tool_call_arrives_in_fragments_and_matches_non_streaming(cluster: Cluster) -> None:
    """Streaming: the first delta carries id, type and name; argument fragments that follow do
    not repeat the id (the SDK would concatenate it); the SDK's
    accumulated call equals the non-streaming one. Then the streamed call goes back as history."""
    router = cluster.router(AUXOT_CTX_SIZE="2048")
    cluster.worker(router)
    body = {"model": "m", "messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 100}
    chunks = raw_chunks(router, body)
    deltas = tool_deltas(chunks)
    assert deltas, chunks  # (how many pieces depends on how fast they come: the fake test checks that)
    assert deltas[0]["id"] and deltas[0]["type"] == "function" and deltas[0]["function"]["name"]
    assert all(
        "id" not in d and "name" not in d.get("function", {})
        for d in deltas[1:]
        if d.get("index", 0) == deltas[0].get("index", 0)
    ), deltas
    one_entry_per_call(chunks)
    assert finish_reasons(chunks) == ["tool_calls"]
    streamed = accumulate(chunks, TOOLS).choices[0].message
    plain = client(router).chat.completions.create(**body).choices[0].message
    assert pairs(streamed.tool_calls) == pairs(plain.tool_calls)
    assert streamed.tool_calls[0].id == deltas[0]["id"]

    # The SDK's streaming helper drives the next turn the same way.
    call = streamed.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": as_history([call])},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"},
    ]
    helper = client(router).chat.completions.stream
    with helper(model="m", messages=history, tools=TOOLS, temperature=0, max_tokens=100) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    assert any(e.type == "tool_calls.function.arguments.delta" for e in events)
    assert final.choices[0].finish_reason == "tool_calls"
    schema_ok(final.choices[0].message.tool_calls[0], TOOLS)


@pytest.mark.parametrize("tool_choice", ["required", "auto", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_choice(cluster: Cluster, tool_choice: Any) -> None:
    router = cluster.router(AUXOT_CTX_SIZE="2048")
    cluster.worker(router)
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": tool_choice, "temperature": 0, "max_tokens": 100}
    result = client(router).chat.completions.create(model="m", **body)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        schema_ok(call, TOOLS)
    if isinstance(tool_choice, dict):  # a named function: only that one may be called
        assert {c.function.name for c in choice.message.tool_calls} == {"get_time"}


def test_tool_choice_none_gives_no_tool_calls(cluster: Cluster) -> None:
    """``tool_choice: "none"``: the caller forbade calls, so none come back, not even ones
    recovered from the text (the tiny model writes raw ``<tool_call>`` tags then)."""
    router = cluster.router(AUXOT_CTX_SIZE="2048")
    cluster.worker(router)
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "none", "temperature": 0, "max_tokens": 30}
    result = client(router).chat.completions.create(model="m", **body)
    assert not result.choices[0].message.tool_calls
    assert result.choices[0].finish_reason == "length"
    chunks = raw_chunks(router, body)
    assert tool_deltas(chunks) == []
    assert finish_reasons(chunks) == ["length"]


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_flag_is_accepted(cluster: Cluster, stream: bool) -> None:
    router = cluster.router(AUXOT_CTX_SIZE="2048")
    cluster.worker(router)
    body = {"messages": ASK, "tools": TOOLS, "parallel_tool_calls": True, "temperature": 0, "max_tokens": 150}
    if stream:
        message = accumulate(raw_chunks(router, body), TOOLS).choices[0].message
    else:
        message = client(router).chat.completions.create(model="m", **body).choices[0].message
    assert message.tool_calls
    assert len({c.id for c in message.tool_calls}) == len(message.tool_calls)
    for call in message.tool_calls:
        schema_ok(call, TOOLS)


# --- exact chunk sequences from the fake llama-server ------------------------------------------


def test_tool_call_fragments_stream_as_the_server_sends_them(fake_cluster: Cluster) -> None:
    """tool_call_split: a header fragment (id, name, "{") and 3-character argument fragments.
    Paced like a real model, each fragment reaches the client in its own chunk; the SDK
    assembles exactly the arguments llama-server produced."""
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="50")
    body = {"messages": [{"role": "user", "content": "FAKE:tool_call_split"}], "tools": TOOLS}
    chunks = raw_chunks(router, body)
    deltas = tool_deltas(chunks)
    fragments = [d["function"]["arguments"] for d in deltas]
    assert "".join(fragments) == FAKE_WEATHER_ARGS
    assert FAKE_WEATHER_ARGS not in fragments  # never re-assembled into one piece
    sent = 1 + -(-(len(FAKE_WEATHER_ARGS) - 1) // 3)  # what the fake wrote
    tool_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert len(deltas) <= sent
    one_entry_per_call(chunks)
    # 20 ms apart, each fragment normally travels alone; a loaded machine may merge a few
    assert len(tool_chunks) >= sent // 3, f"{len(tool_chunks)} chunks for {sent} fragments"
    assert deltas[0]["id"] and len(deltas[0]["id"]) == 32 and deltas[0]["function"]["name"] == "get_weather"
    assert all(set(d) <= {"index", "function"} and set(d["function"]) == {"arguments"} for d in deltas[1:])
    assert finish_reasons(chunks) == ["tool_calls"]
    final = accumulate(chunks, TOOLS).choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        (deltas[0]["id"], "get_weather", FAKE_WEATHER_ARGS)
    ]

    plain = client(router).chat.completions.create(model="m", messages=body["messages"], tools=TOOLS)
    assert plain.choices[0].finish_reason == "tool_calls"
    assert pairs(plain.choices[0].message.tool_calls) == [("get_weather", FAKE_WEATHER_ARGS)]


@pytest.mark.parametrize("scenario", ["parallel_tool_calls", "parallel_tool_calls_seq"])
def test_two_parallel_tool_calls(fake_cluster: Cluster, scenario: str) -> None:
    """Two calls, interleaved or one after the other: both arrive whole, in index order, with
    their own ids, streaming and not."""
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="200")
    messages = [{"role": "user", "content": f"FAKE:{scenario}"}]
    chunks = raw_chunks(router, {"messages": messages, "tools": TOOLS, "parallel_tool_calls": True})
    indexes = [d["index"] for d in tool_deltas(chunks)]
    assert set(indexes) == {0, 1}
    one_entry_per_call(chunks)
    if scenario == "parallel_tool_calls":
        assert indexes[:4] == [0, 1, 0, 1]  # the order the server interleaved them in
    streamed = accumulate(chunks, TOOLS).choices[0]
    expected = [("get_weather", FAKE_WEATHER_ARGS), ("get_time", FAKE_TIME_ARGS)]
    assert pairs(streamed.message.tool_calls) == expected
    assert len({c.id for c in streamed.message.tool_calls}) == 2
    assert streamed.finish_reason == "tool_calls"
    sdk = client(router)
    plain = sdk.chat.completions.create(model="m", messages=messages, tools=TOOLS, parallel_tool_calls=True)
    calls = plain.choices[0].message.tool_calls or []
    assert pairs(calls) == expected
    assert len({c.id for c in calls}) == 2


def test_reasoning_content_streams_and_is_kept(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="200")
    messages = [{"role": "user", "content": "FAKE:reasoning_then_content"}]
    chunks = raw_chunks(router, {"messages": messages})
    assert delta_text(chunks, "reasoning_content") == "The user wants a greeting."
    assert delta_text(chunks, "content") == "Hello! How can I help?"
    reasoning_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("reasoning_content")]
    assert len(reasoning_chunks) > 1  # streamed as it comes, not in one piece at the end
    first_content = next(i for i, c in enumerate(chunks) if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert chunks.index(reasoning_chunks[-1]) < first_content
    assert finish_reasons(chunks) == ["stop"]

    plain = client(router).chat.completions.create(model="m", messages=messages)
    message = plain.choices[0].message
    assert message.content == "Hello! How can I help?"
    assert (message.model_extra or {}).get("reasoning_content") == "The user wants a greeting."


def test_xml_tool_call_in_content_becomes_a_tool_call(fake_cluster: Cluster) -> None:
    """A Qwen3-Coder XML call written as plain content (llama-server did not parse it): the
    client sees a real tool call and none of the markup, streaming and not."""
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="200")
    messages = [{"role": "user", "content": "FAKE:xml_tool_call_in_content"}]
    chunks = raw_chunks(router, {"messages": messages, "tools": TOOLS})
    text = delta_text(chunks, "content")
    assert "<tool_call>" not in text and "<function=" not in text and "<parameter" not in text, text
    final = accumulate(chunks, TOOLS).choices[0]
    assert parsed(final.message.tool_calls) == [("get_weather", {"city": "Paris"})]
    assert final.message.tool_calls[0].id
    assert final.finish_reason == "tool_calls"  # agents loop on this
    plain = client(router).chat.completions.create(model="m", messages=messages, tools=TOOLS).choices[0]
    assert parsed(plain.message.tool_calls) == [("get_weather", {"city": "Paris"})]
    assert not plain.message.content
    assert plain.finish_reason == "tool_calls"


def test_think_tags_in_content_become_reasoning(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="200")
    messages = [{"role": "user", "content": "FAKE:think_tags_in_content"}]
    chunks = raw_chunks(router, {"messages": messages})
    assert delta_text(chunks, "reasoning_content") == "Let me think."
    assert delta_text(chunks, "content") == "The answer is 4."
    plain = client(router).chat.completions.create(model="m", messages=messages).choices[0].message
    assert plain.content == "The answer is 4."
    assert (plain.model_extra or {}).get("reasoning_content") == "Let me think."


def test_non_streaming_keeps_text_and_reasoning_next_to_tool_calls(fake_cluster: Cluster) -> None:
    """Go dropped the assistant's text and reasoning when there were tool calls (§11.2 #13)."""
    router = fake_cluster.router()
    fake_cluster.worker(router)
    prompt = "FAKE:echo <think>I need the weather.</think> Let me check. " + (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    )
    messages = [{"role": "user", "content": prompt}]
    result = client(router).chat.completions.create(model="m", messages=messages, tools=TOOLS, max_tokens=200)
    message = result.choices[0].message
    assert message.content == "FAKE:echo Let me check."
    assert (message.model_extra or {}).get("reasoning_content") == "I need the weather."
    assert parsed(message.tool_calls) == [("get_weather", {"city": "Paris"})]
    assert result.choices[0].finish_reason == "tool_calls"


def test_error_mid_stream_ends_with_an_error_event_then_done(fake_cluster: Cluster) -> None:
    router = fake_cluster.router()
    fake_cluster.worker(router, FAKE_LLAMA_TOKENS_PER_SEC="200")
    messages = [{"role": "user", "content": "FAKE:error_mid_stream"}]
    body = {"messages": messages, "stream": True}
    resp = http.post(f"{router.url}/v1/chat/completions", body, headers=router.headers())
    assert resp.status == 200
    payloads = sse_payloads(resp.body)
    assert payloads[-1] == b"[DONE]"
    error = orjson.loads(payloads[-2])
    assert set(error) == {"error"} and error["error"]["message"] and error["error"]["type"]
    chunks = [orjson.loads(p) for p in payloads[:-2]]
    assert delta_text(chunks, "content") == " tok" * 3  # what was generated before the failure
    assert finish_reasons(chunks) == []  # no pretend-normal finish
    with pytest.raises(openai.APIError):  # the SDK surfaces it as an error, not a normal end
        for _ in client(router).chat.completions.create(model="m", messages=messages, stream=True):
            pass
    with pytest.raises(openai.InternalServerError):
        client(router).chat.completions.create(model="m", messages=messages)
    # the worker is still serving
    ok = client(router).chat.completions.create(model="m", messages=user("hi"), max_tokens=2)
    assert ok.choices[0].message.content == " tok tok"


# --- legacy completions and logprobs on the real llama-server ---------------------------------------


def test_legacy_completions(cluster: Cluster) -> None:
    router = cluster.router()
    cluster.worker(router)
    sdk = client(router)
    request = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}
    result = sdk.completions.create(model="m", **request)
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 10
    with LlamaServer(cluster.model, parallel=1, ctx_size=1024) as direct:
        reference = http.post(f"{direct.base_url}/v1/completions", request).json()
    assert result.choices[0].text == reference["choices"][0]["text"]
    assert result.usage.prompt_tokens == reference["usage"]["prompt_tokens"]

    chunks = list(sdk.completions.create(model="m", stream=True, **request))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == result.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    short = {"prompt": "Once", "max_tokens": 3, "stream": True}
    resp = http.post(f"{router.url}/api/openai/completions", short, headers=router.headers())
    payloads = sse_payloads(resp.body)
    assert payloads[-1] == b"[DONE]"
    assert all(orjson.loads(p)["choices"][0]["text"] is not None for p in payloads[:-1])


def test_logprobs_pass_through(cluster: Cluster) -> None:
    """llama-server b11434 returns logprobs for chat (checked against the binary): the
    non-streaming body and the streamed chunks carry them, one entry per generated token."""
    router = cluster.router()
    cluster.worker(router)
    sdk = client(router)
    request = {"messages": ASK, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    result = sdk.chat.completions.create(model="m", **request)
    choice = result.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    assert len(choice.logprobs.content) == 6
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)

    chunks = list(sdk.chat.completions.create(model="m", stream=True, **request))
    entries = [
        token
        for c in chunks
        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
        for token in c.choices[0].logprobs.content
    ]
    assert [t.token for t in entries] == [t.token for t in choice.logprobs.content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
