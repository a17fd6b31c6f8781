"""Automatic model choice: the virtual ``auto`` model. Pure code, no I/O.

A request for ``auto`` (or one of its aliases) is routed in two steps:

1. **Hard constraints** from what the request needs, against what each candidate model can do:
   the prompt (estimated without a worker) plus ``max_tokens`` must fit the model's context,
   images need ``vision``, tools need tool calling. Among those, models with a worker serving
   them now are preferred (if none is served, the request may still wait in a queue), and a
   request asking for thinking prefers ``reasoning`` models.
2. **A policy** among the models that qualify: ``rules`` (ordered conditions; first match wins)
   or ``classify`` (a small served model reads a digest of the request and answers with one of
   the model names through a grammar-constrained, few-token completion; on timeout or an answer
   that is not a name, the rules decide).

Everything here works on plain data (:class:`Candidate`, :class:`RequestTraits`), so it plugs
into whatever the model catalog provides; the router supplies the candidates and runs the
classifier completion through its own queue.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from auxot_common.anthropic_api import estimate_tokens

JSONObject = dict[str, Any]

DEFAULT_NAME: Final = "auto"
ROUTED_MODEL_HEADER: Final = "x-auxot-routed-model"
ROUTE_REASON_HEADER: Final = "x-auxot-route-reason"
_REASON_LIMIT: Final = 300  # a header, not a log: keep it short
_DIGEST_CHARS: Final = 600  # how much of the last user message the classifier reads
_MATCH_CHARS: Final = 65536  # how much text keyword/regex rules look at (bounded work per request)
_DEFAULT_OUTPUT: Final = 512  # assumed answer length when the request sets no max_tokens
_PROFILE_WEIGHT: Final = 0.2  # how fast a profile follows new measurements


class AutoRouteError(ValueError):
    """The request cannot be routed: no model can serve what it needs (a 400 for the caller)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ConfigError(ValueError):
    """An invalid ``[auto]`` section: one line, said at startup."""


# --- inputs ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Candidate:
    """One model ``auto`` may pick, as the catalog sees it now.

    ``context`` is the context of one slot in tokens (0: unknown, no length check);
    ``capabilities`` uses the registry's words (``chat``, ``code``, ``reasoning``, ``vision``)
    plus ``tools``; ``serving`` says a worker (or an upstream) can run it now; the speeds are
    the measured profile (0: not measured yet).
    """

    name: str
    context: int = 0
    capabilities: frozenset[str] = frozenset()
    serving: bool = True
    prefill_tps: float = 0.0
    decode_tps: float = 0.0

    @property
    def vision(self) -> bool:
        return "vision" in self.capabilities

    @property
    def tools(self) -> bool:
        return "tools" in self.capabilities

    @property
    def reasoning(self) -> bool:
        return "reasoning" in self.capabilities


@dataclass(slots=True)
class RequestTraits:
    """What routing needs to know about one request (built by :func:`traits_from`)."""

    prompt_tokens: int
    max_tokens: int | None = None
    images: bool = False
    tools: bool = False
    reasoning: bool = False
    text: str = ""  # the last user message's text, bounded: what keyword rules and the classifier read
    key_name: str = ""

    @property
    def needed_context(self) -> int:
        return self.prompt_tokens + (self.max_tokens or 0)


