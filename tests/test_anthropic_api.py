"""Unit tests for auxot_common.anthropic_api: translation, SSE encoding, bodies (no I/O).

The stream encoder is checked twice: event by event, and by feeding its bytes to the official
anthropic SDK (through an httpx mock transport) whose accumulated final message must equal the
non-streaming body built from the same ``complete``.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import orjson
import pytest

from auxot_common.anthropic_api import (
    AnthropicError,
    AnthropicStream,
    ChatRequest,
    build_message,
    count_tokens_request,
    error_body,
    error_type_for_status,
    estimate_tokens,
    model_object,
    models_list,
    sanitize_json_schema,
    tool_use_id,
    translate_request,
)
from auxot_common.protocol import Complete, Token, ToolCallDelta

CAPTURES = Path(__file__).parent / "data" / "client-captures"


# --- helpers ------------------------------------------------------------------------------------


def _capture_requests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(CAPTURES.glob("claude-code-*.json")):
        for number, request in enumerate(json.loads(path.read_text())["requests"]):
            if isinstance(request.get("body"), dict):
                out.append((f"{path.stem}#{number}:{request['path']}", request))
    return out


def _capture(name: str, index: int = -1) -> dict[str, Any]:
    requests = json.loads((CAPTURES / f"claude-code-2.1.330-{name}.json").read_text())["requests"]
    body: dict[str, Any] = requests[index]["body"]
    return body


def _body(messages: list[Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 100, "messages": messages, **extra}


def _translate(messages: list[Any], **extra: Any) -> ChatRequest:
    return translate_request(_body(messages, **extra))


def _error(body: Any) -> AnthropicError:
    with pytest.raises(AnthropicError) as info:
        translate_request(body)
    assert info.value.status == 400
    assert info.value.error_type == "invalid_request_error"
    return info.value


def _walk(node: Any) -> Iterable[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _check_well_formed(request: ChatRequest) -> None:
    """The OpenAI messages a ChatML template accepts: one leading system, sane ordering, paired ids."""
    messages = request.messages
    orjson.dumps(messages)
    roles = [m["role"] for m in messages]
    assert set(roles) <= {"system", "user", "assistant", "tool"}
    assert "system" not in roles[1:]
    body_roles = [r for r in roles if r != "system"]
    for first, second in itertools.pairwise(body_roles):
        assert not (first == second and first in ("user", "assistant")), roles
    pending: set[str] = set()
    for message in messages:
        if message["role"] == "assistant":
            assert not pending, f"tool calls without results: {pending}"
            assert isinstance(message["content"], str) or (message["content"] is None and message["tool_calls"])
            for call in message.get("tool_calls", []):
                assert call["type"] == "function"
                assert isinstance(orjson.loads(call["function"]["arguments"]), dict)
                pending.add(call["id"])
        elif message["role"] == "tool":
            assert message["tool_call_id"] in pending
            assert isinstance(message["content"], str)
            pending.discard(message["tool_call_id"])
        else:
            assert not pending, f"tool calls without results: {pending}"
            assert isinstance(message["content"], str | list)
    for tool in request.tools:
        assert tool["type"] == "function"
        assert tool["function"]["parameters"]["type"] == "object"
        assert not any(isinstance(n, dict) and "$schema" in n for n in _walk(tool["function"]["parameters"]))


_EVENT = re.compile(rb"event: ([a-z_]+)\ndata: (\{.*?\})\n\n", re.S)


def _events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Parse SSE bytes strictly: nothing but well-formed events, each naming its own type."""
    events = []
    position = 0
    for match in _EVENT.finditer(data):
        assert match.start() == position, data[position : match.start()]
        name, payload = match.group(1).decode(), orjson.loads(match.group(2))
        assert payload["type"] == name
        events.append((name, payload))
        position = match.end()
    assert position == len(data), data[position:]
    return events


def _names(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    out = []
    for name, payload in events:
        if name in ("content_block_start", "content_block_delta", "content_block_stop"):
            kind = payload.get("content_block", payload.get("delta", {})).get("type", "")
            out.append(f"{name}:{payload['index']}{':' + kind if kind else ''}")
        else:
            out.append(name)
    return out


def _client(response: httpx.Response) -> anthropic.Anthropic:
    transport = httpx.MockTransport(lambda request: response)
    return anthropic.Anthropic(
        api_key="test", base_url="http://auxot.test", max_retries=0, http_client=httpx.Client(transport=transport)
    )


_ASK: dict[str, Any] = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


def _sdk_stream_message(data: bytes) -> anthropic.types.Message:
    """What the official SDK accumulates from our bytes (its own SSE decoder and accumulator)."""
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=data)
    with _client(response).messages.stream(**_ASK) as stream:
        final = stream.get_final_message()
    return anthropic.types.Message.model_validate(final.to_dict())


def _sdk_message(body: dict[str, Any]) -> anthropic.types.Message:
    response = httpx.Response(200, headers={"content-type": "application/json"}, content=orjson.dumps(body))
    message: anthropic.types.Message = _client(response).messages.create(**_ASK)
    return message


def _run(stream: AnthropicStream, *messages: Token | ToolCallDelta | Complete) -> bytes:
    out = [stream.start()]
    for msg in messages:
        if isinstance(msg, Token):
            out.append(stream.on_token(msg))
        elif isinstance(msg, ToolCallDelta):
            out.append(stream.on_tool_call_delta(msg))
        else:
            out.append(stream.on_complete(msg))
    return b"".join(out)


