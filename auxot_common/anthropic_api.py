"""Anthropic Messages API: request translation, SSE encoding and response bodies. Pure code, no I/O.

Requests are translated into the OpenAI chat shape that llama-server renders with the model's chat
template; worker messages (:class:`Token`, :class:`ToolCallDelta`, :class:`Complete`) are turned
back into Anthropic server-sent events or a ``message`` body.

Decisions where the Anthropic and llama.cpp worlds do not line up (see also the docstrings):

- Every system text — the ``system`` field and ``role:"system"`` entries anywhere in ``messages``
  (Claude Code sends one) — is merged, in order, into a single leading system message: most chat
  templates accept one system message and only in first position.
- System blocks starting with ``x-anthropic-billing-header:`` are dropped. Claude Code puts one
  first in every prompt with a hash that changes per conversation; it means nothing to a local
  model and would defeat llama-server's prompt-prefix cache across conversations.
- Consecutive turns of the same role are merged (Anthropic does the same), so templates that
  insist on alternating roles accept the history.
- ``thinking`` absent or ``{"type":"disabled"}`` disables reasoning (``reasoning_effort:"none"``,
  ``enable_thinking:false``): Anthropic models only think when asked to.
- ``tool_choice {"type":"tool"}``: llama-server only understands ``auto``/``none``/``required``
  (an object is silently read as ``auto``), so the named tool becomes the only tool offered and
  the choice ``required``.
- Usage follows Anthropic's definition: ``input_tokens`` counts the prompt tokens that were *not*
  read from the cache; ``cache_read_input_tokens`` the cache hits. Their sum is the prompt size.
- ``stop_reason``: ``max_tokens`` when llama-server stopped on the length limit (even inside a
  tool call, as Anthropic does), else ``tool_use`` when there are tool calls, ``stop_sequence``
  with the worker's ``complete.stop_sequence`` when it is one of the request's (the worker
  matches stop strings itself: llama-server's chat endpoint does not say which one matched), or
  when a backend reports ``finish_reason == "stop_sequence"`` (then the request's only stop
  sequence, if it has just one), else ``end_turn``.
- Tool-call arguments that are not a JSON object (a call cut off by ``max_tokens``, a model
  error) become ``input: {}``; the client's own input validation then reports the problem to the
  model, which is better than showing broken JSON to the user as text.
- Tool-use ids: ids from the client (``toolu_…``) pass through unchanged; ids from llama-server
  get a ``toolu_`` prefix, a missing one is derived from the message id.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from auxot_common.protocol import Complete, JSONObject, Token, ToolCallDelta

# --- errors -------------------------------------------------------------------------------------

STATUS_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    # Anthropic defines no type for 501; clients treat any 5xx as a server error, so the
    # documented generic server type is the one they can handle.
    501: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class AnthropicError(Exception):
    """A request that cannot be served, rendered as an Anthropic error body.

    :param status: the HTTP status to answer with.
    :param error_type: the Anthropic error type (``invalid_request_error``, ...).
    :param message: the human-readable message.
    """

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message

    def body(self) -> JSONObject:
        """The JSON error body for this error."""
        return error_body(self.error_type, self.message)


def error_type_for_status(status: int) -> str:
    """The Anthropic error type for an HTTP status: the table above, else by status class."""
    known = STATUS_ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(error_type: str, message: str) -> JSONObject:
    """``{"type":"error","error":{type,message},"request_id":"req_<24 hex>"}``.

    :param error_type: the Anthropic error type.
    :param message: the message shown to the caller.
    """
    return {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": "req_" + secrets.token_hex(12),
    }


def _invalid(message: str) -> AnthropicError:
    return AnthropicError(400, "invalid_request_error", message)


# --- request translation ------------------------------------------------------------------------


@dataclass(slots=True)
class ChatRequest:
    """A validated Anthropic request, translated for llama-server's chat endpoint.

    ``messages``/``tools`` are OpenAI chat messages and function tools; ``params`` holds every
    other llama-server field (``top_p``, ``top_k``, ``stop``, ``tool_choice``,
    ``parallel_tool_calls``, ``response_format``, ``chat_template_kwargs``,
    ``reasoning_budget_tokens``).
    """

    messages: list[JSONObject]
    tools: list[JSONObject] = field(default_factory=list)
    temperature: float | None = None
    max_tokens: int = 1
    reasoning_effort: str = ""
    params: JSONObject = field(default_factory=dict)
    stream: bool = False
    model: str = ""


def translate_request(body: Any, *, max_output_tokens: int | None = None) -> ChatRequest:
    """Validate and translate a ``POST /v1/messages`` body.

    :param body: the decoded JSON body.
    :param max_output_tokens: the most tokens one answer may have here (the slot context); a
        larger ``max_tokens`` is lowered to it (Claude Code asks for up to 128000).
    :raises AnthropicError: 400 for an invalid request; the checks run in the order messages,
        model, max_tokens, then everything else.
    """
    return _translate(body, generation=True, max_output_tokens=max_output_tokens)


def count_tokens_request(body: Any) -> ChatRequest:
    """Translate a ``POST /v1/messages/count_tokens`` body (``model``/``max_tokens`` optional).

    The result renders exactly like the corresponding ``/v1/messages`` request, so tokenizing its
    messages and tools with the chat template gives the prompt size.

    :raises AnthropicError: 400 for an invalid request.
    """
    return _translate(body, generation=False, max_output_tokens=None)


def _translate(body: Any, *, generation: bool, max_output_tokens: int | None) -> ChatRequest:
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.")
    raw_messages = body.get("messages")
    if raw_messages is None:
        raise _invalid("messages: Field required")
    if not isinstance(raw_messages, list):
        raise _invalid("messages: Input should be a valid list")
    if not raw_messages:
        raise _invalid("messages: at least one message is required")
    model = body.get("model")
    if generation and (not isinstance(model, str) or not model):
        raise _invalid("model: Field required")
    max_tokens = _max_tokens(body.get("max_tokens"), required=generation)
    if max_output_tokens is not None and max_output_tokens > 0:
        max_tokens = min(max_tokens, max_output_tokens)

    builder = _MessageBuilder()
    builder.add_system(body.get("system"), "system")
    for index, message in enumerate(raw_messages):
        builder.add_message(message, f"messages.{index}")
    messages = builder.finish()

    params: JSONObject = {}
    tools = _translate_tools(body.get("tools"), builder.referenced_tools)
    tools = _apply_tool_choice(body.get("tool_choice"), tools, body.get("tools"), params)
    _sampling_params(body, params)
    reasoning_effort = _reasoning(body, params)
    _response_format(body.get("output_config"), body.get("output_format"), params)
    return ChatRequest(
        messages=messages,
        tools=tools,
        temperature=_number(body.get("temperature"), "temperature"),
        max_tokens=max_tokens,
        reasoning_effort=reasoning_effort,
        params=params,
        stream=body.get("stream") is True,
        model=model if isinstance(model, str) else "",
    )


def _max_tokens(value: Any, *, required: bool) -> int:
    if value is None:
        if required:
            raise _invalid("max_tokens: Field required")
        return 1
    if not _is_int(value):
        raise _invalid("max_tokens: Input should be a valid integer")
    if value < 1:
        raise _invalid("max_tokens: Input should be greater than or equal to 1")
    return int(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if not _is_number(value):
        raise _invalid(f"{name}: Input should be a valid number")
    return float(value)


_BILLING_HEADER = "x-anthropic-billing-header:"
_JOIN = "\n\n"


class _MessageBuilder:
    """Collects the system text and the OpenAI messages of one request, in order."""

    __slots__ = ("messages", "referenced_tools", "system")

    def __init__(self) -> None:
        self.system: list[str] = []
        self.messages: list[JSONObject] = []
        # tools named by tool_reference blocks: deferred tools the client has loaded
        self.referenced_tools: set[str] = set()

    def add_system(self, value: Any, path: str) -> None:
        """Add the top-level ``system`` field (a string or text blocks)."""
        if value is None:
            return
        if isinstance(value, str):
            self._add_system_text(value)
            return
        if not isinstance(value, list):
            raise _invalid(f"{path}: Input should be a valid string or a list of text blocks")
        for index, block in enumerate(_blocks(value, path)):
            if block["type"] == "text":
                self._add_system_text(_block_text(block, f"{path}.{index}"))

    def _add_system_text(self, text: str) -> None:
        if text and not text.startswith(_BILLING_HEADER):
            self.system.append(text)

    def add_message(self, message: Any, path: str) -> None:
        """Translate one Anthropic message and append the resulting OpenAI messages."""
        if not isinstance(message, dict):
            raise _invalid(f"{path}: Input should be a valid dictionary")
        role = message.get("role")
        content = message.get("content")
        if role not in ("user", "assistant", "system"):
            raise _invalid(f"{path}.role: Input should be 'user' or 'assistant'")
        if isinstance(content, str):
            blocks: list[JSONObject] = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            blocks = _blocks(content, f"{path}.content")
        else:
            raise _invalid(f"{path}.content: Input should be a valid string or list")
        if role == "system":
            self.add_system(blocks, f"{path}.content")
        elif role == "assistant":
            self._add_assistant(blocks, f"{path}.content")
        else:
            self._add_user(blocks, f"{path}.content")

    def _add_assistant(self, blocks: list[JSONObject], path: str) -> None:
        texts: list[str] = []
        reasoning: list[str] = []
        calls: list[JSONObject] = []
        for index, block in enumerate(blocks):
            kind = block["type"]
            where = f"{path}.{index}"
            if kind == "text":
                texts.append(_block_text(block, where))
            elif kind == "thinking":
                thinking = block.get("thinking", "")
                if not isinstance(thinking, str):
                    raise _invalid(f"{where}.thinking: Input should be a valid string")
                reasoning.append(thinking)
            elif kind == "tool_use":
                calls.append(_tool_call(block, where))
            elif kind == "tool_result":
                raise _invalid(f"{where}: tool_result blocks are only allowed in user messages")
            # redacted_thinking (opaque), server tool blocks and unknown types carry nothing a
            # local model can use
        text = _JOIN.join(t for t in texts if t)
        if not text and not calls:
            return  # a turn of thinking only: nothing a chat template can render
        previous = self.messages[-1] if self.messages else None
        if previous is not None and previous["role"] == "assistant":
            _merge_assistant(previous, text, calls, reasoning)
            return
        out: JSONObject = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            out["tool_calls"] = calls
        joined_reasoning = _JOIN.join(r for r in reasoning if r)
        if joined_reasoning:
            out["reasoning_content"] = joined_reasoning
        self.messages.append(out)

    def _add_user(self, blocks: list[JSONObject], path: str) -> None:
        parts: list[JSONObject] = []
        tool_messages: list[JSONObject] = []
        for index, block in enumerate(blocks):
            kind = block["type"]
            where = f"{path}.{index}"
            if kind == "tool_result":
                tool_message, images = self._tool_result(block, where)
                tool_messages.append(tool_message)
                parts.extend(images)
            elif kind == "tool_use":
                raise _invalid(f"{where}: tool_use blocks are only allowed in assistant messages")
            else:
                part = _user_part(block, where)
                if part is not None:
                    parts.append(part)
        # tool messages must directly follow the assistant turn that made the calls; the user's
        # own text of the same turn (Claude Code appends some) comes after them
        self.messages.extend(tool_messages)
        if not parts:
            return
        previous = self.messages[-1] if self.messages else None
        if previous is not None and previous["role"] == "user":
            previous["content"].extend(parts)
        else:
            self.messages.append({"role": "user", "content": parts})

    def _tool_result(self, block: JSONObject, path: str) -> tuple[JSONObject, list[JSONObject]]:
        tool_use_id = block.get("tool_use_id")
        if not isinstance(tool_use_id, str) or not tool_use_id:
            raise _invalid(f"{path}.tool_use_id: Field required")
        content = block.get("content")
        texts: list[str] = []
        images: list[JSONObject] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for index, sub in enumerate(_blocks(content, f"{path}.content")):
                self._tool_result_part(sub, f"{path}.content.{index}", texts, images)
        elif content is not None:
            raise _invalid(f"{path}.content: Input should be a valid string or list")
        if images:
            texts.append(f"[{len(images)} image(s) from this result follow in the next message]")
        text = _JOIN.join(t for t in texts if t)
        if block.get("is_error") is True:
            # the model must know the call failed; the Anthropic flag has no OpenAI counterpart
            text = f"Error: {text}" if text else "Error"
        return {"role": "tool", "tool_call_id": tool_use_id, "content": text}, images

    def _tool_result_part(self, block: JSONObject, path: str, texts: list[str], images: list[JSONObject]) -> None:
        if block["type"] == "tool_reference":
            name = block.get("tool_name")
            if isinstance(name, str) and name:
                self.referenced_tools.add(name)
                texts.append(f"Tool loaded: {name}")
            return
        part = _user_part(block, path)
        if part is None:
            return
        if part["type"] == "text":
            texts.append(part["text"])
        else:
            images.append(part)

    def finish(self) -> list[JSONObject]:
        """The final message list: one leading system message, then the conversation."""
        messages = self.messages
        for message in messages:
            if message["role"] == "user":
                message["content"] = _user_content(message["content"])
        if not messages:
            raise _invalid("messages: at least one user or assistant message is required")
        last = messages[-1]
        if last["role"] == "assistant" and last.get("tool_calls"):
            # llama-server would try to continue the turn ("prefill") and refuses one with calls
            raise _invalid(
                "messages: the final assistant message ends with tool_use blocks; "
                "send their tool_result blocks in a following user message"
            )
        if self.system:
            return [{"role": "system", "content": _JOIN.join(self.system)}, *messages]
        return messages


def _blocks(value: list[Any], path: str) -> list[JSONObject]:
    """Check that every entry of a content list is an object with a string ``type``."""
    for index, block in enumerate(value):
        if not isinstance(block, dict):
            raise _invalid(f"{path}.{index}: Input should be a valid dictionary")
        if not isinstance(block.get("type"), str):
            raise _invalid(f"{path}.{index}.type: Field required")
    return value


def _block_text(block: JSONObject, path: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _invalid(f"{path}.text: Input should be a valid string")
    return text


def _tool_call(block: JSONObject, path: str) -> JSONObject:
    tool_id = block.get("id")
    name = block.get("name")
    if not isinstance(tool_id, str) or not tool_id:
        raise _invalid(f"{path}.id: Field required")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{path}.name: Field required")
    tool_input = block.get("input", {})
    if isinstance(tool_input, dict):
        arguments = orjson.dumps(tool_input).decode()
    elif isinstance(tool_input, str):
        arguments = tool_input  # some clients send the JSON text itself
    else:
        raise _invalid(f"{path}.input: Input should be a valid dictionary")
    return {"id": tool_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _merge_assistant(previous: JSONObject, text: str, calls: list[JSONObject], reasoning: list[str]) -> None:
    if text:
        previous["content"] = _JOIN.join(t for t in (previous.get("content") or "", text) if t)
    if calls:
        previous.setdefault("tool_calls", []).extend(calls)
    extra = _JOIN.join(r for r in reasoning if r)
    if extra:
        previous["reasoning_content"] = _JOIN.join(r for r in (previous.get("reasoning_content", ""), extra) if r)


def _user_part(block: JSONObject, path: str) -> JSONObject | None:
    """One user content block as an OpenAI content part (text or ``image_url``), or None."""
    kind = block["type"]
    if kind == "text":
        return {"type": "text", "text": _block_text(block, path)}
    if kind == "image":
        return _image_part(block.get("source"), path)
    if kind == "document":
        return _text_part(_document_text(block))
    if kind == "search_result":
        return _text_part(_search_result_text(block))
    return None  # container_upload, server tool results and unknown types


def _text_part(text: str) -> JSONObject | None:
    return {"type": "text", "text": text} if text else None


def _image_part(source: Any, path: str) -> JSONObject:
    if not isinstance(source, dict):
        raise _invalid(f"{path}.source: Field required")
    kind = source.get("type")
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not isinstance(data, str):
            raise _invalid(f"{path}.source: base64 images need media_type and data strings")
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise _invalid(f"{path}.source.url: Field required")
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "file":
        return {"type": "text", "text": f"[image file {source.get('file_id', '')} is not available here]"}
    raise _invalid(f"{path}.source.type: Input should be 'base64', 'url' or 'file'")


def _document_text(block: JSONObject) -> str:
    source = block.get("source")
    title = block.get("title")
    body = ""
    if isinstance(source, dict):
        kind = source.get("type")
        if kind == "text" and isinstance(source.get("data"), str):
            body = source["data"]
        elif kind == "content":
            body = _plain_text(source.get("content"))
        else:
            body = f"[{source.get('media_type', 'binary')} document omitted: only text documents are supported]"
    if isinstance(title, str) and title:
        return f"{title}\n{body}" if body else title
    return body


def _search_result_text(block: JSONObject) -> str:
    pieces = [block.get("title"), block.get("source"), _plain_text(block.get("content"))]
    return "\n".join(p for p in pieces if isinstance(p, str) and p)


def _plain_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [b.get("text") for b in content if isinstance(b, dict) and b.get("type") == "text"]
        return _JOIN.join(t for t in texts if isinstance(t, str) and t)
    return ""


def _user_content(parts: list[JSONObject]) -> str | list[JSONObject]:
    """Plain text as a string (every template takes that); parts only when there are images."""
    if all(part["type"] == "text" for part in parts):
        return _JOIN.join(part["text"] for part in parts if part["text"])
    return parts


# --- tools --------------------------------------------------------------------------------------


def _translate_tools(raw: Any, referenced: set[str]) -> list[JSONObject]:
    """Custom tools as OpenAI function tools; deferred tools only once a tool_reference named them."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _invalid("tools: Input should be a valid list")
    tools: list[JSONObject] = []
    for index, tool in enumerate(raw):
        if not isinstance(tool, dict):
            raise _invalid(f"tools.{index}: Input should be a valid dictionary")
        if tool.get("type") not in (None, "custom"):
            continue  # server tools (web_search_…) and Anthropic-defined client tools
        function = _function_tool(tool, f"tools.{index}")
        if tool.get("defer_loading") is True and function["function"]["name"] not in referenced:
            continue
        tools.append(function)
    return tools


