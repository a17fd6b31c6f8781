"""The models file's routing extras: ``[auto]``, ``[upstreams.NAME]`` and ``[fallbacks]``. Pure.

The catalog (:mod:`auxot_common.models`) reads only ``[[models]]``; these tables sit next to it in
the same TOML file and are validated against the catalog's names. ``[fallbacks]`` maps a local
model's name to ``{upstream = NAME, when = "no-worker" | "overflow" | "always", after_s = N}``
(a top-level table, so the catalog's per-model keys stay its own).

:func:`candidates` turns the catalog and the router's live state into the plain
:class:`~auxot_common.autoroute.Candidate` list automatic choice works on.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field

from auxot_common.autoroute import AutoConfig, Candidate, ProfileBook, parse_auto_config
from auxot_common.autoroute import ConfigError as AutoConfigError
from auxot_common.models import ModelCatalog
from auxot_common.upstreams import ConfigError as UpstreamConfigError
from auxot_common.upstreams import FallbackSpec, UpstreamSpec, parse_fallback, parse_upstreams


class ExtrasError(ValueError):
    """One line naming the file and the problem."""


@dataclass(slots=True)
class RoutingExtras:
    auto: AutoConfig | None = None  # None: no [auto] table, no virtual model
    upstreams: dict[str, UpstreamSpec] = field(default_factory=dict)
    fallbacks: dict[str, FallbackSpec] = field(default_factory=dict)  # local model name -> fallback


def load_extras(text: str, source: str, catalog: ModelCatalog, env: Mapping[str, str]) -> RoutingExtras:
    """Parse the extras of a models file. Upstream models count as model names for ``[auto]``
    rules (an upstream may be a rule's target); a fallback must name a local model."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ExtrasError(f"{source}: not valid TOML: {exc}") from None
    try:
        upstreams = parse_upstreams(data.get("upstreams"), env)
        clash = sorted(n for n in upstreams if catalog.match_exact(n) is not None)
        if clash:
            raise UpstreamConfigError(f"[upstreams.{clash[0]}] has the name of a local model")
        fallbacks: dict[str, FallbackSpec] = {}
        raw_fallbacks = data.get("fallbacks") or {}
        if not isinstance(raw_fallbacks, dict):
            raise UpstreamConfigError("[fallbacks] must map model names to {upstream = ..., when = ...}")
        for name, raw in raw_fallbacks.items():
            spec = catalog.get(name)
            if spec is None:
                raise UpstreamConfigError(
                    f"[fallbacks] {name!r} is not a configured model ({', '.join(catalog.names)})"
                )
            fallbacks[spec.name] = parse_fallback(raw, upstreams, spec.name)
        auto = None
        if "auto" in data:
            auto = parse_auto_config(data["auto"], [*catalog.names, *upstreams])
    except (AutoConfigError, UpstreamConfigError) as exc:
        raise ExtrasError(f"{source}: {exc}") from None
    return RoutingExtras(auto=auto, upstreams=upstreams, fallbacks=fallbacks)


def candidates(
    catalog: ModelCatalog,
    served: Mapping[str, int],
    profiles: ProfileBook,
    *,
    upstreams: Mapping[str, UpstreamSpec] | None = None,
    key_name: str = "",
    tool_models: frozenset[str] | None = None,
) -> list[Candidate]:
    """Chat models of the catalog (embedding models are never routed to) and the upstreams the
    key may use. ``served`` counts workers per model name; tool calling is assumed for every
    chat model (llama-server's templates) unless ``tool_models`` lists the ones that can."""
    out: list[Candidate] = []
    for spec in catalog.specs:
        if spec.embedding:
            continue
        caps = {c.lower() for c in spec.resolution.capabilities}
        if tool_models is None or spec.name in tool_models:
            caps.add("tools")
        profile = profiles.get(spec.name)
        out.append(
            Candidate(
                name=spec.name,
                context=spec.ctx_size,
                capabilities=frozenset(caps),
                serving=served.get(spec.name, 0) > 0,
                prefill_tps=profile.prefill_tps if profile else 0.0,
                decode_tps=profile.decode_tps if profile else 0.0,
            )
        )
    for upstream in (upstreams or {}).values():
        if upstream.may_use(key_name):
            profile = profiles.get(upstream.name)
            out.append(
                Candidate(
                    name=upstream.name,
                    context=upstream.context,
                    capabilities=upstream.capabilities,
                    serving=True,
                    prefill_tps=profile.prefill_tps if profile else 0.0,
                    decode_tps=profile.decode_tps if profile else 0.0,
                )
            )
    return out
