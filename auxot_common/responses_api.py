"""OpenAI Responses API (``POST /responses``, used by the Codex CLI): request translation, SSE
events and response objects. Pure code, no I/O.

A Responses request becomes the same chat job the worker runs for ``/chat/completions``
(:class:`auxot_common.openai_api.ChatRequest`); the job's events are turned back into Responses
output items and named SSE events. Decisions where the two worlds do not line up:

- ``instructions`` and the leading ``developer``/``system`` messages are merged, in order, into one
  system message (most chat templates accept one system message, first). Later ones stay system
  messages in place.
- ``function_call`` / ``custom_tool_call`` items become assistant ``tool_calls`` (consecutive calls
  join one assistant turn); their outputs become ``tool`` messages.
- ``reasoning`` items are replayed as the next assistant turn's ``reasoning_content`` (templates
  that do not render reasoning ignore it). Items with only ``encrypted_content`` (OpenAI's opaque
  reasoning, which no local model can read) are dropped without error.
- ``custom`` tools (freeform, e.g. Codex's ``apply_patch`` with a Lark grammar) are offered to the
  model as a function taking one string, ``input``; the grammar goes into the description. A call
  comes back as a ``custom_tool_call`` whose ``input`` is that string.
- ``namespace`` tools are offered as ``{namespace}__{name}`` (chat tool names cannot hold dots); a
  call comes back with its own ``name`` and ``namespace``.
- Hosted tools the router cannot run (``web_search``, ``tool_search``, ``file_search``, …) are
  dropped; their types are listed in :attr:`ResponsesRequest.dropped_tools` for a note.
- Reasoning from the model is streamed as a ``reasoning`` item with ``reasoning_text`` content
  (raw chain of thought, as OpenAI's open-weight models do), not as a summary.
- ``max_output_tokens`` reached: ``status: "incomplete"``, ``incomplete_details.reason:
  "max_output_tokens"`` and a ``response.incomplete`` event.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from auxot_common.anthropic_api import sanitize_json_schema
from auxot_common.openai_api import ChatRequest, RequestError
from auxot_common.protocol import Complete, JSONObject, Token, ToolCallDelta

NAMESPACE_SEPARATOR: Final = "__"
HOSTED_TOOL_TYPES: Final = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "tool_search",
        "file_search",
        "code_interpreter",
        "computer_use_preview",
        "computer_use",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
    }
)
CUSTOM_INPUT_DESCRIPTION: Final = "The whole raw input of this freeform tool, as one string."


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass(slots=True)
class ToolKind:
    """How a name the model calls maps back to the client's tool."""

    kind: str  # "function" or "custom"
    name: str
    namespace: str | None = None


@dataclass(slots=True)
class ResponsesRequest:
    """A validated Responses request: the chat job plus what the reply needs."""

    chat: ChatRequest
    input_items: list[JSONObject]  # the whole conversation, previous response included
    tool_kinds: dict[str, ToolKind]
    echo: JSONObject  # request fields echoed in the response object
    store: bool = True
    previous_response_id: str | None = None
    dropped_tools: list[str] = field(default_factory=list)


