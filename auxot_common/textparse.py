"""Recover reasoning and tool calls that a model wrote as plain text. Pure code, no I/O.

llama-server separates reasoning (``delta.reasoning_content``) and tool calls
(``delta.tool_calls``) itself when it knows the model's format. Some models and chat templates
leak them into ``delta.content`` instead:

- ``<think>…</think>`` in the content (templates that do not open the think block themselves);
- Qwen3-Coder XML tool calls, reference §8.9::

      <tool_call>
      <function=get_weather>
      <parameter=city>
      Paris
      </parameter>
      </function>
      </tool_call>

- Hermes JSON tool calls: ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>``;
- the inline form ``[Calling tool: NAME({...})]``.

:class:`TextParser` is fed every content (and reasoning) fragment of a stream in order. It
returns what may be streamed at once, routing the inside of ``<think>`` tags as reasoning and
removing the tags, and holds back only what could still turn out to be markup: the few
characters at the end of a fragment that could start a tag split across fragments (``"<thi"`` +
``"nk>"``), trailing whitespace (invisible, and dropped next to tags and tool calls), and —
once a fragment starts a tool call — everything after it. :meth:`TextParser.finish` turns the
held tool-call text into OpenAI tool calls and returns the text that was held back but is text
after all.

Wiring in the worker (one parser per job)::

    parser = TextParser(job.tools)              # tool-call extraction only when tools were offered
    for kind, text in parser.feed(delta_content):               # and feed(r, reasoning=True)
        ...append to the result and send as a token (reasoning when kind == REASONING)
    segments, calls = parser.finish()           # after [DONE]
    ...send the segments like the others; use ``calls`` when llama-server returned none

Whitespace rules (what a client sees): reasoning is stripped at both ends of a think block;
whitespace between ``</think>`` and the answer is dropped; whitespace in front of a tool call is
dropped; text left around extracted calls is stripped, and joined with a blank line to text
already streamed. Everything else passes through byte for byte.
"""

from __future__ import annotations

import ast
import re
import secrets
from typing import Any, Final

import orjson

from auxot_common.protocol import JSONObject

CONTENT: Final = "content"
REASONING: Final = "reasoning"

THINK_OPEN: Final = "<think>"
THINK_CLOSE: Final = "</think>"
TOOL_CALL_OPEN: Final = "<tool_call>"
TOOL_CALL_CLOSE: Final = "</tool_call>"
CALLING_TOOL: Final = "[Calling tool:"
TOOL_MARKERS: Final = (TOOL_CALL_OPEN, CALLING_TOOL)

Segment = tuple[str, str]


