#!/usr/bin/env python3
"""A fast fake llama-server (b11434 wire format) for tests and benchmarks.

A worker can launch this file in place of llama-server: it takes llama-server's command line
(``-m/--model PATH --host H --port P -np/--parallel N -c/--ctx-size N --api-key K -a/--alias A
--metrics``; the key may come from ``LLAMA_API_KEY`` instead, as with llama-server) and
ignores every other flag, with or without a value.

Endpoints: ``GET /health``, ``GET /v1/models``, ``GET /props``, ``GET /slots``, ``GET /metrics``
(with ``--metrics``), ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming and
not; also without ``/v1``), ``POST /tokenize``, ``POST /apply-template``, and for tests
``GET /fake/stats`` (no API key needed).

Byte layout follows llama.cpp b11434's own JSON (keys in insertion order, no spaces), checked
against the real binary: a chat stream is the role chunk and the first token in one write, one
``data:`` event per token, the finish chunk (``delta:{}``), a ``choices:[]`` usage chunk only
with ``stream_options.include_usage``, ``timings`` on the last of those two, then
``data: [DONE]``. Errors are ``{"error":{"code","message","type"}}``; 401 bodies use
llama-server's own key order. The model is named by the ``-m`` argument as given (or ``-a``).

Each generated token is the word " tok". Tokenization is one token per 4 UTF-8 bytes
(rounded up) of the prompt as Qwen2.5's chat template renders it (``/apply-template``), so
``/tokenize`` and ``usage.prompt_tokens`` agree. Slots remember their last prompt: a request
goes to the free slot sharing the longest prefix (or to ``id_slot``) and the shared prefix is
reported as ``cached_tokens`` (never the last token, as in llama-server). A prompt of a slot's
context or more gets llama-server's 400 ``exceed_context_size_error``; generation stops with
"length" when the slot's context is full (no context shift).
With ``max_tokens`` (or ``max_completion_tokens``/``n_predict``) exactly that many tokens are
generated and ``finish_reason`` is "length"; without it FAKE_LLAMA_DEFAULT_TOKENS and "stop".
At most ``--parallel`` requests generate at once; the others wait for a slot, in order.

Environment:
  FAKE_LLAMA_TOKENS_PER_SEC         per-stream token rate; 0 = as fast as possible (default 0)
  FAKE_LLAMA_DEFAULT_TOKENS         tokens when the request has no max_tokens (default 64)
  FAKE_LLAMA_FLAT_BATCH             chunks per write when flat out (default 16); each chunk is
                                    still its own ``data:`` event
  FAKE_LLAMA_PROMPT_TOKENS_PER_SEC  simulated prefill speed for uncached tokens; 0 = instant
  FAKE_LLAMA_PREFILL_MS_PER_TOKEN   the same as a time per token (0.2: a ~30B model on one GPU);
                                    prompt processing of concurrent requests queues (one GPU)
  FAKE_LLAMA_CACHE_RAM_TOKENS       host-RAM prompt cache size in tokens (``--cache-ram``); 0 = off
  FAKE_LLAMA_RESTORE_MS_PER_TOKEN   cost of restoring a cached prompt from RAM (default 0.005)
  FAKE_LLAMA_GPU_STEPS              1 = pace streams like a GPU's continuous batching (needs a
                                    token rate): one decode step per 1/rate s gives every
                                    generating slot its token at once, and prompts that arrive
                                    during a step are prefilled in the next, which lasts longer
                                    by their prefill time (bench/gpu_steps.py)
  FAKE_LLAMA_LOAD_SECONDS           answer 503 "Loading model" this long after start (default 0)
  FAKE_LLAMA_N_PARAMS               meta.n_params in /v1/models (default 494032768)

Fault injection: if the last user message's text (or its first text part; the prompt for
/v1/completions) starts with ``FAKE:<scenario>``, the request follows that scenario instead
(fixed output, max_tokens ignored unless noted):
  tool_call_split          one get_weather call: a first fragment with index, id (32 chars),
                           type and function {name, arguments:"{"} (what b11434 sends), then
                           3-character argument fragments {index, function:{arguments}};
                           finish "tool_calls"
  parallel_tool_calls      get_weather (index 0) and get_time (index 1), fragments interleaved
                           0,1,0,1... (llama-server itself sends them one after the other:
                           parallel_tool_calls_seq does that)
  reasoning_then_content   five reasoning_content deltas, then seven content deltas; "stop"
  xml_tool_call_in_content a Qwen3-Coder <tool_call><function=get_weather>... block as plain
                           content, one delta per line; "stop"
  think_tags_in_content    content "<think>\nLet me think.\n</think>\n\nThe answer is 4." in
                           ten deltas; "stop"
  error_mid_stream         three " tok" deltas, then ``data: {"error":{"code":500,...}}`` and
                           the stream ends (no finish chunk, no [DONE]); HTTP 500 if not streamed
  context_exceeded         HTTP 400 exceed_context_size_error with n_prompt_tokens > n_ctx
  stall                    the role chunk, then nothing until the client disconnects
  crash                    three " tok" deltas, then the process exits with os._exit(1)
  slow_first_token:SECONDS headers at once, the first token after SECONDS, then as usual
  long_tokens:BYTES        max_tokens tokens of BYTES characters each (a lot of text, fast:
                           slow-reader tests)
  echo                     content = the whole last user message (including "FAKE:echo"),
                           one delta per word, capped by max_tokens
``GET /fake/stats``: requests_started, requests_completed, requests_aborted (the client went
away first), requests_errored (scenario errors, 400s), active, deferred, max_active,
tokens_generated, prompt_tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import re
import signal
import string
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import orjson
    from aiohttp import web
except ImportError:  # pragma: no cover - `#!/usr/bin/env python3` found a Python without aiohttp
    _VENV = Path(__file__).resolve().parents[1] / ".venv"
    if (_VENV / "bin" / "python").exists() and Path(sys.prefix).resolve() != _VENV.resolve():
        os.execv(str(_VENV / "bin" / "python"), [str(_VENV / "bin" / "python"), *sys.argv])
    raise

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded as a module by tests
    sys.path.append(str(Path(__file__).resolve().parent))
from gpu_steps import GpuSteps  # bench/gpu_steps.py, beside this file

SYSTEM_FINGERPRINT = "b11434-unknown"
TOKEN_WORD = " tok"
BYTES_PER_TOKEN = 4
PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/fake/stats"})
CHATML_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content"
    " + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_ALNUM = string.ascii_letters + string.digits
_SCENARIO_RE = re.compile(r"FAKE:([a-z_]+)(?::([0-9.]+))?")


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True, slots=True)
class Config:
    model_path: str
    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4
    ctx_size: int = 4096
    api_keys: tuple[str, ...] = ()
    alias: str | None = None
    metrics: bool = False
    tokens_per_sec: float = 0.0
    default_tokens: int = 64
    flat_batch: int = 16
    prompt_tokens_per_sec: float = 0.0
    cache_ram_tokens: int = 0
    restore_ms_per_token: float = 0.005
    load_seconds: float = 0.0
    n_params: int = 494_032_768
    gpu_steps: bool = False

    @property
    def model_name(self) -> str:
        return self.alias or self.model_path  # b11434 reports the -m argument as given

    @property
    def slot_ctx(self) -> int:
        return max(self.ctx_size // self.parallel, 1)


_FLAGS = {
    "-m": "model_path", "--model": "model_path",
    "--host": "host", "--port": "port",
    "-np": "parallel", "--parallel": "parallel",
    "-c": "ctx_size", "--ctx-size": "ctx_size",
    "--api-key": "api_keys", "-a": "alias", "--alias": "alias",
}  # fmt: skip
_SWITCHES = {"--metrics": "metrics"}


def _looks_like_value(token: str) -> bool:
    if not token.startswith("-"):
        return True
    try:  # negative numbers ("--seed -1") are values, not flags
        float(token)
        return True
    except ValueError:
        return False


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """llama-server's flags we use; any other flag is skipped along with its value, if any.

    Hand-rolled because argparse would read llama-server's ``-ctk q8_0`` as ``-c tk``.
    """
    found: dict[str, str] = {}
    i = 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        has_next = i + 1 < len(argv) and _looks_like_value(argv[i + 1])
        if flag in _SWITCHES:
            found[_SWITCHES[flag]] = "1"
        elif flag in _FLAGS:  # our flags take the next word whatever it is: a key may start with "-"
            if not eq and i + 1 >= len(argv):
                raise SystemExit(f"error: {flag} needs a value")
            value = inline if eq else argv[i + 1]
            key = _FLAGS[flag]
            found[key] = f"{found[key]},{value}" if key == "api_keys" and key in found else value
            i += 0 if eq else 1
        elif not eq and has_next and flag.startswith("-"):
            i += 1  # an unknown flag with a value
        i += 1
    return found


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


def _prompt_rate() -> float:
    """Uncached prompt tokens per second: FAKE_LLAMA_PREFILL_MS_PER_TOKEN (0.2 is a ~30B model on
    one GPU) or FAKE_LLAMA_PROMPT_TOKENS_PER_SEC; 0 = instant."""
    ms = _env_float("FAKE_LLAMA_PREFILL_MS_PER_TOKEN", 0.0)
    return 1000.0 / ms if ms > 0 else _env_float("FAKE_LLAMA_PROMPT_TOKENS_PER_SEC", 0.0)


def load_config(argv: Sequence[str]) -> Config:
    found = parse_args(argv)
    if "model_path" not in found:
        raise SystemExit("error: --model is required")
    return Config(
        model_path=found["model_path"],
        host=found.get("host", "127.0.0.1"),
        port=int(found.get("port", "8080")),
        parallel=max(int(found.get("parallel", "4")), 1),
        ctx_size=int(found.get("ctx_size", "4096")),
        # like llama-server, --api-key or else LLAMA_API_KEY (keeps the key out of argv)
        api_keys=tuple(k for k in (found.get("api_keys") or os.environ.get("LLAMA_API_KEY", "")).split(",") if k),
        alias=found.get("alias"),
        metrics="metrics" in found,
        tokens_per_sec=_env_float("FAKE_LLAMA_TOKENS_PER_SEC", 0.0),
        default_tokens=int(_env_float("FAKE_LLAMA_DEFAULT_TOKENS", 64)),
        flat_batch=max(int(_env_float("FAKE_LLAMA_FLAT_BATCH", 16)), 1),
        prompt_tokens_per_sec=_prompt_rate(),
        cache_ram_tokens=int(_env_float("FAKE_LLAMA_CACHE_RAM_TOKENS", 0)),
        restore_ms_per_token=_env_float("FAKE_LLAMA_RESTORE_MS_PER_TOKEN", 0.005),
        load_seconds=_env_float("FAKE_LLAMA_LOAD_SECONDS", 0.0),
        n_params=int(_env_float("FAKE_LLAMA_N_PARAMS", 494_032_768)),
        gpu_steps=os.environ.get("FAKE_LLAMA_GPU_STEPS", "") not in ("", "0"),
    )


# ----------------------------------------------------------------------------------------------
# prompt rendering and tokenization


def message_text(content: Any) -> str:
    """Text of an OpenAI message content: a string, or the text parts of a list joined by \\n."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _first_text(content: Any) -> str:
    if isinstance(content, list):
        return next((p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"), "")
    return content if isinstance(content, str) else ""


DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TOOLS_INTRO = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
)


def _role(messages: list[dict[str, Any]], index: int) -> str:
    return str(messages[index].get("role", "")) if 0 <= index < len(messages) else ""


def _system_block(messages: list[dict[str, Any]], tools: Any) -> str:
    system = message_text(messages[0].get("content")) if _role(messages, 0) == "system" else DEFAULT_SYSTEM
    if not tools:
        return f"<|im_start|>system\n{system}<|im_end|>\n"
    listing = "".join("\n" + _tojson(t) for t in tools)
    return f"<|im_start|>system\n{system}{TOOLS_INTRO}{listing}{TOOLS_OUTRO}"


def _tojson(value: Any) -> str:
    # the template's `tojson` writes ", " and ": " like Python's json module, not orjson's compact form
    return json.dumps(value, ensure_ascii=False)


def _parsed(arguments: Any) -> Any:
    """llama-server hands the template OpenAI's JSON-string arguments as an object."""
    try:
        return orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError:
        return arguments


def _tool_calls_text(calls: list[Any]) -> str:
    parts = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        arguments = _tojson(_parsed(fn.get("arguments", "")))
        parts.append(f'\n<tool_call>\n{{"name": "{fn.get("name", "")}", "arguments": {arguments}}}\n</tool_call>')
    return "".join(parts)


def _render_message(messages: list[dict[str, Any]], i: int) -> str:
    msg, role = messages[i], _role(messages, i)
    text = message_text(msg.get("content"))
    calls = msg.get("tool_calls")
    if role == "tool":  # consecutive tool results share one user turn
        head = "" if _role(messages, i - 1) == "tool" else "<|im_start|>user"
        tail = "" if _role(messages, i + 1) == "tool" else "<|im_end|>\n"
        return f"{head}\n<tool_response>\n{text}\n</tool_response>{tail}"
    if role == "assistant" and isinstance(calls, list) and calls:
        return "<|im_start|>assistant" + (f"\n{text}" if text else "") + _tool_calls_text(calls) + "<|im_end|>\n"
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def render_chatml(messages: list[Any], tools: Any = None) -> str:
    """The prompt Qwen2.5-Instruct's chat template makes (the tiny test model's), in Python."""
    msgs = [m for m in messages if isinstance(m, dict)]
    first = 1 if _role(msgs, 0) == "system" else 0
    body = "".join(_render_message(msgs, i) for i in range(first, len(msgs)))
    return _system_block(msgs, tools) + body + "<|im_start|>assistant\n"


def count_tokens(text: str) -> int:
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN)


