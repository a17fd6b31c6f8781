"""OpenAI-compatible request validation, SSE encoding and response bodies. Pure code, no I/O.

The stream encoders run once per token batch, so every constant part of a chunk is encoded once
per request and only the changing fragment goes through orjson.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from auxot_common.protocol import Complete, JSONObject, Token, ToolCallDelta

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"

# Request fields passed to llama-server as they are, with the JSON types they may have.
_PASSTHROUGH: dict[str, tuple[type, ...]] = {
    "top_p": (int, float),
    "top_k": (int,),
    "min_p": (int, float),
    "stop": (str, list),
    "seed": (int,),
    "response_format": (dict,),
    "tool_choice": (str, dict),
    "parallel_tool_calls": (bool,),
    "logprobs": (bool,),
    "top_logprobs": (int,),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "repeat_penalty": (int, float),
    "logit_bias": (dict, list),
    "chat_template_kwargs": (dict,),
    "n_probs": (int,),
}


class RequestError(ValueError):
    """A request that cannot be served; rendered in the API's own error shape."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param


@dataclass(slots=True)
class ChatRequest:
    """A validated request, ready to become a job."""

    model: str
    messages: list[JSONObject]
    tools: list[JSONObject] = field(default_factory=list)
    temperature: float | None = None
    max_tokens: int | None = None
    reasoning_effort: str = ""
    params: JSONObject = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False


def error_body(message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> JSONObject:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a ``POST /chat/completions`` body. Raises :class:`RequestError` (400)."""
    obj = _require_object(body)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages array is required and must not be empty", param="messages")
    for index, message in enumerate(messages):
        _check_message(index, message)
    n = obj.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise RequestError(400, "n: only n=1 is supported", param="n")
    request = ChatRequest(model=_model(obj), messages=messages, **_common_fields(obj))
    tools = obj.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise RequestError(400, "tools must be an array of objects", param="tools")
        for index, tool in enumerate(tools):
            _check_tool(index, tool)
        request.tools = _force_named_tool(tools, request.params)
    effort = obj.get("reasoning_effort")
    if effort is not None:
        if not isinstance(effort, str):
            raise RequestError(400, "reasoning_effort must be a string", param="reasoning_effort")
        request.reasoning_effort = effort
    return request


def _force_named_tool(tools: list[JSONObject], params: JSONObject) -> list[JSONObject]:
    """``tool_choice: {"type":"function","function":{"name":N}}`` as llama-server understands it:
    it reads ``tool_choice`` only as a string, so offer just that tool and require a call."""
    choice = params.get("tool_choice")
    if not isinstance(choice, dict):
        return tools
    name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
    chosen = [t for t in tools if (t.get("function") or {}).get("name") == name]
    if not chosen:
        raise RequestError(400, f"tool_choice names a tool that is not in tools: {name!r}", param="tool_choice")
    params["tool_choice"] = "required"
    return chosen


def parse_completion_request(body: Any) -> ChatRequest:
    """Validate a legacy ``POST /completions`` body; the prompt travels in ``params``."""
    obj = _require_object(body)
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise RequestError(400, "prompt: only one prompt per request is supported", param="prompt")
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "prompt is required", param="prompt")
    request = ChatRequest(model=_model(obj), messages=[], **_common_fields(obj))
    request.params["prompt"] = prompt
    return request


def _require_object(body: Any) -> JSONObject:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    return body


def _model(obj: JSONObject) -> str:
    model = obj.get("model", "")
    if model is None:
        return ""
    if not isinstance(model, str):
        raise RequestError(400, "model must be a string", param="model")
    return model


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _common_fields(obj: JSONObject) -> JSONObject:
    stream = obj.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be a boolean", param="stream")
    options = obj.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError(400, "stream_options must be an object", param="stream_options")
    return {
        "stream": stream,
        "include_usage": bool(options.get("include_usage", False)),
        "temperature": _optional_number(obj, "temperature"),
        "max_tokens": _max_tokens(obj),
        "params": _passthrough(obj),
    }


def _optional_number(obj: JSONObject, name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise RequestError(400, f"{name} must be a number", param=name)
    return float(value)


def _max_tokens(obj: JSONObject) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = obj.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise RequestError(400, f"{name} must be a positive integer", param=name)
        return int(value)
    return None


def _passthrough(obj: JSONObject) -> JSONObject:
    params: JSONObject = {}
    for name, types in _PASSTHROUGH.items():
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RequestError(400, f"{name} has the wrong type", param=name)
        params[name] = value
    stop = params.get("stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise RequestError(400, "stop must be a string or an array of strings", param="stop")
    return params


def _check_message(index: int, message: Any) -> None:
    """Deep enough that nothing malformed reaches a worker: every item the worker or
    llama-server reads has the type they expect."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError(400, f"{where} must be an object", param=where)
    if not isinstance(message.get("role"), str):
        raise RequestError(400, f"{where}.role is required and must be a string", param=where)
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        raise RequestError(400, f"{where}.content must be a string or an array of parts", param=where)
    if isinstance(content, list):
        for number, part in enumerate(content):
            _check_part(where, f"{where}.content[{number}]", part)
    for name in ("name", "tool_call_id", "reasoning_content"):
        if message.get(name) is not None and not isinstance(message[name], str):
            raise RequestError(400, f"{where}.{name} must be a string", param=where)
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise RequestError(400, f"{where}.tool_calls must be an array", param=where)
    for number, call in enumerate(tool_calls or []):
        _check_tool_call(where, f"{where}.tool_calls[{number}]", call)


def _check_part(param: str, where: str, part: Any) -> None:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise RequestError(400, f"{where}: content parts must be objects with a type", param=param)
    kind = part["type"]
    if kind == "text" and not isinstance(part.get("text"), str):
        raise RequestError(400, f"{where}.text must be a string", param=param)
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise RequestError(400, f"{where}.image_url must be a URL string or an object with a url", param=param)


def _check_tool_call(param: str, where: str, call: Any) -> None:
    if not isinstance(call, dict):
        raise RequestError(400, f"{where} must be an object", param=param)
    for name in ("id", "type"):
        if call.get(name) is not None and not isinstance(call[name], str):
            raise RequestError(400, f"{where}.{name} must be a string", param=param)
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(400, f"{where}.function must be an object with a string name", param=param)
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, str | dict):
        raise RequestError(400, f"{where}.function.arguments must be a JSON string", param=param)


