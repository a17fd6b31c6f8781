"""Tests for the worker <-> router WebSocket protocol (``auxot_common.protocol``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from auxot_common import protocol as proto
from auxot_common.protocol import (
    Cancel,
    Capabilities,
    Complete,
    Config,
    ConfigAck,
    Dispatched,
    Error,
    Heartbeat,
    HeartbeatAck,
    Hello,
    HelloAck,
    Job,
    Policy,
    PolicyUpdate,
    PromptProgress,
    ProtocolError,
    Token,
    ToolCallDelta,
    WorkerLost,
    decode,
    encode,
)

FULL_CAPS = Capabilities(
    backend="llama.cpp",
    model="Qwen3-Coder-30B-A3B-Instruct",
    ctx_size=131072,
    vram_gb=23.5,
    parameters="30B",
    total_slots=2,
    model_capabilities=["code", "tools"],
    gpus=[{"name": "NVIDIA H100", "vram_mb": 81559}],
    draining=True,
    policy_model="Qwen3-Coder-30B-A3B",
)

FULL_POLICY = Policy(
    model_name="Qwen3-Coder-30B-A3B",
    quantization="Q4_K_S",
    context_size=131072,
    max_parallelism=2,
    capabilities=["code"],
    huggingface_id="unsloth/Qwen3-Coder-30B-A3B-Instruct-GGUF",
    files=["Q4/model-00001-of-00002.gguf", "Q4/model-00002-of-00002.gguf"],
    mmproj_file="mmproj-F16.gguf",
    family="qwen3",
    parameters="30B",
    max_message_bytes=65 * 1024 * 1024,
    embedding=True,
    pooling="mean",
)

TOOL_CALL = {
    "index": 0,
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
}

# One instance of every message type, every field set to a non-default value.
FULL_MESSAGES: list[Any] = [
    Hello(gpu_key="adm_key", capabilities=FULL_CAPS, policy_only=True, model="Qwen3-Coder-30B-A3B"),
    Config(capabilities=FULL_CAPS),
    Heartbeat(jobs=["chatcmpl-1"]),
    Token(job_id="chatcmpl-1", token="Hel", reasoning=True, logprobs=[{"token": "Hel", "logprob": -0.1}]),
    ToolCallDelta(job_id="chatcmpl-1", tool_calls=[TOOL_CALL]),
    Complete(
        job_id="chatcmpl-1",
        full_response="Hello!",
        finish_reason="length",
        duration_ms=412,
        input_tokens=9,
        output_tokens=4,
        cache_tokens=3,
        prompt_ms=12.5,
        tool_calls=[TOOL_CALL],
        reasoning_content="Let me think",
        reasoning_tokens=3,
        logprobs={"content": [{"token": "Hel", "logprob": -0.1}]},
        embeddings=[[0.25, -0.5]],
        stop_sequence="END",
    ),
    Error(error="boom", job_id="chatcmpl-1", details="more", status=400, retryable=True),
    PromptProgress(job_id="chatcmpl-1", total=100, cached=20, processed=50),
    HelloAck(
        success=True, gpu_id="9f0c", policy=FULL_POLICY, error="none", retryable=True, retry_after=2.5, batch=True
    ),
    HeartbeatAck(),
    ConfigAck(success=False, error="bad capabilities"),
    Job(
        job_id="chatcmpl-1",
        messages=[{"role": "user", "content": "Hi"}],
        tools=[{"type": "function", "function": {"name": "f"}}],
        temperature=0.7,
        max_tokens=256,
        reasoning_effort="high",
        stream=True,
        kind="completion",
        params={"top_p": 0.9, "stop": ["\n"]},
        reply_to="instance-a",
        attempt=2,
        deadline=1700000000.5,
        timeout_s=299.5,
        model="Qwen3-Coder-30B-A3B",
        session="0123456789abcdef",
        key_name="alice",
        priority=3,
    ),
    Cancel(job_id="chatcmpl-1"),
    PolicyUpdate(policy=FULL_POLICY),
    Dispatched(job_id="chatcmpl-1", worker_id="w1", instance_id="i1"),
    WorkerLost(job_id="chatcmpl-1", reason="socket closed"),
]

# The same types with only the required fields.
MINIMAL_MESSAGES: list[Any] = [
    Hello(gpu_key="adm_key"),
    Config(),
    Heartbeat(),
    Token(job_id="j", token=""),
    ToolCallDelta(job_id="j", tool_calls=[]),
    Complete(job_id="j"),
    Error(error="e"),
    PromptProgress(job_id="j"),
    HelloAck(success=False),
    HeartbeatAck(),
    ConfigAck(),
    Job(job_id="j"),
    Cancel(job_id="j"),
    PolicyUpdate(policy=Policy(model_name="m")),
    Dispatched(job_id="j", worker_id="w", instance_id="i"),
    WorkerLost(job_id="j"),
]


def _wire(message: Any) -> dict[str, Any]:
    return orjson.loads(encode(message))


def test_every_message_type_is_covered() -> None:
    assert {type(m) for m in FULL_MESSAGES} == set(proto.MESSAGE_TYPES.values())
    assert {type(m) for m in MINIMAL_MESSAGES} == set(proto.MESSAGE_TYPES.values())


@pytest.mark.parametrize("message", FULL_MESSAGES + MINIMAL_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Any) -> None:
    data = encode(message)
    assert isinstance(data, bytes)
    assert decode(data) == message
    assert decode(data.decode()) == message  # text frames arrive as str
    assert _wire(message)["type"] == type(message).type


def test_every_field_of_a_full_message_is_on_the_wire() -> None:
    for message in FULL_MESSAGES:
        wire = _wire(message)
        expected = {f.name for f in dataclasses.fields(message)} | {"type"}
        assert set(wire) == expected, type(message).__name__


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (Heartbeat(), {"type": "heartbeat"}),
        (HeartbeatAck(), {"type": "heartbeat_ack"}),
        (Token(job_id="j", token="x"), {"type": "token", "job_id": "j", "token": "x"}),
        (Token(job_id="j", token=""), {"type": "token", "job_id": "j", "token": ""}),
        (
            Complete(job_id="j"),
            {"type": "complete", "job_id": "j", "full_response": "", "finish_reason": "stop"},
        ),
        (HelloAck(success=False), {"type": "hello_ack", "success": False}),
        (
            HelloAck(success=False, error="invalid GPU key"),
            {"type": "hello_ack", "success": False, "error": "invalid GPU key"},
        ),
        (ConfigAck(), {"type": "config_ack", "success": True}),
        (ConfigAck(success=False), {"type": "config_ack", "success": False}),
        (Error(error="e"), {"type": "error", "error": "e"}),
        (PromptProgress(job_id="j"), {"type": "prompt_progress", "job_id": "j"}),
        (ToolCallDelta(job_id="j", tool_calls=[]), {"type": "tool_call_delta", "job_id": "j", "tool_calls": []}),
        (
            Hello(gpu_key="k"),
            {
                "type": "hello",
                "gpu_key": "k",
                "capabilities": {"backend": "pending", "model": "pending", "ctx_size": 0},
            },
        ),
        (
            PolicyUpdate(policy=Policy(model_name="m")),
            {
                "type": "policy_update",
                "policy": {
                    "model_name": "m",
                    "quantization": "",
                    "context_size": 0,
                    "max_parallelism": 1,
                    "capabilities": [],
                },
            },
        ),
    ],
)
def test_defaults_are_omitted_except_always_fields(message: Any, wire: dict[str, Any]) -> None:
    assert _wire(message) == wire


def test_job_omits_unset_options() -> None:
    wire = _wire(Job(job_id="j", messages=[{"role": "user", "content": "Hi"}]))
    for absent in (
        "tools",
        "temperature",
        "max_tokens",
        "reasoning_effort",
        "stream",
        "params",
        "reply_to",
        "deadline",
    ):
        assert absent not in wire
    assert wire["messages"] == [{"role": "user", "content": "Hi"}]


def test_job_temperature_zero_survives_the_wire() -> None:
    """temperature=0 (greedy decoding) is a real request, not "unset": it must reach the worker.

    If it is dropped as an empty value, the worker sends no temperature and llama-server samples
    with its default (0.8), so a caller asking for deterministic output gets random output.
    """
    job = Job(job_id="j", messages=[{"role": "user", "content": "Hi"}], temperature=0.0)
    decoded = decode(encode(job))
    assert isinstance(decoded, Job)
    assert decoded.temperature == 0.0


def test_hello_ack_failure_keeps_success_false() -> None:
    ack = HelloAck(success=False, error="invalid GPU key: authentication failed")
    wire = _wire(ack)
    assert wire["success"] is False
    assert "policy" not in wire
    assert "gpu_id" not in wire
    decoded = decode(encode(ack))
    assert isinstance(decoded, HelloAck)
    assert decoded.success is False
    assert decoded.policy is None


# --- Go-compatible shapes (reference §1.2 examples) -----------------------------------------------


def test_go_phase_one_hello_decodes() -> None:
    msg = decode(
        b'{"type":"hello","gpu_key":"adm_abc","capabilities":{"backend":"pending","model":"pending","ctx_size":0}}'
    )
    assert isinstance(msg, Hello)
    assert msg.gpu_key == "adm_abc"
    assert msg.capabilities == Capabilities()
    assert msg.policy_only is False  # Go never sends it


def test_go_phase_two_hello_and_config_decode() -> None:
    msg = decode(
        b'{"type":"hello","gpu_key":"adm_abc","capabilities":{"backend":"llama.cpp",'
        b'"model":"Qwen3-Coder-30B-A3B-Instruct","ctx_size":131072,"parameters":"30B","total_slots":2},'
        b'"worker_type":"gpu"}'
    )
    assert isinstance(msg, Hello)
    assert msg.capabilities.backend == "llama.cpp"
    assert msg.capabilities.model == "Qwen3-Coder-30B-A3B-Instruct"
    assert msg.capabilities.ctx_size == 131072
    assert msg.capabilities.total_slots == 2
    assert msg.capabilities.parameters == "30B"
    assert msg.capabilities.model_capabilities == []

    config = decode(
        b'{"type":"config","capabilities":{"backend":"llama.cpp","model":"Qwen3-Coder-30B-A3B-Instruct",'
        b'"ctx_size":131072,"parameters":"30B","total_slots":2,"model_capabilities":["code"]}}'
    )
    assert isinstance(config, Config)
    assert config.capabilities.model_capabilities == ["code"]


def test_go_token_and_reasoning_token_decode() -> None:
    assert decode(b'{"type":"token","job_id":"chatcmpl-5b1e","token":"Hel"}') == Token("chatcmpl-5b1e", "Hel", False)
    assert decode(b'{"type":"token","job_id":"chatcmpl-5b1e","token":"Let me think","reasoning":true}') == Token(
        "chatcmpl-5b1e", "Let me think", True
    )


def test_go_complete_without_finish_reason_means_stop() -> None:
    msg = decode(
        b'{"type":"complete","job_id":"chatcmpl-5b1e","full_response":"Hello!","duration_ms":412,'
        b'"cache_tokens":3,"input_tokens":9,"output_tokens":4}'
    )
    assert msg == Complete(
        job_id="chatcmpl-5b1e",
        full_response="Hello!",
        finish_reason="stop",
        duration_ms=412,
        input_tokens=9,
        output_tokens=4,
        cache_tokens=3,
    )


def test_go_complete_with_tool_calls_and_cli_only_fields_decodes() -> None:
    msg = decode(
        orjson.dumps(
            {
                "type": "complete",
                "job_id": "j",
                "full_response": "",
                "tool_calls": [
                    {"id": "xml_1a2b3c4d", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
                "total_cost_usd": 0.0,  # CLI-only fields a Go build may define: ignored
                "provider_session_id": "",
            }
        )
    )
    assert isinstance(msg, Complete)
    assert msg.tool_calls[0]["id"] == "xml_1a2b3c4d"
    assert msg.finish_reason == "stop"


def test_go_errors_decode() -> None:
    job_error = decode(
        b'{"type":"error","job_id":"chatcmpl-5b1e","error":"inference error: chat server returned HTTP 400: {}"}'
    )
    assert isinstance(job_error, Error)
    assert job_error.job_id == "chatcmpl-5b1e"
    assert job_error.status == 0
    auth_error = decode(
        b'{"type":"error","error":"invalid GPU key","details":"Authentication failed. Check your admin key."}'
    )
    assert auth_error == Error(error="invalid GPU key", details="Authentication failed. Check your admin key.")


def test_go_heartbeat_and_job_decode() -> None:
    assert decode(b'{"type":"heartbeat"}') == Heartbeat()
    job = decode(
        b'{"type":"job","job_id":"chatcmpl-5b1e","messages":[{"role":"user","content":"Hi"}],"max_tokens":256}'
    )
    assert isinstance(job, Job)
    assert job.max_tokens == 256
    assert job.temperature is None
    assert job.kind == "chat"
    assert job.attempt == 1


def test_go_hello_ack_decodes_with_nested_policy() -> None:
    msg = decode(
        b'{"type":"hello_ack","success":true,"gpu_id":"9f0c","policy":{"model_name":"Qwen3-Coder-30B-A3B",'
        b'"quantization":"Q4_K_S","context_size":131072,"max_parallelism":2,"capabilities":["code"]}}'
    )
    assert isinstance(msg, HelloAck)
    assert isinstance(msg.policy, Policy)
    assert msg.policy.model_name == "Qwen3-Coder-30B-A3B"
    assert msg.policy.max_parallelism == 2
    assert msg.policy.files == []


# --- nested objects -----------------------------------------------------------------------------


def test_nested_capabilities_and_policy_round_trip_as_objects() -> None:
    hello = decode(encode(Hello(gpu_key="k", capabilities=FULL_CAPS)))
    assert isinstance(hello, Hello)
    assert isinstance(hello.capabilities, Capabilities)
    assert hello.capabilities == FULL_CAPS
    ack = decode(encode(HelloAck(success=True, gpu_id="g", policy=FULL_POLICY)))
    assert isinstance(ack, HelloAck)
    assert isinstance(ack.policy, Policy)
    assert ack.policy.files == FULL_POLICY.files
    update = decode(encode(PolicyUpdate(policy=FULL_POLICY)))
    assert isinstance(update, PolicyUpdate)
    assert update.policy == FULL_POLICY


def test_nested_defaults_are_omitted_but_always_fields_kept() -> None:
    caps = Capabilities(backend="llama.cpp", model="m", ctx_size=4096, total_slots=4).to_dict()
    assert caps == {"backend": "llama.cpp", "model": "m", "ctx_size": 4096, "total_slots": 4}
    policy = Policy(model_name="m", context_size=4096).to_dict()
    assert policy == {
        "model_name": "m",
        "quantization": "",
        "context_size": 4096,
        "max_parallelism": 1,
        "capabilities": [],
    }


def test_policy_without_model_name_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        decode(b'{"type":"policy_update","policy":{"quantization":"Q4_K_S"}}')
    with pytest.raises(ProtocolError):
        decode(b'{"type":"hello_ack","success":true,"policy":{"model_name":42}}')


def test_wrong_type_inside_nested_capabilities_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        decode(b'{"type":"hello","gpu_key":"k","capabilities":{"backend":"llama.cpp","model":"m","ctx_size":"big"}}')
    with pytest.raises(ProtocolError):
        decode(b'{"type":"config","capabilities":{"backend":"llama.cpp","model":"m","ctx_size":1,"total_slots":true}}')


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"hello","gpu_key":"k","capabilities":null}',
        b'{"type":"config","capabilities":null}',
        b'{"type":"policy_update","policy":null}',
    ],
)
def test_null_nested_object_never_decodes_to_none(frame: bytes) -> None:
    """The router reads ``hello.capabilities.total_slots`` and the worker ``update.policy.model_name``
    straight after decoding: a null there must be a ProtocolError (or a default), never None."""
    try:
        msg = decode(frame)
    except ProtocolError:
        return
    nested = getattr(msg, "capabilities", None) if not isinstance(msg, PolicyUpdate) else msg.policy
    assert nested is not None, f"{frame!r} decoded with a None nested object: {msg!r}"


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"tool_generating","job_id":"j"}',  # a Go message type this protocol does not have
        b'{"type":"nonsense"}',
        b'{"job_id":"j","token":"x"}',  # no type
        b'{"type":7}',
        b'{"type":null}',
    ],
)
def test_unknown_or_missing_type_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode(frame)


@pytest.mark.parametrize("frame", [b"[]", b'"token"', b"42", b"null", b'[{"type":"heartbeat"}]'])
def test_non_object_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="JSON object"):
        decode(frame)


@pytest.mark.parametrize("frame", [b"", b"{", b"not json", b'{"type":"heartbeat",}', b"\xff\xfe"])
def test_invalid_json_is_a_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid JSON"):
        decode(frame)


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"token","job_id":1,"token":"x"}',
        b'{"type":"token","job_id":"j","token":5}',
        b'{"type":"token","job_id":"j","token":"x","reasoning":"yes"}',
        b'{"type":"token","job_id":"j"}',  # token missing
        b'{"type":"complete","job_id":123}',
        b'{"type":"complete","job_id":"j","tool_calls":{"id":"x"}}',
        b'{"type":"complete","job_id":"j","input_tokens":"9"}',
        b'{"type":"complete","job_id":"j","input_tokens":true}',
        b'{"type":"complete","job_id":"j","duration_ms":1.5}',
        b'{"type":"tool_call_delta","job_id":"j","tool_calls":"x"}',
        b'{"type":"tool_call_delta","job_id":"j"}',
        b'{"type":"hello"}',  # gpu_key missing
        b'{"type":"hello","gpu_key":null}',
        b'{"type":"hello_ack","success":"true"}',
        b'{"type":"hello_ack","success":1}',
        b'{"type":"error"}',
        b'{"type":"error","error":"e","status":"400"}',
        b'{"type":"job","job_id":"j","messages":{"role":"user"}}',
        b'{"type":"job","job_id":"j","params":[]}',
        b'{"type":"job","job_id":"j","stream":"yes"}',
        b'{"type":"dispatched","job_id":"j","worker_id":"w"}',
        b'{"type":"cancel"}',
        b'{"type":"prompt_progress","job_id":"j","total":"10"}',
    ],
)
def test_wrong_or_missing_fields_are_protocol_errors(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(frame)


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"job","job_id":"j","temperature":"hot"}',
        b'{"type":"job","job_id":"j","max_tokens":"256"}',
        b'{"type":"job","job_id":"j","max_tokens":1.5}',
        b'{"type":"complete","job_id":"j","logprobs":"none"}',
    ],
)
def test_optional_fields_with_the_wrong_type_are_protocol_errors(frame: bytes) -> None:
    """Optional fields get the same type guard as the others: a job whose temperature is a string
    would otherwise be forwarded to llama-server and fail there with a confusing error."""
    with pytest.raises(ProtocolError):
        decode(frame)


def test_float_fields_accept_integers() -> None:
    job = decode(b'{"type":"job","job_id":"j","temperature":1,"deadline":1700000000}')
    assert isinstance(job, Job)
    assert job.temperature == 1
    caps = decode(b'{"type":"config","capabilities":{"backend":"b","model":"m","ctx_size":1,"vram_gb":24}}')
    assert isinstance(caps, Config)
    assert caps.capabilities.vram_gb == 24


def test_unknown_fields_are_ignored() -> None:
    msg = decode(b'{"type":"cancel","job_id":"j","reason":"client gone","extra":{"a":1}}')
    assert msg == Cancel(job_id="j")


# --- token fast path ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        Token("j", "plain"),
        Token("j", "", False),
        Token("chatcmpl-abc", "thinking…", True),
        Token("j", 'quotes " and \\ backslash \n newline \u0000 nul', False),
        Token("j", "emoji 🎉 and 中文", True),
    ],
)
def test_token_fast_path_matches_slow_path(token: Token) -> None:
    fast = encode(token)
    slow = orjson.dumps({"type": "token", **proto._fields_to_dict(token)})
    assert orjson.loads(fast) == orjson.loads(slow)
    assert decode(fast) == token
    assert decode(slow) == token
    # the slow decoder, bypassing the fast path, gives the same message
    assert proto._from_dict(Token, orjson.loads(fast)) == token


def test_token_fast_path_ignores_extra_fields_like_the_slow_path() -> None:
    assert decode(b'{"type":"token","job_id":"j","token":"x","seq":5}') == Token("j", "x")