def _function_tool(tool: JSONObject, path: str) -> JSONObject:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise _invalid(f"{path}.name: Field required")
    schema = tool.get("input_schema", {})
    if not isinstance(schema, dict):
        raise _invalid(f"{path}.input_schema: Input should be a valid dictionary")
    parameters = sanitize_json_schema(schema)
    parameters.setdefault("type", "object")
    function: JSONObject = {"name": name}
    description = tool.get("description")
    if isinstance(description, str) and description:
        function["description"] = description
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def _apply_tool_choice(choice: Any, tools: list[JSONObject], raw_tools: Any, params: JSONObject) -> list[JSONObject]:
    """Set ``tool_choice``/``parallel_tool_calls``; returns the tools to offer."""
    if choice is None:
        return tools
    if not isinstance(choice, dict):
        raise _invalid("tool_choice: Input should be a valid dictionary")
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise _invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    if choice.get("disable_parallel_tool_use") is True:
        params["parallel_tool_calls"] = False
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid("tool_choice.name: Field required")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            # a deferred tool the client forces is loaded by that very choice
            chosen = [t for t in _translate_tools(raw_tools, {name}) if t["function"]["name"] == name]
        if not chosen:
            raise _invalid(f"tool_choice: tool '{name}' was not found in tools")
        params["tool_choice"] = "required"
        return chosen[:1]
    if tools:
        params["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    return tools


# --- sampling, reasoning, structured output -----------------------------------------------------

_EFFORTS: Final[dict[str, str]] = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def _sampling_params(body: JSONObject, params: JSONObject) -> None:
    for name in ("top_p", "top_k"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or (name == "top_k" and not _is_int(value)):
            raise _invalid(f"{name}: Input should be a valid number")
        params[name] = value
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _invalid("stop_sequences: Input should be a valid list of strings")
        if stop:
            params["stop"] = list(stop)


def _reasoning(body: JSONObject, params: JSONObject) -> str:
    """``reasoning_effort`` and ``chat_template_kwargs.enable_thinking`` from ``thinking``/effort."""
    thinking = body.get("thinking")
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind is None or kind == "disabled":
        params["chat_template_kwargs"] = {"enable_thinking": False}
        return "none"
    effort = _effort(body.get("output_config"))
    if kind == "enabled" and isinstance(thinking, dict):
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
            params["reasoning_budget_tokens"] = budget
            effort = effort or _effort_for_budget(budget)
    params["chat_template_kwargs"] = {"enable_thinking": True}
    return effort


def _effort(output_config: Any) -> str:
    if not isinstance(output_config, dict):
        return ""
    effort = output_config.get("effort")
    return _EFFORTS.get(effort, "") if isinstance(effort, str) else ""


def _effort_for_budget(budget: int) -> str:
    # Claude Code asks for 31999 by default and MAX_THINKING_TOKENS otherwise
    if budget <= 4096:
        return "low"
    return "medium" if budget <= 16384 else "high"


def _response_format(output_config: Any, output_format: Any, params: JSONObject) -> None:
    """``output_config.format`` (or the older ``output_format``) as an OpenAI ``response_format``."""
    spec = output_config.get("format") if isinstance(output_config, dict) else None
    if spec is None:
        spec = output_format
    if not isinstance(spec, dict) or spec.get("type") != "json_schema":
        return
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _invalid("output_config.format.schema: Input should be a valid dictionary")
    params["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": sanitize_json_schema(schema)},
    }


# --- JSON Schema for llama.cpp's grammar conversion ---------------------------------------------
#
# llama-server turns every tool's parameters (and a response_format schema) into a GBNF grammar.
# Its schema reader (common/json-schema.cpp, b11434) throws — failing the whole request — on
# boolean subschemas, non-local $refs, unknown types, empty enum/anyOf, non-integer counts,
# non-numeric integer bounds and non-string formats; its GBNF parser throws on a repetition
# minimum above 2000, and loops until memory runs out on a minimum above the maximum. Whatever
# it merely ignores ($id, title, default, propertyNames, not, if/then/else, …) is kept intact.

_TYPES: Final = frozenset({"object", "array", "string", "integer", "number", "boolean", "null"})
_COUNTS: Final = (("minLength", "maxLength"), ("minItems", "maxItems"))
_BOUNDS: Final = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_MAX_REPEAT: Final = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
_INT64: Final = 2**63 - 2
_MAX_DEPTH: Final = 64
# keys that decide what llama.cpp builds for a schema; a schema with none of them matches anything
_STRUCTURAL: Final = frozenset(
    {"$ref", "oneOf", "anyOf", "allOf", "type", "const", "enum", "properties", "additionalProperties",
     "items", "prefixItems", "pattern", "minLength", "maxLength", "format"}
)  # fmt: skip


def sanitize_json_schema(schema: Any) -> JSONObject:
    """A copy of ``schema`` that llama.cpp's JSON-Schema-to-grammar conversion accepts.

    Drops ``$schema`` and exactly the constructs that would make llama-server reject the request
    (listed above), plus ``allOf``/``anyOf`` forms it would mistranslate (an ``allOf`` of string
    constraints becomes an empty-object grammar; an ``anyOf`` of ``required`` lists would lose
    the object's shape). Everything else — ``additionalProperties:false``, ``pattern``,
    ``format``, 53-bit integer bounds, ``propertyNames``, descriptions — passes through.

    :param schema: a JSON Schema (any JSON value is accepted).
    :returns: a new dict (values llama.cpp never reads are shared, not copied); the input is
        never modified.
    """
    cleaned = _clean_schema(schema, 0)
    _drop_dangling_refs(cleaned, cleaned)
    return cleaned


def _clean_schema(node: Any, depth: int) -> JSONObject:
    if not isinstance(node, dict) or depth > _MAX_DEPTH:
        return {}  # true, a non-schema value, or absurd nesting: accept anything
    out: JSONObject = {}
    for key, value in node.items():
        if key == "$schema":
            continue
        cleaned = _clean_keyword(key, value, depth + 1)
        if cleaned is not _DROP:
            out[key] = cleaned
    _fix_counts(out)
    _fix_bounds(out)
    _fix_combinators(out)
    return out


_DROP: Final = object()


def _clean_keyword(key: str, value: Any, depth: int) -> Any:
    if key == "properties":
        return _clean_properties(value, depth)
    if key in ("$defs", "definitions"):
        return {k: _clean_schema(v, depth) for k, v in value.items()} if isinstance(value, dict) else _DROP
    if key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        return _clean_schema_list(value, depth)
    if key == "items":
        if isinstance(value, list):
            return _clean_schema_list(value, depth)
        return _clean_schema(value, depth) if isinstance(value, dict) else _DROP
    if key == "additionalProperties":
        if isinstance(value, bool):
            return value
        return _clean_schema(value, depth) if isinstance(value, dict) else _DROP
    if key == "type":
        return _clean_type(value)
    if key == "enum":
        return value if isinstance(value, list) and value else _DROP
    if key == "required":
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else _DROP
    if key == "$ref":
        return value if isinstance(value, str) and value.startswith("#/") else _DROP
    if key == "format":
        return value if isinstance(value, str) else _DROP
    if key == "pattern":
        return value if isinstance(value, str) and _pattern_is_safe(value) else _DROP
    return value


def _clean_properties(value: Any, depth: int) -> Any:
    if not isinstance(value, dict):
        return _DROP
    # a `false` property schema means "must not be present": offering it would be wrong
    return {k: _clean_schema(v, depth) for k, v in value.items() if v is not False}


def _clean_schema_list(value: Any, depth: int) -> Any:
    if not isinstance(value, list):
        return _DROP
    items = [_clean_schema(v, depth) for v in value if v is not False]
    return items if items else _DROP


def _clean_type(value: Any) -> Any:
    if isinstance(value, str):
        return value if value in _TYPES else _DROP
    if isinstance(value, list):
        kept = list(dict.fromkeys(v for v in value if isinstance(v, str) and v in _TYPES))
        return kept if kept else _DROP
    return _DROP


def _fix_counts(schema: JSONObject) -> None:
    for low_key, high_key in _COUNTS:
        low = _count(schema, low_key)
        high = _count(schema, high_key)
        if low is not None and (low > _MAX_REPEAT or (high is not None and low > high)):
            del schema[low_key]  # both make llama.cpp's grammar parser fail or run away


def _count(schema: JSONObject, key: str) -> int | None:
    if key not in schema:
        return None
    value = schema[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or not 0 <= value < 2**31:
        del schema[key]
        return None
    schema[key] = value
    return int(value)


def _fix_bounds(schema: JSONObject) -> None:
    for key in _BOUNDS:
        if key in schema and not (_is_number(schema[key]) and abs(schema[key]) <= _INT64):
            del schema[key]  # draft-4 boolean exclusive bounds, or beyond int64
    low = _effective_bound(schema, "minimum", "exclusiveMinimum", 1)
    high = _effective_bound(schema, "maximum", "exclusiveMaximum", -1)
    if low is not None and high is not None and low > high:
        for key in _BOUNDS:
            schema.pop(key, None)  # an empty integer range has no grammar


def _effective_bound(schema: JSONObject, inclusive: str, exclusive: str, step: int) -> int | None:
    if inclusive in schema:
        value = schema[inclusive]
        return int(math.ceil(value) if step > 0 else math.floor(value))
    if exclusive in schema:
        value = schema[exclusive]
        return int(math.floor(value) if step > 0 else math.ceil(value)) + step
    return None


def _fix_combinators(schema: JSONObject) -> None:
    all_of = schema.get("allOf")
    if all_of is not None and not all(_mergeable(part) for part in all_of):
        # llama.cpp merges only object properties and enums; anything else would turn into an
        # empty-object grammar, so keep the shared type and drop the extra constraints
        del schema["allOf"]
        types = {part["type"] for part in all_of if isinstance(part.get("type"), str)}
        if "type" not in schema and len(types) == 1:
            (only,) = types
            schema["type"] = only
    has_shape = "type" in schema or "properties" in schema
    for key in ("anyOf", "oneOf"):
        alternatives = schema.get(key)
        if alternatives is not None and has_shape and all(_matches_anything(a) for a in alternatives):
            del schema[key]  # e.g. anyOf of `required` lists: would make the value unconstrained


def _mergeable(part: JSONObject) -> bool:
    return any(key in part for key in ("properties", "$ref", "enum", "anyOf", "oneOf"))


def _matches_anything(schema: JSONObject) -> bool:
    return not any(key in schema for key in _STRUCTURAL)


def _drop_dangling_refs(schema: JSONObject, root: JSONObject) -> None:
    """Remove ``$ref``s llama.cpp cannot resolve (it resolves raw, unescaped pointer segments).

    Walks only the subschemas :func:`_clean_schema` rebuilt: values under other keys are shared
    with the caller's schema and llama.cpp never reads them.
    """
    ref = schema.get("$ref")
    if isinstance(ref, str) and not isinstance(_resolve_pointer(root, ref), dict):
        del schema["$ref"]
    for key in ("properties", "$defs", "definitions"):
        children = schema.get(key)
        if isinstance(children, dict):
            for child in children.values():
                _drop_dangling_refs(child, root)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems", "items", "additionalProperties"):
        value = schema.get(key)
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, dict):
                _drop_dangling_refs(child, root)


def _resolve_pointer(root: JSONObject, ref: str) -> Any:
    target: Any = root
    for part in ref[2:].split("/"):
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            return None
    return target


_QUANTIFIER = re.compile(r"\{(\d*)(,?)(\d*)\}")


def _pattern_is_safe(pattern: str) -> bool:
    """Whether llama.cpp's regex-to-grammar step can take ``pattern`` without failing.

    Patterns it cannot express (``\\d``, lookarounds, …) are fine: it falls back to any string.
    Fatal are invalid regexes and bounded repetitions that exceed its grammar limits.
    """
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError):
        return False
    spread = 0
    for low, high in _quantifiers(pattern):
        if low > _MAX_REPEAT // 2:
            return False
        if high is not None:
            spread += min(high, _MAX_REPEAT + 1) - low
    # rules a repetition creates add up when a starred group contains them
    return spread <= _MAX_REPEAT * 3 // 4


