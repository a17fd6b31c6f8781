"""WebSocket protocol between worker and router.

Every frame is one text frame holding one JSON object with a string field ``type``. The names
and shapes follow the original Go Auxot (reference §1) where they are sound, with these
additions:

- ``hello.policy_only``: the worker's first connection only fetches the policy and is never
  given jobs (Go treated it as a full worker and could strand a job on it).
- ``hello_ack.success = false`` with ``error`` is the one explicit rejection of a bad GPU key.
- ``complete.finish_reason`` carries llama-server's true finish reason (``length``!).
- ``complete.input_tokens`` counts the whole prompt, KV-cache hits included; ``cache_tokens``
  says how many of those were cache hits.
- ``tool_call_delta`` streams tool-call fragments as llama-server produces them.
- ``complete.stop_sequence``: the job's stop string that ended the text (the worker matches
  stop strings itself: llama-server does not say which one matched).
- ``error.status`` carries the HTTP status llama-server answered with, so that a prompt that
  does not fit becomes a 400 for the caller instead of a 500.
- ``complete.prompt_ms`` (llama-server's ``timings.prompt_ms``) lets the router learn each
  worker's prefill speed; ``job.session`` is a hash of the client's session id (a routing hint).
- ``job.stream`` tells the worker whether the caller streams; tokens of a non-streaming job are
  not sent one by one, only the ``complete`` with the full text.
- ``job.timeout_s``: the seconds the job has left when it is sent (an absolute deadline would
  compare the clocks of two machines).
- ``heartbeat.jobs``: the ids of the jobs the worker runs; the router gives up on a job it sent
  that two heartbeats in a row do not list, so a job can never hold a slot silently.
- ``hello_ack.retryable`` / ``retry_after``: a refusal that is not about the key (too many
  failed attempts from that address, too many workers): try again later, do not exit.
- ``policy.max_message_bytes``: the largest frame the router sends (the worker's read limit).

Messages from the other side are checked deeply (nested entries, bounds): a worker or router
bug is a :class:`ProtocolError` at the socket, never an exception deep inside a job.
- ``batch`` (worker -> router) carries several messages in one frame: the events of different
  jobs that became ready in the same event-loop turn. The router announces that it reads them
  with ``hello_ack.batch = true``; a worker sends them only then, so either side may be older.

Fields equal to their default are omitted from the JSON (like Go's ``omitempty``, but a
meaningful zero such as ``temperature: 0`` is kept), except those
listed in a class's ``_always`` set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

JSONObject = dict[str, Any]


class ProtocolError(ValueError):
    """A frame that is not a valid protocol message."""


@dataclass(slots=True)
class Capabilities:
    """What a worker serves. ``backend``/``model`` are ``"pending"`` on a policy-only hello."""

    backend: str = "pending"
    model: str = "pending"
    ctx_size: int = 0
    vram_gb: float = 0.0
    parameters: str = ""
    total_slots: int = 0
    model_capabilities: list[str] = field(default_factory=list)
    gpus: list[JSONObject] = field(default_factory=list)
    draining: bool = False  # shutting down: finish running jobs, take no new ones
    policy_model: str = ""  # the policy's model_name the backend runs now (moves are confirmed by it)

    _always: ClassVar[frozenset[str]] = frozenset({"backend", "model", "ctx_size"})

    def to_dict(self) -> JSONObject:
        return _fields_to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Capabilities:
        caps: Capabilities = _from_dict(cls, data if isinstance(data, dict) else {})
        return caps


@dataclass(slots=True)
class Policy:
    """What the router asks a worker to serve: the full model resolution.

    ``context_size`` is per slot; llama-server gets ``context_size * max_parallelism``.
    ``files`` lists every file of the model (all shards of a split GGUF), relative to the
    Hugging Face repository ``huggingface_id``.
    """

    model_name: str
    quantization: str = ""
    context_size: int = 0
    max_parallelism: int = 1
    capabilities: list[str] = field(default_factory=list)
    huggingface_id: str = ""
    files: list[str] = field(default_factory=list)
    mmproj_file: str = ""
    family: str = ""
    parameters: str = ""
    max_message_bytes: int = 0  # the largest frame the router sends; 0: the worker's default
    embedding: bool = False  # an embedding model: llama-server --embeddings --pooling <pooling>
    pooling: str = ""

    _always: ClassVar[frozenset[str]] = frozenset(
        {"model_name", "quantization", "context_size", "max_parallelism", "capabilities"}
    )

    def to_dict(self) -> JSONObject:
        return _fields_to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Policy:
        if not isinstance(data, dict) or not isinstance(data.get("model_name"), str):
            raise ProtocolError("policy needs a model_name")
        policy: Policy = _from_dict(cls, data)
        return policy


# --- worker -> router -------------------------------------------------------------------------


@dataclass(slots=True)
class Hello:
    gpu_key: str
    capabilities: Capabilities = field(default_factory=Capabilities)
    policy_only: bool = False
    model: str = ""  # the model this worker asks to serve (--model), "" for whatever the router assigns
    type: ClassVar[str] = "hello"
    _always: ClassVar[frozenset[str]] = frozenset({"gpu_key", "capabilities"})


@dataclass(slots=True)
class Config:
    capabilities: Capabilities = field(default_factory=Capabilities)
    type: ClassVar[str] = "config"
    _always: ClassVar[frozenset[str]] = frozenset({"capabilities"})


@dataclass(slots=True)
class Heartbeat:
    jobs: list[str] | None = None  # None: a worker that does not report its jobs (Go)
    type: ClassVar[str] = "heartbeat"
    _always: ClassVar[frozenset[str]] = frozenset()


@dataclass(slots=True)
class Token:
    """One or more text fragments of a job; fragments that arrived together travel together."""

    job_id: str
    token: str
    reasoning: bool = False
    logprobs: list[JSONObject] = field(default_factory=list)  # only when the caller asked for them
    type: ClassVar[str] = "token"
    _always: ClassVar[frozenset[str]] = frozenset({"job_id", "token"})


@dataclass(slots=True)
class ToolCallDelta:
    """OpenAI ``delta.tool_calls`` entries exactly as llama-server streamed them."""

    job_id: str
    tool_calls: list[JSONObject]
    type: ClassVar[str] = "tool_call_delta"
    _always: ClassVar[frozenset[str]] = frozenset({"job_id", "tool_calls"})


@dataclass(slots=True)
class Complete:
    job_id: str
    full_response: str = ""
    finish_reason: str = "stop"
    duration_ms: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_tokens: int = 0
    prompt_ms: float = 0.0  # llama-server's timings.prompt_ms: the router learns prefill speed
    tool_calls: list[JSONObject] = field(default_factory=list)
    reasoning_content: str = ""
    reasoning_tokens: int = 0
    logprobs: JSONObject | None = None
    embeddings: list[list[float]] = field(default_factory=list)  # kind "embeddings": one vector per input
    stop_sequence: str = ""  # the job's stop string that ended the text, matched by the worker
    type: ClassVar[str] = "complete"
    _always: ClassVar[frozenset[str]] = frozenset({"job_id", "full_response", "finish_reason"})


@dataclass(slots=True)
class Error:
    """A job failure (``job_id`` set) or a connection-level error."""

    error: str
    job_id: str = ""
    details: str = ""
    status: int = 0
    retryable: bool = False  # nothing reached the caller and another worker may succeed
    type: ClassVar[str] = "error"
    _always: ClassVar[frozenset[str]] = frozenset({"error"})


@dataclass(slots=True)
class PromptProgress:
    job_id: str
    total: int = 0
    cached: int = 0
    processed: int = 0
    type: ClassVar[str] = "prompt_progress"
    _always: ClassVar[frozenset[str]] = frozenset({"job_id"})


# --- router -> worker -------------------------------------------------------------------------


@dataclass(slots=True)
class HelloAck:
    success: bool
    gpu_id: str = ""
    policy: Policy | None = None
    error: str = ""
    retryable: bool = False  # refused for now (rate limit, capacity), not for a bad key
    retry_after: float = 0.0  # seconds
    batch: bool = False  # this router reads ``batch`` frames
    type: ClassVar[str] = "hello_ack"
    _always: ClassVar[frozenset[str]] = frozenset({"success"})


@dataclass(slots=True)
class HeartbeatAck:
    type: ClassVar[str] = "heartbeat_ack"
    _always: ClassVar[frozenset[str]] = frozenset()


@dataclass(slots=True)
class ConfigAck:
    success: bool = True
    error: str = ""
    type: ClassVar[str] = "config_ack"
    _always: ClassVar[frozenset[str]] = frozenset({"success"})


@dataclass(slots=True)
class Job:
    """A unit of work.

    ``kind`` names the llama-server endpoint: ``chat`` (``/v1/chat/completions``),
    ``completion`` (``/v1/completions``, ``params.prompt``), ``tokenize`` (render
    ``messages``/``tools`` with the chat template and count tokens) or ``embeddings``
    (``/v1/embeddings``, ``params.input`` a list of strings or token arrays).
    ``params`` holds every other request field passed through to llama-server as is
    (``top_p``, ``stop``, ``seed``, ``response_format``, ``tool_choice``, ...).
    ``reply_to`` is the router instance holding the caller's HTTP request.
    """

    job_id: str
    messages: list[JSONObject] = field(default_factory=list)
    tools: list[JSONObject] = field(default_factory=list)
    temperature: float | None = None
    max_tokens: int | None = None
    reasoning_effort: str = ""
    stream: bool = False
    kind: str = "chat"
    params: JSONObject = field(default_factory=dict)
    reply_to: str = ""
    attempt: int = 1
    deadline: float = 0.0  # the owner router's wall clock; routers only
    timeout_s: float = 0.0  # seconds left when sent to a worker; 0: none
    model: str = ""  # the canonical name of the model (its pool and queue stream); "" for none
    session: str = ""  # hash of the client's session id: a routing hint (auxot_common.routing)
    key_name: str = ""  # the caller's API key name: the fair backlog's lane (never the key itself)
    priority: int = 1  # that key's weight in the fair backlog
    type: ClassVar[str] = "job"
    _always: ClassVar[frozenset[str]] = frozenset({"job_id", "messages"})


@dataclass(slots=True)
class Cancel:
    job_id: str
    type: ClassVar[str] = "cancel"
    _always: ClassVar[frozenset[str]] = frozenset({"job_id"})


@dataclass(slots=True)
class PolicyUpdate:
    policy: Policy
    type: ClassVar[str] = "policy_update"
    _always: ClassVar[frozenset[str]] = frozenset({"policy"})


# --- router <-> router (relayed through Redis, never on a worker's socket) ----------------------


@dataclass(slots=True)
class Dispatched:
    """A job reached a worker: where to send ``cancel`` if its caller goes away."""

    job_id: str
    worker_id: str
    instance_id: str
    type: ClassVar[str] = "dispatched"
    _always: ClassVar[frozenset[str]] = frozenset({"job_id", "worker_id", "instance_id"})


@dataclass(slots=True)
class WorkerLost:
    """The worker running a job went away before finishing it; the job's owner decides what next."""

    job_id: str
    reason: str = ""
    type: ClassVar[str] = "worker_lost"
    _always: ClassVar[frozenset[str]] = frozenset({"job_id"})


