"""The model registry: loading, model resolution, VRAM estimates and the ``models`` command.

``registry.json`` lives at the repository top level, next to ``auxot_router.py``; it is generated
by ``scripts/gen_registry.py`` and never edited by hand. The embedded copy is read through the
package's loader, so it also works when the repository is run as a zipapp (the file then sits at
the root of the ``.pyz``). ``load_registry(path)`` reads another file instead
(``AUXOT_REGISTRY_FILE``).

Resolution (:func:`resolve_entry`, reference §6.2): an exact ``id`` wins; otherwise the name is
matched case-insensitively, with the given quantization or, for ``""``/``auto``, the first of
Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q8_0, else the first non-F16 variant, else the first. A
name that is not found gets "did you mean" suggestions: substring matches as Go did, plus
matches that ignore case and punctuation and close matches (difflib), so that
``qwen3 coder 30b`` or ``Qwen3-Codr-30B-A3B`` find ``Qwen3-Coder-30B-A3B``.

Per worker, ``AUXOT_QUANTIZATION=auto`` picks the best quantization that fits the worker's VRAM
(:func:`pick_quantization`). The estimate (:func:`estimate_vram`):

- weights: parameters x the effective bits per weight of the GGUF type (Q4_K_S 4.6, Q6_K 6.6,
  Q8_0 8.5, ...), and never less than the registry's ``vram_requirements_gb``, which uses
  nominal bits (Q4 = 0.5 bytes) and so understates real Q3-Q6 files by 10-40 %;
- KV cache (f16 by default): bytes per token = 2 (K and V) x layers x KV heads x head dim x 2,
  taken from a table of the architectures in the registry (matched by name, counting only layers
  with a full-length cache; sliding-window layers hold only their window per slot); for an
  unknown model 56 KiB x (active parameters in billions) ^ 0.4, calibrated on Llama-3-8B
  (128 KiB/token), Qwen3-32B (256 KiB) and Qwen3-30B-A3B (96 KiB, 3B active from the ``A3B`` in
  its name). Total tokens = context per slot x parallel slots;
- vision projector: 1 GB when the model has an mmproj file;
- overhead (CUDA context, compute buffers): 0.5 GB + 5 % of the rest.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import os
import re
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO

import orjson

REGISTRY_FILE_NAME = "registry.json"
DEFAULT_CONTEXT_SIZE = 131072
DEFAULT_PARALLEL = 2
AUTO = "auto"

# Router-level default when no VRAM is known (reference §6.2).
PREFERENCE_ORDER = ("Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
# Best first. F32 is never chosen automatically: twice F16's size for no quality gain.
QUALITY_ORDER = (
    "F16",
    "BF16",
    "Q8_K",
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q4_K_M",
    "Q4_K_S",
    "Q3_K_M",
    "Q3_K_S",
)
# Effective bits per weight of real GGUF files (mixtures keep some tensors at higher precision;
# Q8_K entries are Unsloth UD-Q8_K_XL files, which keep some tensors at BF16).
BITS_PER_WEIGHT = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_K": 9.5,
    "Q8_0": 8.5,
    "Q6_K": 6.6,
    "Q5_K_M": 5.7,
    "Q5_K_S": 5.5,
    "Q4_K_M": 4.9,
    "Q4_K_S": 4.6,
    "Q3_K_M": 3.9,
    "Q3_K_S": 3.5,
}
KV_BYTES_PER_ELEMENT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625}
MMPROJ_GB = 1.0
OVERHEAD_GB = 0.5
OVERHEAD_FRACTION = 0.05
GB = 1e9
KIB = 1024


class RegistryError(Exception):
    """The registry cannot be read, or a model cannot be resolved in it."""


class ModelNotFoundError(RegistryError):
    """No entry has the requested name or id; ``suggestions`` holds close names."""

    def __init__(self, model: str, suggestions: list[str], more: int) -> None:
        self.model = model
        self.suggestions = suggestions
        super().__init__(_not_found_message(model, suggestions, more))


class QuantizationNotAvailableError(RegistryError):
    """The model exists but not in the requested quantization."""

    def __init__(self, model: str, quantization: str, variants: Sequence[RegistryEntry]) -> None:
        self.model = model
        self.quantization = quantization
        self.available = [v.quantization for v in variants]
        super().__init__(_quantization_message(model, quantization, variants))


@dataclass(slots=True, frozen=True)
class RegistryEntry:
    """One model file in one quantization (reference §7.2)."""

    id: str
    model_name: str
    huggingface_id: str
    quantization: str
    family: str
    parameters: str
    default_context_size: int
    max_context_size: int
    vram_requirements_gb: float
    capabilities: tuple[str, ...]
    file_name: str
    mmproj_file_name: str = ""


@dataclass(slots=True)
class Registry:
    """A parsed registry. ``source`` is the file it came from, or ``"embedded"``."""

    version: str
    generated_at: str
    models: tuple[RegistryEntry, ...]
    source: str = "embedded"
    _by_name: dict[str, list[RegistryEntry]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _by_id: dict[str, RegistryEntry] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        for entry in self.models:
            self._by_name.setdefault(entry.model_name.lower(), []).append(entry)
            self._by_id.setdefault(entry.id, entry)

    def variants(self, model_name: str) -> list[RegistryEntry]:
        """All entries of ``model_name`` (case-insensitive), in registry order."""
        return list(self._by_name.get(model_name.lower(), ()))

    def by_id(self, entry_id: str) -> RegistryEntry | None:
        """The entry with exactly this ``id`` (case-sensitive), if any."""
        return self._by_id.get(entry_id)

    def model_names(self) -> list[str]:
        """Unique model names in registry order."""
        return [variants[0].model_name for variants in self._by_name.values()]


@dataclass(slots=True)
class VramEstimate:
    """Estimated GPU memory, in GB (10^9 bytes), to serve one entry."""

    weights_gb: float
    kv_cache_gb: float
    mmproj_gb: float
    overhead_gb: float
    total_gb: float


@dataclass(slots=True)
class QuantizationChoice:
    """The result of :func:`pick_quantization`; ``warning`` is ``""`` when it fits."""

    entry: RegistryEntry
    estimate: VramEstimate
    budget_gb: float
    fits: bool
    warning: str = ""

    @property
    def quantization(self) -> str:
        return self.entry.quantization


@dataclass(slots=True)
class ModelResolution:
    """Everything a worker needs to download and serve the model, independent of its registry.

    ``files`` are paths inside the Hugging Face repo ``huggingface_id``; for a split GGUF all
    shards in order (llama-server is given the first). ``context_size`` is per slot.
    ``vram_gb`` is the registry's weights-only figure; ``estimated_vram_gb`` the full estimate
    for ``context_size`` x ``parallel``.
    """

    model_name: str
    quantization: str
    huggingface_id: str
    files: list[str]
    mmproj_file: str
    family: str
    parameters: str
    context_size: int
    max_context_size: int
    vram_gb: float
    capabilities: list[str]
    parallel: int = DEFAULT_PARALLEL
    estimated_vram_gb: float = 0.0
    warning: str = ""


# --- loading ---------------------------------------------------------------------------------


def load_registry(path: str | None = None) -> Registry:
    """Load and validate a registry.

    Args:
        path: a registry JSON file (``AUXOT_REGISTRY_FILE``); ``None`` or ``""`` means the
            embedded ``registry.json`` (cached after the first load).

    Raises:
        RegistryError: unreadable, not JSON, wrong shape, or no models.
    """
    if not path:
        return _embedded_registry()
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise RegistryError(f"cannot read registry file {path}: {exc}") from exc
    return parse_registry(data, source=path)


@functools.cache
def _embedded_registry() -> Registry:
    return parse_registry(read_embedded_registry(), source="embedded")


def embedded_registry_path() -> str:
    """Where the embedded registry is: the repository root, or the root inside a zipapp."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(package_dir), REGISTRY_FILE_NAME)