def _quantifiers(pattern: str) -> list[tuple[int, int | None]]:
    """The ``{m,n}`` quantifiers of a regex, outside character classes and escapes."""
    found: list[tuple[int, int | None]] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "{":
            match = _QUANTIFIER.match(pattern, i)
            if match and (match.group(1) or match.group(3)):
                low = int(match.group(1) or 0)
                high = int(match.group(3)) if match.group(3) else (None if match.group(2) else low)
                found.append((low, high))
        i += 1
    return found


# --- streaming ----------------------------------------------------------------------------------

_PING: Final = b'event: ping\ndata: {"type":"ping"}\n\n'
_MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_BLOCK_START: Final = b'event: content_block_start\ndata: {"type":"content_block_start","index":%d,"content_block":'
_TEXT_BLOCK: Final = b'{"type":"text","text":""}}\n\n'
_THINKING_BLOCK: Final = b'{"type":"thinking","thinking":"","signature":""}}\n\n'
_BLOCK_STOP: Final = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
_DELTA: Final = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,"delta":{"type":'
_TEXT_DELTA: Final = b'"text_delta","text":'
_THINKING_DELTA: Final = b'"thinking_delta","thinking":'
_JSON_DELTA: Final = b'"input_json_delta","partial_json":'
_SIGNATURE_DELTA: Final = b'"signature_delta","signature":""}}\n\n'
_DELTA_END: Final = b"}}\n\n"

_NONE, _TEXT, _THINKING, _TOOL = 0, 1, 2, 3


def _sse(event: str, data: JSONObject) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class AnthropicStream:
    """Turns one job's worker messages into Anthropic server-sent events.

    Call :meth:`start` first, then feed :meth:`on_token`, :meth:`on_tool_call_delta` and
    :meth:`on_complete` (or :meth:`on_error`) in arrival order; each returns the bytes to write
    (possibly empty). Content blocks are numbered in the order they open and a block is closed
    before the next one opens. Constant parts of every event are encoded once per block, so a
    token costs one ``orjson.dumps`` of its text.

    :param message_id: ``msg_…`` id of the answer.
    :param model: the model name to report (the one the caller asked for).
    :param input_tokens: the prompt size known before generation (reported in ``message_start``;
        ``message_delta`` carries the worker's exact counts).
    :param stop_sequences: the request's ``stop_sequences``, used to name the matched one.
    """

    __slots__ = (
        "_block_count", "_cached_tokens", "_delta_prefix", "_done", "_held", "_input_tokens", "_interleaved",
        "_live_tool",
        "_message_id", "_model", "_open", "_open_index", "_saw_text", "_saw_thinking", "_stop_sequences",
        "_streamed_ids", "_tool_blocks",
    )  # fmt: skip

    def __init__(
        self, message_id: str, model: str, input_tokens: int = 0, stop_sequences: list[str] | None = None
    ) -> None:
        self._message_id = message_id
        self._model = model
        self._input_tokens = input_tokens
        self._cached_tokens = 0
        self._stop_sequences = stop_sequences or []
        self._block_count = 0
        self._open = _NONE
        self._open_index = -1
        self._delta_prefix = b""
        self._tool_blocks: dict[int, bytes] = {}  # OpenAI tool index -> its input_json_delta prefix
        self._streamed_ids: set[str] = set()
        self._saw_text = False
        self._saw_thinking = False
        self._done = False
        # Anthropic allows one open block at a time, OpenAI tool-call fragments may interleave:
        # one call streams live, others are held until it is clear the output is sequential.
        self._live_tool: int | None = None
        self._held: dict[int, _HeldCall] = {}
        self._interleaved = False

    @property
    def finished(self) -> bool:
        """Whether the stream has ended (``message_stop`` or ``error`` written)."""
        return self._done

    def on_prompt_size(self, total: int, cached: int) -> None:
        """The prompt size the worker reported before the first token (llama-server's prompt
        progress), for ``message_start``: Claude Code tracks its context from it."""
        self._input_tokens = max(total, 0)
        self._cached_tokens = min(max(cached, 0), self._input_tokens)

    def start(self) -> bytes:
        """``message_start`` (empty content, the known prompt size) followed by a ``ping``."""
        message: JSONObject = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self._input_tokens - self._cached_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": self._cached_tokens,
                "output_tokens": 1,
            },
        }
        return _sse("message_start", {"type": "message_start", "message": message}) + _PING

    @staticmethod
    def ping() -> bytes:
        """A ``ping`` event, for keep-alives while the job waits or the prompt is processed."""
        return _PING

    def on_token(self, msg: Token) -> bytes:
        """Text goes to a text block, reasoning to a thinking block; switching kind closes the block."""
        text = msg.token
        if not text or self._done:
            return b""
        kind = _THINKING if msg.reasoning else _TEXT
        if kind == self._open:
            return self._delta_prefix + orjson.dumps(text) + _DELTA_END
        head = self._flush_held() + self._close_block()
        index = self._new_block()
        if kind == _THINKING:
            self._saw_thinking = True
            head += _BLOCK_START % index + _THINKING_BLOCK
            self._delta_prefix = _DELTA % index + _THINKING_DELTA
        else:
            self._saw_text = True
            head += _BLOCK_START % index + _TEXT_BLOCK
            self._delta_prefix = _DELTA % index + _TEXT_DELTA
        self._open = kind
        return head + self._delta_prefix + orjson.dumps(text) + _DELTA_END

    def on_tool_call_delta(self, msg: ToolCallDelta) -> bytes:
        """A new OpenAI tool index opens a ``tool_use`` block; argument fragments stream as they come."""
        if self._done:
            return b""
        out: list[bytes] = []
        for call in msg.tool_calls:
            index = call.get("index", 0)
            function = call.get("function") or {}
            arguments = function.get("arguments")
            fragment = arguments if isinstance(arguments, str) else ""
            if index == self._live_tool:
                if self._held:
                    self._interleaved = True  # the live call goes on after another started
                out.append(self._tool_fragment(index, fragment))
            elif index in self._held:
                self._held[index].arguments.append(fragment)
                if not self._interleaved and len(self._held) == 1 and len(self._held[index].arguments) > 1:
                    out.append(self._promote(index))  # sequential after all: stream it live
            elif self._live_tool is None and self._open != _TOOL:
                out.append(self._start_live_tool(index, call.get("id") or "", function.get("name") or ""))
                out.append(self._tool_fragment(index, fragment))
            else:
                self._held[index] = _HeldCall(call.get("id") or "", function.get("name") or "", [fragment])
        return b"".join(out)

    def _start_live_tool(self, index: int, raw_id: str, name: str) -> bytes:
        if raw_id:
            self._streamed_ids.add(raw_id)
        head = self._open_tool(tool_use_id(raw_id, self._message_id, index), name)
        self._tool_blocks[index] = self._delta_prefix
        self._live_tool = index
        return head

    def _tool_fragment(self, index: int, fragment: str) -> bytes:
        return self._tool_blocks[index] + orjson.dumps(fragment) + _DELTA_END if fragment else b""

    def _promote(self, index: int) -> bytes:
        held = self._held.pop(index)
        self._live_tool = None
        out = self._close_block() + self._start_live_tool(index, held.raw_id, held.name)
        return out + self._tool_fragment(index, "".join(held.arguments))

    def _flush_held(self) -> bytes:
        """Held calls, each as one whole block, once no live call needs the stream any more."""
        out = b""
        for index in sorted(self._held):
            out += self._promote(index)
        self._live_tool = None
        return out

    def on_complete(self, msg: Complete) -> bytes:
        """Blocks the worker did not stream, the closing of the open block, ``message_delta``, ``message_stop``."""
        if self._done:
            return b""
        out: list[bytes] = []
        if not self._saw_thinking and msg.reasoning_content:
            out.append(self.on_token(Token(msg.job_id, msg.reasoning_content, True)))
        if not self._saw_text and msg.full_response:
            out.append(self.on_token(Token(msg.job_id, msg.full_response)))
        out.append(self._flush_held())
        streamed = len(self._tool_blocks)
        for position, call in enumerate(msg.tool_calls):
            raw_id = call.get("id") or ""
            if raw_id in self._streamed_ids or (not raw_id and position < streamed):
                continue  # already sent as deltas
            out.append(self._whole_tool_call(call, position))
        if self._block_count == 0:
            # Anthropic answers always hold a block; an empty text block mirrors build_message
            out.append(_BLOCK_START % self._new_block() + _TEXT_BLOCK)
            self._open = _TEXT
        out.append(self._close_block())
        stop_reason, stop_sequence = _stop_reason(msg, bool(self._tool_blocks or msg.tool_calls), self._stop_sequences)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": _usage(msg, self._input_tokens),
        }
        out.append(_sse("message_delta", delta))
        out.append(_MESSAGE_STOP)
        self._done = True
        return b"".join(out)

    def on_error(self, message: str, error_type: str = "api_error") -> bytes:
        """An ``error`` event; the stream ends there (no ``message_stop``, as Anthropic does)."""
        if self._done:
            return b""
        self._done = True
        return _sse("error", {"type": "error", "error": {"type": error_type, "message": message}})

    def _new_block(self) -> int:
        index = self._block_count
        self._block_count += 1
        self._open_index = index
        return index

    def _close_block(self) -> bytes:
        kind, index = self._open, self._open_index
        if kind == _NONE:
            return b""
        self._open = _NONE
        if kind == _THINKING:
            # Anthropic clients expect a signature before a thinking block ends; there is none
            return _DELTA % index + _SIGNATURE_DELTA + _BLOCK_STOP % index
        return _BLOCK_STOP % index

    def _open_tool(self, tool_id: str, name: str) -> bytes:
        head = self._close_block()
        index = self._new_block()
        block = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
        self._open = _TOOL
        self._delta_prefix = _DELTA % index + _JSON_DELTA
        return head + _BLOCK_START % index + orjson.dumps(block) + b"}\n\n"

    def _whole_tool_call(self, call: JSONObject, position: int) -> bytes:
        function = call.get("function") or {}
        tool_id = tool_use_id(call.get("id") or "", self._message_id, position)
        # a negative key keeps calls that never streamed apart from OpenAI indices
        key = -1 - position
        out = self._open_tool(tool_id, function.get("name") or "")
        self._tool_blocks[key] = self._delta_prefix
        arguments = _arguments_text(function.get("arguments"))
        if arguments:
            out += self._delta_prefix + orjson.dumps(arguments) + _DELTA_END
        return out


