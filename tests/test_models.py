"""The model catalog (configuration, matching) and the assignment/move policy, as pure functions."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from auxot_common.models import (
    CatalogError,
    ModelSettings,
    PoolDemand,
    WorkerState,
    assign_model,
    load_catalog,
    model_key,
    plan_move,
)
from auxot_common.registry import Registry, load_registry, parse_registry


def entry(name: str, quant: str = "Q8_0", vram: float = 8.0, caps: tuple[str, ...] = ("chat",)) -> dict[str, object]:
    return {
        "id": f"{name.lower()}-{quant.lower()}", "model_name": name, "huggingface_id": f"org/{name}-GGUF",
        "quantization": quant, "family": "Dense", "parameters": "8B", "default_context_size": 1024,
        "max_context_size": 4096, "vram_requirements_gb": vram, "capabilities": list(caps),
        "file_name": f"{name}-{quant}.gguf",
    }  # fmt: skip


@pytest.fixture
def registry() -> Registry:
    models = [entry("Big-Coder", vram=40.0), entry("Small-Chat", vram=2.0), entry("Embed-Small", vram=0.5)]
    return parse_registry(orjson.dumps({"version": "t", "models": models}), "test")


FILE = """
[[models]]
name = "Big-Coder"
ctx_size = 2048
parallel = 4
min_workers = 1
aliases = ["claude-*sonnet*", "gpt-4*"]
default = true

[[models]]
registry = "small-chat-q8_0"
aliases = ["claude-*haiku*"]
max_workers = 2