def traits_from(
    messages: Sequence[JSONObject],
    tools: Sequence[JSONObject] = (),
    *,
    max_tokens: int | None = None,
    reasoning_effort: str = "",
    params: JSONObject | None = None,
    key_name: str = "",
) -> RequestTraits:
    """Traits of a request in the job's (OpenAI chat) form, which both APIs translate to.

    The prompt size is an estimate, made without a worker, with the Messages API's estimator
    (erring high by a few percent), so a prompt near a context limit goes to the bigger model.
    """
    images = False
    shaped: list[JSONObject] = []
    for message in messages:
        content = message.get("content")
        parts: list[Any] = []
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") in ("image_url", "input_image", "image"):
                    images = True
                    parts.append({"type": "image"})
                elif isinstance(part.get("text"), str):
                    parts.append(part["text"])
        for call in message.get("tool_calls") or ():
            called = call.get("function") if isinstance(call, dict) else None
            if isinstance(called, dict):
                parts.append(str(called.get("name", "")) + str(called.get("arguments", "")))
        if isinstance(message.get("reasoning_content"), str):
            parts.append(message["reasoning_content"])
        shaped.append({"content": parts})
    shaped_tools = []
    for tool in tools:
        nested = tool.get("function")
        spec: JSONObject = nested if isinstance(nested, dict) else tool
        shaped_tools.append(
            {
                "name": spec.get("name"),
                "description": spec.get("description"),
                "input_schema": spec.get("parameters") or spec.get("input_schema") or {},
            }
        )
    prompt = estimate_tokens({"messages": shaped, "tools": shaped_tools})
    params = params or {}
    kwargs = params.get("chat_template_kwargs")
    thinking = isinstance(kwargs, dict) and kwargs.get("enable_thinking") is True
    reasoning = thinking or reasoning_effort not in ("", "none")
    return RequestTraits(
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        images=images,
        tools=bool(tools),
        reasoning=reasoning,
        text=_last_user_text(messages)[-_MATCH_CHARS:],
        key_name=key_name,
    )


def _last_user_text(messages: Sequence[JSONObject]) -> str:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


# --- configuration -----------------------------------------------------------------------------


@dataclass(slots=True)
class Rule:
    """Conditions (all must hold) and the model they send a request to.

    ``min_prompt_tokens``/``max_prompt_tokens`` bound the estimated prompt; ``tools`` requires
    tools present (True) or absent (False); ``keywords`` any of these words in the last user
    message (case-insensitive); ``pattern`` a regular expression searched there; ``keys`` the
    API key names it applies to.
    """

    model: str
    min_prompt_tokens: int | None = None
    max_prompt_tokens: int | None = None
    tools: bool | None = None
    keywords: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None
    keys: frozenset[str] = frozenset()

    def matches(self, traits: RequestTraits) -> bool:
        if self.min_prompt_tokens is not None and traits.prompt_tokens < self.min_prompt_tokens:
            return False
        if self.max_prompt_tokens is not None and traits.prompt_tokens > self.max_prompt_tokens:
            return False
        if self.tools is not None and traits.tools != self.tools:
            return False
        if self.keys and traits.key_name not in self.keys:
            return False
        if self.keywords:
            lowered = traits.text.lower()
            if not any(word in lowered for word in self.keywords):
                return False
        return self.pattern is None or self.pattern.search(traits.text) is not None

    def describe(self) -> str:
        parts: list[str] = []
        if self.min_prompt_tokens is not None:
            parts.append(f"prompt>={self.min_prompt_tokens}")
        if self.max_prompt_tokens is not None:
            parts.append(f"prompt<={self.max_prompt_tokens}")
        if self.tools is not None:
            parts.append("tools" if self.tools else "no tools")
        if self.keywords:
            parts.append("keyword")
        if self.pattern is not None:
            parts.append("pattern")
        if self.keys:
            parts.append("key")
        return " ".join(parts) or "always"


@dataclass(slots=True)
class AutoConfig:
    """The ``[auto]`` section of the models file.

    ``policy`` is ``rules`` or ``classify``; ``classifier`` names the served model that
    classifies; ``classify_timeout`` (seconds) bounds the classifier's completion, after which
    the rules decide; ``default`` is the model used when no rule matches (else the profile
    decides: the fastest model that qualifies); ``signature`` appends a line naming the routed
    model to the answer's text (off by default).
    """

    name: str = DEFAULT_NAME
    aliases: tuple[str, ...] = ()
    policy: str = "rules"
    rules: list[Rule] = field(default_factory=list)
    classifier: str = ""
    classify_timeout: float = 2.0
    default: str = ""
    signature: bool = False

    def is_auto(self, requested: str) -> bool:
        """Whether a request's ``model`` means ``auto`` (its name, or an alias glob; case-insensitive)."""
        wanted = requested.strip().lower()
        if not wanted:
            return False
        if wanted == self.name.lower():
            return True
        return any(fnmatch.fnmatchcase(wanted, alias.lower()) for alias in self.aliases)


