"""Tests for OpenAI request validation, SSE encoding and response bodies (``auxot_common.openai_api``).

Streams are checked the way a client reads them: the bytes are split into SSE events, every chunk
is validated with the official ``openai`` SDK's models, and the SDK's own stream accumulator must
arrive at the same message as the non-streaming body for the same completion.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from auxot_common.openai_api import (
    DONE,
    KEEPALIVE,
    OpenAIChatStream,
    OpenAICompletionStream,
    RequestError,
    chat_completion_body,
    completion_body,
    error_body,
    model_object,
    models_list,
    parse_chat_request,
    parse_completion_request,
    usage_object,
)
from auxot_common.protocol import Complete, Token, ToolCallDelta

ID = "chatcmpl-0123456789abcdef01234567"
MODEL = "Qwen3-Coder-30B-A3B"
CREATED = 1_700_000_000
USER = [{"role": "user", "content": "Hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": USER, **fields}


def rejects(body: Any, *, param: str | None = None, match: str | None = None) -> RequestError:
    with pytest.raises(RequestError, match=match) as info:
        parse_chat_request(body)
    error = info.value
    assert error.status == 400
    assert error.error_type == "invalid_request_error"
    assert error.message
    assert "\n" not in error.message
    if param is not None:
        assert error.param == param
    return error


def sse_events(data: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE byte stream, in order; comments are skipped."""
    assert data.endswith(b"\n\n"), data[-40:]
    events = []
    for block in data.decode("utf-8").split("\n\n")[:-1]:
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1, block
        assert lines[0].startswith("data: "), block
        events.append(lines[0][len("data: ") :])
    return events


def sse_chunks(data: bytes) -> list[dict[str, Any]]:
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    return [orjson.loads(e) for e in events[:-1]]


