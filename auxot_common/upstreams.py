"""Upstream providers: OpenAI- or Anthropic-compatible endpoints beyond our own GPUs.

An upstream is configured in the models file (``[upstreams.NAME]``) with its API kind, base URL,
the *name* of the environment variable holding its key, the upstream model id, and the API key
names allowed to use it (sending a prompt off-premises must never be a surprise). A local model
may name one as its fallback: ``when = "no-worker"`` (no worker for the model is connected),
``"overflow"`` (the job waited longer than ``after_s`` without being dispatched: the router
takes it out of the queue first, so it never runs twice) or ``"always"`` (the model is just an
alias of the upstream).

:func:`relay` answers one caller request through an upstream:

- the caller's API and the upstream's may differ: an Anthropic caller can use an OpenAI upstream
  (the request goes through :func:`auxot_common.anthropic_api.translate_request`, the same
  translation the worker path uses) and an OpenAI caller an Anthropic upstream
  (:func:`openai_to_anthropic`); the upstream's stream is read into protocol messages and
  written with the caller API's own encoder (``OpenAIChatStream``, ``AnthropicStream``);
- when they match, the upstream's events are passed through as they arrive (never buffered
  beyond one event), reading the usage on the way;
- when the caller leaves, the upstream response is closed (the upstream sees the disconnect);
- upstream errors become errors in the caller's shape; a 429 keeps its ``Retry-After``;
- the upstream key is only ever put in the upstream request's header: never in a log line, an
  error message, ``repr`` or ``/health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

from auxot_common import anthropic_api as anthropic
from auxot_common import protocol as proto
from auxot_common.openai_api import (
    OpenAIChatStream,
    RequestError,
    chat_completion_body,
    parse_chat_request,
)

log = logging.getLogger("auxot.upstreams")

JSONObject = dict[str, Any]

APIS: Final = ("openai", "anthropic")
WHEN: Final = ("no-worker", "overflow", "always")
CALLER_APIS: Final = ("chat", "messages", "responses")
ANTHROPIC_VERSION: Final = "2023-06-01"
MAX_EVENT_BYTES: Final = 4 * 1024 * 1024  # one SSE event (a long tool-call argument fits)
MAX_BODY_BYTES: Final = 32 * 1024 * 1024  # a non-streaming answer
MAX_ERROR_BYTES: Final = 64 * 1024
DEFAULT_MAX_TOKENS: Final = 4096  # Anthropic requires max_tokens; OpenAI callers may leave it out
_THINKING_BUDGETS: Final = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# What an OpenAI-compatible upstream accepts from the llama-server parameters of a translated request.
_OPENAI_PARAMS: Final = ("top_p", "stop", "seed", "response_format", "tool_choice", "parallel_tool_calls")
_OPENAI_MESSAGE_KEYS: Final = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})


class ConfigError(ValueError):
    """An invalid upstream or fallback setting: one line, said at startup."""


# --- configuration -----------------------------------------------------------------------------


@dataclass(slots=True)
class UpstreamSpec:
    """One upstream provider. ``key`` is read from ``key_env`` at load time and never shown."""

    name: str
    api: str  # "openai" (chat completions, responses) or "anthropic" (messages)
    base_url: str  # with the version prefix: https://api.openai.com/v1, https://api.anthropic.com/v1
    model: str  # the model id the upstream knows
    key_env: str = ""
    keys: frozenset[str] = frozenset()  # API key names allowed to use it; "*" for every key
    timeout: float = 300.0  # seconds without a byte from the upstream
    context: int = 0  # the model's context, when known (for automatic choice)
    capabilities: frozenset[str] = frozenset({"chat", "tools"})
    key: str = field(default="", repr=False)

    def may_use(self, key_name: str) -> bool:
        """Whether the API key called ``key_name`` may send prompts to this upstream."""
        return "*" in self.keys or key_name in self.keys

    def public(self) -> JSONObject:
        """What ``/health`` and ``/v1/models`` may show: never the key, not even its variable."""
        return {"name": self.name, "api": self.api, "model": self.model}


@dataclass(slots=True)
class FallbackSpec:
    """When a local model's requests go to an upstream."""

    upstream: str
    when: str = "no-worker"
    after_s: float = 30.0  # overflow: the longest a job waits for a worker

    def at_arrival(self, workers_serving: int) -> bool:
        """Send the request upstream right away (``always``, or ``no-worker`` with none connected)."""
        return self.when == "always" or (self.when == "no-worker" and workers_serving == 0)

    def overflow_due(self, waited_s: float, dispatched: bool) -> bool:
        """Divert a queued job: it waited longer than ``after_s`` and no worker has it yet."""
        return self.when == "overflow" and not dispatched and waited_s >= self.after_s