def _assert_sdk_agrees(data: bytes, complete: Complete, **kwargs: Any) -> anthropic.types.Message:
    streamed = _sdk_stream_message(data)
    body = build_message(complete, message_id="msg_1", model="m", **kwargs)
    assert streamed.model_dump() == _sdk_message(body).model_dump()
    return streamed


def _tool_start(index: int, call_id: str, name: str) -> dict[str, Any]:
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}


def _tool_args(index: int, arguments: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": arguments}}


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# --- the real Claude Code requests ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "request_"), _capture_requests(), ids=[n for n, _ in _capture_requests()])
def test_every_claude_code_capture_translates(name: str, request_: dict[str, Any]) -> None:
    body = request_["body"]
    original = copy.deepcopy(body)
    if request_["path"].endswith("/count_tokens"):
        request = count_tokens_request(body)
    else:
        request = translate_request(body, max_output_tokens=32768)
        assert request.model == body["model"]
        assert request.max_tokens == min(body["max_tokens"], 32768)
        assert request.stream is body["stream"]
    assert body == original, "the request body must not be modified"
    _check_well_formed(request)
    system = request.messages[0]["content"] if request.messages[0]["role"] == "system" else ""
    assert "x-anthropic-billing-header" not in system
    assert estimate_tokens(body) > 0


def test_capture_first_request_merges_the_system_message_and_hides_deferred_tools() -> None:
    body = _capture("first-request")
    request = translate_request(body)
    system = request.messages[0]
    assert system["role"] == "system"
    # the top-level prompt first, then the role:"system" message that came after the user turn
    assert system["content"].index("You are a Claude agent") < system["content"].index("# Environment")
    assert [m["role"] for m in request.messages] == ["system", "user"]
    assert request.messages[1]["content"].endswith("List the files in this directory")
    names = [t["function"]["name"] for t in request.tools]
    assert "DeferredToolPlaceholder" not in names
    assert len(names) == len(body["tools"]) - 1
    assert request.reasoning_effort == "medium"
    assert request.params["chat_template_kwargs"] == {"enable_thinking": True}
    assert "tool_choice" not in request.params
    assert request.max_tokens == 128000


def test_capture_tool_schemas_reach_llama_server_intact_except_what_it_cannot_take() -> None:
    body = _capture("interactive-auto-mode-first-request")
    raw = {t["name"]: t["input_schema"] for t in body["tools"]}
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in translate_request(body).tools}
    read = tools["Read"]["properties"]
    assert read["offset"] == {**raw["Read"]["properties"]["offset"]}
    assert read["offset"]["maximum"] == 9007199254740991
    assert read["limit"]["exclusiveMinimum"] == 0
    assert tools["Read"]["additionalProperties"] is False
    answers = tools["AskUserQuestion"]["properties"]["answers"]
    assert answers["propertyNames"] == {"type": "string"}
    for name, schema in raw.items():
        expected = {k: v for k, v in schema.items() if k != "$schema"}
        if name in tools:  # all but the deferred placeholder
            assert tools[name] == expected, name


def test_capture_allof_of_string_patterns_keeps_the_string() -> None:
    body = _capture("experimental-betas-disabled")
    send = next(t for t in body["tools"] if t["name"] == "SendMessage")
    to = translate_request(body).tools
    params = next(t["function"]["parameters"] for t in to if t["function"]["name"] == "SendMessage")
    assert "allOf" in send["input_schema"]["properties"]["to"]
    # llama.cpp would turn an allOf of patterns into an empty-object grammar
    assert params["properties"]["to"] == {
        k: v for k, v in send["input_schema"]["properties"]["to"].items() if k != "allOf"
    }
    monitor = next(t["function"]["parameters"] for t in to if t["function"]["name"] == "Monitor")
    assert "pattern" in json.dumps(monitor)


def test_capture_thinking_history_becomes_reasoning_content() -> None:
    request = translate_request(_capture("thinking-signature-roundtrip-turn"))
    assistant = request.messages[2]
    assert assistant["role"] == "assistant"
    assert assistant["reasoning_content"] == "Thinking about it."
    assert assistant["content"] is None
    (call,) = assistant["tool_calls"]
    assert call["id"].startswith("toolu_")
    assert call["function"] == {
        "name": "Bash",
        "arguments": '{"command":"ls","description":"List files in the current directory"}',
    }
    tool = request.messages[3]
    assert tool == {"role": "tool", "tool_call_id": call["id"], "content": "main.py\nnotes.txt"}


def test_capture_denied_tool_result_is_marked_as_an_error() -> None:
    request = translate_request(_capture("tool-result-denied-turn"))
    tool = request.messages[-1]
    assert tool["role"] == "tool"
    assert tool["content"].startswith("Error: touch in '/workspace/project/created.txt' needs approval")


def test_capture_tool_reference_loads_the_deferred_tool_and_keeps_the_user_text() -> None:
    request = translate_request(_capture("tool-search-tool-reference-turn"))
    assert [m["role"] for m in request.messages] == ["system", "user", "assistant", "tool", "user"]
    assert request.messages[3]["content"] == "Tool loaded: WebFetch"
    assert request.messages[4] == {"role": "user", "content": "Tool loaded."}
    names = [t["function"]["name"] for t in request.tools]
    assert "WebFetch" in names
    assert "DeferredToolPlaceholder" not in names