def previous_response_id(body: Any) -> str | None:
    """The ``previous_response_id`` of a body, checked, before the history is fetched."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    value = body.get("previous_response_id")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RequestError(400, "previous_response_id must be a string", param="previous_response_id")
    return value


def parse_request(body: Any, history: list[JSONObject] | None = None) -> ResponsesRequest:
    """Validate a ``POST /responses`` body; ``history`` is the stored conversation of
    ``previous_response_id`` (its input and output items). Raises :class:`RequestError`."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    items = _input_items(body.get("input"))
    all_items = [*(history or []), *items]
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise RequestError(400, "model must be a string", param="model")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be a boolean", param="stream")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError(400, "instructions must be a string", param="instructions")

    raw_tools = body.get("tools") or []
    if not isinstance(raw_tools, list):
        raise RequestError(400, "tools must be an array", param="tools")
    for item in all_items:  # Codex's "responses lite": tools travel as an input item
        if item.get("type") == "additional_tools" and isinstance(item.get("tools"), list):
            raw_tools = [*raw_tools, *item["tools"]]
    tools, kinds, dropped = translate_tools(raw_tools)

    params: JSONObject = {}
    _sampling(body, params)
    tools = _tool_choice(body.get("tool_choice"), tools, kinds, params)
    parallel = body.get("parallel_tool_calls")
    if isinstance(parallel, bool) and tools:
        params["parallel_tool_calls"] = parallel
    _text_format(body.get("text"), params)
    effort = _reasoning_effort(body.get("reasoning"))
    max_output = body.get("max_output_tokens")
    if max_output is not None and (not isinstance(max_output, int) or isinstance(max_output, bool) or max_output < 1):
        raise RequestError(400, "max_output_tokens must be a positive integer", param="max_output_tokens")
    temperature = body.get("temperature")
    if temperature is not None and not _is_number(temperature):
        raise RequestError(400, "temperature must be a number", param="temperature")

    messages = to_messages(all_items, instructions, kinds)
    if not messages or all(m["role"] == "system" for m in messages):
        raise RequestError(400, "input must hold at least one message or item", param="input")
    store = body.get("store")
    chat = ChatRequest(
        model=model,
        messages=messages,
        tools=tools,
        temperature=float(temperature) if temperature is not None else None,
        max_tokens=max_output,
        reasoning_effort=effort,
        params=params,
        stream=stream,
    )
    echo: JSONObject = {
        "instructions": instructions,
        "max_output_tokens": max_output,
        "parallel_tool_calls": parallel if isinstance(parallel, bool) else True,
        "reasoning": {"effort": effort or None, "summary": None},
        "temperature": temperature if temperature is not None else 1.0,
        "top_p": body.get("top_p") if _is_number(body.get("top_p")) else 1.0,
        "text": body.get("text") if isinstance(body.get("text"), dict) else {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": raw_tools,
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "store": store is not False,
        "previous_response_id": body.get("previous_response_id"),
    }
    return ResponsesRequest(
        chat=chat,
        input_items=[i for i in all_items if i.get("type") != "additional_tools"],
        tool_kinds=kinds,
        echo=echo,
        store=store is not False,
        previous_response_id=body.get("previous_response_id"),
        dropped_tools=dropped,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _input_items(value: Any) -> list[JSONObject]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise RequestError(400, "input must be a string or an array of items", param="input")
    items: list[JSONObject] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise RequestError(400, f"input[{index}] must be an object", param=f"input[{index}]")
        if "type" not in item and "role" in item:
            items.append({**item, "type": "message"})
            continue
        if not isinstance(item.get("type"), str):
            raise RequestError(400, f"input[{index}].type is required", param=f"input[{index}]")
        items.append(item)
    return items


# --- tools --------------------------------------------------------------------------------------


def translate_tools(raw_tools: list[Any]) -> tuple[list[JSONObject], dict[str, ToolKind], list[str]]:
    """Responses tools as chat tools, the map back from called names, and the dropped types."""
    tools: list[JSONObject] = []
    kinds: dict[str, ToolKind] = {}
    dropped: list[str] = []

    def add(tool: Any, namespace: str | None) -> None:
        if not isinstance(tool, dict):
            raise RequestError(400, "each tool must be an object", param="tools")
        kind = tool.get("type")
        if kind == "namespace":
            inner = tool.get("tools")
            if isinstance(inner, list) and isinstance(tool.get("name"), str):
                for sub in inner:
                    add(sub, tool["name"])
            return
        if kind not in ("function", "custom"):
            dropped.append(str(kind))
            return
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(400, f"a {kind} tool needs a name", param="tools")
        exposed = f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name
        if exposed in kinds:
            return
        kinds[exposed] = ToolKind(kind, name, namespace)
        description = tool.get("description") or ""
        if kind == "function":
            parameters = tool.get("parameters")
            if not isinstance(parameters, dict):
                parameters = {"type": "object", "properties": {}}
        else:
            description = _custom_description(description, tool.get("format"))
            parameters = {
                "type": "object",
                "properties": {"input": {"type": "string", "description": CUSTOM_INPUT_DESCRIPTION}},
                "required": ["input"],
            }
        tools.append(
            {"type": "function", "function": {"name": exposed, "description": description, "parameters": parameters}}
        )

    for tool in raw_tools:
        add(tool, None)
    return tools, kinds, dropped


def _custom_description(description: str, fmt: Any) -> str:
    if isinstance(fmt, dict) and fmt.get("type") == "grammar" and isinstance(fmt.get("definition"), str):
        syntax = fmt.get("syntax") or "lark"
        return f"{description}\n\nThe input must follow this {syntax} grammar:\n{fmt['definition']}"
    return description


def _tool_choice(
    choice: Any, tools: list[JSONObject], kinds: dict[str, ToolKind], params: JSONObject
) -> list[JSONObject]:
    """llama-server reads ``tool_choice`` only as ``auto``/``none``/``required``: a named tool
    becomes the only tool offered and the choice ``required``."""
    if not tools or choice is None:
        return tools
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise RequestError(400, f"unknown tool_choice {choice!r}", param="tool_choice")
        if choice != "auto":
            params["tool_choice"] = choice
        return tools
    if not isinstance(choice, dict):
        raise RequestError(400, "tool_choice must be a string or an object", param="tool_choice")
    kind = choice.get("type")
    if kind in ("function", "custom"):
        name = choice.get("name")
        chosen = [t for t in tools if kinds[t["function"]["name"]].name == name]
        if not chosen:
            raise RequestError(400, f"tool_choice names a tool that is not in tools: {name!r}", param="tool_choice")
        params["tool_choice"] = "required"
        return chosen
    if kind == "allowed_tools":
        allowed = {t.get("name") for t in choice.get("tools") or [] if isinstance(t, dict)}
        chosen = [t for t in tools if kinds[t["function"]["name"]].name in allowed]
        if choice.get("mode") == "required":
            params["tool_choice"] = "required"
        return chosen
    return tools  # a hosted tool's choice: nothing here can honour it


# --- sampling, format, reasoning ----------------------------------------------------------------


def _sampling(body: JSONObject, params: JSONObject) -> None:
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p):
            raise RequestError(400, "top_p must be a number", param="top_p")
        params["top_p"] = top_p
    for name in ("top_k", "min_p", "seed", "presence_penalty", "frequency_penalty"):
        if _is_number(body.get(name)):
            params[name] = body[name]


def _text_format(text: Any, params: JSONObject) -> None:
    if not isinstance(text, dict):
        return
    fmt = text.get("format")
    if not isinstance(fmt, dict):
        return
    kind = fmt.get("type")
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise RequestError(400, "text.format.schema must be an object", param="text.format")
        params["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": fmt.get("name") or "response", "schema": sanitize_json_schema(schema)},
        }
    elif kind == "json_object":
        params["response_format"] = {"type": "json_object"}