def accumulate(chunks: list[dict[str, Any]]) -> Any:
    """The completion the openai SDK accumulates from these chunks (its snapshot: the final
    parsing step refuses ``finish_reason: length``, which is not what is tested here)."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.current_completion_snapshot


TOOL_A = {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
TOOL_B = {"id": "xml_1a2b3c4d", "type": "function", "function": {"name": "get_time", "arguments": '{"tz":"UTC"}'}}


# --- parse_chat_request ---------------------------------------------------------------------------------


def test_minimal_request() -> None:
    request = parse_chat_request({"messages": USER})
    assert request.messages == USER
    assert request.model == ""
    assert request.stream is False
    assert request.include_usage is False
    assert request.temperature is None
    assert request.max_tokens is None
    assert request.tools == []
    assert request.params == {}
    assert request.reasoning_effort == ""


def test_full_request() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": "data:,"}},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [TOOL_A]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
    ]
    request = parse_chat_request(
        {
            "model": "gpt-4o",
            "messages": messages,
            "tools": tools,
            "temperature": 0,
            "max_tokens": 100,
            "reasoning_effort": "low",
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone",  # unknown fields are accepted and ignored
            "n": 1,
        }
    )
    assert request.model == "gpt-4o"
    assert request.messages == messages
    assert request.tools == tools
    assert request.temperature == 0.0
    assert isinstance(request.temperature, float)
    assert request.max_tokens == 100
    assert request.reasoning_effort == "low"
    assert request.stream is True
    assert request.include_usage is True
    assert "user" not in request.params


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "Hi"}, "messages"),
        ({"messages": {"role": "user", "content": "Hi"}}, "messages"),
    ],
)
def test_messages_missing_empty_or_not_a_list(body: dict[str, Any], param: str) -> None:
    error = rejects(body, param=param)
    assert "messages" in error.message
    assert "required" in error.message


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        ("Hi", "must be an object"),
        ({"content": "Hi"}, "role"),
        ({"role": 3, "content": "Hi"}, "role"),
        ({"role": None, "content": "Hi"}, "role"),
        ({"role": "user", "content": 42}, "content"),
        ({"role": "user", "content": {"text": "Hi"}}, "content"),
        ({"role": "user", "content": ["Hi"]}, "content parts"),
        ({"role": "user", "content": [{"text": "Hi"}]}, "content parts"),
        ({"role": "assistant", "content": None, "tool_calls": {"id": "x"}}, "tool_calls"),
    ],
)
def test_bad_message_names_its_index(message: Any, fragment: str) -> None:
    error = rejects({"messages": [{"role": "user", "content": "ok"}, message]}, param="messages[1]")
    assert "messages[1]" in error.message
    assert fragment in error.message


def test_content_may_be_null_or_parts() -> None:
    parse_chat_request({"messages": [{"role": "assistant", "content": None, "tool_calls": [TOOL_A]}]})
    parse_chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
    parse_chat_request({"messages": [{"role": "developer", "content": ""}]})  # roles are not restricted


@pytest.mark.parametrize("body", [None, [], "text", 42, [{"messages": USER}]])
def test_body_must_be_an_object(body: Any) -> None:
    rejects(body, match="JSON object")


@pytest.mark.parametrize("n", [2, 0, "1", 1.5, True])
def test_only_n_equal_to_one(n: Any) -> None:
    rejects(chat(n=n), param="n", match="n=1")


def test_n_one_or_null_is_fine() -> None:
    parse_chat_request(chat(n=1))
    parse_chat_request(chat(n=None))


def test_max_completion_tokens_is_preferred_over_max_tokens() -> None:
    assert parse_chat_request(chat(max_completion_tokens=50, max_tokens=500)).max_tokens == 50
    assert parse_chat_request(chat(max_completion_tokens=None, max_tokens=500)).max_tokens == 500
    assert parse_chat_request(chat(max_completion_tokens=7)).max_tokens == 7


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 1.5),
        ("max_tokens", "100"),
        ("max_tokens", True),
        ("max_completion_tokens", 0),
        ("max_completion_tokens", "many"),
    ],
)
def test_bad_max_tokens(field: str, value: Any) -> None:
    rejects(chat(**{field: value}), param=field, match="positive integer")


@pytest.mark.parametrize("value", ["hot", True, [0.5], {"v": 1}])
def test_bad_temperature(value: Any) -> None:
    rejects(chat(temperature=value), param="temperature", match="number")


def test_model_must_be_a_string() -> None:
    rejects(chat(model=4), param="model")
    assert parse_chat_request(chat(model=None)).model == ""


PASSTHROUGH_VALUES: dict[str, Any] = {
    "top_p": 0.9,
    "top_k": 40,
    "min_p": 0.05,
    "stop": ["\n\n", "END"],
    "seed": 42,
    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": False,
    "logprobs": True,
    "top_logprobs": 3,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "repeat_penalty": 1.1,
    "logit_bias": {"50256": -100},
    "chat_template_kwargs": {"enable_thinking": False},
    "n_probs": 2,
}


def test_passthrough_fields_are_kept_as_they_are() -> None:
    request = parse_chat_request(chat(**PASSTHROUGH_VALUES))
    assert request.params == PASSTHROUGH_VALUES


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stop", "###"),
        ("tool_choice", "required"),
        ("tool_choice", "none"),
        ("top_p", 1),
        ("seed", 0),
        ("logprobs", False),
    ],
)
def test_passthrough_other_valid_forms(field: str, value: Any) -> None:
    assert parse_chat_request(chat(**{field: value})).params == {field: value}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_p", "0.9"),
        ("top_p", True),
        ("top_k", 4.5),
        ("stop", 5),
        ("stop", ["ok", 5]),
        ("seed", "42"),
        ("seed", 1.5),
        ("response_format", "json"),
        ("tool_choice", ["auto"]),
        ("parallel_tool_calls", "yes"),
        ("logprobs", 1),
        ("top_logprobs", True),
        ("presence_penalty", "high"),
        ("chat_template_kwargs", "x"),
    ],
)
def test_passthrough_wrong_types_are_rejected(field: str, value: Any) -> None:
    error = rejects(chat(**{field: value}), param=field)
    assert field in error.message


def test_tools_must_be_a_list_of_objects() -> None:
    rejects(chat(tools={"type": "function"}), param="tools")
    rejects(chat(tools=["get_weather"]), param="tools")
    assert parse_chat_request(chat(tools=None)).tools == []


def test_reasoning_effort_must_be_a_string() -> None:
    rejects(chat(reasoning_effort=1), param="reasoning_effort")


def test_stream_and_stream_options() -> None:
    assert parse_chat_request(chat(stream=None)).stream is False
    request = parse_chat_request(chat(stream=True))
    assert request.stream is True
    assert request.include_usage is False
    assert parse_chat_request(chat(stream=True, stream_options={"include_usage": True})).include_usage is True
    assert parse_chat_request(chat(stream=True, stream_options={"include_usage": False})).include_usage is False
    assert parse_chat_request(chat(stream=True, stream_options=None)).include_usage is False
    rejects(chat(stream="true"), param="stream")
    rejects(chat(stream=1), param="stream")
    rejects(chat(stream=True, stream_options="usage"), param="stream_options")


# --- parse_completion_request ---------------------------------------------------------------------------


def test_completion_with_a_string_prompt() -> None:
    request = parse_completion_request({"model": "m", "prompt": "Once upon a time", "max_tokens": 16, "stop": "\n"})
    assert request.params == {"prompt": "Once upon a time", "stop": "\n"}
    assert request.messages == []
    assert request.max_tokens == 16
    assert request.model == "m"


def test_completion_with_a_single_element_list() -> None:
    assert parse_completion_request({"prompt": ["Once"]}).params["prompt"] == "Once"


@pytest.mark.parametrize("prompt", [["a", "b"], [["a"]]])
def test_completion_with_several_prompts_is_rejected(prompt: Any) -> None:
    with pytest.raises(RequestError) as info:
        parse_completion_request({"prompt": prompt})
    assert info.value.status == 400
    assert info.value.param == "prompt"


@pytest.mark.parametrize(
    "body",
    [{}, {"prompt": ""}, {"prompt": None}, {"prompt": []}, {"prompt": [""]}, {"prompt": 5}, {"prompt": [1, 2, 3]}],
)
def test_completion_with_an_empty_or_missing_prompt_is_rejected(body: dict[str, Any]) -> None:
    with pytest.raises(RequestError) as info:
        parse_completion_request(body)
    assert info.value.status == 400
    assert info.value.param == "prompt"


def test_completion_stream_fields() -> None:
    request = parse_completion_request({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    assert request.stream is True
    assert request.include_usage is True


# --- OpenAIChatStream ---------------------------------------------------------------------------------------


def run_stream(events: list[Any], complete: Complete, *, include_usage: bool) -> bytes:
    stream = OpenAIChatStream(ID, MODEL, CREATED, include_usage)
    out = bytearray(stream.start())
    for event in events:
        if isinstance(event, Token):
            out += stream.on_token(event)
        else:
            out += stream.on_tool_call_delta(event)
    out += stream.on_complete(complete)
    return bytes(out)


TEXT_EVENTS = [
    Token(ID, "Let me ", True),
    Token(ID, "think.", True),
    Token(ID, "Hello"),
    Token(ID, ", "),
    Token(ID, 'wörld "quoted" \n 🎉'),
]
TEXT_COMPLETE = Complete(
    job_id=ID,
    full_response='Hello, wörld "quoted" \n 🎉',
    reasoning_content="Let me think.",
    finish_reason="length",
    input_tokens=120,
    output_tokens=9,
    cache_tokens=100,
)


def check_envelopes(chunks: list[dict[str, Any]]) -> None:
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == ID
        assert chunk["created"] == CREATED
        assert chunk["model"] == MODEL


def test_text_stream_shape() -> None:
    chunks = sse_chunks(run_stream(TEXT_EVENTS, TEXT_COMPLETE, include_usage=False))
    check_envelopes(chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["choices"][0]["finish_reason"] is None
    deltas = [c["choices"][0]["delta"] for c in chunks[1:-1]]
    assert deltas == [
        {"reasoning_content": "Let me "},
        {"reasoning_content": "think."},
        {"content": "Hello"},
        {"content": ", "},
        {"content": 'wörld "quoted" \n 🎉'},
    ]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"  # the true finish reason, not "stop"
    assert last["choices"][0]["delta"] == {}
    assert all("usage" not in c for c in chunks)  # no include_usage, no usage chunk


def test_usage_chunk_only_with_include_usage() -> None:
    chunks = sse_chunks(run_stream(TEXT_EVENTS, TEXT_COMPLETE, include_usage=True))
    check_envelopes(chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 120,
        "completion_tokens": 9,
        "total_tokens": 129,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if "usage" in c) == 1


def test_sdk_accumulates_the_same_message_as_the_non_streaming_body() -> None:
    for include_usage in (False, True):
        chunks = sse_chunks(run_stream(TEXT_EVENTS, TEXT_COMPLETE, include_usage=include_usage))
        final = accumulate(chunks)
        body = ChatCompletion.model_validate(
            chat_completion_body(TEXT_COMPLETE, completion_id=ID, model=MODEL, created=CREATED)
        )
        assert final.id == body.id == ID
        assert final.model == body.model == MODEL
        assert final.created == body.created == CREATED
        message = final.choices[0].message
        expected = body.choices[0].message
        assert message.role == expected.role == "assistant"
        assert message.content == expected.content == TEXT_COMPLETE.full_response
        assert message.model_extra is not None
        assert expected.model_extra is not None
        assert message.model_extra["reasoning_content"] == expected.model_extra["reasoning_content"] == "Let me think."
        assert final.choices[0].finish_reason == body.choices[0].finish_reason == "length"
        if include_usage:
            assert final.usage == body.usage
        else:
            assert final.usage is None


def test_streamed_tool_call_deltas_pass_through_and_accumulate() -> None:
    events = [
        Token(ID, "Checking."),
        ToolCallDelta(
            ID, [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]
        ),
        ToolCallDelta(ID, [{"index": 0, "function": {"arguments": '{"city":'}}]),
        ToolCallDelta(ID, [{"index": 0, "function": {"arguments": '"Paris"}'}}]),
    ]
    complete = Complete(
        job_id=ID,
        full_response="Checking.",
        finish_reason="tool_calls",
        tool_calls=[TOOL_A],
        input_tokens=5,
        output_tokens=7,
    )
    chunks = sse_chunks(run_stream(events, complete, include_usage=True))
    check_envelopes(chunks)
    tool_chunks = [c for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert [c["choices"][0]["delta"]["tool_calls"] for c in tool_chunks] == [e.tool_calls for e in events[1:]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"

    final = accumulate(chunks)
    body = ChatCompletion.model_validate(chat_completion_body(complete, completion_id=ID, model=MODEL, created=CREATED))
    message, expected = final.choices[0].message, body.choices[0].message
    assert message.content == expected.content == "Checking."  # text kept next to the tool calls
    assert message.tool_calls is not None
    assert expected.tool_calls is not None
    assert (
        [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls]
        == [(c.id, c.function.name, c.function.arguments) for c in expected.tool_calls]
        == [("call_a", "get_weather", '{"city":"Paris"}')]
    )
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage == body.usage


def test_tool_calls_never_streamed_are_sent_whole_before_the_finish_chunk() -> None:
    """A call recovered from text at the end (no deltas) must still reach a streaming caller."""
    complete = Complete(job_id=ID, full_response="", finish_reason="tool_calls", tool_calls=[TOOL_A, TOOL_B])
    chunks = sse_chunks(run_stream([], complete, include_usage=False))
    check_envelopes(chunks)
    tool_chunks = [i for i, c in enumerate(chunks) if "tool_calls" in c["choices"][0]["delta"]]
    finish = next(i for i, c in enumerate(chunks) if c["choices"][0]["finish_reason"] is not None)
    assert tool_chunks
    assert max(tool_chunks) < finish == len(chunks) - 1
    sent = [call for i in tool_chunks for call in chunks[i]["choices"][0]["delta"]["tool_calls"]]
    assert [(c["index"], c["id"], c["function"]) for c in sent] == [
        (0, "call_a", TOOL_A["function"]),
        (1, "xml_1a2b3c4d", TOOL_B["function"]),
    ]

    final = accumulate(chunks)
    body = ChatCompletion.model_validate(chat_completion_body(complete, completion_id=ID, model=MODEL, created=CREATED))
    got = final.choices[0].message.tool_calls
    want = body.choices[0].message.tool_calls
    assert got is not None
    assert want is not None
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in got] == [
        (c.id, c.type, c.function.name, c.function.arguments) for c in want
    ]
    # no text: the stream's "" and the body's null both mean "no content"
    assert not final.choices[0].message.content
    assert not body.choices[0].message.content


def test_only_the_calls_that_were_not_streamed_are_added_at_the_end() -> None:
    events = [ToolCallDelta(ID, [{"index": 0, **TOOL_A}])]
    complete = Complete(job_id=ID, finish_reason="tool_calls", tool_calls=[TOOL_A, TOOL_B])
    chunks = sse_chunks(run_stream(events, complete, include_usage=False))
    sent = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [(c["index"], c.get("id")) for c in sent] == [(0, "call_a"), (1, "xml_1a2b3c4d")]
    final = accumulate(chunks)
    assert [c.function.name for c in final.choices[0].message.tool_calls or []] == ["get_weather", "get_time"]


def test_a_stream_with_no_tokens_still_has_role_finish_and_done() -> None:
    chunks = sse_chunks(run_stream([], Complete(job_id=ID, finish_reason=""), include_usage=True))
    check_envelopes(chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"  # empty reason reported as stop
    assert chunks[2]["usage"]["total_tokens"] == 0
    assert len(chunks) == 3


def test_role_chunk_comes_first_even_before_any_worker() -> None:
    stream = OpenAIChatStream(ID, MODEL, CREATED, include_usage=False)
    start = stream.start()
    [event] = sse_events(start)
    chunk = orjson.loads(event)
    ChatCompletionChunk.model_validate(chunk)
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_model_and_id_with_special_characters_stay_valid_json() -> None:
    stream = OpenAIChatStream('id"with\\quotes', 'mo"del', CREATED, include_usage=True)
    data = stream.start() + stream.on_token(Token("j", "x")) + stream.on_complete(Complete(job_id="j"))
    for chunk in sse_chunks(data):
        assert chunk["id"] == 'id"with\\quotes'
        assert chunk["model"] == 'mo"del'


def test_on_error_shape() -> None:
    stream = OpenAIChatStream(ID, MODEL, CREATED, include_usage=True)
    data = (
        stream.start() + stream.on_token(Token(ID, "Hel")) + stream.on_error("the worker went away", code="worker_lost")
    )
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])
    assert error == {
        "error": {"message": "the worker went away", "type": "server_error", "param": None, "code": "worker_lost"}
    }
    assert orjson.loads(sse_events(stream.on_error('x "y"'))[0])["error"]["type"] == "server_error"


def test_constants_are_valid_sse() -> None:
    assert DONE == b"data: [DONE]\n\n"
    assert KEEPALIVE.startswith(b":")
    assert KEEPALIVE.endswith(b"\n\n")
    # a keep-alive comment between chunks does not disturb a parser
    stream = OpenAIChatStream(ID, MODEL, CREATED, include_usage=False)
    data = (
        stream.start()
        + KEEPALIVE
        + stream.on_token(Token(ID, "a"))
        + KEEPALIVE
        + stream.on_complete(Complete(job_id=ID, full_response="a"))
    )
    assert accumulate(sse_chunks(data)).choices[0].message.content == "a"


# --- chat_completion_body -----------------------------------------------------------------------------------


def test_chat_completion_body_text() -> None:
    body = chat_completion_body(TEXT_COMPLETE, completion_id=ID, model=MODEL, created=CREATED)
    ChatCompletion.model_validate(body)
    assert body["object"] == "chat.completion"
    assert body["id"] == ID
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": TEXT_COMPLETE.full_response,
        "reasoning_content": "Let me think.",
    }
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == usage_object(TEXT_COMPLETE)
    assert body["usage"]["prompt_tokens"] == 120  # the whole prompt, cache hits included
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 100}


def test_chat_completion_body_keeps_text_and_reasoning_next_to_tool_calls() -> None:
    complete = Complete(
        job_id=ID,
        full_response="I'll check the weather.",
        reasoning_content="The user wants weather.",
        finish_reason="tool_calls",
        tool_calls=[{"index": 0, **TOOL_A}, TOOL_B],
    )
    body = chat_completion_body(complete, completion_id=ID, model=MODEL, created=CREATED)
    parsed = ChatCompletion.model_validate(body)
    message = body["choices"][0]["message"]
    assert message["content"] == "I'll check the weather."
    assert message["reasoning_content"] == "The user wants weather."
    assert message["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": TOOL_A["function"]},
        {"id": "xml_1a2b3c4d", "type": "function", "function": TOOL_B["function"]},
    ]
    assert parsed.choices[0].finish_reason == "tool_calls"


def test_chat_completion_body_empty_answer_has_string_content() -> None:
    body = chat_completion_body(Complete(job_id=ID), completion_id=ID, model=MODEL, created=CREATED)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ""}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["logprobs"] is None
    assert body["usage"]["total_tokens"] == 0


def test_chat_completion_body_passes_logprobs() -> None:
    logprobs = {"content": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": []}]}
    body = chat_completion_body(
        Complete(job_id=ID, full_response="Hi", logprobs=logprobs), completion_id=ID, model=MODEL, created=CREATED
    )
    parsed = ChatCompletion.model_validate(body)
    assert body["choices"][0]["logprobs"] == logprobs
    assert parsed.choices[0].logprobs is not None


# --- legacy completions ----------------------------------------------------------------------------------


def test_completion_stream() -> None:
    stream = OpenAICompletionStream("cmpl-1", MODEL, CREATED, include_usage=True)
    assert stream.start() == b""
    data = (
        stream.start()
        + stream.on_token(Token("cmpl-1", "Once"))
        + stream.on_token(Token("cmpl-1", "hidden", True))  # reasoning is not part of a completion
        + stream.on_tool_call_delta(ToolCallDelta("cmpl-1", [TOOL_A]))
        + stream.on_token(Token("cmpl-1", " upon"))
        + stream.on_complete(
            Complete(
                job_id="cmpl-1",
                full_response="Once upon",
                finish_reason="length",
                input_tokens=3,
                output_tokens=2,
                cache_tokens=1,
            )
        )
    )
    chunks = sse_chunks(data)
    Completion.model_validate(chunks[-2])  # the finish chunk (the SDK types finish_reason as non-null)
    for chunk in chunks:
        assert chunk["object"] == "text_completion"
        assert chunk["id"] == "cmpl-1"
        assert chunk["created"] == CREATED
        assert chunk["model"] == MODEL
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == "Once upon"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None, None, "length"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1},
    }


def test_completion_stream_without_usage_and_error() -> None:
    stream = OpenAICompletionStream("cmpl-1", MODEL, CREATED, include_usage=False)
    chunks = sse_chunks(stream.on_complete(Complete(job_id="cmpl-1")))
    assert len(chunks) == 1
    assert chunks[0]["choices"][0]["finish_reason"] == "stop"
    events = sse_events(stream.on_error("boom"))
    assert events[-1] == "[DONE]"
    assert orjson.loads(events[0]) == error_body("boom", "server_error")


def test_completion_body() -> None:
    complete = Complete(
        job_id="cmpl-1", full_response="Once upon", finish_reason="length", input_tokens=3, output_tokens=2
    )
    body = completion_body(complete, completion_id="cmpl-1", model=MODEL, created=CREATED)
    parsed = Completion.model_validate(body)
    assert parsed.choices[0].text == "Once upon"
    assert parsed.choices[0].finish_reason == "length"
    assert body["object"] == "text_completion"
    assert body["usage"]["total_tokens"] == 5


# --- small helpers -------------------------------------------------------------------------------------------


def test_error_body_shape() -> None:
    assert error_body("bad", "invalid_request_error", param="messages") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": None}
    }


def test_models_list() -> None:
    listing = models_list(MODEL, CREATED)
    assert listing == {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": CREATED, "owned_by": "auxot"}],
    }
    assert model_object(MODEL, CREATED) == listing["data"][0]