def read_embedded_registry() -> bytes:
    """The bytes of the embedded ``registry.json``, from the filesystem or from a zipapp.

    The package's loader reads it when it can (``SourceFileLoader`` from disk, ``zipimporter``
    from the archive); otherwise the enclosing zip file is opened directly.
    """
    path = embedded_registry_path()
    loader = __spec__.loader if __spec__ is not None else None
    get_data = getattr(loader, "get_data", None)
    if get_data is not None:
        try:
            data = get_data(path)
        except OSError:
            pass
        else:
            return bytes(data)
    try:
        return read_from_zip(path)
    except RegistryError:
        installed = installed_registry_path()
        if installed is None:
            raise
    with open(installed, "rb") as fh:
        return fh.read()


def installed_registry_path() -> str | None:
    """``<prefix>/share/auxot/registry.json`` of a ``pip install`` (environment or ``--user``)."""
    import site
    import sys

    for prefix in (sys.prefix, site.getuserbase()):
        candidate = os.path.join(prefix, "share", "auxot", REGISTRY_FILE_NAME)
        if os.path.isfile(candidate):
            return candidate
    return None


def read_from_zip(path: str) -> bytes:
    """Read ``path`` where some leading part of it is a zip archive (``app.pyz/registry.json``).

    Raises:
        RegistryError: no enclosing archive holds the member.
    """
    archive, member = path, ""
    while archive and not os.path.isfile(archive):
        parent, name = os.path.split(archive)
        if parent == archive:
            break
        archive, member = parent, f"{name}/{member}" if member else name
    if os.path.isfile(archive) and zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            try:
                return zf.read(member)
            except KeyError:
                pass
    raise RegistryError(f"embedded registry not found at {path}")