def _reasoning_effort(reasoning: Any) -> str:
    if not isinstance(reasoning, dict):
        return ""
    effort = reasoning.get("effort")
    return effort if isinstance(effort, str) else ""


# --- input items -> chat messages ---------------------------------------------------------------


def to_messages(items: list[JSONObject], instructions: str | None, kinds: dict[str, ToolKind]) -> list[JSONObject]:
    """The conversation as chat messages (see the module docstring for the rules)."""
    system: list[str] = [instructions] if instructions else []
    messages: list[JSONObject] = []
    pending_reasoning: list[str] = []

    def assistant() -> JSONObject:
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            return last
        message: JSONObject = {"role": "assistant", "content": ""}
        messages.append(message)
        return message

    def attach_reasoning(message: JSONObject) -> None:
        if pending_reasoning:
            message["reasoning_content"] = "\n\n".join(pending_reasoning)
            pending_reasoning.clear()

    for item in items:
        kind = item.get("type")
        if kind == "message":
            role = item.get("role")
            if role in ("system", "developer"):
                text = _content_text(item.get("content"))
                if not messages:
                    system.append(text)
                else:
                    messages.append({"role": "system", "content": text})
            elif role == "assistant":
                message = assistant()
                attach_reasoning(message)
                text = _content_text(item.get("content"))
                message["content"] = (message.get("content") or "") + text
            else:
                messages.append({"role": "user", "content": _user_content(item.get("content"))})
        elif kind in ("function_call", "custom_tool_call"):
            message = assistant()
            attach_reasoning(message)
            name = str(item.get("name") or "")
            if item.get("namespace"):
                name = f"{item['namespace']}{NAMESPACE_SEPARATOR}{name}"
            if kind == "custom_tool_call":
                arguments = orjson.dumps({"input": str(item.get("input") or "")}).decode()
            else:
                raw_arguments = item.get("arguments")
                arguments = raw_arguments if isinstance(raw_arguments, str) else "{}"
            call_id = str(item.get("call_id") or item.get("id") or new_id("call_"))
            message.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments or "{}"}}
            )
        elif kind in ("function_call_output", "custom_tool_call_output"):
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": str(item.get("call_id") or ""),
                    "content": _output_text(item.get("output")),
                }
            )
        elif kind == "reasoning":
            text = _reasoning_text(item)
            if text:
                pending_reasoning.append(text)
        # additional_tools, configuration_update, item_reference, …: nothing to render
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(s for s in system if s)})
    return messages


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = [str(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(parts)


def _user_content(content: Any) -> str | list[JSONObject]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts: list[JSONObject] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            url = part.get("image_url")
            if isinstance(url, str) and url:
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                parts.append({"type": "text", "text": "[an image was attached by file id; it cannot be shown here]"})
        elif kind == "input_file":
            name = part.get("filename") or part.get("file_id") or "a file"
            parts.append({"type": "text", "text": f"[{name} was attached; files are not supported here]"})
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _output_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        return _content_text(output)
    if isinstance(output, dict) and isinstance(output.get("content"), str):
        return str(output["content"])
    return orjson.dumps(output).decode() if output is not None else ""


def _reasoning_text(item: JSONObject) -> str:
    texts: list[str] = []
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list):
            texts += [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str) and p["text"]]
        if texts:
            break  # the full reasoning when present, else its summary
    return "\n\n".join(texts)