@dataclass(slots=True)
class Batch:
    """Several worker -> router messages in one frame (never nested), handled in order.

    Built with :func:`encode_batch` from already-encoded messages, so nothing is encoded twice.
    """

    messages: list[Any]  # list[Message]; Any because Message is defined below
    type: ClassVar[str] = "batch"
    _always: ClassVar[frozenset[str]] = frozenset({"messages"})


Message = (
    Hello
    | Config
    | Heartbeat
    | Token
    | ToolCallDelta
    | Complete
    | Error
    | PromptProgress
    | HelloAck
    | HeartbeatAck
    | ConfigAck
    | Job
    | Cancel
    | PolicyUpdate
    | Dispatched
    | WorkerLost
    | Batch
)

MESSAGE_TYPES: dict[str, type[Any]] = {
    cls.type: cls
    for cls in (
        Hello,
        Config,
        Heartbeat,
        Token,
        ToolCallDelta,
        Complete,
        Error,
        PromptProgress,
        HelloAck,
        HeartbeatAck,
        ConfigAck,
        Job,
        Cancel,
        PolicyUpdate,
        Dispatched,
        WorkerLost,
    )
}

_NESTED: dict[str, Any] = {"Capabilities": Capabilities, "Policy": Policy, "Policy | None": Policy}