def parse_registry(data: bytes, source: str = "embedded") -> Registry:
    """Parse registry JSON bytes.

    Args:
        data: the file's bytes.
        source: a label for messages (a path or ``"embedded"``).

    Raises:
        RegistryError: not JSON, wrong shape, a bad entry, or no models.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise RegistryError(f"registry {source} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise RegistryError(f"registry {source} has no models list")
    models = tuple(_parse_entry(raw, i, source) for i, raw in enumerate(doc["models"]))
    if not models:
        raise RegistryError(f"registry {source} contains no models")
    return Registry(
        version=str(doc.get("version", "")),
        generated_at=str(doc.get("generated_at", "")),
        models=models,
        source=source,
    )


def _parse_entry(raw: Any, index: int, source: str) -> RegistryEntry:
    try:
        return RegistryEntry(
            id=_text(raw, "id"),
            model_name=_text(raw, "model_name"),
            huggingface_id=_text(raw, "huggingface_id"),
            quantization=_text(raw, "quantization"),
            family=str(raw.get("family", "")),
            parameters=str(raw.get("parameters", "")),
            default_context_size=int(raw.get("default_context_size", 0)),
            max_context_size=int(raw.get("max_context_size", 0)),
            vram_requirements_gb=float(raw.get("vram_requirements_gb", 0.0)),
            capabilities=tuple(str(c) for c in raw.get("capabilities") or ()),
            file_name=_text(raw, "file_name"),
            mmproj_file_name=str(raw.get("mmproj_file_name") or ""),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise RegistryError(f"registry {source}: bad entry #{index}: {exc}") from exc


def _text(raw: dict[str, Any], key: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string")
    return value


# --- resolution ------------------------------------------------------------------------------


def is_auto(quantization: str | None) -> bool:
    """True when the quantization is to be chosen automatically (``""``, ``None``, ``auto``)."""
    return not quantization or quantization.strip().lower() == AUTO


def resolve_entry(registry: Registry, model: str, quantization: str | None = None) -> RegistryEntry:
    """Resolve ``AUXOT_MODEL`` / ``AUXOT_QUANTIZATION`` to one entry (reference §6.2).

    Args:
        registry: the registry to search.
        model: an exact entry ``id`` (then ``quantization`` is ignored) or a model name
            (case-insensitive).
        quantization: a quantization (case-insensitive), or ``""``/``None``/``auto`` for the
            default preference order.

    Raises:
        ModelNotFoundError: no such name or id; the message lists suggestions.
        QuantizationNotAvailableError: the name exists without that quantization.
    """
    exact = registry.by_id(model)
    if exact is not None:
        return exact
    variants = registry.variants(model)
    if not variants:
        suggestions, more = suggest_models(registry, model)
        raise ModelNotFoundError(model, suggestions, more)
    if is_auto(quantization):
        return preferred_variant(variants)
    wanted = str(quantization).strip().lower()
    for entry in variants:
        if entry.quantization.lower() == wanted:
            return entry
    raise QuantizationNotAvailableError(model, str(quantization), variants)


def preferred_variant(variants: Sequence[RegistryEntry]) -> RegistryEntry:
    """The default variant: first of :data:`PREFERENCE_ORDER`, else first non-F16, else first."""
    by_quant = {v.quantization.lower(): v for v in reversed(variants)}
    for quant in PREFERENCE_ORDER:
        if quant.lower() in by_quant:
            return by_quant[quant.lower()]
    for entry in variants:
        if entry.quantization.lower() != "f16":
            return entry
    return variants[0]


def suggest_models(registry: Registry, text: str, limit: int = 15) -> tuple[list[str], int]:
    """Model names that look like ``text``: the first ``limit`` and how many more there are.

    Substring matches on name or id come first (sorted), then names that contain ``text`` once
    case and punctuation are ignored, then close matches by :mod:`difflib` (best first).
    """
    names = registry.model_names()
    needle = text.lower()
    ids_by_name: dict[str, list[str]] = {}
    for entry in registry.models:
        ids_by_name.setdefault(entry.model_name, []).append(entry.id)
    substring = sorted(
        n for n in names if needle in n.lower() or any(needle in i for i in ids_by_name[n])
    )
    found = _unique(substring + _loose_matches(names, text))
    return found[:limit], max(0, len(found) - limit)


def _squash(text: str) -> str:
    """Lower case without punctuation or spaces: ``Qwen3-Coder 30B`` -> ``qwen3coder30b``."""
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _loose_matches(names: list[str], text: str) -> list[str]:
    squashed = _squash(text)
    if not squashed:
        return []
    by_squash = {_squash(n): n for n in reversed(names)}
    contained = [n for n in names if squashed in _squash(n)]
    close = difflib.get_close_matches(squashed, list(by_squash), n=5, cutoff=0.8)
    return contained + [by_squash[c] for c in close]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _not_found_message(model: str, suggestions: list[str], more: int) -> str:
    lines = [f'model "{model}" not found in registry']
    if suggestions:
        lines.append("Did you mean:")
        lines += [f"  AUXOT_MODEL={name}" for name in suggestions]
        if more:
            lines.append(f"  ... and {more} more")
    else:
        lines.append("  (no close matches found)")
    lines.append("Run 'auxot-router models' for the full list of available models.")
    return "\n".join(lines)


def _quantization_message(model: str, quant: str, variants: Sequence[RegistryEntry]) -> str:
    lines = [f'model "{model}" found, but quantization "{quant}" is not available']
    lines += [
        f"  AUXOT_QUANTIZATION={v.quantization:<10} ({v.vram_requirements_gb:.1f} GB VRAM)"
        for v in variants
    ]
    lines.append("Omit AUXOT_QUANTIZATION (or set it to auto) to choose one automatically.")
    return "\n".join(lines)


_SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_files(file_name: str) -> list[str]:
    """Every file of a model (reference §7.3).

    A last path component ``<prefix>-<5 digits>-of-<5 digits>.gguf`` is a split GGUF: all N
    shards are returned, each keeping the sub-directory. Anything else is a single file.
    """
    directory, _, base = file_name.rpartition("/")
    match = _SPLIT_RE.match(base)
    if match is None:
        return [file_name]
    count = int(match["count"])
    prefix = f"{directory}/" if directory else ""
    return [f"{prefix}{match['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def clamp_context(entry: RegistryEntry, context_size: int | None) -> int:
    """Per-slot context: ``context_size`` (``None`` = 131072, ``<= 0`` = the model's default)
    clamped to the model's ``max_context_size``."""
    wanted = DEFAULT_CONTEXT_SIZE if context_size is None else context_size
    if wanted <= 0:
        wanted = entry.default_context_size
    if entry.max_context_size > 0:
        wanted = min(wanted, entry.max_context_size)
    return wanted


def resolve_model(
    registry: Registry,
    model: str,
    quantization: str | None = None,
    *,
    context_size: int | None = None,
    parallel: int = DEFAULT_PARALLEL,
    vram_total_gb: float = 0.0,
    vram_free_gb: float = 0.0,
    kv_cache_type: str = "f16",
) -> ModelResolution:
    """The full resolution a worker needs (goes into the policy, reference §11.2 item 10).

    Args:
        registry: the router's registry.
        model: ``AUXOT_MODEL`` (name or exact id).
        quantization: ``AUXOT_QUANTIZATION``; ``auto``/``""``/``None`` picks by the worker's
            VRAM when it is known, else by the default preference order.
        context_size: per-slot context (``AUXOT_CTX_SIZE``); ``None`` means 131072; always
            clamped to the model's maximum.
        parallel: slots per worker (``AUXOT_MAX_PARALLEL``).
        vram_total_gb: the worker's total VRAM in GB, 0 if unknown.
        vram_free_gb: the worker's free VRAM in GB, 0 if unknown (preferred over total).
        kv_cache_type: llama-server's KV cache type, for the estimate.

    Raises:
        ModelNotFoundError, QuantizationNotAvailableError: as :func:`resolve_entry`.
    """
    entry = resolve_entry(registry, model, quantization)
    budget = vram_budget(vram_total_gb, vram_free_gb)
    warning = ""
    if is_auto(quantization) and registry.by_id(model) is None and budget > 0:
        choice = pick_quantization(
            registry.variants(entry.model_name),
            vram_total_gb=vram_total_gb,
            vram_free_gb=vram_free_gb,
            context_size=context_size,
            parallel=parallel,
            kv_cache_type=kv_cache_type,
        )
        entry, warning = choice.entry, choice.warning
    ctx = clamp_context(entry, context_size)
    estimate = estimate_vram(entry, ctx, parallel, kv_cache_type)
    if not warning and 0 < budget < estimate.total_gb:
        warning = _too_big_warning(entry, estimate, budget, ctx, parallel)
    return _resolution(entry, ctx, parallel, estimate, warning)


def _resolution(
    entry: RegistryEntry, ctx: int, parallel: int, estimate: VramEstimate, warning: str
) -> ModelResolution:
    return ModelResolution(
        model_name=entry.model_name,
        quantization=entry.quantization,
        huggingface_id=entry.huggingface_id,
        files=split_files(entry.file_name),
        mmproj_file=entry.mmproj_file_name,
        family=entry.family,
        parameters=entry.parameters,
        context_size=ctx,
        max_context_size=entry.max_context_size,
        vram_gb=entry.vram_requirements_gb,
        capabilities=list(entry.capabilities),
        parallel=parallel,
        estimated_vram_gb=round(estimate.total_gb, 1),
        warning=warning,
    )


# --- VRAM estimate and auto quantization -----------------------------------------------------


@dataclass(slots=True, frozen=True)
class KvShape:
    """KV cache KiB per token at f16: layers with a full-length cache, and sliding-window
    layers, which hold at most ``window`` tokens per slot."""

    full_kib: float
    swa_kib: float = 0.0
    window: int = 0


# First match on the lower-cased model name wins, so specific patterns come before general
# ones. Values: 2 x layers x KV heads x head dim x 2 bytes / 1024.
_KV_TABLE: tuple[tuple[str, KvShape], ...] = (
    (r"^flux", KvShape(0.0)),  # image models, no LLM KV cache
    (r"deepseek-r1-distill-llama-70b|llama-3\.3-70b", KvShape(320)),  # 80 L, 8 KV, 128
    (r"deepseek-r1-distill-llama-8b", KvShape(128)),  # 32 L, 8 KV, 128
    (r"deepseek-r1-distill-qwen-32b", KvShape(256)),  # Qwen2.5-32B: 64 L, 8 KV, 128
    (r"deepseek-r1-distill-qwen-14b", KvShape(192)),  # Qwen2.5-14B: 48 L, 8 KV, 128
    (r"deepseek-r1-distill-qwen-7b", KvShape(56)),  # Qwen2.5-7B: 28 L, 4 KV, 128
    (r"deepseek-r1-distill-qwen-1\.5b", KvShape(28)),  # 28 L, 2 KV, 128
    (r"deepseek-r1-0528-qwen3-8b", KvShape(144)),  # Qwen3-8B
    (r"^deepseek-(v3|r1)|^kimi-k2", KvShape(70)),  # MLA latent: 61 L x 576 x 2 bytes
    (r"^minimax-m2", KvShape(248)),  # 62 L, 8 KV, 128
    (r"^gpt-oss(-safeguard)?-120b", KvShape(36, 36, 128)),  # 36 L, half SWA-128, 8 KV, 64
    (r"^gpt-oss(-safeguard)?-20b", KvShape(24, 24, 128)),  # 24 L, half SWA-128
    (r"^llama-4-", KvShape(48, 144, 8192)),  # 48 L, 8 KV, 128, 3 of 4 chunked (8192)
    (r"^qwen3(\.\d)?-coder-next|^qwen3-next", KvShape(24)),  # 12 of 48 L attention, 2 KV, 256
    (r"^qwen3\.[5-9]-27b", KvShape(64)),  # 16 of 64 L attention, 4 KV, 256
    (r"^qwen3\.[5-9]-397b", KvShape(30)),  # 15 of 60 L attention, 2 KV, 256
    (r"^qwen3\.[5-9]-122b", KvShape(24)),  # 12 of 48 L attention, 2 KV, 256
    (r"^qwen3\.[5-9]-", KvShape(20)),  # 35B-A3B: 10 of 40 L attention, 2 KV, 256
    (r"^qwen3-coder-480b", KvShape(248)),  # 62 L, 8 KV, 128
    (r"^qwen3(-vl)?-235b", KvShape(188)),  # 94 L, 4 KV, 128
    (r"^qwen3(-coder|-vl)?-30b-a3b", KvShape(96)),  # 48 L, 4 KV, 128
    (r"^qwen3(-vl)?-32b", KvShape(256)),  # 64 L, 8 KV, 128
    (r"^qwen3-14b", KvShape(160)),  # 40 L, 8 KV, 128
    (r"^qwen3(-vl)?-(8b|4b)", KvShape(144)),  # 36 L, 8 KV, 128
    (r"^qwen3(-vl)?-(1\.7b|2b|0\.6b)", KvShape(112)),  # 28 L, 8 KV, 128
    (r"^qwen2\.5-(coder|vl)-(72b)", KvShape(320)),  # 80 L, 8 KV, 128
    (r"^qwen2\.5-(coder|vl)-32b", KvShape(256)),  # 64 L, 8 KV, 128
    (r"^qwen2\.5-(coder|vl)-14b", KvShape(192)),  # 48 L, 8 KV, 128
    (r"^qwen2\.5-(coder|vl)-7b", KvShape(56)),  # 28 L, 4 KV, 128
    (r"^qwen2\.5-(coder|vl)-3b", KvShape(36)),  # 36 L, 2 KV, 128
    (r"^qwen2\.5-(coder|vl)-1\.5b", KvShape(28)),  # 28 L, 2 KV, 128
    (r"^qwen2\.5-(coder|vl)-0\.5b", KvShape(12)),  # 24 L, 2 KV, 64
    (r"^gemma-3-27b", KvShape(80, 416, 1024)),  # 62 L (1 in 6 global), 16 KV, 128
    (r"^gemma-3-12b", KvShape(64, 320, 1024)),  # 48 L, 8 KV, 256
    (r"^gemma-3-4b", KvShape(20, 116, 1024)),  # 34 L, 4 KV, 256
    (r"^gemma-3-1b", KvShape(4, 22, 512)),  # 26 L, 1 KV, 256
    (r"^gemma-3-270m", KvShape(3, 15, 512)),  # 18 L, 1 KV, 256
    (r"^gemma-3n-e4b", KvShape(14, 56, 512)),  # 35 L (1 in 5 global), 2 KV, 256
    (r"^gemma-3n-e2b", KvShape(12, 48, 512)),  # 30 L
    (r"^granite-4\.0-h-(small|tiny)", KvShape(16)),  # hybrid Mamba-2: 4 attention layers
    (r"^granite-4\.0-h-", KvShape(8)),
    (r"^granite-4\.0-350m", KvShape(28)),  # 28 L, 4 KV, 64
)
_KV_PATTERNS = tuple((re.compile(p), shape) for p, shape in _KV_TABLE)
_ACTIVE_RE = re.compile(r"-A(\d+(?:\.\d+)?)B(?![a-z])|-(\d+(?:\.\d+)?)B-\d+E\b")


def parameter_billions(parameters: str) -> float:
    """``"31B"`` -> 31.0, ``"596M"`` -> 0.596; 0.0 when unparsable."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([BMK]?)\s*", parameters, flags=re.IGNORECASE)
    if match is None:
        return 0.0
    scale = {"B": 1.0, "": 1.0, "M": 1e-3, "K": 1e-6}[match[2].upper()]
    return float(match[1]) * scale


def active_billions(entry: RegistryEntry) -> float:
    """Parameters used per token: the ``A3B`` / ``17B-128E`` hint in the name, else all."""
    match = _ACTIVE_RE.search(entry.model_name)
    if match is not None:
        return float(match[1] or match[2])
    total = parameter_billions(entry.parameters)
    # A MoE without a hint: assume about a tenth is active (DeepSeek 37/671, MiniMax 10/229).
    return total / 10 if entry.family.lower() == "moe" else total


def kv_shape(entry: RegistryEntry) -> KvShape:
    """The KV cache shape of the entry's architecture (see :data:`_KV_TABLE`) or the fallback
    56 KiB x (active billions) ^ 0.4 per token."""
    name = entry.model_name.lower()
    for pattern, shape in _KV_PATTERNS:
        if pattern.search(name):
            return shape
    active = active_billions(entry)
    return KvShape(56.0 * active**0.4 if active > 0 else 128.0)


def kv_cache_bytes(
    entry: RegistryEntry, context_size: int, parallel: int, kv_cache_type: str = "f16"
) -> float:
    """KV cache bytes for ``parallel`` slots of ``context_size`` tokens each."""
    shape = kv_shape(entry)
    slots = max(parallel, 1)
    ctx = max(context_size, 0)
    swa_tokens = min(ctx, shape.window) * slots if shape.window else 0
    kib = shape.full_kib * ctx * slots + shape.swa_kib * swa_tokens
    scale = KV_BYTES_PER_ELEMENT.get(kv_cache_type.lower(), 2.0) / 2.0
    return kib * KIB * scale


def weights_gb(entry: RegistryEntry) -> float:
    """Model weights in GB: parameters x effective bits per weight, at least the registry's."""
    bits = BITS_PER_WEIGHT.get(entry.quantization.upper())
    computed = parameter_billions(entry.parameters) * bits / 8 if bits else 0.0
    return max(entry.vram_requirements_gb, computed)


def estimate_vram(
    entry: RegistryEntry,
    context_size: int,
    parallel: int = DEFAULT_PARALLEL,
    kv_cache_type: str = "f16",
) -> VramEstimate:
    """Estimated GPU memory to serve ``entry`` (module docstring has the model).

    Args:
        entry: the registry entry (model and quantization).
        context_size: tokens per slot (already clamped).
        parallel: number of slots.
        kv_cache_type: ``f16`` (llama-server's default), ``q8_0``, ``q4_0``, ...
    """
    weights = weights_gb(entry)
    kv = kv_cache_bytes(entry, context_size, parallel, kv_cache_type) / GB
    mmproj = MMPROJ_GB if entry.mmproj_file_name else 0.0
    overhead = OVERHEAD_GB + OVERHEAD_FRACTION * (weights + kv + mmproj)
    total = weights + kv + mmproj + overhead
    return VramEstimate(weights, kv, mmproj, overhead, total)


def vram_budget(vram_total_gb: float = 0.0, vram_free_gb: float = 0.0) -> float:
    """The VRAM to plan with: free memory when reported, else total; 0 if unknown."""
    if vram_free_gb > 0:
        return vram_free_gb
    return max(vram_total_gb, 0.0)


def quality_rank(quantization: str) -> int:
    """Position in :data:`QUALITY_ORDER` (0 = best); ``len`` for unknown or F32."""
    try:
        return QUALITY_ORDER.index(quantization.upper())
    except ValueError:
        return len(QUALITY_ORDER)


def pick_quantization(
    variants: Sequence[RegistryEntry],
    *,
    vram_total_gb: float = 0.0,
    vram_free_gb: float = 0.0,
    context_size: int | None = None,
    parallel: int = DEFAULT_PARALLEL,
    kv_cache_type: str = "f16",
) -> QuantizationChoice:
    """``AUXOT_QUANTIZATION=auto`` for one worker: the best quantization that fits its VRAM.

    Candidates are tried best first (F16, Q8_K, Q8_0, Q6_K, Q5_K_S, Q4_K_S, Q3_K_S; F32 never).
    If none fits, the smallest is returned with a warning; with no VRAM known, the router's
    default preference order decides.

    Args:
        variants: the model's entries (``Registry.variants(name)``), not empty.
        vram_total_gb: the worker's total VRAM in GB (0 = unknown).
        vram_free_gb: its free VRAM in GB (0 = unknown); preferred when known.
        context_size: per-slot context (``None`` = 131072), clamped per entry.
        parallel: slots.
        kv_cache_type: KV cache type for the estimate.
    """
    if not variants:
        raise RegistryError("no variants to choose from")
    budget = vram_budget(vram_total_gb, vram_free_gb)
    if budget <= 0:
        entry = preferred_variant(variants)
        estimate = estimate_vram(entry, clamp_context(entry, context_size), parallel, kv_cache_type)
        warning = f"VRAM unknown; using the default quantization {entry.quantization}"
        return QuantizationChoice(entry, estimate, 0.0, fits=False, warning=warning)
    estimates = [
        (e, estimate_vram(e, clamp_context(e, context_size), parallel, kv_cache_type))
        for e in _auto_candidates(variants)
    ]
    for entry, estimate in estimates:
        if estimate.total_gb <= budget:
            return QuantizationChoice(entry, estimate, budget, fits=True)
    entry, estimate = min(estimates, key=lambda pair: pair[1].total_gb)
    ctx = clamp_context(entry, context_size)
    warning = _too_big_warning(entry, estimate, budget, ctx, parallel)
    return QuantizationChoice(entry, estimate, budget, fits=False, warning=warning)


def _auto_candidates(variants: Sequence[RegistryEntry]) -> list[RegistryEntry]:
    known = [v for v in variants if quality_rank(v.quantization) < len(QUALITY_ORDER)]
    return sorted(known or list(variants), key=lambda v: quality_rank(v.quantization))


def _too_big_warning(
    entry: RegistryEntry, estimate: VramEstimate, budget: float, ctx: int, parallel: int
) -> str:
    return (
        f"{entry.model_name} {entry.quantization} needs about {estimate.total_gb:.1f} GB "
        f"(weights {estimate.weights_gb:.1f} + KV cache {estimate.kv_cache_gb:.1f} for "
        f"{format_context(ctx)} x {parallel} + overhead {estimate.overhead_gb:.1f}) but only "
        f"{budget:.1f} GB VRAM is available; expect CPU offload or out-of-memory. Lower "
        "AUXOT_CTX_SIZE or AUXOT_MAX_PARALLEL, or choose a smaller model."
    )


# --- formatting and the `models` command -----------------------------------------------------


def format_context(n: int) -> str:
    """Context sizes as the ``models`` command prints them (reference §6.5).

    ``1000000`` -> ``1M``, ``1048576`` -> ``1.0M``, ``131072`` -> ``128K``, ``40000`` -> ``40K``.
    """
    if n >= 1_000_000:
        return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n / 1_000_000:.1f}M"
    if n >= KIB and n % KIB == 0:
        return f"{n // KIB}K"
    return f"{n // 1000}K"