# --- output items -------------------------------------------------------------------------------


def usage_object(msg: Complete) -> JSONObject:
    return {
        "input_tokens": msg.input_tokens,
        "input_tokens_details": {"cached_tokens": msg.cache_tokens},
        "output_tokens": msg.output_tokens,
        "output_tokens_details": {"reasoning_tokens": msg.reasoning_tokens},
        "total_tokens": msg.input_tokens + msg.output_tokens,
    }


def response_object(
    response_id: str,
    model: str,
    created_at: int,
    echo: JSONObject,
    *,
    status: str,
    output: list[JSONObject] | None = None,
    usage: JSONObject | None = None,
    error: JSONObject | None = None,
    incomplete_reason: str | None = None,
) -> JSONObject:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "model": model,
        "output": output or [],
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        **echo,
    }


def _message_item(item_id: str, text: str, status: str = "completed") -> JSONObject:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    )
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str | None) -> JSONObject:
    item: JSONObject = {"id": item_id, "type": "reasoning", "summary": []}
    if text is not None:
        item["content"] = [{"type": "reasoning_text", "text": text}]
    return item


def _call_item(
    item_id: str, call_id: str, exposed_name: str, arguments: str, kinds: dict[str, ToolKind], *, status: str
) -> JSONObject:
    kind = kinds.get(exposed_name) or ToolKind("function", exposed_name)
    if kind.kind == "custom":
        item: JSONObject = {
            "id": item_id,
            "type": "custom_tool_call",
            "status": status,
            "call_id": call_id,
            "name": kind.name,
            "input": custom_input(arguments) if status == "completed" else "",
        }
    else:
        item = {
            "id": item_id,
            "type": "function_call",
            "status": status,
            "call_id": call_id,
            "name": kind.name,
            "arguments": arguments,
        }
    if kind.namespace:
        item["namespace"] = kind.namespace
    return item