def _partial_tag_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``."""
    best = 0
    for tag in tags:
        # the earliest start in the last len(tag)-1 characters that begins the tag wins
        i = text.find(tag[0], max(0, len(text) - len(tag) + 1))
        while i != -1:
            if tag.startswith(text[i:]):
                best = max(best, len(text) - i)
                break
            i = text.find(tag[0], i + 1)
    return best


class _Lane:
    """One output kind (content or reasoning): tool-call gating and whitespace holding."""

    __slots__ = ("captured", "emitted", "extracting", "held", "kind", "parts", "pre_ws", "strip_leading", "tools")

    def __init__(self, kind: str, tools: bool) -> None:
        self.kind = kind
        self.tools = tools  # watch for tool-call markers
        self.held = ""  # trailing whitespace, possibly followed by the start of a marker
        self.strip_leading = False  # drop whitespace at the start of what comes next
        self.emitted = False
        self.parts: list[str] = []  # everything emitted, for the totals
        self.extracting = False  # a marker was seen: hold everything from there on
        self.captured: list[str] = []
        self.pre_ws = ""  # whitespace dropped in front of the marker (given back if no call)

    def push(self, text: str) -> str:
        """Take a fragment; return what may be emitted now."""
        if self.extracting:
            self.captured.append(text)
            return ""
        if self.strip_leading:
            text = text.lstrip()
            if not text:
                return ""
            self.strip_leading = False
        s = self.held + text if self.held else text
        self.held = ""
        if self.tools and ("<" in s or "[" in s):
            cut = min((i for i in (s.find(m) for m in TOOL_MARKERS) if i >= 0), default=-1)
            if cut >= 0:
                before = s[:cut]
                kept = before.rstrip()
                self.pre_ws = before[len(kept) :]
                self.extracting = True
                self.captured = [s[cut:]]
                return self._emit(kept)
            tail = _partial_tag_len(s, TOOL_MARKERS)
        else:
            tail = 0
        head = s[: len(s) - tail] if tail else s
        kept = head.rstrip()
        if len(kept) != len(head) or tail:
            self.held = s[len(kept) :]
        return self._emit(kept)

    def _emit(self, text: str) -> str:
        if text:
            self.emitted = True
            self.parts.append(text)
        return text

    def enter(self) -> None:
        """A tag switched output to this lane: its leading whitespace is dropped."""
        self.strip_leading = True
        if self.emitted and not self.held and not self.extracting:
            self.held = "\n\n"  # keeps a second think block (or answer part) apart from the first

    def leave(self) -> str:
        """A tag switched output away from this lane: settle what is held; return text to emit."""
        self.strip_leading = False
        if self.extracting:
            return ""
        held, self.held = self.held, ""
        text = held.rstrip()
        if text:  # the start of a marker, cut short by the tag: it was text
            return self._emit(text)
        if self.kind == CONTENT and self.emitted:
            self.held = held  # whitespace between two parts of the answer stays
        return ""

    def finish(self, tools: list[JSONObject]) -> tuple[str, list[JSONObject]]:
        """The held text that is text after all, and the tool calls found in it."""
        if not self.extracting:
            held, self.held = self.held, ""
            return self._emit(held if self.kind == CONTENT else held.rstrip()), []
        captured = "".join(self.captured)
        self.captured = []
        self.extracting = False
        remaining, calls = extract_tool_calls(captured, tools)
        if not calls:
            text = self.pre_ws + captured
            return self._emit(text if self.kind == CONTENT else text.rstrip()), []
        if remaining and self.emitted:
            remaining = "\n\n" + remaining
        return self._emit(remaining), calls


class TextParser:
    """Split one stream's text into content, reasoning and tool calls (see the module doc).

    :param tools: the request's tools in OpenAI form (``{"type":"function","function":{…}}``;
        Anthropic ``{name, input_schema}`` works too). Their JSON schemas give parameter types.
    :param extract_tools: look for tool calls in the text; default: when ``tools`` is non-empty
        (a model that was offered no tools has nobody to call them for).
    :param split_think: route ``<think>…</think>`` in the content as reasoning.
    """

    __slots__ = ("_content", "_in_think", "_pending", "_reasoning", "_split_think", "_tools")

    def __init__(
        self, tools: list[JSONObject] | None = None, *, extract_tools: bool | None = None, split_think: bool = True
    ) -> None:
        self._tools = list(tools or [])
        detect = bool(self._tools) if extract_tools is None else extract_tools
        self._content = _Lane(CONTENT, detect)
        self._reasoning = _Lane(REASONING, detect)
        self._split_think = split_think
        self._in_think = False
        self._pending = ""  # the start of a think tag, split across fragments

    @property
    def content(self) -> str:
        """All content emitted so far (by :meth:`feed` and :meth:`finish`)."""
        return "".join(self._content.parts)

    @property
    def reasoning(self) -> str:
        """All reasoning emitted so far."""
        return "".join(self._reasoning.parts)

    def feed(self, text: str, *, reasoning: bool = False) -> list[Segment]:
        """One fragment of ``delta.content`` (or of ``delta.reasoning_content`` with
        ``reasoning=True``, which is only watched for tool calls).

        :returns: ``(kind, text)`` segments to stream now, in order; ``kind`` is
            :data:`CONTENT` or :data:`REASONING`; no empty texts; often an empty list.
        """
        if reasoning:
            out = self._reasoning.push(text)
            return [(REASONING, out)] if out else []
        if not self._split_think or (not self._pending and not self._in_think and "<" not in text):
            out = self._content.push(text)
            return [(CONTENT, out)] if out else []
        return self._split(self._pending + text)

    def _split(self, s: str) -> list[Segment]:
        self._pending = ""
        segments: list[Segment] = []
        while s:
            lane = self._reasoning if self._in_think else self._content
            if self._in_think:
                # a nested <think> is dropped; the first </think> closes the block
                close = s.find(THINK_CLOSE)
                nested = s.find(THINK_OPEN, 0, close if close >= 0 else len(s))
                if nested >= 0:
                    self._push(segments, lane, s[:nested])
                    s = s[nested + len(THINK_OPEN) :]
                    continue
                if close < 0:
                    self._tail(segments, lane, s, (THINK_CLOSE, THINK_OPEN))
                    break
                self._push(segments, lane, s[:close])
                self._add(segments, REASONING, self._reasoning.leave())
                self._content.enter()
                self._in_think = False
                s = s[close + len(THINK_CLOSE) :]
                continue
            opening = s.find(THINK_OPEN)
            stray = s.find(THINK_CLOSE)
            if stray >= 0 and (opening < 0 or stray < opening):
                self._push(segments, lane, s[:stray])  # a </think> with no <think>: drop the tag
                s = s[stray + len(THINK_CLOSE) :]
                continue
            if opening < 0:
                self._tail(segments, lane, s, (THINK_OPEN, THINK_CLOSE))
                break
            self._push(segments, lane, s[:opening])
            self._add(segments, CONTENT, self._content.leave())
            self._reasoning.enter()
            self._in_think = True
            s = s[opening + len(THINK_OPEN) :]
        return segments

    def _tail(self, segments: list[Segment], lane: _Lane, s: str, tags: tuple[str, str]) -> None:
        keep = _partial_tag_len(s, tags)
        if keep:
            s, self._pending = s[:-keep], s[-keep:]
        self._push(segments, lane, s)

    def _push(self, segments: list[Segment], lane: _Lane, text: str) -> None:
        if text:
            self._add(segments, lane.kind, lane.push(text))

    @staticmethod
    def _add(segments: list[Segment], kind: str, text: str) -> None:
        if not text:
            return
        if segments and segments[-1][0] == kind:
            segments[-1] = (kind, segments[-1][1] + text)
        else:
            segments.append((kind, text))

    def finish(self) -> tuple[list[Segment], list[JSONObject]]:
        """End of the stream: the text still held back, and the tool calls found in the text.

        Tool calls come from the reasoning first, then the content (reference §8.8), each as
        ``{"id":"call_…","type":"function","function":{"name":…,"arguments":"<compact JSON>"}}``.
        Text that looked like a tool call but is not a complete one is given back as text.
        """
        segments: list[Segment] = []
        if self._pending:
            pending, self._pending = self._pending, ""
            lane = self._reasoning if self._in_think else self._content
            self._push(segments, lane, pending)
        calls: list[JSONObject] = []
        for lane in (self._reasoning, self._content):
            text, found = lane.finish(self._tools)
            self._add(segments, lane.kind, text)
            calls.extend(found)
        return segments, calls


# --- tool-call extraction -------------------------------------------------------------------

_BLOCK = re.compile(r"<tool_call>((?:(?!<tool_call>).)*?)</tool_call>", re.DOTALL)
_OPEN_RUN = re.compile(r"(?:<tool_call>\s*)+$")
_FUNCTION = re.compile(r"<function=([^\s>]+)\s*>")
_PARAMETER = re.compile(r"<parameter=([^\s>]+)\s*>(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|\Z)", re.DOTALL)
_CALLING = re.compile(r"\[Calling tool:\s*(\w+)\(")
_CALLING_END = re.compile(r"\s*\)\]")


def new_call_id() -> str:
    """``call_`` followed by 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