@dataclass(slots=True)
class _HeldCall:
    raw_id: str
    name: str
    arguments: list[str]


def tool_use_id(raw_id: str, message_id: str, position: int) -> str:
    """The Anthropic id of a tool call: ``toolu_``-prefixed, derived from the message when missing."""
    if raw_id:
        return raw_id if raw_id.startswith("toolu_") else "toolu_" + raw_id
    return f"toolu_{message_id.removeprefix('msg_')}_{position}"


def _stop_reason(msg: Complete, has_tool_calls: bool, stop_sequences: list[str]) -> tuple[str, str | None]:
    if msg.finish_reason == "length":
        return "max_tokens", None
    if has_tool_calls:
        return "tool_use", None
    matched = msg.stop_sequence if msg.stop_sequence in stop_sequences else ""  # only one the caller asked for
    if msg.finish_reason == "stop_sequence" or matched:
        if matched:
            return "stop_sequence", matched
        return "stop_sequence", stop_sequences[0] if len(stop_sequences) == 1 else None
    return "end_turn", None


def _usage(msg: Complete, fallback_input: int = 0) -> JSONObject:
    cached = max(0, msg.cache_tokens)
    prompt = msg.input_tokens if msg.input_tokens > 0 else fallback_input
    return {
        "input_tokens": max(0, prompt - cached),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": max(0, msg.output_tokens),
    }