@dataclass(slots=True)
class ModelSummary:
    """One row of the ``models`` command: a model name and its variants."""

    name: str
    variants: list[RegistryEntry]
    estimates: dict[str, float] = field(default_factory=dict)

    @property
    def first(self) -> RegistryEntry:
        return self.variants[0]

    def min_vram_gb(self) -> float:
        """Smallest weights-only figure over non-F16/F32 variants (all variants if none)."""
        light = [v for v in self.variants if v.quantization.upper() not in ("F16", "F32")]
        return min(v.vram_requirements_gb for v in light or self.variants)

    def capabilities(self) -> list[str]:
        return _unique(c for v in self.variants for c in v.capabilities)

    def to_json(self) -> dict[str, Any]:
        first = self.first
        return {
            "model_name": self.name,
            "huggingface_id": first.huggingface_id,
            "family": first.family,
            "parameters": first.parameters,
            "capabilities": self.capabilities(),
            "default_context_size": first.default_context_size,
            "max_context_size": first.max_context_size,
            "min_vram_gb": self.min_vram_gb(),
            "quantizations": [self._variant_json(v) for v in self.variants],
        }

    def _variant_json(self, v: RegistryEntry) -> dict[str, Any]:
        item: dict[str, Any] = {
            "quantization": v.quantization,
            "id": v.id,
            "vram_gb": v.vram_requirements_gb,
            "files": split_files(v.file_name),
        }
        if v.mmproj_file_name:
            item["mmproj_file"] = v.mmproj_file_name
        if v.id in self.estimates:
            item["estimated_vram_gb"] = self.estimates[v.id]
        return item


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _models_parser() -> _Parser:
    parser = _Parser(
        prog="auxot-router models",
        description="List the models of the embedded registry.",
        add_help=False,
    )
    parser.add_argument("--family", type=str.lower, choices=("dense", "moe"))
    parser.add_argument(
        "--max-vram",
        type=float,
        metavar="GB",
        help="only models with a quantization whose estimate (weights + KV cache for --ctx x "
        "--parallel + overhead) fits; lists only the fitting quantizations",
    )
    parser.add_argument("--ctx", type=int, default=32768, help="context per slot for --max-vram")
    parser.add_argument("--parallel", type=int, default=1, help="slots for --max-vram")
    parser.add_argument("--capability", type=str.lower, metavar="NAME", help="vision, code, ...")
    parser.add_argument("--search", metavar="TEXT", help="text in the name, id or HF repo")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def summarise(registry: Registry) -> list[ModelSummary]:
    """One :class:`ModelSummary` per unique model name, in registry order; each row's variants
    smallest first (the registry's own order is arbitrary for some models)."""
    return [
        ModelSummary(name, sorted(registry.variants(name), key=_size_key))
        for name in registry.model_names()
    ]


