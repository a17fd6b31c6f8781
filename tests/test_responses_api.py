"""Unit tests of the Responses translation (auxot_common/responses_api.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from auxot_common import responses_api as r
from auxot_common.openai_api import RequestError
from auxot_common.protocol import Complete, Token, ToolCallDelta

PATCH_TOOL = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Edit files.",
    "format": {"type": "grammar", "syntax": "lark", "definition": "start: x"},
}
NS_TOOL = {
    "type": "namespace",
    "name": "multi",
    "tools": [{"type": "function", "name": "spawn", "parameters": {"type": "object"}}],
}
FN_TOOL = {
    "type": "function",
    "name": "exec_command",
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
}


def events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block:
            name, data = block.split("\n", 1)
            payload = orjson.loads(data.removeprefix("data: "))
            assert name == f"event: {payload['type']}"
            out.append(payload)
    return out


def test_history_items_become_chat_messages() -> None:
    body = {
        "instructions": "be brief",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "dev"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            {"type": "reasoning", "summary": [], "content": None, "encrypted_content": "opaque"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "thinking"}]},
            {"type": "function_call", "name": "exec_command", "arguments": '{"cmd":"ls"}', "call_id": "c1"},
            {"type": "custom_tool_call", "name": "apply_patch", "input": "*** Begin Patch", "call_id": "c2"},
            {"type": "function_call_output", "call_id": "c1", "output": "a.txt"},
            {"type": "custom_tool_call_output", "call_id": "c2", "output": "done"},
        ],
        "tools": [FN_TOOL, PATCH_TOOL, NS_TOOL, {"type": "web_search"}],
    }
    parsed = r.parse_request(body)
    messages = parsed.chat.messages
    assert messages[0] == {"role": "system", "content": "be brief\n\ndev"}
    assert messages[1] == {"role": "user", "content": "hi"}
    assistant = messages[2]
    assert assistant["reasoning_content"] == "thinking"  # the encrypted-only item is dropped
    assert [c["function"]["name"] for c in assistant["tool_calls"]] == ["exec_command", "apply_patch"]
    assert orjson.loads(assistant["tool_calls"][1]["function"]["arguments"]) == {"input": "*** Begin Patch"}
    assert messages[3:] == [
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
        {"role": "tool", "tool_call_id": "c2", "content": "done"},
    ]
    names = [t["function"]["name"] for t in parsed.chat.tools]
    assert names == ["exec_command", "apply_patch", "multi__spawn"]
    assert "start: x" in parsed.chat.tools[1]["function"]["description"]
    assert parsed.dropped_tools == ["web_search"]


def test_request_options() -> None:
    parsed = r.parse_request(
        {
            "input": "hi",
            "max_output_tokens": 7,
            "reasoning": {"effort": "low"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            "tool_choice": {"type": "function", "name": "exec_command"},
            "tools": [FN_TOOL, PATCH_TOOL],
            "unknown_field": 1,
        }
    )
    assert parsed.chat.max_tokens == 7 and parsed.chat.reasoning_effort == "low"
    assert parsed.chat.params["response_format"]["type"] == "json_schema"
    assert parsed.chat.params["tool_choice"] == "required"
    assert [t["function"]["name"] for t in parsed.chat.tools] == ["exec_command"]
    with pytest.raises(RequestError):
        r.parse_request({"input": "hi", "max_output_tokens": 0})


def test_stream_custom_and_namespaced_calls() -> None:
    parsed = r.parse_request({"input": "hi", "tools": [PATCH_TOOL, NS_TOOL]})
    stream = r.ResponsesStream(parsed, "resp_1", "m", 0)
    raw = stream.start()
    raw += stream.on_token(Token("j", "hmm", reasoning=True))
    raw += stream.on_tool_call_delta(
        ToolCallDelta("j", [{"index": 0, "id": "c1", "function": {"name": "apply_patch", "arguments": '{"input":'}}])
    )
    raw += stream.on_tool_call_delta(ToolCallDelta("j", [{"index": 0, "function": {"arguments": '"P"}'}}]))
    raw += stream.on_tool_call_delta(
        ToolCallDelta("j", [{"index": 1, "id": "c2", "function": {"name": "multi__spawn", "arguments": "{}"}}])
    )
    raw += stream.on_complete(
        Complete("j", finish_reason="tool_calls", input_tokens=10, output_tokens=5, cache_tokens=4, reasoning_tokens=1)
    )
    got = events(raw)
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    done = [e["item"] for e in got if e["type"] == "response.output_item.done"]
    assert [d["type"] for d in done] == ["reasoning", "custom_tool_call", "function_call"]
    assert done[0]["content"] == [{"type": "reasoning_text", "text": "hmm"}]
    assert done[1]["input"] == "P" and done[1]["call_id"] == "c1"
    assert done[2]["name"] == "spawn" and done[2]["namespace"] == "multi"
    final = got[-1]
    assert final["type"] == "response.completed"
    assert final["response"]["usage"]["input_tokens_details"]["cached_tokens"] == 4
    assert final["response"]["usage"]["output_tokens_details"]["reasoning_tokens"] == 1


def test_stream_failure_is_explicit() -> None:
    stream = r.ResponsesStream(r.parse_request({"input": "hi"}), "resp_1", "m", 0)
    got = events(stream.start() + stream.on_token(Token("j", "a")) + stream.on_error("worker lost"))
    assert got[-1]["type"] == "response.failed"
    assert got[-1]["response"]["error"] == {"code": "server_error", "message": "worker lost"}
    assert (
        r.error_code("request (5000 tokens) exceeds the available context size (1024 tokens)", 400)
        == "context_length_exceeded"
    )


def test_text_deltas_are_exactly_the_generic_events() -> None:
    """Text and reasoning deltas are written from per-item byte templates (the per-token hot
    path): each must be byte for byte what encoding the event object gives, fields in order."""
    stream = r.ResponsesStream(r.parse_request({"input": "hi"}), "resp_1", "m", 0)
    raw = stream.start()
    for token in ("think", ' "q"\\'):
        raw += stream.on_token(Token("j", token, reasoning=True))
    for token in ("Hé", 'llo "w"\n', "\u2028</x>"):
        raw += stream.on_token(Token("j", token))
    raw += stream.on_complete(Complete("j", finish_reason="stop", input_tokens=3, output_tokens=5))
    blocks = [b for b in raw.split(b"\n\n") if b]
    deltas = [
        b
        for b in blocks
        if b.startswith((b"event: response.output_text.delta", b"event: response.reasoning_text.delta"))
    ]
    assert len(deltas) == 5
    for block in deltas:
        head, data = block.split(b"\ndata: ", 1)
        obj = orjson.loads(data)
        assert head == b"event: " + obj["type"].encode() and data == orjson.dumps(obj)
        fields = ["type", "sequence_number", "item_id", "output_index", "content_index", "delta"]
        assert list(obj) == ([*fields, "logprobs"] if obj["type"] == "response.output_text.delta" else fields)
    got = events(raw)
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    texts = [e["delta"] for e in got if e["type"] == "response.output_text.delta"]
    assert texts == ["Hé", 'llo "w"\n', "\u2028</x>"]
    done = [e["item"] for e in got if e["type"] == "response.output_item.done"]
    assert [d["type"] for d in done] == ["reasoning", "message"]
    assert done[1]["content"][0]["text"] == "Hé" + 'llo "w"\n' + "\u2028</x>"
    message_deltas = [e for e in got if e["type"] == "response.output_text.delta"]
    assert {(e["item_id"], e["output_index"]) for e in message_deltas} == {(done[1]["id"], 1)}