def _arguments_text(arguments: Any) -> str:
    """The arguments as JSON object text, or "" when they are not a JSON object."""
    if isinstance(arguments, dict):
        return orjson.dumps(arguments).decode()
    if isinstance(arguments, str) and arguments:
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return ""
        return arguments if isinstance(parsed, dict) else ""
    return ""


def _parse_arguments(arguments: Any) -> JSONObject:
    text = _arguments_text(arguments)
    parsed = orjson.loads(text) if text else {}
    return parsed if isinstance(parsed, dict) else {}


# --- non-streaming ------------------------------------------------------------------------------


def build_message(msg: Complete, *, message_id: str, model: str, stop_sequences: list[str] | None = None) -> JSONObject:
    """The non-streaming ``message`` body for a finished job.

    Content is thinking (signature ``""``), then text, then one ``tool_use`` per call with its
    arguments parsed (not a JSON object: ``{}``); a lone empty text block when there is nothing.

    :param msg: the worker's ``complete`` message.
    :param message_id: ``msg_…`` id of the answer.
    :param model: the model name to report.
    :param stop_sequences: the request's ``stop_sequences``, used to name the matched one.
    """
    content: list[JSONObject] = []
    if msg.reasoning_content:
        content.append({"type": "thinking", "thinking": msg.reasoning_content, "signature": ""})
    if msg.full_response:
        content.append({"type": "text", "text": msg.full_response})
    for position, call in enumerate(msg.tool_calls):
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": tool_use_id(call.get("id") or "", message_id, position),
                "name": function.get("name") or "",
                "input": _parse_arguments(function.get("arguments")),
            }
        )
    if not content:
        content.append({"type": "text", "text": ""})
    stop_reason, stop_sequence = _stop_reason(msg, bool(msg.tool_calls), stop_sequences or [])
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(msg),
    }


