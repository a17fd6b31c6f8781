"""Batch frames (``auxot_common.protocol`` ``batch``) and the worker's sender that builds them
(``auxot_common.sendbatch.FrameBatcher``)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from auxot_common import protocol as proto
from auxot_common.sendbatch import FrameBatcher


def test_batch_frame_round_trip_keeps_every_message_in_order() -> None:
    messages: list[proto.Message] = [
        proto.Token(job_id="a", token=" tok"),
        proto.Token(job_id="b", token=" think", reasoning=True),
        proto.ToolCallDelta(job_id="c", tool_calls=[{"index": 0, "function": {"arguments": "{"}}]),
        proto.Complete(job_id="a", full_response="x", finish_reason="length", output_tokens=3),
        proto.Heartbeat(),
    ]
    frame = proto.encode_batch([proto.encode(m) for m in messages])
    decoded = proto.decode(frame)
    assert isinstance(decoded, proto.Batch)
    assert decoded.messages == messages
    assert proto.decode(proto.encode(decoded)) == decoded  # encode() of a Batch is the same frame
    assert orjson.loads(frame)["type"] == "batch"


def test_a_batch_of_one_is_the_plain_message() -> None:
    payload = proto.encode(proto.Token(job_id="a", token=" tok"))
    assert proto.encode_batch([payload]) == payload


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"batch","messages":{"type":"heartbeat"}}',
        b'{"type":"batch"}',
        b'{"type":"batch","messages":[{"type":"batch","messages":[]}]}',
        b'{"type":"batch","messages":[{"type":"token","job_id":1,"token":"x"}]}',
        b'{"type":"batch","messages":["heartbeat"]}',
        b'{"type":"batch","messages":[{"type":"nope"}]}',
    ],
)
def test_malformed_batches_are_protocol_errors(frame: bytes) -> None:
    with pytest.raises(proto.ProtocolError):
        proto.decode(frame)


def test_hello_ack_announces_batch_support_only_when_set() -> None:
    assert "batch" not in orjson.loads(proto.encode(proto.HelloAck(success=True)))
    ack = proto.decode(proto.encode(proto.HelloAck(success=True, batch=True)))
    assert isinstance(ack, proto.HelloAck) and ack.batch
    old_router = proto.decode(b'{"type":"hello_ack","success":true,"gpu_id":"g"}')  # a Go router
    assert isinstance(old_router, proto.HelloAck) and not old_router.batch


class Socket:
    """Records frames; can fail or stall its writes."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def write(self, frame: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.frames.append(frame)  # on the socket first, then wait for it to drain (as aiohttp does)
        if self.gate is not None:
            await self.gate.wait()

    def messages(self) -> list[proto.Message]:
        out: list[proto.Message] = []
        for frame in self.frames:
            message = proto.decode(frame)
            out.extend(message.messages if isinstance(message, proto.Batch) else [message])
        return out


def token(job: str, text: str = " tok") -> bytes:
    return proto.encode(proto.Token(job_id=job, token=text))


async def test_messages_ready_in_one_loop_turn_share_one_frame() -> None:
    sock = Socket()
    batcher = FrameBatcher(sock.write)
    await asyncio.gather(*(batcher.send(token(f"job{i}")) for i in range(32)))
    assert len(sock.frames) == 1
    assert [m.job_id for m in sock.messages()] == [f"job{i}" for i in range(32)]  # type: ignore[union-attr]
    assert (batcher.frames, batcher.messages) == (1, 32)


async def test_one_job_alone_sends_plain_frames_in_order() -> None:
    sock = Socket()
    batcher = FrameBatcher(sock.write)
    for text in ("a", "b", "c"):
        await batcher.send(token("only", text))
    assert [orjson.loads(f)["type"] for f in sock.frames] == ["token"] * 3  # a Go-style frame each
    assert [m.token for m in sock.messages()] == ["a", "b", "c"]  # type: ignore[union-attr]


async def test_batches_split_at_the_frame_limit_and_keep_order() -> None:
    sock = Socket()
    batcher = FrameBatcher(sock.write, max_frame_bytes=200)
    big = proto.encode(proto.Complete(job_id="big", full_response="x" * 500))
    payloads = [token("a"), token("b"), big, token("c")]
    await asyncio.gather(*(batcher.send(p) for p in payloads))
    assert len(sock.frames) == 3  # [a, b] | big alone | [c]
    assert sock.frames[1] == big
    assert [m.job_id for m in sock.messages()] == ["a", "b", "big", "c"]  # type: ignore[union-attr]


