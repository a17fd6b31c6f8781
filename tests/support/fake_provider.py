"""A local fake upstream provider: OpenAI chat completions / responses and Anthropic messages.

It streams like the real services (OpenAI ``chat.completion.chunk`` events with a usage chunk
when asked, ``[DONE]``; Anthropic ``message_start`` ... ``message_stop``), records every request
it gets (path, headers, JSON body) and every stream its client abandoned, and can be told to
answer the next requests with an HTTP error (a 429 with ``Retry-After``, a 401, ...).

:class:`ServerThread` runs any aiohttp app on 127.0.0.1 in a thread of its own, so synchronous
SDK clients in a test can talk to it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeProvider:
    """The behaviour of the fake; change attributes between requests."""

    words: list[str] = field(default_factory=lambda: ["Hello", " from", " upstream", "."])
    delay_s: float = 0.0  # between streamed words
    linger_s: float = 0.0  # after the final event, before the stream ends (the connection stays open)
    tool_call: tuple[str, dict[str, Any]] | None = None  # (name, arguments) answered instead of text
    fail: list[tuple[int, dict[str, str], dict[str, Any]]] = field(default_factory=list)  # queued errors
    prompt_tokens: int = 11
    cached_tokens: int = 3
    requests: list[Recorded] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def fail_next(self, status: int, *, retry_after: str | None = None, message: str = "slow down") -> None:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self.fail.append((status, headers, {"error": {"message": message, "type": "rate_limit_error"}}))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        return app

    async def _record(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        body = orjson.loads(await request.read())
        self.requests.append(Recorded(request.path, dict(request.headers), body))
        if self.fail:
            status, headers, error = self.fail.pop(0)
            return body, web.json_response(error, status=status, headers=headers)
        return body, None

    async def _stream(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for event in events:
                await response.write(event)
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
            if self.linger_s:
                await asyncio.sleep(self.linger_s)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled.append(request.path)
            raise
        self.finished.append(request.path)
        return response

    # --- OpenAI chat completions ----------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, error = await self._record(request)
        if error is not None:
            return error
        model = body.get("model", "")
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.words),
            "total_tokens": self.prompt_tokens + len(self.words),
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(self.words)}
            finish = "stop"
            if self.tool_call:
                name, args = self.tool_call
                message = {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": name, "arguments": orjson.dumps(args).decode()},
                        }
                    ],
                }
                finish = "tool_calls"
            self.finished.append(request.path)
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                }
            )
        head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

        events = [chunk({"role": "assistant", "content": ""})]
        if self.tool_call:
            name, args = self.tool_call
            text = orjson.dumps(args).decode()
            start = {"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": ""}}
            events.append(chunk({"tool_calls": [start]}))
            half = len(text) // 2
            for part in (text[:half], text[half:]):
                events.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
            events.append(chunk({}, "tool_calls"))
        else:
            events += [chunk({"content": word}) for word in self.words]
            events.append(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events)

    # --- OpenAI responses -----------------------------------------------------------------------

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body, error = await self._record(request)
        if error is not None:
            return error
        text = "".join(self.words)
        usage = {
            "input_tokens": self.prompt_tokens,
            "output_tokens": len(self.words),
            "total_tokens": self.prompt_tokens + len(self.words),
        }
        response = {
            "id": "resp_fake",
            "object": "response",
            "created_at": int(time.time()),
            "model": body.get("model", ""),
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "id": "msg_fake",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": usage,
        }
        if not body.get("stream"):
            self.finished.append(request.path)
            return web.json_response(response)

        def event(kind: str, data: dict[str, Any]) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"

        events = [event("response.created", {"response": {**response, "status": "in_progress", "output": []}})]
        events += [
            event(
                "response.output_text.delta", {"item_id": "msg_fake", "output_index": 0, "content_index": 0, "delta": w}
            )
            for w in self.words
        ]
        events.append(event("response.completed", {"response": response}))
        return await self._stream(request, events)

    # --- Anthropic messages ---------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body, error = await self._record(request)
        if error is not None:
            return error
        model = body.get("model", "")
        fresh = self.prompt_tokens - self.cached_tokens
        usage_in = {
            "input_tokens": fresh,
            "cache_read_input_tokens": self.cached_tokens,
            "cache_creation_input_tokens": 0,
        }
        if self.tool_call:
            name, args = self.tool_call
            content: list[dict[str, Any]] = [{"type": "tool_use", "id": "toolu_1", "name": name, "input": args}]
            stop = "tool_use"
        else:
            content = [{"type": "text", "text": "".join(self.words)}]
            stop = "end_turn"
        if not body.get("stream"):
            self.finished.append(request.path)
            return web.json_response(
                {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": content,
                    "stop_reason": stop,
                    "stop_sequence": None,
                    "usage": {**usage_in, "output_tokens": len(self.words)},
                }
            )

        def event(kind: str, data: dict[str, Any]) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"

        message = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage_in, "output_tokens": 1},
        }
        events = [event("message_start", {"message": message}), event("ping", {})]
        if self.tool_call:
            name, args = self.tool_call
            text = orjson.dumps(args).decode()
            block = {"type": "tool_use", "id": "toolu_1", "name": name, "input": {}}
            events.append(event("content_block_start", {"index": 0, "content_block": block}))
            half = len(text) // 2
            for part in (text[:half], text[half:]):
                delta = {"type": "input_json_delta", "partial_json": part}
                events.append(event("content_block_delta", {"index": 0, "delta": delta}))
        else:
            events.append(event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
            events += [
                event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}})
                for w in self.words
            ]
        events.append(event("content_block_stop", {"index": 0}))
        ending: dict[str, Any] = {
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": len(self.words)},
        }
        events.append(event("message_delta", ending))
        events.append(event("message_stop", {}))
        return await self._stream(request, events)


class ServerThread:
    """An aiohttp app served on 127.0.0.1 from a thread with its own event loop."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def __enter__(self) -> ServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