# --- models -------------------------------------------------------------------------------------

# Anthropic documents the epoch for models whose release date is unknown.
_UNKNOWN_RELEASE: Final = "1970-01-01T00:00:00Z"


def model_object(model_name: str, *, max_input_tokens: int | None = None, max_tokens: int | None = None) -> JSONObject:
    """One entry of ``GET /v1/models``.

    :param model_name: the model id.
    :param max_input_tokens: the context window, when known (clients size their context by it).
    :param max_tokens: the largest ``max_tokens`` accepted, when known.
    """
    obj: JSONObject = {
        "type": "model",
        "id": model_name,
        "display_name": model_name,
        "created_at": _UNKNOWN_RELEASE,
        "lifecycle": "active",
    }
    if max_input_tokens is not None:
        obj["max_input_tokens"] = max_input_tokens
    if max_tokens is not None:
        obj["max_tokens"] = max_tokens
    return obj


def models_list(model_name: str, *, max_input_tokens: int | None = None, max_tokens: int | None = None) -> JSONObject:
    """The ``GET /v1/models`` page: the single served model. Parameters as :func:`model_object`."""
    obj = model_object(model_name, max_input_tokens=max_input_tokens, max_tokens=max_tokens)
    return {"data": [obj], "first_id": model_name, "has_more": False, "last_id": model_name}


