"""The tiny GGUF test model, served by a real llama-server, behaves as the suite relies on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.llama_server import LlamaServer
from tests.support.tiny_model import make_tiny_model

API_KEY = "tiny-model-test-key"
MAX_TOKENS = 48


def _tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": name, "description": f"{name} tool", "parameters": parameters},
    }


TOOLS: dict[str, dict[str, Any]] = {
    "string": _tool(
        "get_weather",
        {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    ),
    "int_enum": _tool(
        "set_volume",
        {
            "type": "object",
            "properties": {
                "level": {"type": "integer", "minimum": 0, "maximum": 10},
                "mode": {"type": "string", "enum": ["quiet", "loud"]},
            },
            "required": ["level", "mode"],
        },
    ),
    "nested": _tool(
        "book_room",
        {
            "type": "object",
            "properties": {
                "guest": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"],
                },
                "nights": {"type": "number"},
            },
            "required": ["guest", "nights"],
        },
    ),
    "array": _tool(
        "add_tags",
        {
            "type": "object",
            "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["tags"],
        },
    ),
}

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def _matches(value: Any, schema: dict[str, Any]) -> bool:
    """The subset of JSON Schema the test tools use: type, enum, required, items."""
    kind = schema.get("type")
    if kind is not None:
        # bool is an int subclass in Python but not an integer in JSON.
        if isinstance(value, bool) and kind != "boolean":
            return False
        if not isinstance(value, _JSON_TYPES[kind]):
            return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return all(key in value for key in schema.get("required", [])) and all(
            _matches(value[key], sub) for key, sub in props.items() if key in value
        )
    if isinstance(value, list):
        return all(_matches(item, schema.get("items", {})) for item in value)
    return True


def _assert_valid_call(name: str, arguments: str, tool: dict[str, Any]) -> None:
    assert name == tool["function"]["name"]
    args = json.loads(arguments)
    assert _matches(args, tool["function"]["parameters"]), arguments


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[LlamaServer]:
    with LlamaServer(model_path, parallel=2, ctx_size=8192, api_key=API_KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: LlamaServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=30) as oai:
        yield oai


def _chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello! Tell me a story."}], **kwargs
    )


def test_model_is_byte_reproducible(tmp_path: Path, model_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again.gguf")
    other = make_tiny_model(tmp_path / "other.gguf", seed=1)
    assert again.read_bytes() == model_path.read_bytes()
    assert other.read_bytes() != model_path.read_bytes()
    assert 500_000 < model_path.stat().st_size < 2_000_000


@pytest.mark.parametrize("temperature", [0.0, 1.0, 1.5])
def test_plain_chat_is_printable_and_runs_to_max_tokens(client: openai.OpenAI, temperature: float) -> None:
    resp = _chat(client, max_tokens=MAX_TOKENS, temperature=temperature)
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == MAX_TOKENS
    text = choice.message.content
    assert text and all(" " <= ch <= "~" for ch in text), repr(text)


def test_plain_chat_is_deterministic_at_temperature_zero(client: openai.OpenAI) -> None:
    texts = {_chat(client, max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content for _ in range(3)}
    assert len(texts) == 1


def test_streamed_plain_chat_matches_non_streamed(client: openai.OpenAI) -> None:
    full = _chat(client, max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content
    parts: list[str] = []
    finish = None
    for chunk in _chat(client, max_tokens=MAX_TOKENS, temperature=0, stream=True):
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == full
    assert finish == "length"


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
@pytest.mark.parametrize("temperature", [0.0, 1.5])
@pytest.mark.parametrize("schema", sorted(TOOLS))
def test_tool_call_non_streaming(client: openai.OpenAI, schema: str, temperature: float, tool_choice: str) -> None:
    tool = TOOLS[schema]
    resp = _chat(client, max_tokens=200, temperature=temperature, tools=[tool], tool_choice=tool_choice)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1
    assert calls[0].id and calls[0].type == "function"
    _assert_valid_call(calls[0].function.name, calls[0].function.arguments, tool)


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
@pytest.mark.parametrize("temperature", [0.0, 1.5])
@pytest.mark.parametrize("schema", sorted(TOOLS))
def test_tool_call_streaming(client: openai.OpenAI, schema: str, temperature: float, tool_choice: str) -> None:
    tool = TOOLS[schema]
    stream = _chat(
        client,
        max_tokens=200,
        temperature=temperature,
        tools=[tool],
        tool_choice=tool_choice,
        stream=True,
    )
    name, arguments, finish = "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                assert call.index == 0
                name += (call.function and call.function.name) or ""
                arguments += (call.function and call.function.arguments) or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    _assert_valid_call(name, arguments, tool)


def test_tool_call_with_several_tools_and_history(client: openai.OpenAI) -> None:
    tools = list(TOOLS.values())
    resp = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        ],
        tools=tools,  # type: ignore[arg-type]
        max_tokens=200,
        temperature=1.0,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    by_name = {t["function"]["name"]: t for t in tools}
    _assert_valid_call(call.function.name, call.function.arguments, by_name[call.function.name])


def test_server_rejects_missing_api_key(server: LlamaServer) -> None:
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError):
        _chat(bad, max_tokens=4)


def test_server_start_failure_reports_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError, match="llama-server exited"):
        LlamaServer(broken).start()
