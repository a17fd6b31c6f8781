"""Property-based fuzzing of everything that reads untrusted input.

- Both APIs' request validation: any JSON body is either a validated request or a client error
  (4xx) in the API's own terms, never another exception (which aiohttp would turn into a 500).
- The worker protocol decoder: any frame is a message or a ProtocolError.
- ``textparse`` on random model output (with tool-call markup mixed in): never raises, and
  every character the model wrote reaches the caller as text or inside a tool call.
- A validated request always becomes a job whose messages the worker can turn into a
  llama-server body (the worker's own normalisation never raises on what the router let through).

The example budget is fixed and the run derandomized by the ``ci`` settings profile
(tests/conftest.py), so CI runs the same examples every time.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

import auxot_worker
from auxot_common import anthropic_api as anthropic
from auxot_common import protocol as proto
from auxot_common.openai_api import RequestError, parse_chat_request, parse_completion_request
from auxot_common.textparse import TextParser, extract_tool_calls

# --- strategies ------------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=24,
)


def _keyed(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects whose keys are mostly the ones the validator looks at, with any values."""
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), json_values, max_size=6)


OPENAI_PART = _keyed(["type", "text", "image_url", "input_audio", "url"])
OPENAI_CALL = _keyed(["id", "type", "function", "index"]) | st.builds(
    lambda f: {"id": "c", "type": "function", "function": f}, _keyed(["name", "arguments"]) | json_values
)
OPENAI_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "developer"]) | json_values},
    optional={
        "content": json_values | st.lists(OPENAI_PART | json_values, max_size=3),
        "tool_calls": json_values | st.lists(OPENAI_CALL | json_values, max_size=3),
        "tool_call_id": json_values,
        "name": json_values,
    },
)
OPENAI_TOOL = st.builds(lambda f: {"type": "function", "function": f}, _keyed(["name", "parameters", "description"]))
OPENAI_BODY = st.fixed_dictionaries(
    {"messages": st.lists(OPENAI_MESSAGE | json_values, max_size=4) | json_values},
    optional={
        "tools": st.lists(OPENAI_TOOL | _keyed(["type", "function"]) | json_values, max_size=3) | json_values,
        "tool_choice": json_values
        | st.builds(lambda n: {"type": "function", "function": {"name": n}}, json_values)
        | st.builds(lambda f: {"type": "function", "function": f}, json_values),
        "stream": json_values,
        "max_tokens": json_values,
        "temperature": json_values,
        "stop": json_values,
        "stream_options": json_values,
        "reasoning_effort": json_values,
        "model": json_values,
    },
)

ANTHROPIC_BLOCK = _keyed(["type", "text", "id", "name", "input", "tool_use_id", "content", "source", "thinking"]) | (
    st.sampled_from(["text", "tool_use", "tool_result", "image", "thinking", "document"]).flatmap(
        lambda kind: _keyed(["text", "id", "name", "input", "tool_use_id", "content", "source"]).map(
            lambda block: {**block, "type": kind}
        )
    )
)
ANTHROPIC_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant"]) | json_values},
    optional={"content": json_values | st.lists(ANTHROPIC_BLOCK | json_values, max_size=3)},
)
ANTHROPIC_BODY = st.fixed_dictionaries(
    {
        "messages": st.lists(ANTHROPIC_MESSAGE | json_values, max_size=4) | json_values,
        "max_tokens": st.integers(-2, 5000) | json_values,
    },
    optional={
        "system": json_values | st.lists(ANTHROPIC_BLOCK, max_size=2),
        "tools": st.lists(_keyed(["name", "input_schema", "description", "type"]) | json_values, max_size=3)
        | json_values,
        "tool_choice": _keyed(["type", "name"]) | json_values,
        "stop_sequences": json_values,
        "stream": json_values,
        "thinking": _keyed(["type", "budget_tokens"]) | json_values,
        "temperature": json_values,
    },
)


def _worker_body(job: proto.Job) -> None:
    """What the worker does with a job's messages before llama-server sees them."""
    body = auxot_worker.llama_request_body(job)
    orjson.dumps(body)
    if auxot_worker.has_images(job.messages):
        [auxot_worker.without_images(m) for m in job.messages]


# --- request validation ---------------------------------------------------------------------


@given(OPENAI_BODY | json_values)
def test_openai_chat_validation_never_fails_unexpectedly(body: Any) -> None:
    try:
        chat = parse_chat_request(body)
    except RequestError as exc:
        assert 400 <= exc.status < 500
        return
    _worker_body(proto.Job(job_id="j", messages=chat.messages, tools=chat.tools, params=chat.params, kind="chat"))


@given(_keyed(["prompt", "max_tokens", "stream", "stop", "temperature"]) | json_values)
def test_openai_completion_validation_never_fails_unexpectedly(body: Any) -> None:
    try:
        parse_completion_request(body)
    except RequestError as exc:
        assert 400 <= exc.status < 500


@given(ANTHROPIC_BODY | json_values)
def test_anthropic_validation_never_fails_unexpectedly(body: Any) -> None:
    for translate in (anthropic.translate_request, anthropic.count_tokens_request):
        try:
            chat = translate(body)
        except anthropic.AnthropicError as exc:
            assert 400 <= exc.status < 500
            continue
        _worker_body(proto.Job(job_id="j", messages=chat.messages, tools=chat.tools, params=chat.params, kind="chat"))


# --- the worker protocol --------------------------------------------------------------------

FRAME_OBJECTS = st.sampled_from(sorted(proto.MESSAGE_TYPES)).flatmap(
    lambda kind: _keyed(
        ["job_id", "token", "tool_calls", "capabilities", "policy", "jobs", "logprobs", "total_slots", "gpu_key"]
    ).map(lambda obj: {**obj, "type": kind})
)


@given(FRAME_OBJECTS | json_values)
def test_protocol_decoder_never_fails_unexpectedly(obj: Any) -> None:
    try:
        frame = orjson.dumps(obj)
    except TypeError:  # an integer beyond 64 bits: not a frame anyone can send
        return
    try:
        message = proto.decode(frame)
    except proto.ProtocolError:
        return
    proto.encode(message)


@given(st.binary(max_size=200))
def test_protocol_decoder_takes_any_bytes(frame: bytes) -> None:
    with contextlib.suppress(proto.ProtocolError):
        proto.decode(frame)


# --- textparse on model output --------------------------------------------------------------

MARKUP = st.sampled_from(
    [
        "<tool_call>", "</tool_call>", "<function=get_weather>", "</function>", "<parameter=city>",
        "<parameter=days>", "</parameter>", "<think>", "</think>", "[Calling tool: get_weather(", ")]",
        '{"name": "get_weather", "arguments": {"city": "Paris"}}', "{[1]: 2}", "{(1, 2): 3}", "{'a': True}",
        "[1, 2", "1e999", "\n", " ", "{", "}", "<", ">",
    ]
)  # fmt: skip
MODEL_OUTPUT = st.lists(MARKUP | st.text(max_size=12), max_size=30)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "object"}, "days": {"type": ["array", "integer"]}},
            },
        },
    }
]


@given(MODEL_OUTPUT, st.booleans())
def test_textparse_never_raises_on_model_output(fragments: list[str], reasoning_first: bool) -> None:
    parser = TextParser(TOOLS)
    for index, fragment in enumerate(fragments):
        parser.feed(fragment, reasoning=reasoning_first and index < 2)
    _, calls = parser.finish()
    for call in calls:
        orjson.loads(call["function"]["arguments"])  # always valid JSON
    extract_tool_calls("".join(fragments), TOOLS)