def tokenize(text: str, with_pieces: bool) -> list[Any]:
    """One token per 4 UTF-8 bytes; ids are the bytes folded into a Qwen-sized vocabulary."""
    raw = text.encode()
    groups = [raw[i : i + BYTES_PER_TOKEN] for i in range(0, len(raw), BYTES_PER_TOKEN)]
    ids = [int.from_bytes(g, "little") % 151_936 for g in groups]
    if not with_pieces:
        return ids
    return [{"id": tid, "piece": _piece(g)} for tid, g in zip(ids, groups, strict=True)]


def _piece(group: bytes) -> str | list[int]:
    try:  # like llama-server: a piece that is not valid UTF-8 is given as its byte values
        return group.decode()
    except UnicodeDecodeError:
        return list(group)


def common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix, by binary search on slice equality (C speed, not a loop)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def random_id() -> str:
    return "".join(random.choices(_ALNUM, k=32))


# ----------------------------------------------------------------------------------------------
# scenarios: what a request generates


@dataclass(slots=True)
class Plan:
    """What to generate: ``deltas`` (one per token), or ``n_plain`` tokens of TOKEN_WORD."""

    finish: str
    n_plain: int = 0
    deltas: list[dict[str, Any]] | None = None
    tail: str = ""  # "", "error", "stall" or "crash": what happens after the deltas
    first_delay: float = 0.0
    context_exceeded: bool = False