_RULE_KEYS: Final = frozenset(
    {"model", "min_prompt_tokens", "max_prompt_tokens", "tools", "keyword", "keywords", "regex", "keys"}
)
_AUTO_KEYS: Final = frozenset(
    {"name", "aliases", "policy", "rules", "classifier", "classify_timeout_ms", "default", "signature"}
)


def parse_auto_config(raw: Any, model_names: Iterable[str]) -> AutoConfig:
    """Validate the ``[auto]`` table of the models file against the configured model names.

    :raises ConfigError: one line naming the problem (an unknown key, a rule for a model that is
        not configured, a bad regular expression, ...).
    """
    if raw is None:
        return AutoConfig()
    if not isinstance(raw, dict):
        raise ConfigError("[auto] must be a table")
    unknown = sorted(set(raw) - _AUTO_KEYS)
    if unknown:
        raise ConfigError(f"[auto]: unknown setting {unknown[0]!r} (known: {', '.join(sorted(_AUTO_KEYS))})")
    names = {n.lower(): n for n in model_names}

    def model_ref(value: Any, where: str) -> str:
        if not isinstance(value, str) or value.lower() not in names:
            raise ConfigError(f"{where}: {value!r} is not a configured model (configured: {', '.join(names.values())})")
        return names[value.lower()]

    name = raw.get("name", DEFAULT_NAME)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("[auto] name must be a non-empty string")
    if name.lower() in names:
        raise ConfigError(f"[auto] name {name!r} is also the name of a configured model")
    aliases = raw.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError("[auto] aliases must be a list of strings (globs such as 'gpt-*')")
    policy = raw.get("policy", "rules")
    if policy not in ("rules", "classify"):
        raise ConfigError(f"[auto] policy must be 'rules' or 'classify', not {policy!r}")
    rules_raw = raw.get("rules", [])
    if not isinstance(rules_raw, list):
        raise ConfigError("[auto] rules must be an array of tables ([[auto.rules]])")
    rules = [_parse_rule(r, i, model_ref) for i, r in enumerate(rules_raw)]
    classifier = ""
    if policy == "classify":
        classifier = model_ref(raw.get("classifier"), "[auto] classifier")
    timeout_ms = raw.get("classify_timeout_ms", 2000)
    if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or timeout_ms <= 0:
        raise ConfigError("[auto] classify_timeout_ms must be a positive integer")
    default = model_ref(raw["default"], "[auto] default") if "default" in raw else ""
    signature = raw.get("signature", False)
    if not isinstance(signature, bool):
        raise ConfigError("[auto] signature must be true or false")
    return AutoConfig(
        name=name.strip(),
        aliases=tuple(aliases),
        policy=policy,
        rules=rules,
        classifier=classifier,
        classify_timeout=timeout_ms / 1000,
        default=default,
        signature=signature,
    )


def _parse_rule(raw: Any, index: int, model_ref: Callable[[Any, str], str]) -> Rule:
    where = f"[auto] rules[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown condition {unknown[0]!r} (known: {', '.join(sorted(_RULE_KEYS))})")
    rule = Rule(model=model_ref(raw.get("model"), f"{where} model"))
    for bound in ("min_prompt_tokens", "max_prompt_tokens"):
        value = raw.get(bound)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{where} {bound} must be a non-negative integer")
            setattr(rule, bound, value)
    if "tools" in raw:
        if not isinstance(raw["tools"], bool):
            raise ConfigError(f"{where} tools must be true or false")
        rule.tools = raw["tools"]
    words = raw.get("keywords", [])
    if "keyword" in raw:
        words = [raw["keyword"], *words] if isinstance(words, list) else words
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise ConfigError(f"{where} keywords must be a list of non-empty strings")
    rule.keywords = tuple(w.lower() for w in words)
    if "regex" in raw:
        if not isinstance(raw["regex"], str):
            raise ConfigError(f"{where} regex must be a string")
        try:
            rule.pattern = re.compile(raw["regex"])
        except re.error as exc:
            raise ConfigError(f"{where} regex: {exc}") from None
    keys = raw.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError(f"{where} keys must be a list of API key names")
    rule.keys = frozenset(keys)
    return rule