# --- token estimate -----------------------------------------------------------------------------

# Pieces roughly as a byte-level BPE pre-tokenizer cuts text: a word with its leading space,
# digit runs, punctuation runs, whitespace runs.
_PIECES = re.compile(r" ?[^\W\d_]+| ?\d+| ?[^\w\s]+|\s+")
_IMAGE_TOKENS: Final = 1000
_MESSAGE_TOKENS: Final = 4
_TOOL_TOKENS: Final = 10


def estimate_tokens(body: Any) -> int:
    """Estimate the prompt tokens of a Messages request when no worker can tokenize it.

    Text is cut into pieces the way a byte-level BPE pre-tokenizer does (words with their
    leading space, digit runs, punctuation runs, whitespace runs) and each piece is priced: an
    ASCII word is one token plus one per further 10 letters, a digit one token, punctuation one
    per 3 characters, other letters 0.6 per character. Tool definitions count their name,
    description and schema JSON; each message adds 4 tokens of role markup, each tool 10, each
    image 1000. Measured against the Qwen2 tokenizer on the Claude Code captures' system
    prompts, tool schemas and a Python file it is 1–4 % high, bytes/4 5–20 % high; erring high
    is the safe side for clients that compact their context by it. Never raises.

    :param body: the request body (anything; what is not understood counts 0).
    """
    if not isinstance(body, dict):
        return 0
    total = _estimate_value(body.get("system"))
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            total += _MESSAGE_TOKENS
            if isinstance(message, dict):
                total += _estimate_value(message.get("content"))
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if isinstance(tool, dict):
                total += _TOOL_TOKENS + _estimate_value(tool.get("name")) + _estimate_value(tool.get("description"))
                total += _estimate_text(orjson.dumps(tool.get("input_schema") or {}).decode())
    return total


