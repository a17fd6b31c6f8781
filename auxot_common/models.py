"""The model catalog: which models a router serves, how requests name them, and which worker
serves which model (assignment and moves, with hysteresis). Pure: no I/O besides reading the
models file, no asyncio.

Configuration, in order of precedence:

- ``AUXOT_MODELS_FILE``: a TOML file with one ``[[models]]`` table per model::

      [[models]]
      name = "Qwen3-Coder-30B-A3B"      # registry name or exact id (``registry`` is a synonym)
      quantization = "auto"             # or an explicit one
      ctx_size = 65536                  # context per slot
      parallel = 2                      # slots per worker
      min_workers = 1
      max_workers = 0                   # 0: no limit
      aliases = ["claude-*sonnet*", "gpt-4*"]
      default = true                    # unknown model names go here

      [[models]]
      name = "Qwen3-0.6B"
      aliases = ["claude-*haiku*"]
      embedding = false                 # true: llama-server --embeddings --pooling <pooling>
      pooling = "mean"

- ``AUXOT_MODELS``: comma-separated registry names; the first is the default.
- ``AUXOT_MODEL``: one model, the default (today's single-model setup).

A request's ``model`` is matched (case-insensitively) against the served name, the registry
name and id as written, the Hugging Face repository, then each alias as a glob. No match goes
to the default model when there is one.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from auxot_common.registry import (
    ModelResolution,
    Registry,
    RegistryError,
    resolve_model,
    suggest_models,
)

POOLING_TYPES = ("mean", "cls", "last", "rank", "none")


class CatalogError(ValueError):
    """A models configuration that cannot be served; the message is one line (or a did-you-mean)."""


@dataclass(slots=True)
class ModelSpec:
    """One configured model.

    ``name`` is the canonical served name (the registry's ``model_name``), used in responses,
    ``/v1/models`` and as the queue's stream name. ``registry`` is what the user wrote.
    """

    name: str
    registry: str
    resolution: ModelResolution
    quantization: str = ""
    ctx_size: int = 131072
    parallel: int = 2
    min_workers: int = 0
    max_workers: int = 0  # 0: no limit
    aliases: tuple[str, ...] = ()
    embedding: bool = False
    pooling: str = "mean"
    default: bool = False

    @property
    def key(self) -> str:
        return model_key(self.name)

    def names(self) -> set[str]:
        """Exact spellings that select this model (lower case)."""
        res = self.resolution
        return {n.lower() for n in (self.name, self.registry, res.huggingface_id) if n}

    def resolve_for(self, registry: Registry, vram_gb: float) -> ModelResolution:
        """The resolution for a worker with ``vram_gb`` (auto quantization picks what fits)."""
        if vram_gb <= 0 or self.quantization.lower() not in ("", "auto"):
            return self.resolution
        return resolve_model(
            registry,
            self.registry,
            None,
            context_size=self.ctx_size,
            parallel=self.parallel,
            vram_free_gb=vram_gb,
        )


def model_key(name: str) -> str:
    """A Redis-key-safe slug of a model name: ``Qwen3-Coder-30B-A3B`` -> ``qwen3-coder-30b-a3b``."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-")
    return slug or "model"


@dataclass(slots=True)
class ModelCatalog:
    """The configured models in order; ``default`` takes names that match nothing."""

    specs: list[ModelSpec]
    default: ModelSpec | None = None
    source: str = ""  # "AUXOT_MODEL", "AUXOT_MODELS" or the models file's path
    _exact: dict[str, ModelSpec] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for spec in self.specs:
            for name in spec.names():
                self._exact.setdefault(name, spec)

    def get(self, name: str) -> ModelSpec | None:
        """The spec whose canonical name is ``name`` (exactly, any case)."""
        for spec in self.specs:
            if spec.name.lower() == name.lower():
                return spec
        return None

    def match(self, requested: str) -> ModelSpec | None:
        """The model a request's ``model`` names: exact names first, then aliases (globs),
        then the default; None when nothing matches and there is no default."""
        found = self.match_exact(requested)
        return found if found is not None else self.default

    def match_exact(self, requested: str) -> ModelSpec | None:
        """Like :meth:`match` without falling back to the default."""
        wanted = requested.strip().lower()
        if not wanted:
            return None
        spec = self._exact.get(wanted)
        if spec is not None:
            return spec
        for spec in self.specs:
            if any(fnmatch.fnmatchcase(wanted, alias.lower()) for alias in spec.aliases):
                return spec
        return None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]