# --- step 1: hard constraints --------------------------------------------------------------------


@dataclass(slots=True)
class Shortlist:
    """The models that qualify, and why the others do not (for the reason header)."""

    models: list[Candidate]
    notes: list[str] = field(default_factory=list)


def qualify(traits: RequestTraits, candidates: Sequence[Candidate]) -> Shortlist:
    """Apply the hard constraints; raise :class:`AutoRouteError` when no model can serve at all."""
    if not candidates:
        raise AutoRouteError("no model is configured for automatic choice", status=503)
    notes: list[str] = []
    fits = [c for c in candidates if not c.context or c.context >= traits.needed_context]
    if not fits:
        biggest = max(c.context for c in candidates)
        raise AutoRouteError(
            f"the prompt (about {traits.prompt_tokens} tokens) plus max_tokens ({traits.max_tokens or 0}) "
            f"does not fit any model's context (the largest is {biggest} tokens)"
        )
    if len(fits) < len(candidates):
        notes.append(f"context {traits.needed_context} excludes {_names(c for c in candidates if c not in fits)}")
    shortlist = fits
    if traits.images:
        shortlist = [c for c in shortlist if c.vision]
        if not shortlist:
            raise AutoRouteError("the request has images and no configured model that fits it can see images")
        notes.append("images need vision")
    if traits.tools:
        shortlist = [c for c in shortlist if c.tools]
        if not shortlist:
            raise AutoRouteError("the request has tools and no configured model that fits it can call tools")
        notes.append("tools need tool calling")
    served = [c for c in shortlist if c.serving]
    if served and len(served) < len(shortlist):
        notes.append(f"not served now: {_names(c for c in shortlist if not c.serving)}")
        shortlist = served
    if traits.reasoning:
        thinkers = [c for c in shortlist if c.reasoning]
        if thinkers and len(thinkers) < len(shortlist):
            notes.append("thinking prefers reasoning models")
            shortlist = thinkers
    return Shortlist(shortlist, notes)


def _names(models: Iterable[Candidate]) -> str:
    return ",".join(c.name for c in models)


# --- step 2: policy ----------------------------------------------------------------------------


@dataclass(slots=True)
class Choice:
    """The routed model and the reason, for ``x-auxot-route-reason`` and the logs."""

    model: str
    reason: str

    @property
    def header_reason(self) -> str:
        """The reason as a header value: printable ASCII on one line, bounded."""
        text = "".join(ch if " " <= ch <= "~" else "?" for ch in self.reason)
        return text[:_REASON_LIMIT]


def choose_by_rules(config: AutoConfig, traits: RequestTraits, shortlist: Shortlist) -> Choice:
    """The first rule that matches and whose model qualifies; else the default; else the profile."""
    by_name = {c.name: c for c in shortlist.models}
    prefix = "; ".join(shortlist.notes)
    skipped: list[int] = []
    for index, rule in enumerate(config.rules):
        if not rule.matches(traits):
            continue
        if rule.model in by_name:
            return Choice(rule.model, _reason(prefix, f"rule {index + 1} ({rule.describe()})", skipped))
        skipped.append(index + 1)  # it matched but its model cannot take this request
    if config.default in by_name:
        return Choice(config.default, _reason(prefix, "no rule matched: default", skipped))
    best = fastest(shortlist.models, traits)
    return Choice(best.name, _reason(prefix, "no rule matched: " + _profile_reason(best), skipped))