def _estimate_value(value: Any) -> int:
    if isinstance(value, str):
        return _estimate_text(value)
    if isinstance(value, list):
        return sum(_estimate_value(item) for item in value)
    if not isinstance(value, dict):
        return 0
    kind = value.get("type")
    if kind == "image":
        return _IMAGE_TOKENS
    if kind == "document":
        source = value.get("source")
        if isinstance(source, dict) and source.get("type") in ("text", "content"):
            return _estimate_value(source.get("data")) + _estimate_value(source.get("content"))
        return _IMAGE_TOKENS  # a PDF: a guess, it is not rendered here anyway
    if kind == "tool_use":
        return _estimate_value(value.get("name")) + _estimate_text(orjson.dumps(value.get("input") or {}).decode())
    return sum(_estimate_value(value.get(key)) for key in ("text", "thinking", "content"))


def _estimate_text(text: str) -> int:
    total = 0
    for piece in _PIECES.findall(text):
        word = piece.lstrip(" ")
        if not word:
            total += 1
        elif word[0].isspace():
            total += 1 + len(word) // 16
        elif not word.isascii():
            total += max(1, round(len(word) * 0.6))
        elif word[0].isalpha():
            total += 1 + (len(word) - 1) // 10
        elif word[0].isdigit():
            total += len(word)
        else:
            total += (len(word) + 2) // 3
    return total