_UPSTREAM_KEYS: Final = frozenset(
    {"api", "base_url", "model", "key_env", "keys", "timeout_s", "context", "capabilities"}
)


def parse_upstreams(raw: Any, env: Mapping[str, str] | None = None) -> dict[str, UpstreamSpec]:
    """The ``[upstreams.NAME]`` tables of the models file.

    :raises ConfigError: one line naming the upstream and the problem. A ``key_env`` that is
        not set is an error (the variable's name is said, never a value).
    """
    env = os.environ if env is None else env
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("[upstreams] must be a table of tables ([upstreams.NAME])")
    specs: dict[str, UpstreamSpec] = {}
    for name, table in raw.items():
        where = f"[upstreams.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = sorted(set(table) - _UPSTREAM_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(_UPSTREAM_KEYS))})")
        api = table.get("api", "openai")
        if api not in APIS:
            raise ConfigError(f"{where} api must be 'openai' or 'anthropic', not {api!r}")
        base_url = table.get("base_url")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where} base_url must be an http(s) URL")
        model = table.get("model")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where} model (the upstream's model id) is required")
        key_env = table.get("key_env", "")
        if not isinstance(key_env, str):
            raise ConfigError(f"{where} key_env must be the name of an environment variable")
        key = ""
        if key_env:
            key = env.get(key_env, "")
            if not key:
                raise ConfigError(f"{where} key_env: the environment variable {key_env} is not set")
        keys = table.get("keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(f"{where} keys must list the API key names allowed to use it ('*' for all)")
        timeout = table.get("timeout_s", 300)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise ConfigError(f"{where} timeout_s must be a positive number")
        context = table.get("context", 0)
        if not isinstance(context, int) or isinstance(context, bool) or context < 0:
            raise ConfigError(f"{where} context must be a non-negative integer")
        capabilities = table.get("capabilities", ["chat", "tools"])
        if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
            raise ConfigError(f"{where} capabilities must be a list of strings")
        specs[name] = UpstreamSpec(
            name=name,
            api=api,
            base_url=base_url.rstrip("/"),
            model=model,
            key_env=key_env,
            keys=frozenset(keys),
            timeout=float(timeout),
            context=context,
            capabilities=frozenset(c.lower() for c in capabilities),
            key=key,
        )
    return specs


def parse_fallback(raw: Any, upstreams: Mapping[str, UpstreamSpec], model: str) -> FallbackSpec:
    """A model's ``fallback = {upstream = "...", when = "...", after_s = N}``."""
    where = f"model {model!r} fallback"
    if isinstance(raw, str):
        raw = {"upstream": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table {{upstream = NAME, when = ...}}")
    unknown = sorted(set(raw) - {"upstream", "when", "after_s"})
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}")
    name = raw.get("upstream")
    if name not in upstreams:
        known = ", ".join(upstreams) or "none configured"
        raise ConfigError(f"{where}: upstream {name!r} is not configured (configured: {known})")
    when = raw.get("when", "no-worker")
    if when not in WHEN:
        raise ConfigError(f"{where}: when must be one of {', '.join(WHEN)}, not {when!r}")
    after = raw.get("after_s", 30)
    if not isinstance(after, int | float) or isinstance(after, bool) or after < 0:
        raise ConfigError(f"{where}: after_s must be a non-negative number of seconds")
    return FallbackSpec(upstream=str(name), when=when, after_s=float(after))


# --- usage and statistics ----------------------------------------------------------------------


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0  # the whole prompt, cache hits included
    output_tokens: int = 0
    cached_tokens: int = 0


@dataclass(slots=True)
class UpstreamStats:
    """Counters of one upstream, for ``/metrics`` and ``/health``."""

    requests: int = 0
    errors: int = 0
    rate_limited: int = 0
    cancelled: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def count(self, usage: Usage) -> None:
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens


def _openai_usage(raw: Any) -> Usage | None:
    """Chat completions (``prompt_tokens``) or responses (``input_tokens``) usage."""
    if not isinstance(raw, dict):
        return None
    details = raw.get("prompt_tokens_details") or raw.get("input_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return Usage(
        input_tokens=_int(raw.get("prompt_tokens", raw.get("input_tokens"))),
        output_tokens=_int(raw.get("completion_tokens", raw.get("output_tokens"))),
        cached_tokens=_int(cached),
    )


def _anthropic_usage(raw: Any, usage: Usage) -> None:
    """Anthropic counts cache reads and writes apart from ``input_tokens``; ours include them."""
    if not isinstance(raw, dict):
        return
    if "input_tokens" in raw:
        read = _int(raw.get("cache_read_input_tokens"))
        usage.input_tokens = _int(raw.get("input_tokens")) + read + _int(raw.get("cache_creation_input_tokens"))
        usage.cached_tokens = read
    if "output_tokens" in raw:
        usage.output_tokens = _int(raw.get("output_tokens"))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# --- request translation: OpenAI chat -> Anthropic messages ----------------------------------------


def openai_to_anthropic(body: JSONObject, model: str) -> JSONObject:
    """A validated chat completions body as a streaming Messages request.

    System and developer messages become ``system``; tool results become ``tool_result`` blocks
    in a user turn (consecutive results share one turn, as Anthropic requires); assistant tool
    calls become ``tool_use`` blocks; ``image_url`` parts become image blocks; ``reasoning_effort``
    becomes a thinking budget when it fits under ``max_tokens``.
    """
    system: list[str] = []
    messages: list[JSONObject] = []
    for message in body.get("messages") or []:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_openai_text(message.get("content")))
        elif role == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": str(message.get("tool_call_id") or ""),
                "content": _openai_text(message.get("content")),
            }
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "user" and _all_tool_results(previous["content"]):
                previous["content"].append(result)
            else:
                messages.append({"role": "user", "content": [result]})
        elif role == "assistant":
            blocks: list[JSONObject] = []
            text = _openai_text(message.get("content"))
            if text:
                blocks.append({"type": "text", "text": text})
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": str(call.get("id") or ""),
                        "name": str(function.get("name") or ""),
                        "input": _arguments(function.get("arguments")),
                    }
                )
            messages.append({"role": "assistant", "content": blocks or [{"type": "text", "text": ""}]})
        else:
            messages.append({"role": "user", "content": _user_blocks(message.get("content"))})
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    out: JSONObject = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}
    if system:
        out["system"] = "\n\n".join(s for s in system if s)
    if isinstance(body.get("temperature"), int | float):
        out["temperature"] = min(1.0, float(body["temperature"]))  # Anthropic's range is 0..1
    if isinstance(body.get("top_p"), int | float):
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = body.get("tools") or []
    if tools:
        out["tools"] = [
            {
                "name": (t.get("function") or {}).get("name", ""),
                "description": (t.get("function") or {}).get("description", ""),
                "input_schema": (t.get("function") or {}).get("parameters") or {"type": "object"},
            }
            for t in tools
        ]
        choice = _anthropic_tool_choice(body.get("tool_choice"))
        if choice is not None:
            out["tool_choice"] = choice
    budget = _THINKING_BUDGETS.get(str(body.get("reasoning_effort") or ""))
    if budget is not None and budget < max_tokens:
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
        out.pop("temperature", None)  # Anthropic refuses a temperature with thinking
    return out