def test_capture_title_request_uses_structured_output_without_thinking() -> None:
    body = _capture("interactive-title-and-preflight", 1)
    request = translate_request(body)
    assert request.tools == []
    assert request.reasoning_effort == "none"
    assert request.params["chat_template_kwargs"] == {"enable_thinking": False}
    assert request.params["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": body["output_config"]["format"]["schema"]},
    }


def test_capture_thinking_budget_and_custom_model_effort() -> None:
    sonnet = translate_request(_capture("sonnet-4.5-max-thinking-tokens"))
    assert sonnet.params["reasoning_budget_tokens"] == 4000
    assert sonnet.reasoning_effort == "low"
    custom = translate_request(_capture("custom-model-first-request"))
    assert custom.reasoning_effort == "high"
    assert custom.model == "qwen3-coder-30b"
    assert custom.max_tokens == 32000


def test_capture_count_tokens_bodies_translate_without_max_tokens() -> None:
    body = _capture("count-tokens", 13)
    assert "max_tokens" not in body
    request = count_tokens_request(body)
    assert [t["function"]["name"] for t in request.tools] == [t["name"] for t in body["tools"]]
    assert count_tokens_request({"messages": [{"role": "user", "content": "foo"}]}).model == ""
    with pytest.raises(AnthropicError):
        count_tokens_request({"model": "m"})


def test_capture_estimate_grows_with_tools() -> None:
    bodies = json.loads((CAPTURES / "claude-code-2.1.330-count-tokens.json").read_text())["requests"]
    baseline = estimate_tokens(bodies[0]["body"])
    with_tools = estimate_tokens(bodies[13]["body"])
    assert 0 < baseline < 20
    assert with_tools > 3000


# --- request translation -------------------------------------------------------------------------


def test_system_blocks_join_and_cache_control_is_ignored() -> None:
    system = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cc_entrypoint=cli;"},
        {"type": "text", "text": "First.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Second."},
    ]
    request = _translate([{"role": "user", "content": "hi"}], system=system)
    assert request.messages == [{"role": "system", "content": "First.\n\nSecond."}, {"role": "user", "content": "hi"}]
    assert _translate([{"role": "user", "content": "hi"}], system="Plain.").messages[0] == {
        "role": "system",
        "content": "Plain.",
    }
    _error(_body([{"role": "user", "content": "hi"}], system=5))


def test_system_messages_anywhere_merge_into_the_first_in_order() -> None:
    request = _translate(
        [
            {"role": "system", "content": "A"},
            {"role": "user", "content": "hi"},
            {"role": "system", "content": [{"type": "text", "text": "B"}]},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "C"},
            {"role": "user", "content": "again"},
        ],
        system="S",
    )
    assert request.messages == [
        {"role": "system", "content": "S\n\nA\n\nB\n\nC"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]


def test_images_become_image_url_parts() -> None:
    request = _translate(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                ],
            }
        ]
    )
    assert request.messages[0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
    ]
    _error(_body([{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]))
    _error(_body([{"role": "user", "content": [{"type": "image", "source": {"type": "ftp"}}]}]))


def _tool_turn(result: dict[str, Any], *after: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "run it"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"c": 1}}]},
        {"role": "user", "content": [result, *after]},
    ]


def test_tool_result_error_and_user_text_next_to_it() -> None:
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "denied", "is_error": True}
    request = _translate(_tool_turn(result, {"type": "text", "text": "Try something else."}))
    assert request.messages[1:] == [
        {"role": "assistant", "content": None, "tool_calls": [_call("toolu_1", "Bash", '{"c":1}')]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: denied"},
        {"role": "user", "content": "Try something else."},
    ]
    empty = {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True}
    assert _translate(_tool_turn(empty)).messages[-1]["content"] == "Error"


def test_tool_result_blocks_and_images() -> None:
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [
            {"type": "text", "text": "line 1"},
            {"type": "text", "text": "line 2"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAA"}},
        ],
    }
    messages = _translate(_tool_turn(result)).messages
    assert messages[-2]["role"] == "tool"
    assert messages[-2]["content"].startswith("line 1\n\nline 2\n\n[1 image(s)")
    assert messages[-1] == {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAA"}}],
    }


def test_parallel_tool_results_keep_their_order() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Two calls."},
                {"type": "tool_use", "id": "toolu_a", "name": "A", "input": {}},
                {"type": "tool_use", "id": "toolu_b", "name": "B"},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "ra"},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": [{"type": "text", "text": "rb"}]},
            ],
        },
    ]
    request = _translate(messages)
    _check_well_formed(request)
    assert request.messages[1]["content"] == "Two calls."
    assert [c["function"]["arguments"] for c in request.messages[1]["tool_calls"]] == ["{}", "{}"]
    assert [(m["tool_call_id"], m["content"]) for m in request.messages[2:]] == [("toolu_a", "ra"), ("toolu_b", "rb")]


def test_thinking_history_redacted_and_thinking_only_turns() -> None:
    messages = [
        {"role": "user", "content": "one"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Hmm.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Answer."},
            ],
        },
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "only thoughts", "signature": "s"}]},
        {"role": "user", "content": "three"},
    ]
    request = _translate(messages)
    assert request.messages == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Answer.", "reasoning_content": "Hmm."},
        {"role": "user", "content": "two\n\nthree"},
    ]


