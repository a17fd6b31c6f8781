"""The models file's [auto], [upstreams] and [fallbacks] tables, and the catalog as auto candidates."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from auxot_common.autoroute import ProfileBook, choose, traits_from
from auxot_common.models import ModelCatalog, ModelSettings, build_catalog
from auxot_common.registry import Registry, parse_registry
from auxot_common.routing_extras import ExtrasError, candidates, load_extras


def entry(name: str, caps: tuple[str, ...]) -> dict[str, object]:
    return {
        "id": f"{name.lower()}-q8_0", "model_name": name, "huggingface_id": f"org/{name}-GGUF",
        "quantization": "Q8_0", "family": "Dense", "parameters": "8B", "default_context_size": 1024,
        "max_context_size": 65536, "vram_requirements_gb": 2.0, "capabilities": list(caps),
        "file_name": f"{name}-Q8_0.gguf",
    }  # fmt: skip


@pytest.fixture
def catalog() -> ModelCatalog:
    registry: Registry = parse_registry(
        orjson.dumps(
            {
                "version": "t",
                "models": [
                    entry("Small-Chat", ("chat",)),
                    entry("Big-Thinker", ("chat", "reasoning")),
                    entry("Seer", ("chat", "vision")),
                    entry("Embed", ("chat",)),
                ],
            }
        ),
        "test",
    )
    settings = [
        ModelSettings(registry="Small-Chat", ctx_size=2048, default=True),
        ModelSettings(registry="Big-Thinker", ctx_size=32768),
        ModelSettings(registry="Seer", ctx_size=8192),
        ModelSettings(registry="Embed", embedding=True),
    ]
    return build_catalog(registry, settings, "test")


FILE = """
[[models]]
name = "Small-Chat"

[auto]
aliases = ["gpt-*"]
default = "Small-Chat"
rules = [
  { model = "Big-Thinker", keywords = ["prove"] },
  { model = "paid", keys = ["team"] },
]

[upstreams.paid]
api = "anthropic"
base_url = "https://api.example/v1"
model = "claude-x"
key_env = "PAID_KEY"
keys = ["team"]
context = 200000

[fallbacks]
Small-Chat = { upstream = "paid", when = "overflow", after_s = 12 }
"""


def test_extras_load_and_route_over_the_catalog(catalog: ModelCatalog) -> None:
    extras = load_extras(FILE, "models.toml", catalog, {"PAID_KEY": "sk-secret"})
    assert extras.auto is not None and extras.auto.is_auto("gpt-4o")
    assert extras.fallbacks["Small-Chat"].when == "overflow" and extras.fallbacks["Small-Chat"].after_s == 12
    assert extras.upstreams["paid"].key == "sk-secret"
    served = {"Small-Chat": 1, "Big-Thinker": 1, "Seer": 0}
    book = ProfileBook(catalog.names)
    listed = candidates(catalog, served, book, upstreams=extras.upstreams, key_name="alice")
    assert [c.name for c in listed] == ["Small-Chat", "Big-Thinker", "Seer"]  # no embeddings, no upstream for alice
    assert listed[1].reasoning and listed[2].vision and not listed[2].serving and listed[0].tools
    team = candidates(catalog, served, book, upstreams=extras.upstreams, key_name="team")
    assert team[-1].name == "paid" and team[-1].context == 200000

    def route(text: str, key: str, cands: list[object]) -> str:
        choice = asyncio.run(choose(extras.auto, traits_from([{"role": "user", "content": text}], key_name=key), cands))  # type: ignore[arg-type]
        return choice.model

    assert route("please prove it", "alice", listed) == "Big-Thinker"
    assert route("hello", "team", team) == "paid"
    assert route("hello", "alice", listed) == "Small-Chat"
    # an image: only the vision model can see it, even though no worker serves it yet
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}]
    choice = asyncio.run(choose(extras.auto, traits_from(image), listed))  # type: ignore[arg-type]
    assert choice.model == "Seer"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[upstreams.Small-Chat]\nbase_url = "http://h/v1"\nmodel = "m"', "name of a local model"),
        (
            '[upstreams.u]\nbase_url = "http://h/v1"\nmodel = "m"\n[fallbacks]\nNope = "u"',
            "'Nope' is not a configured model",
        ),
        ('[auto]\nrules = [{ model = "nope" }]', "'nope' is not a configured model"),
        ('[upstreams.u]\nbase_url = "http://h/v1"\nmodel = "m"\nkey_env = "UNSET"', "UNSET is not set"),
    ],
)
def test_extras_errors_name_the_file(catalog: ModelCatalog, text: str, message: str) -> None:
    with pytest.raises(ExtrasError) as caught:
        load_extras(text, "models.toml", catalog, {})
    assert str(caught.value).startswith("models.toml: ") and message in str(caught.value)