def tool_call(name: str, arguments: JSONObject) -> JSONObject:
    """An OpenAI tool call with compact JSON arguments and a new id."""
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps(arguments).decode()},
    }


def extract_tool_calls(text: str, tools: list[JSONObject] | None = None) -> tuple[str, list[JSONObject]]:
    """Find the complete tool calls in ``text``.

    Recognised: ``<tool_call>`` blocks holding Qwen XML (``<function=NAME>`` with
    ``<parameter=K>V</parameter>``) or Hermes JSON (``{"name":…,"arguments":{…}}``), and
    ``[Calling tool: NAME({…})]``. A block the stream ended inside of counts when its body is
    complete (``</function>`` seen, or a whole JSON object). Blocks that are not complete calls
    stay in the text unchanged.

    :param text: the text to search.
    :param tools: the offered tools; their schemas decide how XML parameter values are typed.
    :returns: the text with the calls removed (pieces stripped, joined by a blank line) and the
        calls in order of appearance.
    """
    try:
        return _extract_tool_calls(text, tools)
    except Exception:  # a parser bug must not end a job: the text stays text
        return text, []


def _extract_tool_calls(text: str, tools: list[JSONObject] | None) -> tuple[str, list[JSONObject]]:
    schemas = _schemas(tools or [])
    spans: list[tuple[int, int, JSONObject]] = []
    for match in _BLOCK.finditer(text):
        call = _parse_block(match.group(1), schemas, terminated=True)
        if call is not None:
            spans.append((_absorb_openers(text, match.start()), match.end(), call))
    last_close = spans[-1][1] if spans else 0
    tail = text.rfind(TOOL_CALL_OPEN, last_close)
    if tail >= 0 and text.find(TOOL_CALL_CLOSE, tail) < 0:
        call = _parse_block(text[tail + len(TOOL_CALL_OPEN) :], schemas, terminated=False)
        if call is not None:
            spans.append((_absorb_openers(text, tail), len(text), call))
    for match in _CALLING.finditer(text):
        if any(start <= match.start() < end for start, end, _ in spans):
            continue
        found = _parse_calling(text, match)
        if found is not None:
            spans.append((match.start(), found[0], found[1]))
    if not spans:
        return text, []
    spans.sort(key=lambda span: span[0])
    pieces: list[str] = []
    position = 0
    for start, end, _ in spans:
        pieces.append(text[position:start].strip())
        position = end
    pieces.append(text[position:].strip())
    return "\n\n".join(p for p in pieces if p), [call for _, _, call in spans]