def test_consecutive_turns_merge() -> None:
    request = _translate(
        [
            {"role": "user", "content": "a"},
            {"role": "user", "content": [{"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
            {"role": "assistant", "content": [{"type": "text", "text": "d"}]},
        ]
    )
    assert request.messages == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c\n\nd"}]


def test_final_assistant_tool_use_is_rejected() -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "A", "input": {}}]},
    ]
    assert "tool_result" in _error(_body(messages)).message


def _tools(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    return [
        {"name": "A", "description": "Tool A", "input_schema": schema},
        {"name": "B", "input_schema": schema, "defer_loading": True, "cache_control": {"type": "ephemeral"}},
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        *extra,
    ]


def test_tools_translate_and_deferred_or_server_tools_are_hidden() -> None:
    request = _translate([{"role": "user", "content": "hi"}], tools=_tools({"type": "custom", "name": "C"}))
    assert request.tools == [
        {
            "type": "function",
            "function": {
                "name": "A",
                "description": "Tool A",
                "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
            },
        },
        {"type": "function", "function": {"name": "C", "parameters": {"type": "object"}}},
    ]


def test_tool_reference_reveals_a_deferred_tool() -> None:
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "tool_reference", "tool_name": "B"}],
    }
    request = _translate(_tool_turn(result), tools=_tools())
    assert [t["function"]["name"] for t in request.tools] == ["A", "B"]


@pytest.mark.parametrize(
    ("choice", "expected", "names"),
    [
        ({"type": "auto"}, "auto", ["A"]),
        ({"type": "any"}, "required", ["A"]),
        ({"type": "none"}, "none", ["A"]),
        ({"type": "tool", "name": "A"}, "required", ["A"]),
        ({"type": "tool", "name": "B"}, "required", ["B"]),  # forcing a deferred tool loads it
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: str, names: list[str]) -> None:
    request = _translate([{"role": "user", "content": "hi"}], tools=_tools(), tool_choice=choice)
    assert request.params["tool_choice"] == expected
    assert [t["function"]["name"] for t in request.tools] == names
    assert "parallel_tool_calls" not in request.params


def test_tool_choice_options_and_errors() -> None:
    choice = {"type": "auto", "disable_parallel_tool_use": True}
    request = _translate([{"role": "user", "content": "hi"}], tools=_tools(), tool_choice=choice)
    assert request.params["parallel_tool_calls"] is False
    no_tools = _translate([{"role": "user", "content": "hi"}], tool_choice={"type": "any"})
    assert "tool_choice" not in no_tools.params
    _error(_body([{"role": "user", "content": "hi"}], tools=_tools(), tool_choice={"type": "tool", "name": "Z"}))
    _error(_body([{"role": "user", "content": "hi"}], tools=_tools(), tool_choice={"type": "maybe"}))
    _error(_body([{"role": "user", "content": "hi"}], tools=[{"description": "no name"}]))
    _error(_body([{"role": "user", "content": "hi"}], tools=[{"name": "A", "input_schema": "x"}]))


@pytest.mark.parametrize(
    ("extra", "effort", "thinking", "budget"),
    [
        ({}, "none", False, None),
        ({"thinking": {"type": "disabled"}}, "none", False, None),
        ({"thinking": {"type": "adaptive"}}, "", True, None),
        (
            {"thinking": {"type": "adaptive", "display": "omitted"}, "output_config": {"effort": "max"}},
            "high",
            True,
            None,
        ),
        ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, "low", True, 2000),
        ({"thinking": {"type": "enabled", "budget_tokens": 10000}}, "medium", True, 10000),
        ({"thinking": {"type": "enabled", "budget_tokens": 31999}}, "high", True, 31999),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 31999}, "output_config": {"effort": "low"}},
            "low",
            True,
            31999,
        ),
    ],
)
def test_thinking_and_effort(extra: dict[str, Any], effort: str, thinking: bool, budget: int | None) -> None:
    request = _translate([{"role": "user", "content": "hi"}], **extra)
    assert request.reasoning_effort == effort
    assert request.params["chat_template_kwargs"] == {"enable_thinking": thinking}
    assert request.params.get("reasoning_budget_tokens") == budget


def test_sampling_fields_and_ignored_fields() -> None:
    request = _translate(
        [{"role": "user", "content": "hi"}],
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        stop_sequences=["###"],
        stream=True,
        metadata={"user_id": "u"},
        context_management={"edits": []},
        safeguards=[{"type": "dangerous_tool_use"}],
        container="c",
        mcp_servers=[{"type": "url"}],
        service_tier="auto",
        something_from_the_future={"x": 1},
    )
    assert request.temperature == 0.2
    assert request.stream is True
    assert request.params == {
        "top_p": 0.9,
        "top_k": 40,
        "stop": ["###"],
        "chat_template_kwargs": {"enable_thinking": False},
    }
    assert translate_request(_body([{"role": "user", "content": "hi"}])).temperature is None
    _error(_body([{"role": "user", "content": "hi"}], stop_sequences="###"))
    _error(_body([{"role": "user", "content": "hi"}], temperature="hot"))
    _error(_body([{"role": "user", "content": "hi"}], top_k=1.5))