def custom_input(arguments: str) -> str:
    """The raw input of a freeform tool from the ``{"input": …}`` the model wrote."""
    try:
        parsed = orjson.loads(arguments) if arguments else {}
    except orjson.JSONDecodeError:
        return arguments
    if isinstance(parsed, dict):
        value = parsed.get("input")
        if isinstance(value, str):
            return value
        if len(parsed) == 1:
            only = next(iter(parsed.values()))
            return only if isinstance(only, str) else orjson.dumps(only).decode()
    return arguments


def _call_id(raw: Any) -> str:
    return raw if isinstance(raw, str) and raw else new_id("call_")


def build_output(msg: Complete, kinds: dict[str, ToolKind]) -> list[JSONObject]:
    """Output items of a finished job (non-streaming)."""
    output: list[JSONObject] = []
    if msg.reasoning_content:
        output.append(_reasoning_item(new_id("rs_"), msg.reasoning_content))
    if msg.full_response or not msg.tool_calls:
        output.append(_message_item(new_id("msg_"), msg.full_response))
    for call in msg.tool_calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments or {}).decode()
        output.append(
            _call_item(
                new_id("fc_"),
                _call_id(call.get("id")),
                str(function.get("name") or ""),
                arguments,
                kinds,
                status="completed",
            )
        )
    return output


def final_status(msg: Complete) -> tuple[str, str | None]:
    if msg.finish_reason == "length":
        return "incomplete", "max_output_tokens"
    return "completed", None


def response_body(
    msg: Complete, request: ResponsesRequest, *, response_id: str, model: str, created_at: int
) -> JSONObject:
    status, reason = final_status(msg)
    return response_object(
        response_id,
        model,
        created_at,
        request.echo,
        status=status,
        output=build_output(msg, request.tool_kinds),
        usage=usage_object(msg),
        incomplete_reason=reason,
    )


def error_code(message: str, status: int) -> str:
    """The Responses error code of a job failure; Codex reads ``context_length_exceeded``."""
    lowered = message.lower()
    if "context" in lowered and ("exceed" in lowered or "too long" in lowered or "larger than" in lowered):
        return "context_length_exceeded"
    if status == 429:
        return "rate_limit_exceeded"
    # never "server_is_overloaded": Codex treats it as final, a plain server error it retries
    return "server_error" if status >= 500 or status == 0 else "invalid_request"


# --- streaming ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _OpenItem:
    kind: str  # "message", "reasoning", "call"
    item_id: str
    output_index: int
    text: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""
    delta_head: tuple[bytes, bytes] = (b"", b"")  # a text delta event's bytes around its sequence number


@dataclass(slots=True)
class _HeldCall:
    raw_id: Any
    name: str
    fragments: list[str]


