"""Coalescing of outgoing WebSocket messages: what becomes ready in one loop turn, one frame.

On a GPU that decodes 32 sequences in step, the tokens of 32 jobs reach the worker in the same
event-loop turn. Sent one frame each, they cost 32 frame writes (and 32 syscalls) on the worker
and 32 frame reads, 32 ``orjson.loads`` calls and 32 wake-ups of the socket reader on the router.
:class:`FrameBatcher` lets every sender of the turn append its encoded message, and the first of
them writes everything after one yield to the loop, as one ``batch`` frame
(:func:`auxot_common.protocol.encode_batches`).

The first sender of a turn writes the batch and returns once it was handed to the socket, raising
what the write raised. The others return at once while no earlier write waits for the socket to
drain (the batch is written within this loop turn, by the first sender): waiting for it would
cost every token of every job a future and a task switch. While a write waits for the peer
(back-pressure), every sender waits for its batch, as with a direct write. A failed write leaves
the batcher failed: every later ``send`` raises that error, so the jobs whose messages it carried
learn of it at their next message (a broken socket loses what it buffered either way; the router
treats the worker's jobs as lost when the socket closes). A sender cancelled while it was about
to write for the others hands the write to a task, so their messages are never stranded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from auxot_common.protocol import encode_batches

DEFAULT_MAX_FRAME_BYTES = 1024 * 1024  # a batch stops growing here; a bigger message goes alone


class FrameBatcher:
    """Parameters:
    write: writes one frame (raises ``ConnectionError`` if the socket is gone). It must hand the
        frame to the socket before it waits for anything (aiohttp's ``send_frame`` writes, then
        waits for the socket to drain), so a write cancelled while it waits has sent its frame.
    max_frame_bytes: the largest batch frame to build (the peer's frame limit is far above).
    """

    __slots__ = (
        "_done", "_failed", "_max", "_pending", "_size", "_tasks", "_waiting", "_write", "_writing",
        "frames", "messages",
    )  # fmt: skip

    def __init__(self, write: Callable[[bytes], Awaitable[None]], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self._write = write
        self._max = max_frame_bytes
        self._pending: list[bytes] = []
        self._size = 0
        self._done: asyncio.Future[None] | None = None  # resolves when the pending messages are written
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting = 0  # writes in progress that wait for the socket to drain
        self._failed: Exception | None = None  # the error of a failed write: the socket is broken
        self._writing: asyncio.Task[None] | None = None  # a batch written by a task (see _flush)
        self.frames = 0  # frames written (for benchmarks and tests)
        self.messages = 0  # messages written

    async def send(self, payload: bytes) -> None:
        """Queue one encoded message; return once it was written, or (not the turn's first
        sender, no back-pressure) once the turn's first sender will write it."""
        if self._failed is not None:
            raise self._failed
        done = self._done
        if done is not None:
            self._pending.append(payload)
            self._size += len(payload)
            if self._waiting:  # back-pressure: wait like a direct write would
                await asyncio.shield(done)
            return
        loop = asyncio.get_running_loop()
        done = self._done = loop.create_future()
        done.add_done_callback(_retrieve)
        self._pending.append(payload)
        self._size += len(payload)
        try:
            await asyncio.sleep(0)  # the other senders woken in this turn add their messages now
        except asyncio.CancelledError:
            task = loop.create_task(self._flush(done))  # the others still wait for this write
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            raise
        await self._flush(done)
        done.result()  # this sender's own error, if the write failed

    async def _flush(self, done: asyncio.Future[None]) -> None:
        batch, self._pending, self._size = self._pending, [], 0
        self._done = None  # senders from now on start the next batch
        frames = encode_batches(batch, self._max)
        if self._writing is not None or len(frames) > 1:
            # rare (back-pressure, or over a frame's worth in one turn): the frames are written
            # by a task, after every earlier batch, so that neither a cancelled sender nor a
            # later batch can leave a job's messages unwritten or out of order
            task = asyncio.get_running_loop().create_task(self._write_after(self._writing, frames, len(batch), done))
            self._writing = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            with contextlib.suppress(Exception):
                await asyncio.shield(done)
            return
        # the common case: one frame, nothing before it still being written. The frame is on
        # the socket before the write can wait (aiohttp writes, then drains), so a sender
        # cancelled while it waits for the drain has still sent everyone's messages.
        self._waiting += 1
        try:
            await self._write(frames[0])
        except Exception as exc:
            self._fail(done, exc)
            return
        except asyncio.CancelledError:
            self._written(done, 1, len(batch))
            raise
        finally:
            self._waiting -= 1
        self._written(done, 1, len(batch))

    async def _write_after(
        self, previous: asyncio.Task[None] | None, frames: list[bytes], count: int, done: asyncio.Future[None]
    ) -> None:
        written = 0
        try:
            if previous is not None:
                await asyncio.wait([previous])  # its outcome is its senders' concern: only its end matters
            self._waiting += 1  # until this batch is written: senders of later turns wait for theirs
            try:
                for frame in frames:
                    if self._failed is not None:
                        raise self._failed
                    await self._write(frame)
                    written += 1
            finally:
                self._waiting -= 1
        except Exception as exc:
            self.frames += written
            self._fail(done, exc)
        else:
            self._written(done, written, count)
        finally:
            if self._writing is asyncio.current_task():
                self._writing = None

    def _written(self, done: asyncio.Future[None], frames: int, messages: int) -> None:
        self.frames += frames
        self.messages += messages
        if not done.done():
            done.set_result(None)

    def _fail(self, done: asyncio.Future[None], error: Exception) -> None:
        self._failed = error  # the socket is broken: every later send raises this
        if not done.done():
            done.set_exception(error)

    async def close(self) -> None:
        """Wait for a write handed to a task (a cancelled sender's) to finish."""
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task


def _retrieve(future: asyncio.Future[None]) -> None:
    """A failed batch whose senders were all cancelled must not log 'exception never retrieved'."""
    if not future.cancelled():
        future.exception()