def _reason(prefix: str, decision: str, skipped: list[int]) -> str:
    parts = [p for p in (prefix, decision) if p]
    if skipped:
        parts.append("matching rule(s) " + ",".join(map(str, skipped)) + " named a model that does not qualify")
    return "; ".join(parts)


def _profile_reason(model: Candidate) -> str:
    if model.prefill_tps > 0 and model.decode_tps > 0:
        return "fastest measured"
    return "first configured"


def fastest(models: Sequence[Candidate], traits: RequestTraits) -> Candidate:
    """The model expected to answer soonest: prompt at its prefill speed plus the answer at its
    decode speed. Models not measured yet rank after measured ones, in catalog order."""
    output = traits.max_tokens or _DEFAULT_OUTPUT

    def expected_seconds(model: Candidate) -> float:
        if model.prefill_tps <= 0 or model.decode_tps <= 0:
            return float("inf")
        return traits.prompt_tokens / model.prefill_tps + output / model.decode_tps

    return min(models, key=expected_seconds)  # min keeps the first of equals: catalog order


# --- classify ----------------------------------------------------------------------------------


@dataclass(slots=True)
class ClassifierPrompt:
    """The classifier's job: chat messages, llama-server params (the grammar) and the token cap."""

    messages: list[JSONObject]
    params: JSONObject
    max_tokens: int


def classifier_prompt(
    traits: RequestTraits, models: Sequence[Candidate], descriptions: dict[str, str] | None = None
) -> ClassifierPrompt:
    """A short digest of the request and a GBNF grammar that only admits one of the model names.

    The grammar makes even a random model answer with a valid name; ``max_tokens`` covers the
    longest name (a name is rarely more than a few tokens; a character per token is the bound).
    """
    descriptions = descriptions or {}
    lines = []
    for model in models:
        what = descriptions.get(model.name) or ", ".join(sorted(model.capabilities)) or "general"
        lines.append(f"- {model.name}: {what}; context {model.context or 'unknown'} tokens")
    digest = traits.text[:_DIGEST_CHARS]
    flags = [f"prompt about {traits.prompt_tokens} tokens"]
    if traits.tools:
        flags.append("uses tools")
    if traits.reasoning:
        flags.append("asks for thinking")
    system = "You route requests to the best model. Answer with the name of exactly one model.\nModels:\n" + "\n".join(
        lines
    )
    user = f"Request ({'; '.join(flags)}):\n{digest}\n\nBest model:"
    alternatives = " | ".join(_gbnf_literal(m.name) for m in models)
    params: JSONObject = {"grammar": f"root ::= {alternatives}", "chat_template_kwargs": {"enable_thinking": False}}
    longest = max(len(m.name) for m in models)
    return ClassifierPrompt(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        params=params,
        max_tokens=max(4, longest + 2),
    )


def _gbnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def parse_classifier_answer(answer: str, models: Sequence[Candidate]) -> str | None:
    """The model the classifier named, or None: exact (case-insensitive) first, then the one
    name the answer starts with (a model that kept talking after the name)."""
    text = answer.strip().strip("\"'`.").strip()
    by_lower = {m.name.lower(): m.name for m in models}
    if text.lower() in by_lower:
        return by_lower[text.lower()]
    starts = [name for lower, name in by_lower.items() if text.lower().startswith(lower)]
    if starts:
        return max(starts, key=len)
    return None


Classifier = Callable[[ClassifierPrompt], Awaitable[str]]