def encode(message: Message) -> bytes:
    """Serialise a message to the JSON bytes of one text frame."""
    if type(message) is Token and not message.logprobs:  # the hot path: one per batch of streamed text
        if message.reasoning:
            return orjson.dumps({"type": "token", "job_id": message.job_id, "token": message.token, "reasoning": True})
        return orjson.dumps({"type": "token", "job_id": message.job_id, "token": message.token})
    if type(message) is Batch:
        return _BATCH_HEAD + b",".join(encode(m) for m in message.messages) + b"]}"
    body = _fields_to_dict(message)
    return orjson.dumps({"type": message.type, **body})


_BATCH_HEAD = b'{"type":"batch","messages":['


def encode_batch(payloads: list[bytes]) -> bytes:
    """One ``batch`` frame from messages already encoded with :func:`encode` (one payload is
    sent as itself: a batch of one would only cost the router a level of nesting)."""
    if len(payloads) == 1:
        return payloads[0]
    return _BATCH_HEAD + b",".join(payloads) + b"]}"


def encode_batches(payloads: list[bytes], max_bytes: int) -> list[bytes]:
    """Encoded messages grouped, in order, into ``batch`` frames of at most ``max_bytes`` (a
    bigger message goes alone): the worker's frames to the router and the routers' relay entries."""
    frames: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for payload in payloads:
        if group and size + len(payload) + 1 > max_bytes:
            frames.append(encode_batch(group))
            group, size = [], 0
        group.append(payload)
        size += len(payload) + 1
    if group:
        frames.append(encode_batch(group))
    return frames