async def test_a_failed_write_raises_in_its_writer_and_in_every_later_send() -> None:
    sock = Socket()
    sock.fail = ConnectionResetError("gone")
    batcher = FrameBatcher(sock.write)
    results = await asyncio.gather(*(batcher.send(token(f"j{i}")) for i in range(3)), return_exceptions=True)
    assert isinstance(results[0], ConnectionResetError)  # the turn's first sender wrote the batch
    assert results[1:] == [None, None]  # the others had returned before the write
    sock.fail = None
    for job in ("j1", "j2", "after"):  # the socket is broken: every job learns it at its next message
        with pytest.raises(ConnectionResetError):
            await batcher.send(token(job))
    assert sock.frames == []


async def test_a_cancelled_first_sender_does_not_strand_the_others() -> None:
    sock = Socket()
    batcher = FrameBatcher(sock.write)
    first = asyncio.ensure_future(batcher.send(token("first")))
    await asyncio.sleep(0)  # first is now waiting for the turn to end
    second = asyncio.ensure_future(batcher.send(token("second")))
    first.cancel()
    await second
    await batcher.close()
    assert {m.job_id for m in sock.messages()} == {"first", "second"}  # type: ignore[union-attr]
    assert first.cancelled()


async def test_senders_wait_while_a_write_waits_for_the_socket() -> None:
    sock = Socket()
    sock.gate = asyncio.Event()
    batcher = FrameBatcher(sock.write)
    early = [asyncio.ensure_future(batcher.send(token(f"e{i}"))) for i in range(2)]
    await asyncio.sleep(0.01)
    # the first sender writes and waits for the socket; the other had handed it its message
    assert [t.done() for t in early] == [False, True]
    late = [asyncio.ensure_future(batcher.send(token(f"late{i}"))) for i in range(2)]
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in late)  # back-pressure: a later turn waits for the socket
    sock.gate.set()
    await asyncio.gather(*early, *late)
    assert len(sock.frames) == 2  # a batch per turn
    assert [m.job_id for m in sock.messages()] == ["e0", "e1", "late0", "late1"]  # type: ignore[union-attr]


async def test_senders_after_the_first_return_within_the_turn_and_are_written_in_it() -> None:
    sock = Socket()
    batcher = FrameBatcher(sock.write)
    first = asyncio.ensure_future(batcher.send(token("first")))
    await asyncio.sleep(0)  # the first sender waits for the turn to end
    await batcher.send(token("second"))  # returns at once: no write waits for the socket
    assert sock.frames == [] and not first.done()
    await first
    assert len(sock.frames) == 1
    assert [m.job_id for m in sock.messages()] == ["first", "second"]  # type: ignore[union-attr]


async def test_a_batch_of_several_frames_is_written_whole_and_before_later_batches() -> None:
    sock = Socket()
    sock.gate = asyncio.Event()
    batcher = FrameBatcher(sock.write, max_frame_bytes=120)  # two messages a frame
    first_turn = [asyncio.ensure_future(batcher.send(token(f"j{i}", "a"))) for i in range(4)]
    await asyncio.sleep(0.01)  # its first frame is on the socket, which does not drain
    first_turn[0].cancel()  # the sender that started the batch goes away mid-write
    second_turn = [asyncio.ensure_future(batcher.send(token(f"j{i}", "b"))) for i in range(4)]
    await asyncio.sleep(0.01)
    assert len(sock.frames) == 1 and not any(t.done() for t in second_turn)  # back-pressure
    sock.gate.set()
    await asyncio.gather(*first_turn[1:], *second_turn)
    await batcher.close()
    assert first_turn[0].cancelled()
    sent = [(m.job_id, m.token) for m in sock.messages()]  # type: ignore[union-attr]
    for job in ("j0", "j1", "j2", "j3"):  # nothing stranded, and each job's messages in order
        assert [text for j, text in sent if j == job] == ["a", "b"]
    assert len(sock.frames) == 4