def _absorb_openers(text: str, start: int) -> int:
    """Extend a block's start over repeated ``<tool_call>`` openers right in front of it."""
    match = _OPEN_RUN.search(text, 0, start)
    return match.start() if match else start


def _parse_block(body: str, schemas: dict[str, JSONObject], *, terminated: bool) -> JSONObject | None:
    body = body.strip()
    function = _FUNCTION.search(body)
    if function is not None:
        end = body.find("</function>", function.end())
        if end < 0 and not terminated:
            return None  # cut off inside the call
        inner = body[function.end() : end if end >= 0 else len(body)]
        name = function.group(1)
        schema = schemas.get(name, {})
        arguments: JSONObject = {}
        for param in _PARAMETER.finditer(inner):
            key = param.group(1)
            arguments[key] = _typed_value(param.group(2), _property_schema(schema, key))
        if not arguments and inner.strip().startswith("{"):
            # <function=NAME>{"k": "v"}</function>, the Llama-3.1 style some templates use
            parsed = _json(inner.strip())
            if isinstance(parsed, dict):
                arguments = parsed
        return tool_call(name, arguments)
    if body.startswith("{"):
        return _parse_hermes(body)
    return None


def _parse_hermes(body: str) -> JSONObject | None:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, dict):
        return None
    return tool_call(name, arguments)