def decode(data: str | bytes) -> Message:
    """Parse one frame. Raises :class:`ProtocolError` for anything that is not a known message."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    if isinstance(obj, dict) and obj.get("type") == "batch":
        items = obj.get("messages")
        if not isinstance(items, list):
            raise ProtocolError("bad batch message: messages must be a list")
        messages = [_decode_object(item) for item in items]
        if any(type(m) is Batch for m in messages):
            raise ProtocolError("bad batch message: batches do not nest")
        return Batch(messages)
    return _decode_object(obj)


def _decode_object(obj: Any) -> Message:
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a JSON object")
    kind = obj.get("type")
    if kind == "token":  # the hot path
        job_id, token = obj.get("job_id"), obj.get("token")
        reasoning = obj.get("reasoning", False)
        if isinstance(job_id, str) and isinstance(token, str) and isinstance(reasoning, bool) and "logprobs" not in obj:
            return Token(job_id, token, reasoning)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type: {kind!r}")
    try:
        return _from_dict(cls, obj)  # type: ignore[no-any-return]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad {kind} message: {exc}") from None


def _is_default(f: dataclasses.Field[Any], value: Any) -> bool:
    """Omitted fields are those equal to their default: ``temperature: 0`` differs from None."""
    if f.default is not dataclasses.MISSING:
        return value is f.default if f.default is None else bool(value == f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value == f.default_factory())
    return False


def _fields_to_dict(obj: Any) -> JSONObject:
    always = obj._always
    out: JSONObject = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name not in always and _is_default(f, value):
            continue
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        out[f.name] = value
    return out


def _from_dict(cls: Any, data: JSONObject) -> Any:
    kwargs: JSONObject = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        annotation = f.type if isinstance(f.type, str) else ""
        nested = _NESTED.get(annotation)
        if nested is not None:
            if value is None and not annotation.endswith("| None"):
                raise ValueError(f"{f.name} must be an object")
            if value is not None:
                value = nested.from_dict(value)
        kwargs[f.name] = value
    obj = cls(**kwargs)
    _check_types(obj)
    check = _DEEP_CHECKS.get(cls.__name__)
    if check is not None:
        check(obj)
    return obj


MAX_SLOTS = 4096  # far above any real worker; a larger total_slots is a bug or an attack


def _check_tool_call_entries(entries: list[Any], name: str) -> None:
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"{name} entries must be objects")
        index = entry.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1024:
            raise ValueError(f"{name}[].index must be a small non-negative integer")
        for key in ("id", "type"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise ValueError(f"{name}[].{key} must be a string")
        function = entry.get("function")
        if function is None:
            continue
        if not isinstance(function, dict):
            raise ValueError(f"{name}[].function must be an object")
        for key in ("name", "arguments"):
            if function.get(key) is not None and not isinstance(function[key], str):
                raise ValueError(f"{name}[].function.{key} must be a string")


def _check_capabilities(caps: Capabilities) -> None:
    if not 0 <= caps.total_slots <= MAX_SLOTS:
        raise ValueError(f"total_slots must be between 0 and {MAX_SLOTS}")
    if not all(isinstance(g, dict) for g in caps.gpus):
        raise ValueError("gpus entries must be objects")
    if not all(isinstance(c, str) for c in caps.model_capabilities):
        raise ValueError("model_capabilities entries must be strings")


def _check_list_of(kind: type, name: str) -> Any:
    def check(obj: Any) -> None:
        value = getattr(obj, name)
        if value is not None and not all(isinstance(v, kind) for v in value):
            raise ValueError(f"{name} entries must be {kind.__name__}")

    return check


def _check_complete(msg: Complete) -> None:
    _check_tool_call_entries(msg.tool_calls, "tool_calls")
    if min(msg.input_tokens, msg.output_tokens, msg.cache_tokens, msg.duration_ms) < 0:
        raise ValueError("counts must not be negative")


def _check_job(job: Job) -> None:
    if not all(isinstance(m, dict) for m in job.messages) or not all(isinstance(t, dict) for t in job.tools):
        raise ValueError("messages and tools entries must be objects")


_DEEP_CHECKS: dict[str, Any] = {
    "Capabilities": _check_capabilities,
    "ToolCallDelta": lambda msg: _check_tool_call_entries(msg.tool_calls, "tool_calls"),
    "Complete": _check_complete,
    "Token": _check_list_of(dict, "logprobs"),
    "Heartbeat": _check_list_of(str, "jobs"),
    "Job": _check_job,
}


_SCALARS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "bool": (bool,),
    "int": (int,),
    "float": (int, float),
    "list": (list,),
    "JSONObject": (dict,),
}


def _check_types(obj: Any) -> None:
    """Reject fields whose JSON type does not match the annotation (a cheap guard, not a schema)."""
    for f in dataclasses.fields(obj):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        value = getattr(obj, f.name)
        base, _, optional = annotation.partition(" | ")
        if optional == "None" and value is None:
            continue
        expected = _SCALARS.get(base.split("[", 1)[0])
        if expected is None:
            continue
        if not isinstance(value, expected) or (base in ("int", "float") and isinstance(value, bool)):
            raise ValueError(f"{f.name} must be {base}")