async def choose(
    config: AutoConfig,
    traits: RequestTraits,
    candidates: Sequence[Candidate],
    classifier: Classifier | None = None,
    descriptions: dict[str, str] | None = None,
) -> Choice:
    """Constraints, then the policy. ``classifier`` runs the classifier's completion (through
    the router's queue) and returns its text; it is bounded by ``config.classify_timeout``.

    :raises AutoRouteError: no model can serve the request.
    """
    shortlist = qualify(traits, candidates)
    if len(shortlist.models) == 1:
        only = shortlist.models[0]
        return Choice(only.name, "; ".join([*shortlist.notes, "only model that qualifies"]))
    if config.policy != "classify" or classifier is None:
        return choose_by_rules(config, traits, shortlist)
    prompt = classifier_prompt(traits, shortlist.models, descriptions)
    try:
        answer = await asyncio.wait_for(classifier(prompt), config.classify_timeout)
    except TimeoutError:
        fallback = choose_by_rules(config, traits, shortlist)
        fallback.reason = f"classifier timed out after {config.classify_timeout * 1000:g} ms; " + fallback.reason
        return fallback
    except Exception as exc:  # the classifier's worker failed: the rules still answer
        fallback = choose_by_rules(config, traits, shortlist)
        fallback.reason = f"classifier failed ({type(exc).__name__}); " + fallback.reason
        return fallback
    picked = parse_classifier_answer(answer, shortlist.models)
    if picked is None:
        fallback = choose_by_rules(config, traits, shortlist)
        fallback.reason = "classifier answered no model name; " + fallback.reason
        return fallback
    return Choice(picked, "; ".join([*shortlist.notes, f"classifier {config.classifier} chose it"]))


# --- profiles ----------------------------------------------------------------------------------


@dataclass(slots=True)
class ModelProfile:
    """Measured speeds of one model: an exponential moving average over the jobs it served.

    Prefill counts only prompt tokens that were not cache hits (a cached prompt says nothing
    about prefill speed); decode counts output tokens after the first.
    """

    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    samples: int = 0

    def observe(
        self, *, prompt_tokens: int, cached_tokens: int, prefill_s: float, output_tokens: int, decode_s: float
    ) -> None:
        fresh = prompt_tokens - cached_tokens
        if fresh >= 16 and prefill_s > 0:  # tiny prompts measure latency, not throughput
            self.prefill_tps = _ewma(self.prefill_tps, fresh / prefill_s, _PROFILE_WEIGHT)
        if output_tokens >= 8 and decode_s > 0:
            self.decode_tps = _ewma(self.decode_tps, (output_tokens - 1) / decode_s, _PROFILE_WEIGHT)
        self.samples += 1

    def fields(self) -> JSONObject:
        return {
            "prefill_tokens_per_second": round(self.prefill_tps, 1) if self.prefill_tps else None,
            "decode_tokens_per_second": round(self.decode_tps, 1) if self.decode_tps else None,
            "measured_jobs": self.samples,
        }


def _ewma(old: float, new: float, weight: float) -> float:
    return new if old <= 0 else old + weight * (new - old)


class ProfileBook:
    """Profiles by model name; bounded by the catalog (unknown names are not recorded)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._profiles: dict[str, ModelProfile] = {name: ModelProfile() for name in names}

    def reset_names(self, names: Iterable[str]) -> None:
        """A new catalog: keep the profiles of models still configured, drop the others."""
        self._profiles = {name: self._profiles.get(name) or ModelProfile() for name in names}

    def get(self, name: str) -> ModelProfile | None:
        return self._profiles.get(name)

    def observe(self, name: str, **measures: Any) -> None:
        profile = self._profiles.get(name)
        if profile is not None:
            profile.observe(**measures)


# --- visibility --------------------------------------------------------------------------------


def signature_line(model: str) -> str:
    """The optional line appended to the answer text (``[auto] signature = true``)."""
    return f"\n\n— answered by {model} (auto)"


def model_listing_fields(candidate: Candidate, profile: ModelProfile | None) -> JSONObject:
    """Extra fields of one model in ``GET /v1/models`` (under ``auxot``)."""
    fields: JSONObject = {
        "context_length": candidate.context or None,
        "capabilities": sorted(candidate.capabilities),
        "served": candidate.serving,
    }
    fields.update((profile or ModelProfile()).fields())
    return fields