# --- loading ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class ModelSettings:
    """What one model's configuration says, before it is resolved against the registry."""

    registry: str
    quantization: str = ""
    ctx_size: int = 131072
    parallel: int = 2
    min_workers: int = 0
    max_workers: int = 0
    aliases: tuple[str, ...] = ()
    embedding: bool = False
    pooling: str = "mean"
    default: bool = False


_FILE_KEYS = {
    "name",
    "registry",
    "quantization",
    "ctx_size",
    "parallel",
    "min_workers",
    "max_workers",
    "aliases",
    "embedding",
    "pooling",
    "default",
}


def settings_from_toml(text: str, source: str, defaults: ModelSettings) -> list[ModelSettings]:
    """Parse a models file; raises :class:`CatalogError` naming the file, model and key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: not valid TOML: {exc}") from None
    models = data.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise CatalogError(f"{source}: expected one or more [[models]] tables")
    out: list[ModelSettings] = []
    for index, raw in enumerate(models, start=1):
        where = f"{source}: model {index}"
        unknown = sorted(set(raw) - _FILE_KEYS)
        if unknown:
            raise CatalogError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_FILE_KEYS))})")
        name = raw.get("name", raw.get("registry"))
        if not isinstance(name, str) or not name.strip():
            raise CatalogError(f"{where}: needs a name (a registry model name or id)")
        where = f"{source}: model {name!r}"
        out.append(
            ModelSettings(
                registry=name.strip(),
                quantization=_str(raw, "quantization", defaults.quantization, where),
                ctx_size=_int(raw, "ctx_size", defaults.ctx_size, where, minimum=256),
                parallel=_int(raw, "parallel", defaults.parallel, where, minimum=1, maximum=512),
                min_workers=_int(raw, "min_workers", 0, where, minimum=0),
                max_workers=_int(raw, "max_workers", 0, where, minimum=0),
                aliases=tuple(_aliases(raw.get("aliases", []), where)),
                embedding=_bool(raw, "embedding", False, where),
                pooling=_pooling(raw, where),
                default=_bool(raw, "default", False, where),
            )
        )
    return out


def _str(raw: dict[str, Any], key: str, default: str, where: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str):
        raise CatalogError(f"{where}: {key} must be a string")
    return value.strip()


def _int(raw: dict[str, Any], key: str, default: int, where: str, *, minimum: int, maximum: int | None = None) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (maximum and value > maximum):
        bound = f" and at most {maximum}" if maximum else ""
        raise CatalogError(f"{where}: {key} must be an integer of at least {minimum}{bound}")
    return value


def _bool(raw: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise CatalogError(f"{where}: {key} must be true or false")
    return value


def _aliases(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(a, str) and a.strip() for a in value):
        raise CatalogError(f"{where}: aliases must be a list of names or glob patterns")
    return [a.strip() for a in value]


def _pooling(raw: dict[str, Any], where: str) -> str:
    value = raw.get("pooling", "mean")
    if value not in POOLING_TYPES:
        raise CatalogError(f"{where}: pooling must be one of {', '.join(POOLING_TYPES)}")
    return str(value)


def build_catalog(registry: Registry, settings: Sequence[ModelSettings], source: str) -> ModelCatalog:
    """Resolve every model against the registry. The first marked ``default`` is the default;
    with none marked, the first model is (unless the file says ``default = false`` everywhere
    explicitly, which :func:`load_catalog` passes as ``first_is_default=False``)."""
    specs: list[ModelSpec] = []
    for item in settings:
        try:
            resolution = resolve_model(
                registry, item.registry, item.quantization or None, context_size=item.ctx_size, parallel=item.parallel
            )
        except RegistryError as exc:
            message = str(exc)
            if source not in ("AUXOT_MODEL",):  # the registry's hints name AUXOT_MODEL; say where it was
                message = message.replace("AUXOT_MODEL=", "") + f"\n(in {source})"
            raise CatalogError(message) from None
        embedding = item.embedding or "embedding" in resolution.capabilities
        if embedding and "embedding" not in resolution.capabilities:
            resolution.capabilities.append("embedding")
        spec = ModelSpec(
            name=resolution.model_name,
            registry=item.registry,
            resolution=resolution,
            quantization=item.quantization,
            ctx_size=item.ctx_size,
            parallel=item.parallel,
            min_workers=item.min_workers,
            max_workers=item.max_workers,
            aliases=item.aliases,
            embedding=embedding,
            pooling=item.pooling,
            default=item.default,
        )
        clash = next((s for s in specs if s.name.lower() == spec.name.lower()), None)
        if clash is not None:
            raise CatalogError(f"{source}: {item.registry!r} and {clash.registry!r} are the same model ({spec.name})")
        specs.append(spec)
    if not specs:
        raise CatalogError(f"{source}: no models configured")
    defaults = [s for s in specs if s.default]
    if len(defaults) > 1:
        raise CatalogError(f"{source}: only one model can be the default ({defaults[0].name}, {defaults[1].name})")
    return ModelCatalog(specs=specs, default=defaults[0] if defaults else None, source=source)


def load_catalog(
    registry: Registry,
    *,
    model: str,
    models: str = "",
    models_file: str = "",
    read_file: Callable[[str], str] | None = None,
    defaults: ModelSettings | None = None,
) -> ModelCatalog:
    """The catalog from ``AUXOT_MODELS_FILE``, else ``AUXOT_MODELS``, else ``AUXOT_MODEL``.

    ``defaults`` carries ``AUXOT_QUANTIZATION``, ``AUXOT_CTX_SIZE`` and ``AUXOT_MAX_PARALLEL``
    for models that do not set their own. With ``AUXOT_MODELS`` the first model is the default;
    in a models file the one marked ``default = true`` (none: unknown names get a 404).
    """
    base = defaults or ModelSettings(registry=model)
    if models_file:
        reader = read_file or _read_text
        try:
            text = reader(models_file)
        except OSError as exc:
            raise CatalogError(f"AUXOT_MODELS_FILE={models_file}: cannot read it: {exc.strerror or exc}") from None
        return build_catalog(registry, settings_from_toml(text, models_file, base), models_file)
    if models.strip():
        names = [n.strip() for n in models.split(",") if n.strip()]
        items = [_with_registry(base, name, default=(i == 0)) for i, name in enumerate(names)]
        return build_catalog(registry, items, "AUXOT_MODELS")
    return build_catalog(registry, [_with_registry(base, model, default=True)], "AUXOT_MODEL")


def _with_registry(base: ModelSettings, name: str, *, default: bool) -> ModelSettings:
    return ModelSettings(
        registry=name,
        quantization=base.quantization,
        ctx_size=base.ctx_size,
        parallel=base.parallel,
        default=default,
    )


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def suggestions_for(registry: Registry, name: str) -> list[str]:
    """Registry names close to ``name`` (for a worker's ``--model`` typo)."""
    return suggest_models(registry, name, limit=5)[0]


# --- assignment and moves ----------------------------------------------------------------------

# Hysteresis (defaults; the router reads AUXOT_MOVE_COOLDOWN and AUXOT_DEMAND_PERSIST):
MOVE_COOLDOWN_S = 600.0  # a worker is not moved again within 10 minutes of its last (re)assignment
DEMAND_PERSIST_S = 30.0  # a model must have had waiting jobs and no worker for 30 s before a move


@dataclass(slots=True)
class PoolDemand:
    """What the assignment policy knows about one model's pool right now."""

    name: str
    workers: int = 0
    waiting: int = 0  # jobs queued for it, not yet running
    min_workers: int = 0
    max_workers: int = 0  # 0: no limit
    size_gb: float = 0.0  # the registry's VRAM figure: "biggest first"
    starving_since: float | None = None  # when it last started having waiting jobs and no worker

    @property
    def full(self) -> bool:
        return self.max_workers > 0 and self.workers >= self.max_workers

    @property
    def unmet(self) -> bool:
        return not self.full and (self.waiting > 0 or self.workers < self.min_workers)


@dataclass(slots=True)
class WorkerState:
    """A connected worker as the move planner sees it."""

    worker_id: str
    model: str
    running: int  # jobs it runs now
    movable: bool  # it asked for no model (``--model``) and reports which model it serves
    assigned_at: float  # monotonic time of its last assignment or move
    fits: frozenset[str] = frozenset()  # the models whose quantization fits its VRAM


def assign_model(pools: Sequence[PoolDemand], fits: Callable[[str], bool], *, current: str = "") -> str | None:
    """The model for a worker that asked for none.

    A worker reconnecting with a model already loaded (``current``) keeps it. Otherwise: the
    models with unmet demand (waiting jobs, or fewer workers than their minimum) whose
    quantization fits the worker, biggest first; then the model with the fewest workers among
    those that fit and are not full (catalog order breaks ties); then anything not full.
    """
    by_name = {p.name: p for p in pools}
    if current and current in by_name and not by_name[current].full:
        return current
    unmet = [p for p in pools if p.unmet and fits(p.name)]
    if unmet:
        # the most starved first (no worker at all), then the biggest model
        return min(unmet, key=lambda p: (p.workers > 0, -p.size_gb, pools.index(p))).name
    open_pools = [p for p in pools if not p.full]
    fitting = [p for p in open_pools if fits(p.name)] or open_pools
    if not fitting:
        return None
    return min(fitting, key=lambda p: (p.workers, pools.index(p))).name


def plan_move(
    pools: Sequence[PoolDemand],
    workers: Iterable[WorkerState],
    now: float,
    *,
    cooldown_s: float = MOVE_COOLDOWN_S,
    persist_s: float = DEMAND_PERSIST_S,
) -> tuple[str, str] | None:
    """At most one move, ``(worker_id, model)``, or None.

    A move happens only when a model has had waiting jobs and no worker for ``persist_s``
    seconds, and some other model has an idle, movable worker above its minimum, with no waiting
    jobs of its own, that was not (re)assigned within ``cooldown_s``. Neither side then
    qualifies again at once: the starving model has a worker (arriving), the donor is at or
    above its minimum, and the moved worker is in its cooldown, so workers do not flap.
    """
    starving = [
        p
        for p in pools
        if p.workers == 0 and p.waiting > 0 and p.starving_since is not None and now - p.starving_since >= persist_s
    ]
    if not starving:
        return None
    by_name = {p.name: p for p in pools}
    candidates = [
        w
        for w in workers
        if w.movable
        and w.running == 0
        and now - w.assigned_at >= cooldown_s
        and w.model in by_name
        and by_name[w.model].waiting == 0
        and by_name[w.model].workers > max(by_name[w.model].min_workers, 0)
    ]
    for target in sorted(starving, key=lambda p: (p.starving_since or now, -p.size_gb)):
        fitting = [w for w in candidates if not w.fits or target.name in w.fits]
        if fitting:
            # take from the pool with the most workers, the longest-idle worker first
            donor = max(fitting, key=lambda w: (by_name[w.model].workers, -w.assigned_at))
            return donor.worker_id, target.name
    return None