def _openai_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _all_tool_results(content: Any) -> bool:
    return isinstance(content, list) and all(b.get("type") == "tool_result" for b in content)


def _user_blocks(content: Any) -> str | list[JSONObject]:
    if not isinstance(content, list):
        return _openai_text(content)
    blocks: list[JSONObject] = []
    for part in content:
        if part.get("type") == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                blocks.append({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
            elif isinstance(url, str) and url:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
    return blocks


def _arguments(arguments: Any) -> JSONObject:
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str) and arguments:
        with contextlib.suppress(orjson.JSONDecodeError):
            parsed = orjson.loads(arguments)
            if isinstance(parsed, dict):
                return parsed
    return {}


def _anthropic_tool_choice(choice: Any) -> JSONObject | None:
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"type": "tool", "name": choice["function"].get("name", "")}
    return None


def anthropic_to_openai(chat: anthropic.ChatRequest, model: str) -> JSONObject:
    """A translated Messages request (the worker path's translation) as an OpenAI chat body.

    Only parameters an OpenAI-compatible server accepts travel; llama-server's own
    (``top_k``, ``chat_template_kwargs``, budgets) stay behind.
    """
    messages = [{k: v for k, v in m.items() if k in _OPENAI_MESSAGE_KEYS} for m in chat.messages]
    out: JSONObject = {
        "model": model,
        "messages": messages,
        "max_tokens": chat.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat.tools:
        out["tools"] = chat.tools
    if chat.temperature is not None:
        out["temperature"] = chat.temperature
    for name in _OPENAI_PARAMS:
        if name in chat.params:
            out[name] = chat.params[name]
    kwargs = chat.params.get("chat_template_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("enable_thinking") is True and chat.reasoning_effort:
        out["reasoning_effort"] = chat.reasoning_effort
    return out


# --- reading an upstream stream ----------------------------------------------------------------


class SSEParser:
    """Cuts a byte stream into server-sent events, each with its raw bytes (for pass-through)."""

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, chunk: bytes) -> list[tuple[bytes, str, str]]:
        """Complete events so far: ``(raw bytes, event name, data)``. Raises ValueError beyond the limit."""
        self._buffer += chunk
        if b"\r" in self._buffer:  # CRLF lines; the whole (partial-event) buffer, so a split CRLF joins too
            self._buffer = bytearray(self._buffer.replace(b"\r\n", b"\n"))
        events: list[tuple[bytes, str, str]] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                if len(self._buffer) > self._limit:
                    raise ValueError("an upstream event is larger than the limit")
                return events
            raw = bytes(self._buffer[: end + 2])
            del self._buffer[: end + 2]
            name, data = "", []
            for line in raw.decode("utf-8", "replace").split("\n"):
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
            if name or data:
                events.append((raw, name, "\n".join(data)))


class OpenAIReader:
    """An OpenAI chat completions stream as protocol messages (what a worker would send)."""

    def __init__(self, job_id: str = "upstream") -> None:
        self.job_id = job_id
        self.usage = Usage()
        self.model = ""
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, JSONObject] = {}
        self._finish = "stop"
        self.ended = False  # the stream's final event came: nothing more to read

    def on_event(self, data: str) -> list[proto.Message]:
        if data.strip() == "[DONE]":
            self.ended = True
            return []
        chunk = orjson.loads(data)
        if isinstance(chunk.get("error"), dict):
            return [proto.Error(str(chunk["error"].get("message") or "upstream error"), job_id=self.job_id)]
        self.model = chunk.get("model") or self.model
        usage = _openai_usage(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
        out: list[proto.Message] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                self._reasoning.append(reasoning)
                out.append(proto.Token(self.job_id, reasoning, reasoning=True))
            if isinstance(delta.get("content"), str) and delta["content"]:
                self._text.append(delta["content"])
                out.append(proto.Token(self.job_id, delta["content"]))
            if delta.get("tool_calls"):
                for call in delta["tool_calls"]:
                    self._merge_call(call)
                out.append(proto.ToolCallDelta(self.job_id, delta["tool_calls"]))
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return out

    def _merge_call(self, call: JSONObject) -> None:
        index = call.get("index", 0)
        entry = self._calls.setdefault(index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        entry["id"] = call.get("id") or entry["id"]
        function = call.get("function") or {}
        entry["function"]["name"] += function.get("name") or ""
        entry["function"]["arguments"] += function.get("arguments") or ""

    def complete(self) -> proto.Complete:
        return proto.Complete(
            job_id=self.job_id,
            full_response="".join(self._text),
            finish_reason=self._finish,
            input_tokens=self.usage.input_tokens,
            output_tokens=self.usage.output_tokens,
            cache_tokens=self.usage.cached_tokens,
            tool_calls=[self._calls[i] for i in sorted(self._calls)],
            reasoning_content="".join(self._reasoning),
        )


_ANTHROPIC_FINISH: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


class AnthropicReader:
    """An Anthropic Messages stream as protocol messages (tool_use blocks as OpenAI tool calls)."""

    def __init__(self, job_id: str = "upstream") -> None:
        self.job_id = job_id
        self.usage = Usage()
        self.model = ""
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: list[JSONObject] = []
        self._tool_index: dict[int, int] = {}  # content block index -> tool call index
        self._finish = "stop"
        self.ended = False  # the stream's final event came: nothing more to read

    def on_event(self, event: str, data: str) -> list[proto.Message]:
        obj = orjson.loads(data) if data else {}
        kind = obj.get("type", event)
        self.ended = self.ended or kind == "message_stop"
        if kind == "message_start":
            message = obj.get("message") or {}
            self.model = message.get("model") or ""
            _anthropic_usage(message.get("usage"), self.usage)
        elif kind == "content_block_start":
            block = obj.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = len(self._calls)
                self._tool_index[obj.get("index", 0)] = index
                call = {
                    "id": block.get("id", ""),
                    "type": "function",
                    "function": {"name": block.get("name", ""), "arguments": ""},
                }
                self._calls.append(call)
                return [
                    proto.ToolCallDelta(self.job_id, [{"index": index, **call, "function": dict(call["function"])}])
                ]
            if block.get("type") == "text" and block.get("text"):
                return self._token(block["text"], False)
        elif kind == "content_block_delta":
            delta = obj.get("delta") or {}
            if delta.get("type") == "text_delta":
                return self._token(delta.get("text", ""), False)
            if delta.get("type") == "thinking_delta":
                return self._token(delta.get("thinking", ""), True)
            if delta.get("type") == "input_json_delta":
                position = self._tool_index.get(obj.get("index", 0))
                fragment = delta.get("partial_json", "")
                if position is not None and fragment:
                    index = position
                    self._calls[index]["function"]["arguments"] += fragment
                    return [proto.ToolCallDelta(self.job_id, [{"index": index, "function": {"arguments": fragment}}])]
        elif kind == "message_delta":
            reason = (obj.get("delta") or {}).get("stop_reason")
            if reason:
                self._finish = _ANTHROPIC_FINISH.get(reason, "stop")
            _anthropic_usage(obj.get("usage"), self.usage)
        elif kind == "error":
            error = obj.get("error") or {}
            return [proto.Error(str(error.get("message") or "upstream error"), job_id=self.job_id)]
        return []

    def _token(self, text: str, reasoning: bool) -> list[proto.Message]:
        if not text:
            return []
        (self._reasoning if reasoning else self._text).append(text)
        return [proto.Token(self.job_id, text, reasoning=reasoning)]

    def complete(self) -> proto.Complete:
        return proto.Complete(
            job_id=self.job_id,
            full_response="".join(self._text),
            finish_reason=self._finish,
            input_tokens=self.usage.input_tokens,
            output_tokens=self.usage.output_tokens,
            cache_tokens=self.usage.cached_tokens,
            tool_calls=self._calls,
            reasoning_content="".join(self._reasoning),
        )


# --- errors ------------------------------------------------------------------------------------


@dataclass(slots=True)
class MappedError:
    status: int
    message: str
    retry_after: int | None = None


def map_upstream_error(upstream: str, status: int, body: bytes, retry_after: str | None) -> MappedError:
    """An upstream's HTTP error as ours. Credentials problems are ours to fix, not the caller's:
    they become a 502 that says so without echoing the upstream's text (it may quote the key)."""
    message = _error_message(body)
    retry = _retry_after(retry_after)
    if status == 429:
        return MappedError(429, f"upstream {upstream} is rate limiting: {message}", retry if retry is not None else 1)
    if status in (401, 403):
        return MappedError(502, f"upstream {upstream} refused the router's credentials")
    if status in (400, 413, 422):
        return MappedError(400, f"upstream {upstream}: {message}")
    if status in (503, 529):
        return MappedError(503, f"upstream {upstream} is overloaded: {message}", retry if retry is not None else 1)
    if status in (408, 504):
        return MappedError(504, f"upstream {upstream} timed out")
    return MappedError(502, f"upstream {upstream} answered {status}: {message}")


def _error_message(body: bytes) -> str:
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        obj = orjson.loads(body)
        error = obj.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
    return body[:200].decode("utf-8", "replace").strip() or "no details"


def _retry_after(value: str | None) -> int | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        seconds = float(value.strip())
        if seconds >= 0 and math.isfinite(seconds):
            return max(1, math.ceil(seconds))
    return None


# --- the relay ---------------------------------------------------------------------------------

ErrorRenderer = Callable[[int, str, "int | None"], web.StreamResponse]


@dataclass(slots=True)
class RelayResult:
    """What a relayed request did: its response (already sent or to return), usage, outcome."""

    response: web.StreamResponse
    usage: Usage = field(default_factory=Usage)
    status: int = 200
    model: str = ""


def upstream_request(spec: UpstreamSpec, caller_api: str, body: JSONObject) -> tuple[str, JSONObject, bool]:
    """``(path, body, pass_through)`` of the upstream request for a caller's validated body.

    :raises RequestError: the caller's API cannot be served by this upstream (``/v1/responses``
        needs an OpenAI-compatible upstream), or the body is invalid.
    :raises anthropic.AnthropicError: an invalid Messages body.
    """
    if caller_api == "responses":
        if spec.api != "openai":
            raise RequestError(400, f"upstream {spec.name} speaks the Anthropic API; /v1/responses needs an OpenAI one")
        return "/responses", {**body, "model": spec.model}, True
    if caller_api == "chat":
        parse_chat_request(body)  # the same validation as a local request
        if spec.api == "openai":
            out = {**body, "model": spec.model}
            if body.get("stream") is True:
                out["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            return "/chat/completions", out, True
        return "/messages", openai_to_anthropic(body, spec.model), False
    if caller_api == "messages":
        if spec.api == "anthropic":
            return "/messages", {**body, "model": spec.model}, True
        chat = anthropic.translate_request(body)
        return "/chat/completions", anthropic_to_openai(chat, spec.model), False
    raise ValueError(f"unknown caller API {caller_api!r}")


def _headers(spec: UpstreamSpec, request: web.Request) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if spec.api == "anthropic":
        headers["anthropic-version"] = ANTHROPIC_VERSION
        beta = request.headers.get("anthropic-beta")
        if beta:
            headers["anthropic-beta"] = beta
        if spec.key:
            headers["x-api-key"] = spec.key
    elif spec.key:
        headers["Authorization"] = f"Bearer {spec.key}"
    return headers


async def relay(
    request: web.Request,
    session: aiohttp.ClientSession,
    spec: UpstreamSpec,
    *,
    caller_api: str,
    body: JSONObject,
    render_error: ErrorRenderer,
    stats: UpstreamStats | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> RelayResult:
    """Answer ``request`` through ``spec``. The caller's body is already parsed and authorised;
    ``render_error(status, message, retry_after)`` builds an error in the caller's API shape.
    ``extra_headers`` (the route headers) go on the response, success or error."""
    stats = stats if stats is not None else UpstreamStats()
    stats.requests += 1
    started = time.monotonic()
    try:
        path, upstream_body, pass_through = upstream_request(spec, caller_api, body)
    except RequestError as exc:
        return _error_result(render_error(exc.status, exc.message, None), extra_headers, exc.status)
    except anthropic.AnthropicError as exc:
        return _error_result(render_error(exc.status, exc.message, None), extra_headers, exc.status)
    caller_streams = body.get("stream") is True
    call = _Call(request, spec, caller_api, caller_streams, body, extra_headers, render_error)
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=spec.timeout)
    upstream: aiohttp.ClientResponse | None = None
    result: RelayResult | None = None
    try:
        try:
            upstream = await session.post(
                spec.base_url + path, data=orjson.dumps(upstream_body), headers=_headers(spec, request), timeout=timeout
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats.errors += 1
            status = 504 if isinstance(exc, TimeoutError) else 502
            message = f"upstream {spec.name} is unreachable ({type(exc).__name__})"
            return _error_result(render_error(status, message, None), extra_headers, status)
        if upstream.status >= 400:
            raw = await upstream.content.read(MAX_ERROR_BYTES)
            mapped = map_upstream_error(spec.name, upstream.status, raw, upstream.headers.get("Retry-After"))
            stats.errors += 1
            stats.rate_limited += mapped.status == 429
            log.warning(
                "upstream error", extra={"upstream": spec.name, "status": upstream.status, "mapped": mapped.status}
            )
            rendered = render_error(mapped.status, mapped.message, mapped.retry_after)
            return _error_result(rendered, extra_headers, mapped.status)
        if pass_through:
            result = await _pass_through(call, upstream)
        else:
            result = await _translated(call, upstream)
        stats.count(result.usage)
        log.info(
            "upstream request",
            extra={
                "upstream": spec.name,
                "caller_api": caller_api,
                "input_tokens": result.usage.input_tokens,
                "output_tokens": result.usage.output_tokens,
                "ms": round((time.monotonic() - started) * 1000),
            },
        )
        return result
    except (asyncio.CancelledError, ConnectionResetError):
        stats.cancelled += 1
        log.info("caller left; upstream request closed", extra={"upstream": spec.name})
        raise
    finally:
        if upstream is not None:
            if result is None:
                upstream.close()  # the caller left or we failed: drop the connection, the upstream stops
            else:
                upstream.release()


def _error_result(response: web.StreamResponse, extra: Mapping[str, str] | None, status: int) -> RelayResult:
    if extra:
        response.headers.update(extra)
    return RelayResult(response, status=status)


async def _prepare_sse(request: web.Request, extra: Mapping[str, str] | None) -> web.StreamResponse:
    response = web.StreamResponse(headers={**_SSE_HEADERS, **(extra or {})})
    await response.prepare(request)
    return response


@dataclass(slots=True)
class _Call:
    """One relayed request, as the two relay paths need it."""

    request: web.Request
    spec: UpstreamSpec
    caller_api: str
    caller_streams: bool
    body: JSONObject
    extra: Mapping[str, str] | None
    render_error: ErrorRenderer


async def _pass_through(call: _Call, upstream: aiohttp.ClientResponse) -> RelayResult:
    """Same API on both sides: forward the upstream's bytes, reading usage on the way."""
    request, spec, caller_api, caller_streams, body, extra = (
        call.request, call.spec, call.caller_api, call.caller_streams, call.body, call.extra,
    )  # fmt: skip
    usage = Usage()
    if not caller_streams:
        raw = await upstream.content.read(MAX_BODY_BYTES + 1)
        if len(raw) > MAX_BODY_BYTES:
            raise web.HTTPBadGateway(reason="upstream answer too large")
        obj = orjson.loads(raw)
        if caller_api == "messages":
            _anthropic_usage(obj.get("usage"), usage)
        else:
            usage = _openai_usage(obj.get("usage")) or usage
        headers = {**(extra or {})}
        whole = web.Response(body=raw, content_type="application/json", headers=headers)
        return RelayResult(whole, usage, 200, str(obj.get("model") or spec.model))
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    response = await _prepare_sse(request, extra)
    parser = SSEParser()
    model = spec.model
    ended = False
    async for chunk in upstream.content.iter_any():
        out = bytearray()
        for raw, event, data in parser.feed(chunk):
            forward = True
            if data.strip() == "[DONE]":
                ended = caller_api == "chat"
            elif data:
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    forward = _read_usage(caller_api, event, obj, usage, wants_usage)
                    ended = obj.get("type", event) in _FINAL_EVENTS.get(caller_api, ())
            if forward:
                out += raw
            if ended:
                break
        if out:
            await response.write(bytes(out))
        # the caller has the whole answer and may hang up now (the OpenAI SDK closes at [DONE]):
        # return before the upstream's end of stream, or the usage read so far would be lost
        if ended:
            break
    return RelayResult(response, usage, 200, model)


_FINAL_EVENTS = {  # the event that ends a passed-through stream, per caller API ([DONE] for chat)
    "messages": ("message_stop",),
    "responses": ("response.completed", "response.incomplete", "response.failed"),
}


def _read_usage(caller_api: str, event: str, obj: JSONObject, usage: Usage, wants_usage: bool) -> bool:
    """Update usage from one passed-through event; False to drop it (a usage chunk the OpenAI
    caller did not ask for: the router asked for it, to count)."""
    if caller_api == "messages":
        kind = obj.get("type", event)
        if kind == "message_start":
            _anthropic_usage((obj.get("message") or {}).get("usage"), usage)
        elif kind == "message_delta":
            _anthropic_usage(obj.get("usage"), usage)
        return True
    if caller_api == "responses":
        if obj.get("type") == "response.completed":
            found = _openai_usage((obj.get("response") or {}).get("usage"))
            if found is not None:
                usage.input_tokens, usage.output_tokens, usage.cached_tokens = (
                    found.input_tokens, found.output_tokens, found.cached_tokens,
                )  # fmt: skip
        return True
    found = _openai_usage(obj.get("usage"))
    if found is not None:
        usage.input_tokens, usage.output_tokens, usage.cached_tokens = (
            found.input_tokens, found.output_tokens, found.cached_tokens,
        )  # fmt: skip
        if not obj.get("choices") and not wants_usage:
            return False
    return True


async def _translated(call: _Call, upstream: aiohttp.ClientResponse) -> RelayResult:
    """Different APIs: read the upstream's stream into protocol messages, encode for the caller."""
    request, spec, caller_api, caller_streams, body, extra = (
        call.request, call.spec, call.caller_api, call.caller_streams, call.body, call.extra,
    )  # fmt: skip
    reader: OpenAIReader | AnthropicReader = AnthropicReader() if spec.api == "anthropic" else OpenAIReader()
    created = int(time.time())
    encoder: OpenAIChatStream | anthropic.AnthropicStream
    stop_sequences = body.get("stop_sequences") if isinstance(body.get("stop_sequences"), list) else None
    if caller_api == "messages":
        message_id = "msg_" + os.urandom(12).hex()
        encoder = anthropic.AnthropicStream(message_id, spec.model, stop_sequences=stop_sequences)
    else:
        completion_id = "chatcmpl-" + os.urandom(12).hex()
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        encoder = OpenAIChatStream(completion_id, spec.model, created, include_usage)
    response: web.StreamResponse | None = None
    if caller_streams:
        response = await _prepare_sse(request, extra)
        await response.write(encoder.start())
    parser = SSEParser()
    failure: proto.Error | None = None
    async for chunk in upstream.content.iter_any():
        out = bytearray()
        for _raw, event, data in parser.feed(chunk):
            if not data:
                continue
            messages = reader.on_event(event, data) if isinstance(reader, AnthropicReader) else reader.on_event(data)
            for message in messages:
                if isinstance(message, proto.Error):
                    failure = message
                elif response is not None:
                    out += _encode(encoder, message)
        if out and response is not None:
            await response.write(bytes(out))
        # at the upstream's final event, answer now: not at its end of stream (see _pass_through)
        if failure is not None or reader.ended:
            break
    if failure is not None:
        if response is None:
            text = f"upstream {spec.name}: {failure.error}"
            return _error_result(call.render_error(502, text, None), extra, 502)
        await response.write(encoder.on_error(f"upstream {spec.name}: {failure.error}"))
        return RelayResult(response, reader.usage, 502, spec.model)
    complete = reader.complete()
    if response is not None:
        await response.write(encoder.on_complete(complete))
        return RelayResult(response, reader.usage, 200, spec.model)
    if caller_api == "messages":
        obj = anthropic.build_message(
            complete, message_id="msg_" + os.urandom(12).hex(), model=spec.model, stop_sequences=stop_sequences
        )
    else:
        obj = chat_completion_body(
            complete, completion_id="chatcmpl-" + os.urandom(12).hex(), model=spec.model, created=created
        )
    return RelayResult(web.json_response(obj, headers=dict(extra or {})), reader.usage, 200, spec.model)


def _encode(encoder: OpenAIChatStream | anthropic.AnthropicStream, message: proto.Message) -> bytes:
    if isinstance(message, proto.Token):
        return encoder.on_token(message)
    if isinstance(message, proto.ToolCallDelta):
        return encoder.on_tool_call_delta(message)
    return b""


__all__ = [
    "AnthropicReader",
    "FallbackSpec",
    "OpenAIReader",
    "RelayResult",
    "SSEParser",
    "UpstreamSpec",
    "UpstreamStats",
    "Usage",
    "map_upstream_error",
    "openai_to_anthropic",
    "parse_fallback",
    "parse_upstreams",
    "relay",
    "upstream_request",
]