def _split(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _tool_header(index: int, name: str) -> dict[str, Any]:
    # b11434 sets arguments to "{" the moment it parses the name, so the header carries it
    call = {"index": index, "id": random_id(), "type": "function", "function": {"name": name, "arguments": "{"}}
    return {"tool_calls": [call]}


def _tool_fragment(index: int, piece: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}


def _tool_deltas(index: int, name: str, arguments: str) -> list[dict[str, Any]]:
    assert arguments.startswith("{")
    return [_tool_header(index, name)] + [_tool_fragment(index, p) for p in _split(arguments[1:], 3)]


WEATHER_ARGS = '{"city":"Paris","unit":"celsius"}'  # compact, as llama-server rebuilds arguments
TIME_ARGS = '{"timezone":"Europe/Paris"}'
THINK_PIECES = ["<think>", "\nLet me", " think", ".", "\n", "</think>", "\n\n", "The answer", " is", " 4."]
XML_TOOL_CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"


def _content(pieces: Sequence[str]) -> list[dict[str, Any]]:
    return [{"content": p} for p in pieces]


def _interleave(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(max(len(a), len(b))):
        out.extend(x[i] for x in (a, b) if i < len(x))
    return out


def _fixed_plans() -> dict[str, Callable[[], Plan]]:
    return {
        "tool_call_split": lambda: Plan("tool_calls", deltas=_tool_deltas(0, "get_weather", WEATHER_ARGS)),
        "parallel_tool_calls": lambda: Plan(
            "tool_calls",
            deltas=_interleave(_tool_deltas(0, "get_weather", WEATHER_ARGS), _tool_deltas(1, "get_time", TIME_ARGS)),
        ),
        "parallel_tool_calls_seq": lambda: Plan(
            "tool_calls", deltas=_tool_deltas(0, "get_weather", WEATHER_ARGS) + _tool_deltas(1, "get_time", TIME_ARGS)
        ),
        "reasoning_then_content": lambda: Plan(
            "stop",
            deltas=[{"reasoning_content": p} for p in ("The user", " wants", " a", " greeting", ".")]
            + _content(["Hello", "!", " How", " can", " I", " help", "?"]),
        ),
        "xml_tool_call_in_content": lambda: Plan("stop", deltas=_content(XML_TOOL_CALL.splitlines(keepends=True))),
        "think_tags_in_content": lambda: Plan(
            "stop",
            deltas=_content(THINK_PIECES),
        ),
        "error_mid_stream": lambda: Plan("stop", deltas=_content([TOKEN_WORD] * 3), tail="error"),
        "stall": lambda: Plan("stop", deltas=[], tail="stall"),
        "crash": lambda: Plan("stop", deltas=_content([TOKEN_WORD] * 3), tail="crash"),
        "context_exceeded": lambda: Plan("stop", context_exceeded=True),
    }


FIXED_PLANS = _fixed_plans()
SCENARIOS = sorted([*FIXED_PLANS, "echo", "slow_first_token", "long_tokens"])


class RequestError(Exception):
    """A request llama-server would refuse: becomes its JSON error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def requested_tokens(body: dict[str, Any], default: int) -> tuple[int, str]:
    for key in ("max_tokens", "max_completion_tokens", "n_predict"):
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            return value, "length"
    return default, "stop"


def make_plan(text: str, body: dict[str, Any], default_tokens: int) -> Plan:
    n, finish = requested_tokens(body, default_tokens)
    if not text.startswith("FAKE:"):
        return Plan(finish, n_plain=n)
    match = _SCENARIO_RE.match(text)
    name = match.group(1) if match else ""
    if name in FIXED_PLANS:
        return FIXED_PLANS[name]()
    if name == "echo":
        pieces = re.findall(r"\s*\S+|\s+", text)
        return Plan(finish if len(pieces) > n else "stop", deltas=_content(pieces[:n]))
    if name == "slow_first_token":
        if not (match and match.group(2)):
            raise RequestError(400, "usage: FAKE:slow_first_token:SECONDS")
        return Plan(finish, n_plain=n, first_delay=min(float(match.group(2)), 3600.0))
    if name == "long_tokens":
        size = int(float(match.group(2))) if match and match.group(2) else 0
        if not 1 <= size <= 1 << 20:
            raise RequestError(400, "usage: FAKE:long_tokens:BYTES (1 to 1048576)")
        return Plan(finish, deltas=[{"content": " " + "x" * (size - 1)}] * n)
    raise RequestError(400, f"unknown fake scenario {text.split(maxsplit=1)[0]!r}; known: {', '.join(SCENARIOS)}")


def last_user_text(messages: list[Any]) -> str:
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return _first_text(msg.get("content"))
    return ""


# ----------------------------------------------------------------------------------------------
# byte encoders: the per-request constant parts of every chunk are encoded once


def timings(prompt_n: int, cache_n: int, predicted_n: int, prompt_ms: float, predicted_ms: float) -> dict[str, Any]:
    def rate(n: int, ms: float) -> tuple[float, float]:
        return (ms / n if n else 0.0), (n * 1e3 / ms if ms > 0 else 0.0)

    p_tok, p_sec = rate(prompt_n, prompt_ms)
    g_tok, g_sec = rate(predicted_n, predicted_ms)
    return {
        "cache_n": cache_n, "prompt_n": prompt_n, "prompt_ms": prompt_ms, "prompt_per_token_ms": p_tok,
        "prompt_per_second": p_sec, "predicted_n": predicted_n, "predicted_ms": predicted_ms,
        "predicted_per_token_ms": g_tok, "predicted_per_second": g_sec,
    }  # fmt: skip


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
    return {
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


@dataclass(slots=True)
class Outcome:
    """Counts for usage and timings, known once generation ends."""

    prompt_tokens: int
    cached: int
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached)

    def timings(self) -> dict[str, Any]:
        processed = self.prompt_tokens - self.cached
        return timings(processed, self.cached, self.completion_tokens, self.prompt_ms, self.predicted_ms)


class ChatEncoder:
    """chat.completion.chunk events, byte-compatible with b11434's key order."""

    def __init__(self, cmpl_id: str, model: str, created: int) -> None:
        self.id, self.model, self.created = cmpl_id, model, created
        meta = (
            f'"created":{created},"id":"{cmpl_id}","model":{orjson.dumps(model).decode()},'
            f'"system_fingerprint":"{SYSTEM_FINGERPRINT}","object":"chat.completion.chunk"'
        ).encode()
        self._meta = meta
        self._prefix = b'data: {"choices":[{"finish_reason":null,"index":0,"delta":'
        self._suffix = b"}]," + meta + b"}\n\n"
        self.first = self.delta({"role": "assistant", "content": None})

    def delta(self, delta: dict[str, Any]) -> bytes:
        return self._prefix + orjson.dumps(delta) + self._suffix

    def final(self, finish: str, outcome: Outcome, include_usage: bool) -> bytes:
        timing = b',"timings":' + orjson.dumps(outcome.timings())
        head = b'data: {"choices":[{"finish_reason":"' + finish.encode() + b'","index":0,"delta":{}}],' + self._meta
        if not include_usage:
            return head + timing + b"}\n\n"
        usage_chunk = b'data: {"choices":[],' + self._meta + b',"usage":' + orjson.dumps(outcome.usage())
        return head + b"}\n\n" + usage_chunk + timing + b"}\n\n"

    def body(self, finish: str, deltas: Sequence[dict[str, Any]], outcome: Outcome) -> dict[str, Any]:
        choice = {"finish_reason": finish, "index": 0, "message": merge_deltas(deltas)}
        return {
            "choices": [choice], "created": self.created, "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "object": "chat.completion",
            "usage": outcome.usage(), "id": self.id, "timings": outcome.timings(),
        }  # fmt: skip


class TextEncoder:
    """text_completion events of the legacy /v1/completions endpoint (usage always included)."""

    def __init__(self, cmpl_id: str, model: str, created: int) -> None:
        self.id, self.model, self.created = cmpl_id, model, created
        self._suffix = (
            f'"created":{created},"model":{orjson.dumps(model).decode()},'
            f'"system_fingerprint":"{SYSTEM_FINGERPRINT}","object":"text_completion"'
        ).encode()
        self.first = b""

    def delta(self, delta: dict[str, Any]) -> bytes:
        text = orjson.dumps(delta.get("content", ""))
        return b'data: {"choices":[{"text":' + text + b',"index":0,"logprobs":null,"finish_reason":null}],' + (
            self._suffix + b',"id":"' + self.id.encode() + b'"}\n\n'
        )

    def final(self, finish: str, outcome: Outcome, include_usage: bool) -> bytes:
        return b"data: " + orjson.dumps(self.body(finish, [], outcome)) + b"\n\n"

    def body(self, finish: str, deltas: Sequence[dict[str, Any]], outcome: Outcome) -> dict[str, Any]:
        text = "".join(d.get("content", "") for d in deltas)
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return {
            "choices": [choice], "created": self.created, "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "object": "text_completion",
            "usage": outcome.usage(), "id": self.id, "timings": outcome.timings(),
        }  # fmt: skip


Encoder = ChatEncoder | TextEncoder
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Finished = tuple[web.StreamResponse, str]  # the response and how the request ended


def merge_deltas(deltas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The non-streaming message that the given stream deltas add up to (b11434 key order)."""
    content = "".join(d.get("content") or "" for d in deltas)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for frag in delta.get("tool_calls", []):
            call = calls.setdefault(frag["index"], {"type": "function", "function": {"name": "", "arguments": ""}})
            call["function"]["name"] += frag["function"].get("name", "")
            call["function"]["arguments"] += frag["function"].get("arguments", "")
            if "id" in frag:
                call["id"] = frag["id"]
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


def error_body(status: int, message: str, type_: str, **extra: int) -> bytes:
    return orjson.dumps({"error": {"code": status, "message": message, "type": type_, **extra}})


# ----------------------------------------------------------------------------------------------
# slots: at most --parallel requests generate; the rest wait in arrival order


@dataclass(slots=True)
class Stats:
    requests_started: int = 0
    requests_completed: int = 0
    requests_aborted: int = 0
    requests_errored: int = 0
    active: int = 0
    deferred: int = 0
    max_active: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class SlotPool:
    """Slots with their last prompt, plus llama-server's host-RAM prompt cache (``--cache-ram``):
    a slot's prompt is saved there when the slot is given to a prompt that keeps less than half
    of it, and a request restores the cached prompt sharing the longest prefix with it when that
    beats its slot (``ram_tokens`` bounds the cache, oldest out first; 0 = no RAM cache)."""

    def __init__(self, n: int, ram_tokens: int = 0) -> None:
        self.free: set[int] = set(range(n))
        self.prompts = [""] * n
        self.last_used = [0.0] * n
        self._waiters: list[asyncio.Future[None]] = []
        self.ram_tokens = ram_tokens
        self.ram: list[str] = []  # oldest first
        self.restored_chars = 0  # of the last acquire: characters loaded from the RAM cache

    def _save_and_restore(self, slot: int, prompt: str, cached: int) -> int:
        old = self.prompts[slot]
        if self.ram_tokens <= 0:
            return cached
        if old and cached * 2 < len(old):  # the slot loses most of what it held: keep it in RAM
            self.ram.append(old)
            while sum(count_tokens(p) for p in self.ram) > self.ram_tokens:
                self.ram.pop(0)
        best, best_len = -1, cached
        for i, saved in enumerate(self.ram):
            n = common_prefix_len(saved, prompt)
            if n > best_len:
                best, best_len = i, n
        if best >= 0:
            self.ram.pop(best)  # loaded into the slot (the slot's prompt replaces it)
            self.restored_chars = best_len - cached
        return best_len

    def _pick(self, prompt: str, wanted: int | None) -> tuple[int, int] | None:
        if wanted is not None and 0 <= wanted < len(self.prompts):
            return (wanted, common_prefix_len(self.prompts[wanted], prompt)) if wanted in self.free else None
        if not self.free:
            return None
        # like llama-server: most similar cached prompt first, then least recently used
        scored = [(common_prefix_len(self.prompts[s], prompt), -self.last_used[s], s) for s in self.free]
        best = max(scored)
        return best[2], best[0]

    async def acquire(self, prompt: str, wanted: int | None) -> tuple[int, int]:
        """A free slot and the number of prompt characters it already holds."""
        while (picked := self._pick(prompt, wanted)) is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                self._waiters.remove(waiter)
        self.restored_chars = 0
        slot, cached = picked
        cached = self._save_and_restore(slot, prompt, cached)
        self.free.discard(slot)
        self.prompts[slot] = prompt
        return slot, cached

    def release(self, slot: int) -> None:
        self.free.add(slot)
        self.last_used[slot] = time.monotonic()
        for waiter in self._waiters:  # all re-check; futures resolve in arrival order
            if not waiter.done():
                waiter.set_result(None)


# ----------------------------------------------------------------------------------------------
# the server


@dataclass(slots=True)
class Job:
    """One parsed completion request."""

    plan: Plan
    prompt: str
    stream: bool
    include_usage: bool
    encoder: Encoder
    wanted_slot: int | None
    deltas: list[dict[str, Any]] = field(default_factory=list)


class FakeLlamaServer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stats = Stats()
        self.slots = SlotPool(cfg.parallel, cfg.cache_ram_tokens)
        self.compute = asyncio.Lock()  # one GPU: prompt processing of concurrent requests queues
        self.ready_at = time.monotonic() + cfg.load_seconds
        self.gpu: GpuSteps | None = None
        if cfg.gpu_steps and cfg.tokens_per_sec > 0:
            self.gpu = GpuSteps(cfg.tokens_per_sec, cfg.prompt_tokens_per_sec)

    # --- middlewares ---------------------------------------------------------------------------

    @web.middleware
    async def gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/fake/stats" and time.monotonic() < self.ready_at:
            return _json_error(503, {"message": "Loading model", "type": "unavailable_error", "code": 503})
        if self.cfg.api_keys and request.path not in PUBLIC_PATHS and not self._authorized(request):
            return _json_error(401, {"message": "Invalid API Key", "type": "authentication_error", "code": 401})
        try:
            return await handler(request)
        except RequestError as exc:
            body = error_body(exc.status, exc.message, exc.type)
            return web.Response(status=exc.status, body=body, content_type="application/json", charset="utf-8")

    def _authorized(self, request: web.Request) -> bool:
        key = request.headers.get("Authorization") or request.headers.get("X-Api-Key") or ""
        return key.removeprefix("Bearer ") in self.cfg.api_keys

    # --- simple endpoints ----------------------------------------------------------------------

    async def health(self, _: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def fake_stats(self, _: web.Request) -> web.Response:
        return _json(self.stats.as_dict())

    async def models(self, _: web.Request) -> web.Response:
        cfg = self.cfg
        size = Path(cfg.model_path).stat().st_size if Path(cfg.model_path).exists() else 0
        meta = {
            "vocab_type": 2, "n_vocab": 151_936, "n_ctx": cfg.slot_ctx, "n_ctx_train": 32_768,
            "n_embd": 896, "n_params": cfg.n_params, "size": size, "ftype": "Q8_0",
        }  # fmt: skip
        entry = {"id": cfg.model_name, "aliases": [cfg.model_name], "tags": [], "object": "model",
                 "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                 "created": int(time.time()), "owned_by": "llamacpp", "meta": meta}  # fmt: skip
        return _json({"models": [{"name": cfg.model_name, "model": cfg.model_name}], "object": "list", "data": [entry]})

    async def props(self, _: web.Request) -> web.Response:
        cfg = self.cfg
        return _json({
            "default_generation_settings": {"params": {"n_predict": -1, "temperature": 0.8}, "n_ctx": cfg.slot_ctx},
            "total_slots": cfg.parallel, "model_alias": cfg.model_name, "model_path": cfg.model_path,
            "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": True, "endpoint_props": False, "endpoint_metrics": cfg.metrics,
            "chat_template": CHATML_TEMPLATE, "bos_token": "", "eos_token": "<|im_end|>",
            "build_info": SYSTEM_FINGERPRINT, "is_sleeping": False,
        })  # fmt: skip

    async def slots_view(self, _: web.Request) -> web.Response:
        free, n_ctx = self.slots.free, self.cfg.slot_ctx
        return _json([{"id": i, "n_ctx": n_ctx, "is_processing": i not in free} for i in range(self.cfg.parallel)])

    async def metrics(self, _: web.Request) -> web.Response:
        if not self.cfg.metrics:
            msg = "This server does not support metrics endpoint. Start it with `--metrics`"
            raise RequestError(501, msg, "not_supported_error")
        s = self.stats
        lines = [
            f"llamacpp:prompt_tokens_total {s.prompt_tokens}",
            f"llamacpp:tokens_predicted_total {s.tokens_generated}",
            f"llamacpp:requests_processing {s.active}",
            f"llamacpp:requests_deferred {s.deferred}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def tokenize_view(self, request: web.Request) -> web.Response:
        body = await _read_body(request)
        content = body.get("content", "")
        return _json({"tokens": tokenize(content if isinstance(content, str) else "", bool(body.get("with_pieces")))})

    async def apply_template(self, request: web.Request) -> web.Response:
        body = await _read_body(request)
        return _json({"prompt": render_chatml(_messages(body), body.get("tools"))})

    # --- completions ---------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await _read_body(request)
        messages = _messages(body)
        plan = make_plan(last_user_text(messages), body, self.cfg.default_tokens)
        encoder = ChatEncoder("chatcmpl-" + random_id(), self.cfg.model_name, int(time.time()))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        prompt = render_chatml(messages, body.get("tools"))
        job = Job(plan, prompt, bool(body.get("stream")), include_usage, encoder, _slot_id(body))
        return await self._run(request, job)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _read_body(request)
        prompt = body.get("prompt", "")
        prompt = prompt if isinstance(prompt, str) else "".join(p for p in prompt if isinstance(p, str))
        plan = make_plan(prompt, body, self.cfg.default_tokens)
        if plan.deltas:  # reasoning and tool-call scenarios have no place in plain text
            plan.deltas = [d for d in plan.deltas if "content" in d]
        encoder = TextEncoder("chatcmpl-" + random_id(), self.cfg.model_name, int(time.time()))
        return await self._run(request, Job(plan, prompt, bool(body.get("stream")), True, encoder, _slot_id(body)))

    async def _run(self, request: web.Request, job: Job) -> web.StreamResponse:
        stats = self.stats
        stats.requests_started += 1
        state = "aborted"  # unless we get to say otherwise, the client went away
        try:
            stats.deferred += 1
            try:
                slot, cached_chars = await self.slots.acquire(job.prompt, job.wanted_slot)
                restored_chars = self.slots.restored_chars
            finally:
                stats.deferred -= 1
            try:
                stats.active += 1
                stats.max_active = max(stats.max_active, stats.active)
                response, state = await self._generate(request, job, cached_chars, restored_chars)
                return response
            finally:
                stats.active -= 1
                self.slots.release(slot)
        except ConnectionResetError:
            return web.Response(status=499)  # nobody reads it; the stream is gone
        finally:
            match state:
                case "completed":
                    stats.requests_completed += 1
                case "errored":
                    stats.requests_errored += 1
                case _:
                    stats.requests_aborted += 1

    async def _generate(self, request: web.Request, job: Job, cached_chars: int, restored_chars: int = 0) -> Finished:
        cfg, plan = self.cfg, job.plan
        prompt_tokens = count_tokens(job.prompt)
        if plan.context_exceeded or prompt_tokens >= cfg.slot_ctx:
            n = max(prompt_tokens, cfg.slot_ctx + 1) if plan.context_exceeded else prompt_tokens
            msg = f"request ({n} tokens) exceeds the available context size ({cfg.slot_ctx} tokens), try increasing it"
            body = error_body(400, msg, "exceed_context_size_error", n_prompt_tokens=n, n_ctx=cfg.slot_ctx)
            return web.Response(status=400, body=body, content_type="application/json", charset="utf-8"), "errored"
        # llama-server always re-evaluates at least the last prompt token
        outcome = Outcome(prompt_tokens, min(cached_chars // BYTES_PER_TOKEN, prompt_tokens - 1))
        self.stats.prompt_tokens += prompt_tokens
        prefill_s = restored_chars / BYTES_PER_TOKEN * cfg.restore_ms_per_token / 1000
        if cfg.prompt_tokens_per_sec > 0:
            prefill_s += (prompt_tokens - outcome.cached) / cfg.prompt_tokens_per_sec
        if prefill_s > 0:
            started = time.monotonic()
            async with self.compute:
                await _sleep(prefill_s)
            outcome.prompt_ms = (time.monotonic() - started) * 1e3
        delay = plan.first_delay
        units = self._units(job, room=cfg.slot_ctx - prompt_tokens)
        if job.stream:
            return await self._stream(request, job, units, outcome, delay)
        return await self._respond(job, units, outcome, delay)

    def _units(self, job: Job, room: int) -> list[bytes]:
        """The bytes of each token's event; for plain output, one shared object repeated."""
        plan, enc = job.plan, job.encoder
        if plan.deltas is None:
            if plan.n_plain >= room:  # like llama-server without context shift: stop when full
                plan.n_plain, plan.finish = max(room - 1, 1), "length"
            job.deltas = [{"content": TOKEN_WORD}] * plan.n_plain
            unit = enc.delta(job.deltas[0])
            return [unit] * plan.n_plain
        job.deltas = plan.deltas
        return [enc.delta(d) for d in plan.deltas]

    async def _stream(
        self, request: web.Request, job: Job, units: list[bytes], outcome: Outcome, delay: float
    ) -> Finished:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)  # llama-server sends headers once the slot starts the prompt
        started = time.monotonic()
        if self.gpu is not None:  # prefill in the GPU's next step; the first token comes with it
            await _sleep(job.plan.first_delay)
            await self.gpu.prefill(outcome.prompt_tokens - outcome.cached)
        else:
            await _sleep(delay)
        outcome.prompt_ms += (time.monotonic() - started) * 1e3
        plan, enc = job.plan, job.encoder
        first = enc.first
        if not units:
            if first:
                await resp.write(first)
        else:
            units = [first + units[0], *units[1:]]  # the role chunk rides with the first token
            await self._pace(resp, units)
        outcome.completion_tokens = len(job.deltas)
        outcome.predicted_ms = (time.monotonic() - started) * 1e3 - delay * 1e3
        if plan.tail:
            return resp, await self._tail(resp, plan.tail)
        await resp.write(enc.final(plan.finish, outcome, job.include_usage) + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp, "completed"

    async def _pace(self, resp: web.StreamResponse, units: Sequence[bytes]) -> None:
        """Write one unit per token at the configured rate (tokens_generated counts what went out)."""
        rate, total, stats = self.cfg.tokens_per_sec, len(units), self.stats
        if self.gpu is not None:  # one token per GPU step, the first was due at prefill's end
            for i, unit in enumerate(units):
                if i:
                    await self.gpu.step()
                await resp.write(unit)
                stats.tokens_generated += 1
            return
        if rate <= 0:
            batch = self.cfg.flat_batch
            for i in range(0, total, batch):
                await resp.write(b"".join(units[i : i + batch]))
                stats.tokens_generated += min(batch, total - i)
                await asyncio.sleep(0)  # let the other streams have the loop
            return
        loop = asyncio.get_running_loop()
        start, sent = loop.time(), 0
        while sent < total:
            # every token whose time has come goes now, so a late wake-up does not slow the rate
            due = min(total, int((loop.time() - start) * rate) + 1)
            await resp.write(b"".join(units[sent:due]))
            stats.tokens_generated += due - sent
            sent = due
            if sent < total:
                await asyncio.sleep(max(start + sent / rate - loop.time(), 0.0))

    async def _tail(self, resp: web.StreamResponse, tail: str) -> str:
        if tail == "error":
            await resp.write(b"data: " + error_body(500, "fake: error injected mid-stream", "server_error") + b"\n\n")
            await resp.write_eof()
            return "errored"
        if tail == "crash":
            await asyncio.sleep(0.05)  # let the tokens already written leave the socket
            os._exit(1)
        await asyncio.Event().wait()  # stall until the client goes away and we are cancelled
        return "aborted"

    async def _respond(self, job: Job, units: list[bytes], outcome: Outcome, delay: float) -> Finished:
        plan = job.plan
        rate = self.cfg.tokens_per_sec
        await _sleep(delay)
        outcome.prompt_ms += delay * 1e3
        gen_s = (len(units) / rate) if rate > 0 else 0.0
        await _sleep(gen_s)
        outcome.completion_tokens, outcome.predicted_ms = len(job.deltas), gen_s * 1e3
        self.stats.tokens_generated += outcome.completion_tokens
        if plan.tail == "crash":
            os._exit(1)
        if plan.tail == "stall":
            await asyncio.Event().wait()
        if plan.tail == "error":
            return _json_error(500, {"code": 500, "message": "fake: error injected", "type": "server_error"}), "errored"
        return _json(job.encoder.body(plan.finish, job.deltas, outcome)), "completed"

    # --- wiring --------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.gate], client_max_size=64 * 1024 * 1024)
        get, post = app.router.add_get, app.router.add_post
        for path in ("/health", "/v1/health"):
            get(path, self.health)
        for path in ("/v1/models", "/models"):
            get(path, self.models)
        get("/props", self.props)
        get("/slots", self.slots_view)
        get("/metrics", self.metrics)
        get("/fake/stats", self.fake_stats)
        for path in ("/v1/chat/completions", "/chat/completions"):
            post(path, self.chat)
        for path in ("/v1/completions", "/completions"):
            post(path, self.completions)
        post("/tokenize", self.tokenize_view)
        post("/apply-template", self.apply_template)
        return app


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json", charset="utf-8")


def _json_error(status: int, error: dict[str, Any]) -> web.Response:
    return _json({"error": error}, status)


async def _read_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    return body


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' is required and must be a non-empty array")
    return messages


def _slot_id(body: dict[str, Any]) -> int | None:
    value = body.get("id_slot")
    return value if isinstance(value, int) and value >= 0 else None


async def serve(cfg: Config) -> None:
    server = FakeLlamaServer(cfg)
    # handler_cancellation: a client that disconnects cancels its handler, freeing the slot,
    # as closing the connection does in llama-server
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=1024, reuse_address=True)
    await site.start()
    listening = f"main: server is listening on http://{cfg.host}:{cfg.port} - starting the main loop"
    print(listening, file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    if not Path(cfg.model_path).is_file():
        print(f"llama_model_load: error loading model: failed to open {cfg.model_path}", file=sys.stderr)
        raise SystemExit(1)
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        print(f"main: couldn't bind HTTP server socket, hostname: {cfg.host}, port: {cfg.port}: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc


if __name__ == "__main__":
    main()
