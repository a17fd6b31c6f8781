"""The worker's shortcut for the common llama-server chunk (one choice's ``delta.content`` and
nothing else, issue 12) sends exactly what reading every field sends, for every chunk shape a
stream can hold; and a chunk that is anything more never takes it."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

import auxot_worker as w
from auxot_common import protocol as proto

META = {"created": 1796535534, "id": "chatcmpl-x", "model": "m", "system_fingerprint": "b1", "object": "c"}


def chunk(delta: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {"finish_reason": None, "index": 0, "delta": delta if delta is not None else {}}
    choice.update(extra.pop("choice", {}))
    return {"choices": [choice], **META, **extra}


def content(text: str, **extra: Any) -> dict[str, Any]:
    return chunk({"content": text}, **extra)


LOGPROBS = {"content": [{"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}]}
SHAPES: dict[str, dict[str, Any]] = {
    "plain": content(" tok"),
    "unicode": content('é"\\\n😀'),
    "think tag": content("<think>"),
    "role": chunk({"role": "assistant", "content": None}),
    "role and text": chunk({"role": "assistant", "content": "hi"}),
    "empty text": content(""),
    "null text": chunk({"content": None}),
    "finish": chunk({}, choice={"finish_reason": "stop"}),
    "text and finish": content("end", choice={"finish_reason": "length"}),
    "logprobs": content("a", choice={"logprobs": LOGPROBS}),
    "usage": content("u", usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}),
    "timings": content("t", timings={"prompt_ms": 1.5, "predicted_n": 1}),
    "progress": content("p", prompt_progress={"total": 9, "cache": 2, "processed": 9}),
    "reasoning": chunk({"reasoning_content": "hmm"}),
    "tool call": chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f"}}]}),
    "two choices": {"choices": [content("a")["choices"][0], content("b")["choices"][0]], **META},
    "legacy text": {"choices": [{"text": "x", "index": 0, "finish_reason": None}], **META},
    "unknown field": content("x", something_new=1),
}


def job(**params: Any) -> proto.Job:
    return proto.Job(job_id="j", model="m", messages=[{"role": "user", "content": "hi"}], stream=True, params=params)


async def through_handler(job_: proto.Job, chunks: list[dict[str, Any]]) -> tuple[list[proto.Message], w.JobResult]:
    sent: list[proto.Message] = []

    async def send(message: proto.Message) -> None:
        sent.append(message)

    runner = w.JobRunner(session=None, llama=None, send=send)  # type: ignore[arg-type]
    result = w.new_result(job_)
    for c in chunks:
        await runner._handle_events(job_, [orjson.dumps(c)], result)
    return sent, result


def field_by_field(job_: proto.Job, chunks: list[dict[str, Any]]) -> tuple[list[proto.Message], w.JobResult]:
    sent: list[proto.Message] = []
    result = w.new_result(job_)
    for c in chunks:
        outgoing: list[proto.Message] = []
        w.apply_chunk(job_, copy.deepcopy(c), result, outgoing)
        sent += outgoing
    return sent, result


def state(result: w.JobResult) -> tuple[Any, ...]:
    return (result.finish_reason, result.usage, result.timings, result.logprobs, result.tool_calls,
            result.parser.content, result.parser.reasoning)  # fmt: skip


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("params", [{}, {"stop": ["zz"]}], ids=["no stop", "stop strings"])
async def test_each_chunk_shape_after_a_plain_one_sends_what_reading_every_field_sends(
    name: str, params: dict[str, Any]
) -> None:
    chunks = [content("a"), SHAPES[name], content(" b"), content("c")]
    sent, result = await through_handler(job(**params), chunks)
    expected, reference = field_by_field(job(**params), chunks)
    assert sent == expected
    assert state(result) == state(reference)


def test_only_a_single_content_delta_is_plain() -> None:
    plain = {name for name, c in SHAPES.items() if w.plain_content(c) is not None}
    assert plain == {"plain", "unicode", "think tag"}