def _size_key(entry: RegistryEntry) -> tuple[float, int]:
    return (entry.vram_requirements_gb, -quality_rank(entry.quantization))


def filter_models(summaries: list[ModelSummary], args: argparse.Namespace) -> list[ModelSummary]:
    """Apply the ``models`` filters; ``--max-vram`` also narrows each row's variants."""
    out = []
    for summary in summaries:
        if args.family and summary.first.family.lower() != args.family:
            continue
        if args.capability and args.capability not in [c.lower() for c in summary.capabilities()]:
            continue
        if args.search and not _matches_search(summary, args.search):
            continue
        if args.max_vram is not None:
            fitted = _fit_summary(summary, args.max_vram, args.ctx, args.parallel)
            if fitted is not None:
                out.append(fitted)
        else:
            out.append(summary)
    return out


def _matches_search(summary: ModelSummary, text: str) -> bool:
    needle, squashed = text.lower(), _squash(text)
    first = summary.first
    haystacks = [summary.name, first.huggingface_id, *(v.id for v in summary.variants)]
    return any(
        needle in h.lower() or (squashed and squashed in _squash(h)) for h in haystacks
    )


def _fit_summary(
    summary: ModelSummary, max_vram: float, ctx: int, parallel: int
) -> ModelSummary | None:
    fitting, estimates = [], {}
    for v in summary.variants:
        if v.quantization.upper() == "F32":
            continue
        total = estimate_vram(v, clamp_context(v, ctx), parallel).total_gb
        if total <= max_vram:
            fitting.append(v)
            estimates[v.id] = round(total, 1)
    return ModelSummary(summary.name, fitting, estimates) if fitting else None