def _parse_calling(text: str, match: re.Match[str]) -> tuple[int, JSONObject] | None:
    start = match.end()
    while start < len(text) and text[start].isspace():
        start += 1
    if not text.startswith("{", start):
        return None
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                try:
                    arguments = orjson.loads(text[start : i + 1])
                except orjson.JSONDecodeError:
                    return None
                end = _CALLING_END.match(text, i + 1)
                if end is None or not isinstance(arguments, dict):
                    return None
                return end.end(), tool_call(match.group(1), arguments)
    return None


# --- parameter typing -----------------------------------------------------------------------


def _schemas(tools: list[JSONObject]) -> dict[str, JSONObject]:
    """Tool name -> its parameters schema (OpenAI function tools or Anthropic tools)."""
    out: dict[str, JSONObject] = {}
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        nested = tool.get("function")
        function: JSONObject = nested if isinstance(nested, dict) else tool
        name = function.get("name")
        schema = function.get("parameters", function.get("input_schema"))
        if isinstance(name, str) and isinstance(schema, dict):
            out[name] = schema
    return out


def _property_schema(schema: JSONObject, key: str) -> JSONObject | None:
    properties = schema.get("properties")
    if isinstance(properties, dict):
        prop = properties.get(key)
        if isinstance(prop, dict):
            return prop
    return None


def _types(schema: JSONObject) -> list[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    found: list[str] = []
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            for option in options:
                if isinstance(option, dict):
                    found.extend(t for t in _types(option) if t not in found)
    if not found and isinstance(schema.get("enum"), list):
        found = [_json_type(v) for v in schema["enum"]]
    return found


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else "string"


def _typed_value(raw: str, schema: JSONObject | None) -> Any:
    """A parameter value as the JSON type its schema asks for.

    Strings lose one newline at each end (the format puts the value on its own lines) and keep
    everything else (indentation of code matters). Without a schema, JSON objects and arrays are
    embedded as such and everything else is a string (§8.9).
    """
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    stripped = value.strip()
    types = _types(schema) if schema is not None else []
    if not types:
        if stripped[:1] in ("{", "["):
            parsed = _json(stripped)
            if isinstance(parsed, dict | list):
                return parsed
        return value
    for kind in types:
        converted = _convert(stripped, kind)
        if converted is not _NO:
            return converted
    return value


_NO: Final = object()


def _convert(text: str, kind: str) -> Any:
    if kind == "string":
        return _NO  # handled by the caller: the value as written
    if kind == "null":
        return None if text.lower() in ("null", "none") else _NO
    if kind == "boolean":
        return {"true": True, "false": False}.get(text.lower(), _NO)
    if kind == "integer":
        try:
            return int(text)
        except ValueError:
            number = _json(text)
            return int(number) if isinstance(number, float) and number.is_integer() else _NO
    if kind == "number":
        number = _json(text)
        return number if isinstance(number, int | float) and not isinstance(number, bool) else _NO
    if kind in ("object", "array"):
        parsed = _json(text)
        if parsed is _NO:
            parsed = _python_literal(text)
        want = dict if kind == "object" else list
        return parsed if isinstance(parsed, want) else _NO
    return _NO


def _python_literal(text: str) -> Any:
    """A Python literal that is also valid JSON (``{'a': True}``), else ``_NO``.

    ``literal_eval`` raises far more than ValueError on model output (``{[1]: 2}`` is a
    TypeError) and may build values JSON cannot hold (tuple keys, bytes, sets): anything that
    does not round-trip through orjson is not a value.
    """
    try:
        parsed = ast.literal_eval(text)
        orjson.dumps(parsed)
    except Exception:  # model output must never end a job
        return _NO
    return parsed


def _json(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return _NO