def _check_tool(index: int, tool: JSONObject) -> None:
    where = f"tools[{index}]"
    if tool.get("type") is not None and not isinstance(tool["type"], str):
        raise RequestError(400, f"{where}.type must be a string", param=where)
    function = tool.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RequestError(400, f"{where}.function must be an object with a name", param=where)
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise RequestError(400, f"{where}.function.parameters must be a JSON schema object", param=where)


def usage_object(msg: Complete) -> JSONObject:
    """OpenAI usage: prompt tokens include KV-cache hits, reported as ``cached_tokens``."""
    return {
        "prompt_tokens": msg.input_tokens,
        "completion_tokens": msg.output_tokens,
        "total_tokens": msg.input_tokens + msg.output_tokens,
        "prompt_tokens_details": {"cached_tokens": msg.cache_tokens},
    }


class OpenAIChatStream:
    """Encodes a job's events as ``chat.completion.chunk`` SSE events.

    Parameters:
        completion_id: the ``chatcmpl-…`` id every chunk carries.
        model: echoed in every chunk.
        created: Unix seconds, the same in every chunk (as OpenAI does).
        include_usage: send the usage chunk (``choices: []``) before ``[DONE]``.
    """

    def __init__(self, completion_id: str, model: str, created: int, include_usage: bool) -> None:
        head = orjson.dumps(
            {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        )
        self._head = b"data: " + head[:-1]
        self._prefix = self._head + b',"choices":[{"index":0,"delta":'
        self._include_usage = include_usage
        self._streamed_tool_indexes: set[int] = set()

    def start(self) -> bytes:
        return self._prefix + b'{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'

    def on_token(self, msg: Token) -> bytes:
        key = b'{"reasoning_content":' if msg.reasoning else b'{"content":'
        if msg.logprobs:
            logprobs = b'},"logprobs":{"content":' + orjson.dumps(msg.logprobs) + b'},"finish_reason":null}]}\n\n'
            return self._prefix + key + orjson.dumps(msg.token) + logprobs
        return self._prefix + key + orjson.dumps(msg.token) + b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def on_tool_call_delta(self, msg: ToolCallDelta) -> bytes:
        for call in msg.tool_calls:
            index = call.get("index", 0)
            if isinstance(index, int):
                self._streamed_tool_indexes.add(index)
        return self._delta(b'{"tool_calls":' + orjson.dumps(msg.tool_calls) + b"}")

    def on_complete(self, msg: Complete) -> bytes:
        out = bytearray()
        late_calls = [
            {**call, "index": index}
            for index, call in enumerate(msg.tool_calls)
            if index not in self._streamed_tool_indexes
        ]
        if late_calls:  # tool calls recovered from text at the end (XML in content) arrive whole
            out += self._delta(b'{"tool_calls":' + orjson.dumps(late_calls) + b"}")
        finish = orjson.dumps(msg.finish_reason or "stop")
        out += self._prefix + b'{},"logprobs":null,"finish_reason":' + finish + b"}]}\n\n"
        if self._include_usage:
            out += self._head + b',"choices":[],"usage":' + orjson.dumps(usage_object(msg)) + b"}\n\n"
        out += DONE
        return bytes(out)

    def on_error(self, message: str, error_type: str = "server_error", code: str | None = None) -> bytes:
        return b"data: " + orjson.dumps(error_body(message, error_type, code=code)) + b"\n\n" + DONE

    def _delta(self, delta: bytes) -> bytes:
        return self._prefix + delta + b',"logprobs":null,"finish_reason":null}]}\n\n'


def chat_completion_body(msg: Complete, *, completion_id: str, model: str, created: int) -> JSONObject:
    """The non-streaming ``chat.completion`` body; text and reasoning are kept next to tool calls."""
    message: JSONObject = {"role": "assistant", "content": msg.full_response or None}
    if msg.reasoning_content:
        message["reasoning_content"] = msg.reasoning_content
    if msg.tool_calls:
        message["tool_calls"] = [
            {"id": c.get("id", ""), "type": "function", "function": c.get("function", {})} for c in msg.tool_calls
        ]
    elif message["content"] is None:
        message["content"] = ""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": msg.logprobs, "finish_reason": msg.finish_reason or "stop"}
        ],
        "usage": usage_object(msg),
    }