def test_max_tokens_clamp_and_validation_order() -> None:
    body = _body([{"role": "user", "content": "hi"}], max_tokens=128000)
    assert translate_request(body, max_output_tokens=8192).max_tokens == 8192
    assert translate_request(body, max_output_tokens=None).max_tokens == 128000
    assert translate_request(_body([{"role": "user", "content": "hi"}]), max_output_tokens=8192).max_tokens == 100
    assert _error({"max_tokens": 1}).message == "messages: Field required"
    assert _error({"messages": [{"role": "user", "content": "x"}]}).message == "model: Field required"
    assert (
        _error({"model": "m", "messages": [{"role": "user", "content": "x"}]}).message == "max_tokens: Field required"
    )
    for bad in (0, -5, True, 1.5, "10"):
        _error(_body([{"role": "user", "content": "hi"}], max_tokens=bad))


@pytest.mark.parametrize(
    "body",
    [
        [],
        "text",
        {"model": "m", "max_tokens": 1, "messages": "hi"},
        {"model": "m", "max_tokens": 1, "messages": []},
        {"model": "", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
        _body(["not an object"]),
        _body([{"role": "robot", "content": "x"}]),
        _body([{"role": "user"}]),
        _body([{"role": "user", "content": [{"text": "no type"}]}]),
        _body([{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        _body([{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}}]}]),
        _body([{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]),
        _body(
            [{"role": "assistant", "content": [{"type": "tool_use", "name": "n"}]}, {"role": "user", "content": "x"}]
        ),
        _body([{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": [1]}]}]),
        _body([{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]),
        _body([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}]),
        _body([{"role": "system", "content": "only a system message"}]),
        _body([{"role": "user", "content": "x"}], tools="all"),
    ],
)
def test_invalid_requests_are_400(body: Any) -> None:
    error = _error(body)
    assert error.body()["error"] == {"type": "invalid_request_error", "message": error.message}


def test_unknown_blocks_documents_and_search_results() -> None:
    request = _translate(
        [
            {
                "role": "user",
                "content": [
                    {
                        "type": "document",
                        "source": {"type": "text", "media_type": "text/plain", "data": "Doc body"},
                        "title": "T",
                    },
                    {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
                    {
                        "type": "search_result",
                        "source": "https://x",
                        "title": "R",
                        "content": [{"type": "text", "text": "found"}],
                    },
                    {"type": "container_upload", "file_id": "f"},
                    {"type": "brand_new_block", "x": 1},
                ],
            }
        ]
    )
    content = request.messages[0]["content"]
    assert content.startswith("T\nDoc body\n\n[application/pdf document omitted")
    assert content.endswith("R\nhttps://x\nfound")


def test_structured_output_formats() -> None:
    schema = {"$schema": "x", "type": "object", "properties": {"a": {"type": "integer"}}}
    expected = {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
    }
    new = _translate(
        [{"role": "user", "content": "hi"}], output_config={"format": {"type": "json_schema", "schema": schema}}
    )
    assert new.params["response_format"] == expected
    old = _translate([{"role": "user", "content": "hi"}], output_format={"type": "json_schema", "schema": schema})
    assert old.params["response_format"] == expected
    _error(_body([{"role": "user", "content": "hi"}], output_config={"format": {"type": "json_schema"}}))


# --- JSON Schema sanitising ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        # what llama.cpp b11434 rejects (checked against a real llama-server: 400 or a hang)
        ({"properties": {"a": True, "b": False, "c": {"type": "string"}}, "required": ["b", "c"]},
         {"properties": {"a": {}, "c": {"type": "string"}}, "required": ["b", "c"]}),
        ({"properties": {"a": {"$ref": "https://example.com/x.json"}}}, {"properties": {"a": {}}}),
        ({"properties": {"a": {"$ref": "#"}}}, {"properties": {"a": {}}}),
        ({"properties": {"a": {"$ref": "#/$defs/X"}}}, {"properties": {"a": {}}}),
        ({"$defs": {"X": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/X"}}},
         {"$defs": {"X": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/X"}}}),
        ({"type": "string", "minLength": 10, "maxLength": 5}, {"type": "string", "maxLength": 5}),
        ({"type": "string", "minLength": 5000}, {"type": "string"}),
        ({"type": "string", "maxLength": 524288}, {"type": "string", "maxLength": 524288}),
        ({"type": "array", "maxItems": 3.5, "minItems": 2.0}, {"type": "array", "minItems": 2}),
        ({"type": "string", "maxLength": -1}, {"type": "string"}),
        ({"type": "str"}, {}),
        ({"type": ["string", "null", "bogus"]}, {"type": ["string", "null"]}),
        ({"enum": []}, {}),
        ({"type": "string", "pattern": "^(ab$"}, {"type": "string"}),
        ({"type": "string", "pattern": "^(a{0,2000})*$"}, {"type": "string"}),
        ({"type": "string", "pattern": "^a{2500}$"}, {"type": "string"}),
        ({"type": "string", "pattern": "^[\\s\\S]{0,300}$"}, {"type": "string", "pattern": "^[\\s\\S]{0,300}$"}),
        ({"type": "string", "pattern": "^wf_[a-z0-9-]{6,}$"}, {"type": "string", "pattern": "^wf_[a-z0-9-]{6,}$"}),
        ({"type": "integer", "minimum": -9007199254740991, "maximum": 9007199254740991},
         {"type": "integer", "minimum": -9007199254740991, "maximum": 9007199254740991}),
        ({"type": "integer", "maximum": 1e30}, {"type": "integer"}),
        ({"type": "integer", "minimum": 0, "exclusiveMinimum": True}, {"type": "integer", "minimum": 0}),
        ({"type": "integer", "minimum": 5, "maximum": 1}, {"type": "integer"}),
        ({"type": "string", "format": {"x": 1}}, {"type": "string"}),
        ({"type": "array", "prefixItems": [{"type": "string"}], "items": False},
         {"type": "array", "prefixItems": [{"type": "string"}]}),
        ({"type": "object", "additionalProperties": "no"}, {"type": "object"}),
        ({"anyOf": [], "oneOf": "x", "allOf": [False]}, {}),
        # what llama.cpp accepts but mistranslates
        ({"type": "object", "properties": {"a": {}}, "anyOf": [{"required": ["a"]}, {"required": ["b"]}]},
         {"type": "object", "properties": {"a": {}}}),
        ({"type": "string", "allOf": [{"pattern": "^a"}, {"maxLength": 3}]}, {"type": "string"}),
        ({"allOf": [{"type": "string", "pattern": "^a$"}, {"type": "string", "maxLength": 3}]}, {"type": "string"}),
        # what it handles: kept
        ({"allOf": [{"properties": {"a": {}}}, {"$ref": "#/$defs/B"}], "$defs": {"B": {"properties": {"b": {}}}}},
         {"allOf": [{"properties": {"a": {}}}, {"$ref": "#/$defs/B"}], "$defs": {"B": {"properties": {"b": {}}}}}),
        ({"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "T", "examples": ["x"]},
         {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "T", "examples": ["x"]}),
        ({"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:x", "not": {"type": "null"}},
         {"$id": "urn:x", "not": {"type": "null"}}),
        # keys llama.cpp never reads are left alone, refs included
        ({"not": {"$ref": "#/nowhere"}, "items": {"$ref": "#/nowhere"}}, {"not": {"$ref": "#/nowhere"}, "items": {}}),
    ],
)  # fmt: skip
def test_sanitize_json_schema(schema: dict[str, Any], expected: dict[str, Any]) -> None:
    original = copy.deepcopy(schema)
    assert sanitize_json_schema(schema) == expected
    assert schema == original


def test_sanitize_json_schema_survives_junk_and_depth() -> None:
    assert sanitize_json_schema("nope") == {}
    assert sanitize_json_schema(True) == {}
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(500):
        deep = {"type": "object", "properties": {"x": deep}}
    orjson.dumps(sanitize_json_schema(deep))


# --- streaming ------------------------------------------------------------------------------------

_USAGE: dict[str, Any] = {"input_tokens": 1200, "output_tokens": 7, "cache_tokens": 1000}


def test_stream_text_only() -> None:
    stream = AnthropicStream("msg_1", "m", input_tokens=1100)
    complete = Complete("j", full_response="Hello world", finish_reason="stop", **_USAGE)
    data = _run(stream, Token("j", "Hello"), Token("j", " world"), complete)
    events = _events(data)
    assert _names(events) == [
        "message_start",
        "ping",
        "content_block_start:0:text",
        "content_block_delta:0:text_delta",
        "content_block_delta:0:text_delta",
        "content_block_stop:0",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["usage"] == {
        "input_tokens": 1100,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    assert start["content"] == [] and start["stop_reason"] is None and start["id"] == "msg_1"
    assert events[2][1]["content_block"] == {"type": "text", "text": ""}
    assert events[3][1]["delta"] == {"type": "text_delta", "text": "Hello"}
    assert events[6][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        # Anthropic's input_tokens excludes cache reads; the three add up to the prompt
        "usage": {
            "input_tokens": 200,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 1000,
            "output_tokens": 7,
        },
    }
    assert stream.finished
    assert stream.on_token(Token("j", "late")) == b""
    message = _assert_sdk_agrees(data, complete)
    assert message.content[0].type == "text" and message.content[0].text == "Hello world"
    assert message.usage.input_tokens == 200 and message.usage.cache_read_input_tokens == 1000


def test_stream_reasoning_then_text() -> None:
    stream = AnthropicStream("msg_1", "m")
    complete = Complete("j", full_response="Answer.", reasoning_content="Let me think.", **_USAGE)
    data = _run(stream, Token("j", "Let me", True), Token("j", " think.", True), Token("j", "Answer."), complete)
    events = _events(data)
    assert _names(events) == [
        "message_start",
        "ping",
        "content_block_start:0:thinking",
        "content_block_delta:0:thinking_delta",
        "content_block_delta:0:thinking_delta",
        "content_block_delta:0:signature_delta",
        "content_block_stop:0",
        "content_block_start:1:text",
        "content_block_delta:1:text_delta",
        "content_block_stop:1",
        "message_delta",
        "message_stop",
    ]
    assert events[2][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[3][1]["delta"] == {"type": "thinking_delta", "thinking": "Let me"}
    assert events[5][1]["delta"] == {"type": "signature_delta", "signature": ""}
    message = _assert_sdk_agrees(data, complete)
    assert [b.type for b in message.content] == ["thinking", "text"]


def test_stream_tool_call_split_over_many_deltas() -> None:
    fragments = ['{"com', 'mand"', ': "ls', ' -la"', "}"]
    arguments = "".join(fragments)
    stream = AnthropicStream("msg_1", "m")
    messages: list[Token | ToolCallDelta | Complete] = [
        Token("j", "Listing."),
        ToolCallDelta("j", [_tool_start(0, "abc123", "Bash")]),
    ]
    messages += [ToolCallDelta("j", [_tool_args(0, f)]) for f in fragments]
    complete = Complete(
        "j",
        full_response="Listing.",
        finish_reason="tool_calls",
        tool_calls=[_call("abc123", "Bash", arguments)],
        **_USAGE,
    )
    data = _run(stream, *messages, complete)
    events = _events(data)
    assert _names(events) == [
        "message_start",
        "ping",
        "content_block_start:0:text",
        "content_block_delta:0:text_delta",
        "content_block_stop:0",
        "content_block_start:1:tool_use",
        *["content_block_delta:1:input_json_delta"] * len(fragments),
        "content_block_stop:1",
        "message_delta",
        "message_stop",
    ]
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "toolu_abc123", "name": "Bash", "input": {}}
    assert [p["delta"]["partial_json"] for _, p in events[6:11]] == fragments
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    message = _assert_sdk_agrees(data, complete)
    assert message.content[1].type == "tool_use" and message.content[1].input == {"command": "ls -la"}


def test_stream_two_parallel_tool_calls() -> None:
    stream = AnthropicStream("msg_1", "m")
    complete = Complete(
        "j",
        finish_reason="tool_calls",
        tool_calls=[_call("toolu_a", "Read", '{"file_path":"/a"}'), _call("toolu_b", "Read", '{"file_path":"/b"}')],
        **_USAGE,
    )
    data = _run(
        stream,
        ToolCallDelta("j", [_tool_start(0, "toolu_a", "Read"), _tool_args(0, '{"file_path":')]),
        ToolCallDelta("j", [_tool_args(0, '"/a"}')]),
        ToolCallDelta("j", [_tool_start(1, "toolu_b", "Read")]),
        ToolCallDelta("j", [_tool_args(1, '{"file_path":"/b"}')]),
        complete,
    )
    assert _names(_events(data))[2:-2] == [
        "content_block_start:0:tool_use",
        "content_block_delta:0:input_json_delta",
        "content_block_delta:0:input_json_delta",
        "content_block_stop:0",
        "content_block_start:1:tool_use",
        "content_block_delta:1:input_json_delta",
        "content_block_stop:1",
    ]
    message = _assert_sdk_agrees(data, complete)
    assert [b.id for b in message.content] == ["toolu_a", "toolu_b"]  # type: ignore[union-attr]


def test_stream_tool_call_seen_only_in_complete() -> None:
    # e.g. Qwen XML tool calls the worker extracts from the text at the end
    stream = AnthropicStream("msg_1", "m")
    complete = Complete(
        "j", full_response="Sure.", finish_reason="tool_calls", tool_calls=[_call("", "Bash", '{"command":"pwd"}')]
    )
    data = _run(stream, Token("j", "Sure."), complete)
    events = _events(data)
    assert _names(events)[5:8] == [
        "content_block_start:1:tool_use",
        "content_block_delta:1:input_json_delta",
        "content_block_stop:1",
    ]
    assert events[6][1]["delta"]["partial_json"] == '{"command":"pwd"}'
    assert events[5][1]["content_block"]["id"] == tool_use_id("", "msg_1", 0) == "toolu_1_0"
    _assert_sdk_agrees(data, complete)


def test_stream_max_tokens() -> None:
    stream = AnthropicStream("msg_1", "m")
    complete = Complete("j", full_response="Cut", finish_reason="length", output_tokens=3)
    data = _run(stream, Token("j", "Cut"), complete)
    assert _events(data)[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert _assert_sdk_agrees(data, complete).stop_reason == "max_tokens"


def test_stream_max_tokens_inside_a_tool_call_wins_over_tool_use() -> None:
    stream = AnthropicStream("msg_1", "m")
    complete = Complete("j", finish_reason="length", tool_calls=[_call("toolu_x", "Bash", '{"command": "l')])
    data = _run(
        stream, ToolCallDelta("j", [_tool_start(0, "toolu_x", "Bash"), _tool_args(0, '{"command": "l')]), complete
    )
    assert _events(data)[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert build_message(complete, message_id="msg_1", model="m")["content"][0]["input"] == {}


def test_stream_stop_sequence() -> None:
    stream = AnthropicStream("msg_1", "m", stop_sequences=["###"])
    complete = Complete("j", full_response="Done", finish_reason="stop_sequence")
    data = _run(stream, Token("j", "Done"), complete)
    assert _events(data)[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "###"}
    message = _assert_sdk_agrees(data, complete, stop_sequences=["###"])
    assert message.stop_sequence == "###"
    several = build_message(complete, message_id="m", model="m", stop_sequences=["a", "b"])
    assert (several["stop_reason"], several["stop_sequence"]) == ("stop_sequence", None)


def test_stream_error_ends_the_stream() -> None:
    stream = AnthropicStream("msg_1", "m")
    data = stream.start() + stream.on_token(Token("j", "partial")) + stream.on_error("worker died", "overloaded_error")
    events = _events(data)
    assert _names(events) == [
        "message_start",
        "ping",
        "content_block_start:0:text",
        "content_block_delta:0:text_delta",
        "error",
    ]
    assert events[-1][1] == {"type": "error", "error": {"type": "overloaded_error", "message": "worker died"}}
    assert stream.finished
    assert stream.on_complete(Complete("j")) == b""
    assert stream.on_error("again") == b""
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=data)
    with pytest.raises(anthropic.APIStatusError, match="worker died"), _client(response).messages.stream(**_ASK) as sdk:
        sdk.get_final_message()


def test_stream_empty_answer_and_unstreamed_text() -> None:
    empty = Complete("j", finish_reason="stop")
    data = _run(AnthropicStream("msg_1", "m"), empty)
    assert _names(_events(data))[2:-2] == ["content_block_start:0:text", "content_block_stop:0"]
    _assert_sdk_agrees(data, empty)
    # a worker that sent no tokens: the text and reasoning come from the complete message
    whole = Complete("j", full_response="All at once.", reasoning_content="Quietly.")
    _assert_sdk_agrees(_run(AnthropicStream("msg_1", "m"), whole), whole)


def test_stream_switching_kinds_opens_new_blocks_and_ignores_empty_tokens() -> None:
    stream = AnthropicStream("msg_1", "m")
    data = _run(stream, Token("j", "a"), Token("j", ""), Token("j", "b", True), Token("j", "c"), Complete("j"))
    assert [n for n in _names(_events(data)) if n.startswith("content_block_start")] == [
        "content_block_start:0:text",
        "content_block_start:1:thinking",
        "content_block_start:2:text",
    ]


def test_stream_bytes_escape_text_and_ping() -> None:
    stream = AnthropicStream("msg_1", "m")
    stream.start()
    chunk = stream.on_token(Token("j", 'quote " newline \n unicode é'))
    _, (_, delta) = _events(chunk)
    assert delta["delta"]["text"] == 'quote " newline \n unicode é'
    assert AnthropicStream.ping() == b'event: ping\ndata: {"type":"ping"}\n\n'


# --- non-streaming body ---------------------------------------------------------------------------


def test_build_message_content_order_and_arguments() -> None:
    complete = Complete(
        "j",
        full_response="Text.",
        reasoning_content="Thoughts.",
        finish_reason="tool_calls",
        tool_calls=[
            _call("call_1", "A", '{"x": [1, 2]}'),
            _call("toolu_2", "B", "not json"),
            _call("toolu_3", "C", "[1]"),
        ],
        input_tokens=50,
        output_tokens=9,
        cache_tokens=20,
    )
    body = build_message(complete, message_id="msg_9", model="claude-x")
    assert body == {
        "id": "msg_9",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "thinking", "thinking": "Thoughts.", "signature": ""},
            {"type": "text", "text": "Text."},
            {"type": "tool_use", "id": "toolu_call_1", "name": "A", "input": {"x": [1, 2]}},
            {"type": "tool_use", "id": "toolu_2", "name": "B", "input": {}},
            {"type": "tool_use", "id": "toolu_3", "name": "C", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 30,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 20,
            "output_tokens": 9,
        },
    }
    assert _sdk_message(body).content[2].type == "tool_use"


def test_build_message_empty_and_end_turn() -> None:
    body = build_message(Complete("j"), message_id="msg_1", model="m")
    assert body["content"] == [{"type": "text", "text": ""}]
    assert body["stop_reason"] == "end_turn"
    _sdk_message(body)


# --- errors, models, estimate --------------------------------------------------------------------


def test_error_body_and_types() -> None:
    body = error_body("overloaded_error", "busy")
    assert body["type"] == "error"
    assert body["error"] == {"type": "overloaded_error", "message": "busy"}
    assert re.fullmatch(r"req_[0-9a-f]{24}", body["request_id"])
    assert error_body("api_error", "x")["request_id"] != body["request_id"]
    expected = {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
        413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 501: "api_error", 502: "api_error",
        503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error", 418: "invalid_request_error",
    }  # fmt: skip
    assert {status: error_type_for_status(status) for status in expected} == expected


def test_models() -> None:
    listing = models_list("qwen3-coder", max_input_tokens=32768)
    assert listing["first_id"] == listing["last_id"] == "qwen3-coder"
    assert listing["has_more"] is False
    info = anthropic.types.ModelInfo.model_validate(listing["data"][0])
    assert info.id == info.display_name == "qwen3-coder"
    assert info.max_input_tokens == 32768
    assert model_object("x") == {
        "type": "model",
        "id": "x",
        "display_name": "x",
        "created_at": "1970-01-01T00:00:00Z",
        "lifecycle": "active",
    }


def test_estimate_tokens() -> None:
    assert estimate_tokens({"messages": [{"role": "user", "content": "Hello, how are you doing today?"}]}) == 4 + 8
    assert estimate_tokens(None) == 0
    junk = {"messages": "junk", "system": 5, "tools": [None, {"name": 3}]}
    assert estimate_tokens(junk) == 10 + 1  # the tool overhead and its "{}" schema
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "x" * 100000}}
    assert estimate_tokens({"messages": [{"role": "user", "content": [image]}]}) == 4 + 1000
    tool_turn = {"messages": _tool_turn({"type": "tool_result", "tool_use_id": "toolu_1", "content": "some output"})}
    assert estimate_tokens(tool_turn) > estimate_tokens({"messages": tool_turn["messages"][:1]}) + 8