[[models]]
name = "Embed-Small"
embedding = true
pooling = "cls"
"""


def from_file(registry: Registry, text: str, tmp_path: Path) -> object:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return load_catalog(registry, model="ignored", models_file=str(path))


# --- loading ---------------------------------------------------------------------------------------


def test_single_model_is_todays_setup(registry: Registry) -> None:
    catalog = load_catalog(registry, model="Small-Chat", defaults=ModelSettings("Small-Chat", ctx_size=2048))
    assert catalog.names == ["Small-Chat"] and catalog.source == "AUXOT_MODEL"
    assert catalog.default is catalog.specs[0]
    assert catalog.default.resolution.context_size == 2048
    assert catalog.match("anything at all") is catalog.default


def test_models_list_first_is_default(registry: Registry) -> None:
    catalog = load_catalog(registry, model="Big-Coder", models=" Small-Chat , Big-Coder")
    assert catalog.names == ["Small-Chat", "Big-Coder"]
    assert catalog.default is not None and catalog.default.name == "Small-Chat"


def test_models_file(registry: Registry, tmp_path: Path) -> None:
    catalog = from_file(registry, FILE, tmp_path)
    big, small, embed = catalog.specs  # type: ignore[attr-defined]
    assert (big.name, big.ctx_size, big.parallel, big.min_workers, big.default) == ("Big-Coder", 2048, 4, 1, True)
    assert big.resolution.context_size == 2048 and big.resolution.parallel == 4
    assert (small.name, small.registry, small.max_workers) == ("Small-Chat", "small-chat-q8_0", 2)
    assert embed.embedding and embed.pooling == "cls" and "embedding" in embed.resolution.capabilities
    assert catalog.default is big  # type: ignore[attr-defined]


def test_file_without_a_default_has_none(registry: Registry, tmp_path: Path) -> None:
    catalog = from_file(registry, FILE.replace("default = true", ""), tmp_path)
    assert catalog.default is None  # type: ignore[attr-defined]
    assert catalog.match("no-such-model") is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "not valid TOML"),
        ("[model]\nname='x'", "expected one or more [[models]]"),
        ("[[models]]\nquantization='auto'", "needs a name"),
        ("[[models]]\nname='Big-Coder'\nctx=4", "unknown key 'ctx'"),
        ("[[models]]\nname='Big-Coder'\nparallel=0", "parallel must be an integer of at least 1"),
        ("[[models]]\nname='Big-Coder'\naliases=[1]", "aliases must be a list"),
        ("[[models]]\nname='Big-Coder'\npooling='max'", "pooling must be one of"),
        ("[[models]]\nname='Big-Coder'\n[[models]]\nname='big-coder-q8_0'", "are the same model"),
        ("[[models]]\nname='Big-Coder'\ndefault=true\n[[models]]\nname='Small-Chat'\ndefault=true", "only one"),
    ],
)
def test_invalid_files_say_why(registry: Registry, tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CatalogError, match=message.replace("[", r"\[").replace("(", r"\(")):
        from_file(registry, text, tmp_path)


def test_typo_gets_did_you_mean(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as info:
        load_catalog(registry, model="x", models="Small-Chat,Big-Codr")
    assert "Big-Codr" in str(info.value) and "Did you mean" in str(info.value) and "Big-Coder" in str(info.value)
    with pytest.raises(CatalogError, match="cannot read it"):
        load_catalog(registry, model="x", models_file=str(tmp_path / "missing.toml"))


def test_the_embedded_registry_loads_several_models() -> None:
    catalog = load_catalog(load_registry(), model="x", models="Qwen3-Coder-30B-A3B,Qwen3-14B")
    assert catalog.names == ["Qwen3-Coder-30B-A3B", "Qwen3-14B"]


# --- matching --------------------------------------------------------------------------------------


def test_match_by_name_id_repo_and_alias(registry: Registry, tmp_path: Path) -> None:
    catalog = from_file(registry, FILE, tmp_path)
    match = catalog.match  # type: ignore[attr-defined]
    assert match("big-coder").name == "Big-Coder"  # case-insensitive
    assert match("SMALL-CHAT-Q8_0").name == "Small-Chat"  # registry id
    assert match("org/Embed-Small-GGUF").name == "Embed-Small"  # Hugging Face repo
    assert match("claude-3-5-haiku-20241022").name == "Small-Chat"  # glob alias
    assert match("claude-sonnet-4-20250514").name == "Big-Coder"
    assert match("GPT-4o").name == "Big-Coder"
    assert match("llama-70b").name == "Big-Coder"  # unknown: the default
    assert catalog.match_exact("llama-70b") is None  # type: ignore[attr-defined]
    assert match("").name == "Big-Coder"


def test_model_key_is_a_safe_slug() -> None:
    assert model_key("Qwen3-Coder-30B-A3B") == "qwen3-coder-30b-a3b"
    assert model_key("org/weird name:*") == "org-weird-name"


# --- assignment --------------------------------------------------------------------------------


def test_a_new_worker_goes_where_demand_is_biggest_first() -> None:
    pools = [
        PoolDemand("big", workers=1, waiting=0, size_gb=40),
        PoolDemand("small", workers=0, waiting=3, size_gb=2),
        PoolDemand("mid", workers=0, min_workers=1, size_gb=10),
    ]
    assert assign_model(pools, lambda m: True) == "mid"  # both starve: the bigger first
    assert assign_model(pools, lambda m: m != "mid") == "small"  # mid does not fit this worker
    # a model that has a worker but waiting jobs comes after models with none
    pools = [PoolDemand("big", workers=1, waiting=5, size_gb=40), PoolDemand("small", waiting=1, size_gb=2)]
    assert assign_model(pools, lambda m: True) == "small"


def test_without_demand_the_fewest_workers_and_max_is_kept() -> None:
    pools = [PoolDemand("a", workers=2), PoolDemand("b", workers=1), PoolDemand("c", workers=1, max_workers=1)]
    assert assign_model(pools, lambda m: True) == "b"
    assert assign_model([PoolDemand("c", workers=1, max_workers=1)], lambda m: True) is None
    # a full model with waiting jobs is not "unmet demand"
    pools = [PoolDemand("c", workers=1, max_workers=1, waiting=9), PoolDemand("d", workers=3)]
    assert assign_model(pools, lambda m: True) == "d"


def test_a_reconnecting_worker_keeps_its_model() -> None:
    pools = [PoolDemand("a", workers=3), PoolDemand("b", waiting=4)]
    assert assign_model(pools, lambda m: True, current="a") == "a"
    assert assign_model(pools, lambda m: True, current="gone") == "b"


# --- moves and hysteresis ----------------------------------------------------------------------


def idle(worker_id: str, model: str, assigned_at: float = 0.0, **kw: object) -> WorkerState:
    return WorkerState(worker_id, model, running=0, movable=True, assigned_at=assigned_at, **kw)  # type: ignore[arg-type]


def test_a_starving_model_gets_an_idle_worker_after_demand_persists() -> None:
    pools = [PoolDemand("a", workers=2), PoolDemand("b", waiting=2, starving_since=100.0)]
    workers = [idle("w1", "a"), idle("w2", "a", assigned_at=50.0)]
    assert plan_move(pools, workers, now=110.0, cooldown_s=60, persist_s=30) is None  # demand too young
    assert plan_move(pools, workers, now=130.0, cooldown_s=60, persist_s=30) == ("w1", "b")  # longest idle


def test_no_move_within_the_cooldown_or_from_a_busy_or_minimal_pool() -> None:
    starving = PoolDemand("b", waiting=1, starving_since=0.0)
    now = 1000.0
    assert plan_move([PoolDemand("a", workers=2), starving], [idle("w", "a", 990.0)], now, cooldown_s=60) is None
    busy = WorkerState("w", "a", running=1, movable=True, assigned_at=0)
    assert plan_move([PoolDemand("a", workers=2), starving], [busy], now) is None
    pinned = WorkerState("w", "a", running=0, movable=False, assigned_at=0)
    assert plan_move([PoolDemand("a", workers=2), starving], [pinned], now) is None
    at_min = PoolDemand("a", workers=1, min_workers=1)
    assert plan_move([at_min, starving], [idle("w", "a")], now) is None
    donor_waits = PoolDemand("a", workers=2, waiting=1)
    assert plan_move([donor_waits, starving], [idle("w", "a")], now) is None
    assert plan_move([PoolDemand("a", workers=2), starving], [idle("w", "a", fits=frozenset({"a"}))], now) is None
    # the last worker of a model with no minimum and no jobs may go
    assert plan_move([PoolDemand("a", workers=1), starving], [idle("w", "a")], now) == ("w", "b")


def test_a_model_with_a_worker_never_takes_another_by_a_move() -> None:
    pools = [PoolDemand("a", workers=3), PoolDemand("b", workers=1, waiting=50, starving_since=0.0)]
    assert plan_move(pools, [idle("w", "a")], now=10_000.0) is None