class OpenAICompletionStream:
    """Encodes a legacy ``text_completion`` stream (no role chunk; text per chunk)."""

    def __init__(self, completion_id: str, model: str, created: int, include_usage: bool) -> None:
        head = orjson.dumps({"id": completion_id, "object": "text_completion", "created": created, "model": model})
        self._head = b"data: " + head[:-1]
        self._prefix = self._head + b',"choices":[{"index":0,"text":'
        self._include_usage = include_usage

    def start(self) -> bytes:
        return b""

    def on_token(self, msg: Token) -> bytes:
        if msg.reasoning:
            return b""
        return self._prefix + orjson.dumps(msg.token) + b',"logprobs":null,"finish_reason":null}]}\n\n'

    def on_tool_call_delta(self, msg: ToolCallDelta) -> bytes:
        return b""

    def on_complete(self, msg: Complete) -> bytes:
        finish = orjson.dumps(msg.finish_reason or "stop")
        out = self._prefix + b'"","logprobs":null,"finish_reason":' + finish + b"}]}\n\n"
        if self._include_usage:
            out += self._head + b',"choices":[],"usage":' + orjson.dumps(usage_object(msg)) + b"}\n\n"
        return out + DONE

    def on_error(self, message: str, error_type: str = "server_error", code: str | None = None) -> bytes:
        return b"data: " + orjson.dumps(error_body(message, error_type, code=code)) + b"\n\n" + DONE


def completion_body(msg: Complete, *, completion_id: str, model: str, created: int) -> JSONObject:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": msg.full_response,
                "logprobs": msg.logprobs,
                "finish_reason": msg.finish_reason or "stop",
            }
        ],
        "usage": usage_object(msg),
    }


def models_list(model_name: str, created: int) -> JSONObject:
    return {"object": "list", "data": [model_object(model_name, created)]}


def model_object(model_name: str, created: int) -> JSONObject:
    return {"id": model_name, "object": "model", "created": created, "owned_by": "auxot"}