def _context_text(entry: RegistryEntry) -> str:
    default, maximum = entry.default_context_size, entry.max_context_size
    return f"{format_context(default)} / {format_context(maximum)}"


def _vram_text(gb: float) -> str:
    return f"{gb:.0f} GB" if gb >= 10 else f"{gb:.1f} GB"


def render_table(registry: Registry, rows: list[ModelSummary], note: str = "") -> str:
    """The human-readable ``models`` listing."""
    header = f"auxot model registry (v{registry.version}, {len(registry.models)} entries)"
    lines = [header + note, ""]
    if not rows:
        lines.append("  (no models match)")
    else:
        lines += _table_lines(rows)
    lines += [
        "",
        "Usage: AUXOT_MODEL=<model-name>",
        "       AUXOT_QUANTIZATION=<quant>  (optional — auto-selects if omitted)",
    ]
    return "\n".join(lines) + "\n"


def _table_lines(rows: list[ModelSummary]) -> list[str]:
    cells = [
        (
            r.name,
            r.first.parameters,
            r.first.family,
            _context_text(r.first),
            _vram_text(r.min_vram_gb()),
            ", ".join(r.capabilities()),
            ", ".join(v.quantization for v in r.variants),
        )
        for r in rows
    ]
    titles = ("NAME", "PARAMS", "FAMILY", "CONTEXT", "MIN VRAM", "CAPABILITIES", "QUANTIZATIONS")
    widths = [max(len(t), *(len(c[i]) for c in cells)) for i, t in enumerate(titles)]
    right = {1, 4}  # numbers read better right-aligned

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if i in right else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return ("  " + "  ".join(parts)).rstrip()

    return [line(titles)] + [line(c) for c in cells]