class ResponsesStream:
    """Encodes a job's events as Responses SSE events, with ``sequence_number``s in order.

    Items are sent one after the other (reasoning, text, each tool call): a new kind of
    content closes the open item with its ``…done`` events and ``response.output_item.done``,
    which Codex needs for every item. A tool call whose fragments arrive while another call is
    streaming is held and sent whole at the end.
    """

    def __init__(self, request: ResponsesRequest, response_id: str, model: str, created_at: int) -> None:
        self._request = request
        self._kinds = request.tool_kinds
        self._response_id = response_id
        self._model = model
        self._created_at = created_at
        self._sequence = 0
        self._open: _OpenItem | None = None
        self._output: list[JSONObject] = []
        self._calls: dict[int, _OpenItem] = {}  # by the worker's tool-call index
        self._held: dict[int, _HeldCall] = {}
        self._saw: set[str] = set()
        self._done = False
        self.final: JSONObject | None = None  # the finished response object (for storing)

    def _event(self, kind: str, data: JSONObject) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **data}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def _snapshot(self, status: str, **extra: Any) -> JSONObject:
        return response_object(
            self._response_id, self._model, self._created_at, self._request.echo, status=status, **extra
        )

    def start(self) -> bytes:
        return self._event("response.created", {"response": self._snapshot("in_progress")}) + self._event(
            "response.in_progress", {"response": self._snapshot("in_progress")}
        )

    def _is_custom(self, name: str) -> bool:
        kind = self._kinds.get(name)
        return kind is not None and kind.kind == "custom"

    def _open_item(self, kind: str, prefix: str) -> tuple[_OpenItem, bytes]:
        out = self._close_open()
        item = _OpenItem(kind, new_id(prefix), len(self._output))
        self._output.append({})  # filled in when the item is done
        self._open = item
        self._saw.add(kind)
        return item, out

    def _close_open(self) -> bytes:
        item, self._open = self._open, None
        if item is None:
            return b""
        where = {"item_id": item.item_id, "output_index": item.output_index}
        text = "".join(item.text)
        out = b""
        if item.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out += self._event("response.output_text.done", {**where, "content_index": 0, "text": text, "logprobs": []})
            out += self._event("response.content_part.done", {**where, "content_index": 0, "part": part})
            done = _message_item(item.item_id, text)
        elif item.kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            out += self._event("response.reasoning_text.done", {**where, "content_index": 0, "text": text})
            out += self._event("response.content_part.done", {**where, "content_index": 0, "part": part})
            done = _reasoning_item(item.item_id, text)
        else:
            done = _call_item(item.item_id, item.call_id, item.name, text, self._kinds, status="completed")
            if done["type"] == "custom_tool_call":
                out += self._event("response.custom_tool_call_input.delta", {**where, "delta": done["input"]})
                out += self._event("response.custom_tool_call_input.done", {**where, "input": done["input"]})
            else:
                done_data = {**where, "name": done["name"], "arguments": text}
                out += self._event("response.function_call_arguments.done", done_data)
        self._output[item.output_index] = done
        return out + self._event("response.output_item.done", {"output_index": item.output_index, "item": done})

    def on_token(self, msg: Token) -> bytes:
        if self._done or not msg.token:
            return b""
        kind = "reasoning" if msg.reasoning else "message"
        out = b""
        item = self._open
        if item is None or item.kind != kind:
            item, out = self._open_item(kind, "rs_" if msg.reasoning else "msg_")
            where = {"item_id": item.item_id, "output_index": item.output_index}
            if msg.reasoning:
                added = _reasoning_item(item.item_id, None)
                part: JSONObject = {"type": "reasoning_text", "text": ""}
            else:
                added = _message_item(item.item_id, "", "in_progress")
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out += self._event("response.output_item.added", {"output_index": item.output_index, "item": added})
            out += self._event("response.content_part.added", {**where, "content_index": 0, "part": part})
        item.text.append(msg.token)
        # the hot path, once per token: the event's fixed bytes are built once per item, and
        # are exactly what _event would write (a unit test compares them)
        if not item.delta_head[0]:
            kind_name = "response.reasoning_text.delta" if msg.reasoning else "response.output_text.delta"
            location = orjson.dumps({"item_id": item.item_id, "output_index": item.output_index, "content_index": 0})
            item.delta_head = (
                b"event: " + kind_name.encode() + b'\ndata: {"type":"' + kind_name.encode() + b'","sequence_number":',
                b"," + location[1:-1] + b',"delta":',
            )
        head, middle = item.delta_head
        sequence = self._sequence
        self._sequence += 1
        tail = b"}\n\n" if msg.reasoning else b',"logprobs":[]}\n\n'
        return out + head + str(sequence).encode() + middle + orjson.dumps(msg.token) + tail

    def on_tool_call_delta(self, msg: ToolCallDelta) -> bytes:
        if self._done:
            return b""
        out = b""
        for call in msg.tool_calls:
            index = call.get("index", 0)
            if not isinstance(index, int):
                index = 0
            function = call.get("function") or {}
            fragment = function.get("arguments") or ""
            if not isinstance(fragment, str):
                fragment = orjson.dumps(fragment).decode()
            live = self._calls.get(index)
            if live is not None:
                out += self._fragment(live, fragment) if live is self._open else b""
                if live is not self._open:
                    live.text.append(fragment)  # pragma: no cover - a closed call never gets more
                continue
            held = self._held.get(index)
            if held is None:
                held = self._held[index] = _HeldCall(call.get("id"), "", [])
            held.raw_id = held.raw_id or call.get("id")
            held.name = held.name or str(function.get("name") or "")
            held.fragments.append(fragment)
            if held.name and not (self._open is not None and self._open.kind == "call"):
                del self._held[index]
                out += self._start_call(index, held.raw_id, held.name)
                out += self._fragment(self._calls[index], "".join(held.fragments))
        return out

    def _start_call(self, index: int, raw_id: Any, name: str) -> bytes:
        item, out = self._open_item("call", "ctc_" if self._is_custom(name) else "fc_")
        item.call_id = _call_id(raw_id)
        item.name = name
        self._calls[index] = item
        added = _call_item(item.item_id, item.call_id, name, "", self._kinds, status="in_progress")
        return out + self._event("response.output_item.added", {"output_index": item.output_index, "item": added})

    def _fragment(self, item: _OpenItem, fragment: str) -> bytes:
        if not fragment:
            return b""
        item.text.append(fragment)
        if self._is_custom(item.name):
            return b""  # a freeform input is sent whole once the JSON around it is complete
        where = {"item_id": item.item_id, "output_index": item.output_index}
        return self._event("response.function_call_arguments.delta", {**where, "delta": fragment})

    def _whole_call(self, index: int, raw_id: Any, name: str, arguments: str) -> bytes:
        return self._start_call(index, raw_id, name) + self._fragment(self._calls[index], arguments)

    def on_complete(self, msg: Complete) -> bytes:
        """Content the worker did not stream, held calls, the last ``…done`` events and
        ``response.completed`` (``response.incomplete`` at ``max_output_tokens``)."""
        if self._done:
            return b""
        out = b""
        if "reasoning" not in self._saw and msg.reasoning_content and not self._output:
            out += self.on_token(Token(msg.job_id, msg.reasoning_content, True))
        if "message" not in self._saw and msg.full_response and not self._calls:
            out += self.on_token(Token(msg.job_id, msg.full_response))
        for index in sorted(self._held):
            held = self._held.pop(index)
            out += self._whole_call(index, held.raw_id, held.name, "".join(held.fragments))
        for position, call in enumerate(msg.tool_calls):
            if position in self._calls:
                continue  # already streamed
            function = call.get("function") or {}
            arguments = function.get("arguments")
            if not isinstance(arguments, str):
                arguments = orjson.dumps(arguments or {}).decode()
            out += self._whole_call(position, call.get("id"), str(function.get("name") or ""), arguments)
        if not self._output:  # a response always holds an item: an empty message
            out += self.on_token(Token(msg.job_id, " "))
            assert self._open is not None
            self._open.text = []
        out += self._close_open()
        status, reason = final_status(msg)
        self.final = self._snapshot(status, output=self._output, usage=usage_object(msg), incomplete_reason=reason)
        self._done = True
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self._event(kind, {"response": self.final})

    def on_error(self, message: str, status: int = 500) -> bytes:
        """``response.failed`` with the error; the stream ends there, never silently."""
        if self._done:
            return b""
        self._done = True
        out = self._close_open()
        error = {"code": error_code(message, status), "message": message}
        self.final = self._snapshot("failed", output=[o for o in self._output if o], error=error)
        return out + self._event("response.failed", {"response": self.final})


def error_event(message: str, code: str, sequence_number: int = 0) -> bytes:
    """A stand-alone ``error`` event (a failure before any response exists)."""
    payload = {"type": "error", "sequence_number": sequence_number, "code": code, "message": message, "param": None}
    return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"


def now() -> int:
    return int(time.time())