def models_command(
    argv: list[str], out: TextIO = sys.stdout, registry: Registry | None = None
) -> int:
    """``auxot-router models [--family dense|moe] [--max-vram GB [--ctx N] [--parallel N]]
    [--capability NAME] [--search TEXT] [--json]``.

    Args:
        argv: the arguments after ``models``.
        out: where to print.
        registry: the registry to list; default the embedded one (as in Go, the command
            ignores ``AUXOT_REGISTRY_FILE``).

    Returns:
        The exit status: 0, or 2 for a usage error (message on stderr).
    """
    parser = _models_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"auxot-router models: {exc}\n{parser.format_usage()}", end="", file=sys.stderr)
        return 2
    if args.help:
        out.write(parser.format_help())
        return 0
    try:
        reg = registry if registry is not None else load_registry()
    except RegistryError as exc:
        print(f"auxot-router models: {exc}", file=sys.stderr)
        return 1
    rows = filter_models(summarise(reg), args)
    if args.json:
        out.write(orjson.dumps([r.to_json() for r in rows], option=orjson.OPT_INDENT_2).decode())
        out.write("\n")
        return 0
    out.write(render_table(reg, rows, _filter_note(args, len(rows))))
    return 0


def _filter_note(args: argparse.Namespace, shown: int) -> str:
    filtered = any((args.family, args.capability, args.search, args.max_vram is not None))
    if not filtered:
        return ""
    note = f"; {shown} shown"
    if args.max_vram is not None:
        note += (
            f"; fitting {args.max_vram:g} GB at {format_context(args.ctx)} context"
            f" x {args.parallel}, f16 KV cache"
        )
    return note
