"""Tests for the registry generator, loader, resolution, VRAM estimate and ``models`` command."""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
import zipapp
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest

from auxot_common import registry as reg
from auxot_common.registry import (
    ModelNotFoundError,
    QuantizationNotAvailableError,
    Registry,
    RegistryEntry,
    RegistryError,
)

REPO = Path(__file__).resolve().parent.parent


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_registry", REPO / "scripts/gen_registry.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()
OLD = gen.find_input(gen.OLD_NAME)
NEW = gen.find_input(gen.NEW_NAME)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return reg.load_registry()


def _entry(quant: str, **over: Any) -> RegistryEntry:
    fields: dict[str, Any] = {
        "id": f"foo-{quant.lower()}",
        "model_name": "Foo",
        "huggingface_id": "org/Foo-GGUF",
        "quantization": quant,
        "family": "Dense",
        "parameters": "8B",
        "default_context_size": 8192,
        "max_context_size": 32768,
        "vram_requirements_gb": 4.0,
        "capabilities": ("chat",),
        "file_name": f"Foo-{quant}.gguf",
    }
    fields.update(over)
    return RegistryEntry(**fields)


# --- generator --------------------------------------------------------------------------------


def test_generation_is_deterministic_and_committed_file_is_current() -> None:
    first = gen.generate(OLD, NEW)
    assert first == gen.generate(OLD, NEW)
    assert (REPO / "registry.json").read_bytes() == first, "run scripts/gen_registry.py"


def test_generator_check_mode(tmp_path: Path) -> None:
    out = tmp_path / "registry.json"
    args = ["--old", str(OLD), "--new", str(NEW), "--out", str(out)]
    assert gen.main(args) == 0
    assert gen.main([*args, "--check"]) == 0
    out.write_bytes(out.read_bytes().replace(b'"Q4_K_S"', b'"Q4_K_M"', 1))
    assert gen.main([*args, "--check"]) == 1


def test_generated_file_is_one_entry_per_line() -> None:
    lines = (REPO / "registry.json").read_bytes().splitlines()
    entry_lines = [line for line in lines if line.startswith(b'{"id":')]
    doc = orjson.loads((REPO / "registry.json").read_bytes())
    assert len(entry_lines) == len(doc["models"])


def test_merge_rules_on_synthetic_snapshots() -> None:
    def e(entry_id: str, tag: str, file_name: str = "x.gguf") -> dict[str, Any]:
        return {"id": entry_id, "model_name": entry_id, "huggingface_id": "o/r", "tag": tag, "file_name": file_name}

    old: dict[str, Any] = {
        "version": "0.1.0",
        "generated_at": "old",
        "models": [e("a", "old"), e("b", "old"), e("p", "old", "mmproj-F32.gguf"), e("c", "old")],
    }
    d, b = e("d", "new"), e("b", "new")
    d["formats"] = [{"type": "gguf", "huggingface_id": "o/r", "file_name": "x.gguf"}]
    b["formats"] = [{"type": "safetensors"}]
    new: dict[str, Any] = {"version": "0.2.0", "generated_at": "new", "models": [d, b]}
    merged = gen.merge(old, new)
    assert [(m["id"], m["tag"]) for m in merged["models"]] == [("d", "new"), ("b", "new"), ("a", "old"), ("c", "old")]
    assert "formats" not in merged["models"][0]  # redundant copy dropped
    assert merged["models"][1]["formats"] == [{"type": "safetensors"}]  # informative kept
    assert (merged["version"], merged["generated_at"]) == ("0.2.0", "new")
    assert "do not edit" in merged["sources"]
    assert gen.render(merged) == gen.render(gen.merge(old, new))


def test_union_newer_wins(registry: Registry) -> None:
    old = orjson.loads(OLD.read_bytes())
    new = orjson.loads(NEW.read_bytes())
    assert registry.variants("Qwen3.5-35B-A3B")  # only in the newer snapshot
    assert registry.variants("Qwen2.5-Coder-32B")  # only in the older one
    assert registry.variants("Qwen3-Coder-30B-A3B")  # in both
    # Both have kimi-k2-5-f16; the newer says "reasoning", the older "chat".
    old_kimi = next(m for m in old["models"] if m["id"] == "kimi-k2-5-f16")
    assert old_kimi["capabilities"] == ["chat"]
    assert registry.by_id("kimi-k2-5-f16").capabilities == ("reasoning",)  # type: ignore[union-attr]
    assert registry.generated_at == new["generated_at"]
    ids = [m.id for m in registry.models]
    assert ids[: len(new["models"])] == [m["id"] for m in new["models"]]
    assert len(ids) == len(set(ids))
    assert not [m for m in registry.models if m.file_name.split("/")[-1].startswith("mmproj")]
    assert "F32" not in {m.quantization for m in registry.models}


# --- loading ----------------------------------------------------------------------------------


def test_load_embedded_and_override(tmp_path: Path, registry: Registry) -> None:
    assert registry.source == "embedded"
    assert len(registry.models) > 100
    assert reg.load_registry("") is registry  # cached
    path = tmp_path / "mine.json"
    path.write_bytes(
        orjson.dumps(
            {
                "version": "9",
                "models": [
                    {
                        "id": "x-q4-k-s",
                        "model_name": "X",
                        "huggingface_id": "o/X",
                        "quantization": "Q4_K_S",
                        "file_name": "X.gguf",
                        "vram_requirements_gb": 1,
                    }
                ],
            }
        )
    )
    mine = reg.load_registry(str(path))
    assert (mine.version, mine.source, mine.model_names()) == ("9", str(path), ["X"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "not valid JSON"),
        (b'{"models": []}', "contains no models"),
        (b"[]", "has no models list"),
        (b'{"models": [{"id": "x"}]}', "bad entry #0"),
    ],
)
def test_load_rejects_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(RegistryError, match=message):
        reg.load_registry(str(path))


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot read registry file"):
        reg.load_registry(str(tmp_path / "missing.json"))


def test_zipapp_loads_embedded_registry(tmp_path: Path, registry: Registry) -> None:
    src = tmp_path / "app"
    shutil.copytree(REPO / "auxot_common", src / "auxot_common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "registry.json", src / "registry.json")
    (src / "__main__.py").write_text(
        "from auxot_common.registry import load_registry, read_embedded_registry\n"
        "import auxot_common.registry as r\n"
        "assert '.pyz' in r.__file__, r.__file__\n"
        "print(len(load_registry().models), len(read_embedded_registry()))\n"
    )
    target = tmp_path / "auxot.pyz"
    zipapp.create_archive(src, target)
    run = subprocess.run([sys.executable, str(target)], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    count, size = run.stdout.split()
    assert int(count) == len(registry.models)
    assert int(size) == (REPO / "registry.json").stat().st_size


def test_read_from_zip_fallback(tmp_path: Path) -> None:
    archive = tmp_path / "x.pyz"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("registry.json", b"{}")
        zf.writestr("sub/dir/file.txt", b"deep")
    assert reg.read_from_zip(str(archive / "registry.json")) == b"{}"
    assert reg.read_from_zip(str(archive / "sub" / "dir" / "file.txt")) == b"deep"
    with pytest.raises(RegistryError, match="not found"):
        reg.read_from_zip(str(archive / "nope.json"))
    with pytest.raises(RegistryError, match="not found"):
        reg.read_from_zip(str(tmp_path / "no-archive" / "registry.json"))


# --- resolution -------------------------------------------------------------------------------


def test_exact_id_wins_and_ignores_quantization(registry: Registry) -> None:
    entry = reg.resolve_entry(registry, "qwen3-coder-30b-a3b-q8-0", "Q4_K_S")
    assert (entry.model_name, entry.quantization) == ("Qwen3-Coder-30B-A3B", "Q8_0")


@pytest.mark.parametrize("quant", [None, "", "auto", "AUTO"])
def test_name_uses_preference_order(registry: Registry, quant: str | None) -> None:
    entry = reg.resolve_entry(registry, "qwen3-coder-30b-a3b", quant)
    assert (entry.id, entry.quantization) == ("qwen3-coder-30b-a3b-q4-k-s", "Q4_K_S")


def test_name_and_quantization_case_insensitive(registry: Registry) -> None:
    entry = reg.resolve_entry(registry, "QWEN3-CODER-30B-A3B", "q6_k")
    assert entry.id == "qwen3-coder-30b-a3b-q6-k"


def test_preference_fallbacks(registry: Registry) -> None:
    # Only F16, Q6_K and Q8_0 exist for this one: Q6_K comes first in the preference order.
    assert reg.resolve_entry(registry, "DeepSeek-R1-Distill-Qwen-14B").quantization == "Q6_K"
    assert reg.preferred_variant([_entry("F16"), _entry("Q3_K_S")]).quantization == "Q3_K_S"
    assert reg.preferred_variant([_entry("F16"), _entry("F16", id="g")]).id == "foo-f16"


def test_quantization_not_available_message(registry: Registry) -> None:
    with pytest.raises(QuantizationNotAvailableError) as info:
        reg.resolve_entry(registry, "Qwen3-Coder-30B-A3B", "Q4_K_M")
    assert str(info.value) == (
        'model "Qwen3-Coder-30B-A3B" found, but quantization "Q4_K_M" is not available\n'
        "  AUXOT_QUANTIZATION=F16        (62.0 GB VRAM)\n"
        "  AUXOT_QUANTIZATION=Q3_K_S     (9.7 GB VRAM)\n"
        "  AUXOT_QUANTIZATION=Q4_K_S     (15.5 GB VRAM)\n"
        "  AUXOT_QUANTIZATION=Q5_K_S     (19.4 GB VRAM)\n"
        "  AUXOT_QUANTIZATION=Q6_K       (23.3 GB VRAM)\n"
        "  AUXOT_QUANTIZATION=Q8_0       (31.0 GB VRAM)\n"
        "  AUXOT_QUANTIZATION=Q8_K       (31.0 GB VRAM)\n"
        "Omit AUXOT_QUANTIZATION (or set it to auto) to choose one automatically."
    )
    assert info.value.available[:2] == ["F16", "Q3_K_S"]


def test_not_found_without_matches(registry: Registry) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        reg.resolve_entry(registry, "zzzz-nothing", "Q4_K_S")
    assert str(info.value) == (
        'model "zzzz-nothing" not found in registry\n'
        "  (no close matches found)\n"
        "Run 'auxot-router models' for the full list of available models."
    )


def test_not_found_substring_suggestions_capped(registry: Registry) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        reg.resolve_entry(registry, "qwen")
    lines = str(info.value).splitlines()
    assert lines[0] == 'model "qwen" not found in registry'
    suggested = [line for line in lines if line.startswith("  AUXOT_MODEL=")]
    assert len(suggested) == 15
    names = [line.removeprefix("  AUXOT_MODEL=") for line in suggested]
    assert names == sorted(names)
    assert lines[-2].startswith("  ... and ")
    assert lines[-2].endswith(" more")
    assert lines[-1] == "Run 'auxot-router models' for the full list of available models."


@pytest.mark.parametrize("typo", ["Qwen3-Coder-30B-A3", "qwen3 coder 30b", "Qwen3-Codr-30B-A3B", "QWEN3_CODER_30B_A3B"])
def test_did_you_mean_for_typos(registry: Registry, typo: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        reg.resolve_entry(registry, typo)
    assert "Qwen3-Coder-30B-A3B" in info.value.suggestions[:3]
    assert "  AUXOT_MODEL=Qwen3-Coder-30B-A3B\n" in str(info.value)


def test_suggestions_find_ids_too(registry: Registry) -> None:
    names, more = reg.suggest_models(registry, "qwen3-5-35b-a3b-q4")
    assert names[0] == "Qwen3.5-35B-A3B"  # the id contains it; close names follow
    assert more == 0


# --- split files and full resolution ----------------------------------------------------------


def test_split_files_from_registry(registry: Registry) -> None:
    kimi = reg.resolve_entry(registry, "kimi-k2-5-q4-k-s")
    files = reg.split_files(kimi.file_name)
    assert kimi.file_name == "Q4_K_S/Kimi-K2.5-Q4_K_S-00001-of-00013.gguf"
    assert len(files) == 13
    assert files[0] == kimi.file_name
    assert files[-1] == "Q4_K_S/Kimi-K2.5-Q4_K_S-00013-of-00013.gguf"
    gpt = reg.resolve_model(registry, "gpt-oss-120b", "Q3_K_S")
    assert gpt.files == [
        "Q3_K_S/gpt-oss-120b-Q3_K_S-00001-of-00002.gguf",
        "Q3_K_S/gpt-oss-120b-Q3_K_S-00002-of-00002.gguf",
    ]


def test_split_files_edge_cases() -> None:
    assert reg.split_files("Model-Q4_K_S.gguf") == ["Model-Q4_K_S.gguf"]
    assert reg.split_files("M-00001-of-00002.gguf") == ["M-00001-of-00002.gguf", "M-00002-of-00002.gguf"]
    assert reg.split_files("a/M-1-of-2.gguf") == ["a/M-1-of-2.gguf"]  # not 5 digits


def test_resolve_model_full(registry: Registry) -> None:
    res = reg.resolve_model(registry, "Qwen3.5-35B-A3B")
    assert res.model_name == "Qwen3.5-35B-A3B"
    assert res.quantization == "Q4_K_S"
    assert res.huggingface_id == "unsloth/Qwen3.5-35B-A3B-GGUF"
    assert res.files == ["Qwen3.5-35B-A3B-Q4_K_S.gguf"]
    assert res.mmproj_file == "mmproj-F16.gguf"
    assert res.capabilities == ["chat", "vision"]
    assert (res.family, res.parameters) == ("MoE", "35B")
    assert (res.context_size, res.max_context_size, res.parallel) == (131072, 262144, 2)
    assert res.vram_gb == 17.5
    assert res.estimated_vram_gb > res.vram_gb
    assert res.warning == ""


def test_resolve_model_context_rules(registry: Registry) -> None:
    # Qwen3-30B-A3B allows 40960 tokens: the 131072 default is clamped.
    assert reg.resolve_model(registry, "Qwen3-30B-A3B").context_size == 40960
    assert reg.resolve_model(registry, "Qwen3-30B-A3B", context_size=8192).context_size == 8192
    # 0 means the model's default_context_size (as the early Go router's 0 did).
    entry = reg.resolve_entry(registry, "Qwen3-30B-A3B")
    zero = reg.resolve_model(registry, "Qwen3-30B-A3B", context_size=0)
    assert zero.context_size == entry.default_context_size
    no_mmproj = reg.resolve_model(registry, "Qwen3-Coder-30B-A3B", parallel=4)
    assert (no_mmproj.mmproj_file, no_mmproj.capabilities, no_mmproj.parallel) == ("", ["code"], 4)


def test_resolve_model_warns_when_explicit_choice_is_too_big(registry: Registry) -> None:
    res = reg.resolve_model(registry, "Qwen3-Coder-30B-A3B", "F16", context_size=32768, vram_total_gb=24)
    assert res.quantization == "F16"
    assert "24.0 GB VRAM is available" in res.warning


# --- VRAM estimate and auto quantization ------------------------------------------------------


def test_kv_cache_calibration(registry: Registry) -> None:
    qwen = reg.resolve_entry(registry, "Qwen3-30B-A3B")
    llama = reg.resolve_entry(registry, "DeepSeek-R1-Distill-Llama-8B")
    assert reg.kv_cache_bytes(qwen, 1, 1) == 96 * 1024
    assert reg.kv_cache_bytes(llama, 1, 1) == 128 * 1024
    assert reg.kv_cache_bytes(qwen, 1000, 2) == 2000 * 96 * 1024
    assert reg.kv_cache_bytes(qwen, 1000, 1, "q8_0") == pytest.approx(1000 * 96 * 1024 * 0.53125)


def test_kv_cache_fallback_formula() -> None:
    dense = reg.kv_cache_bytes(_entry("Q4_K_S", model_name="Unknown-8B"), 1, 1) / 1024
    moe = (
        reg.kv_cache_bytes(_entry("Q4_K_S", model_name="Unknown-30B-A3B", family="MoE", parameters="31B"), 1, 1) / 1024
    )
    assert dense == pytest.approx(128, rel=0.05)
    assert moe == pytest.approx(96, rel=0.15)


def test_sliding_window_layers_hold_only_the_window(registry: Registry) -> None:
    gemma = reg.resolve_entry(registry, "gemma-3-27b-it")
    short, long = reg.kv_cache_bytes(gemma, 1024, 1), reg.kv_cache_bytes(gemma, 2048, 1)
    assert long - short == 1024 * 80 * 1024  # past the window only full layers grow


def test_estimate_parts(registry: Registry) -> None:
    entry = reg.resolve_entry(registry, "qwen3-coder-30b-a3b-q4-k-s")
    est = reg.estimate_vram(entry, 32768, 2)
    assert est.weights_gb >= entry.vram_requirements_gb
    assert est.kv_cache_gb == pytest.approx(65536 * 96 * 1024 / 1e9)
    assert est.mmproj_gb == 0
    assert est.overhead_gb == pytest.approx(0.5 + 0.05 * (est.weights_gb + est.kv_cache_gb))
    assert est.total_gb == pytest.approx(est.weights_gb + est.kv_cache_gb + est.overhead_gb)
    assert reg.estimate_vram(entry, 65536, 2).total_gb > est.total_gb
    vision = reg.resolve_entry(registry, "Qwen3.5-35B-A3B")
    assert reg.estimate_vram(vision, 4096, 1).mmproj_gb == 1.0


def test_auto_quantization_depends_on_vram(registry: Registry) -> None:
    variants = registry.variants("Qwen3-Coder-30B-A3B")
    small = reg.pick_quantization(variants, vram_total_gb=24, context_size=32768, parallel=2)
    big = reg.pick_quantization(variants, vram_total_gb=80, context_size=32768, parallel=2)
    assert small.fits
    assert big.fits
    assert (small.warning, big.warning) == ("", "")
    assert small.quantization in ("Q3_K_S", "Q4_K_S")
    assert big.quantization == "F16"
    assert (
        small.estimate.total_gb
        <= 24
        < reg.pick_quantization(variants, vram_total_gb=80, context_size=32768, parallel=2).estimate.total_gb
    )
    mid = reg.pick_quantization(variants, vram_total_gb=40, context_size=32768, parallel=2)
    ranks = [reg.quality_rank(c.quantization) for c in (big, mid, small)]
    assert ranks == sorted(ranks)
    assert len(set(ranks)) == 3


def test_auto_prefers_free_vram(registry: Registry) -> None:
    variants = registry.variants("Qwen3-Coder-30B-A3B")
    by_total = reg.pick_quantization(variants, vram_total_gb=80, context_size=32768)
    by_free = reg.pick_quantization(variants, vram_total_gb=80, vram_free_gb=30, context_size=32768)
    assert by_free.budget_gb == 30
    assert reg.quality_rank(by_free.quantization) > reg.quality_rank(by_total.quantization)


def test_auto_nothing_fits_gives_smallest_and_warning(registry: Registry) -> None:
    choice = reg.pick_quantization(
        registry.variants("Qwen3-Coder-30B-A3B"), vram_total_gb=4, context_size=32768, parallel=2
    )
    assert choice.quantization == "Q3_K_S"
    assert not choice.fits
    assert "4.0 GB VRAM is available" in choice.warning


def test_auto_without_vram_uses_preference_order(registry: Registry) -> None:
    choice = reg.pick_quantization(registry.variants("Qwen3-Coder-30B-A3B"))
    assert choice.quantization == "Q4_K_S"
    assert "VRAM unknown" in choice.warning


def test_auto_never_picks_f32() -> None:
    variants = [_entry("F32", vram_requirements_gb=32), _entry("Q8_0", vram_requirements_gb=8)]
    assert reg.pick_quantization(variants, vram_total_gb=1000).quantization == "Q8_0"


def test_resolve_model_auto_per_worker(registry: Registry) -> None:
    small = reg.resolve_model(registry, "Qwen3-Coder-30B-A3B", "auto", context_size=32768, vram_total_gb=24)
    big = reg.resolve_model(registry, "Qwen3-Coder-30B-A3B", "auto", context_size=32768, vram_total_gb=80)
    assert reg.quality_rank(big.quantization) < reg.quality_rank(small.quantization)
    assert big.files == [
        "BF16/Qwen3-Coder-30B-A3B-Instruct-BF16-00001-of-00002.gguf",
        "BF16/Qwen3-Coder-30B-A3B-Instruct-BF16-00002-of-00002.gguf",
    ]
    # An explicit quantization is never overridden by the VRAM.
    fixed = reg.resolve_model(registry, "Qwen3-Coder-30B-A3B", "Q6_K", vram_total_gb=80)
    assert fixed.quantization == "Q6_K"


def test_parameter_parsing() -> None:
    assert reg.parameter_billions("31B") == 31
    assert reg.parameter_billions("596M") == pytest.approx(0.596)
    assert reg.parameter_billions("?") == 0
    llama4 = _entry("Q4_K_S", model_name="Llama-4-Scout-17B-16E", parameters="108B")
    assert reg.active_billions(llama4) == 17
    assert reg.active_billions(_entry("Q4_K_S", model_name="X-35B-A3B")) == 3


# --- formatting and the models command --------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (131072, "128K"),
        (262144, "256K"),
        (40960, "40K"),
        (1000000, "1M"),
        (1048576, "1.0M"),
        (10485760, "10.5M"),
        (32000, "32K"),
        (4096, "4K"),
    ],
)
def test_format_context(n: int, text: str) -> None:
    assert reg.format_context(n) == text


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = reg.models_command(argv, out)
    return code, out.getvalue()


def _rows(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("") + 2  # blank line, then the column titles
    return [line.split()[0] for line in lines[start : lines.index("", start)]]


def test_models_table(registry: Registry) -> None:
    code, text = _run([])
    assert code == 0
    lines = text.splitlines()
    assert lines[0] == f"auxot model registry (v{registry.version}, {len(registry.models)} entries)"
    assert lines[2].split() == ["NAME", "PARAMS", "FAMILY", "CONTEXT", "MIN", "VRAM", "CAPABILITIES", "QUANTIZATIONS"]
    assert _rows(text) == registry.model_names()
    coder = next(line for line in lines if line.startswith("  Qwen3-Coder-30B-A3B "))
    assert coder.split() == [
        "Qwen3-Coder-30B-A3B",
        "31B",
        "MoE",
        "32K",
        "/",
        "256K",
        "9.7",
        "GB",
        "code",
        "Q3_K_S,",
        "Q4_K_S,",
        "Q5_K_S,",
        "Q6_K,",
        "Q8_0,",
        "Q8_K,",
        "F16",
    ]
    assert lines[-2:] == [
        "Usage: AUXOT_MODEL=<model-name>",
        "       AUXOT_QUANTIZATION=<quant>  (optional — auto-selects if omitted)",
    ]


def test_models_filters(registry: Registry) -> None:
    _, moe = _run(["--family", "MoE"])
    assert "Qwen3-Coder-30B-A3B" in _rows(moe)
    assert "Llama-3.3-70B" not in _rows(moe)
    _, vision = _run(["--capability", "vision", "--family", "dense"])
    assert "gemma-3-27b-it" in _rows(vision)
    assert "Qwen3-Coder-30B-A3B" not in _rows(vision)
    _, found = _run(["--search", "qwen3 coder 30b"])
    assert _rows(found) == ["Qwen3-Coder-30B-A3B", "Qwen3-Coder-30B-A3B-Instruct-1M"]
    _, small = _run(["--max-vram", "8"])
    assert "Qwen3-4B" in _rows(small)
    assert "Qwen3-8B" not in _rows(small)  # 4.5 GiB of f16 KV cache at 32K leaves too little
    assert "Llama-3.3-70B" not in _rows(small)
    assert "fitting 8 GB at 32K context x 1" in small.splitlines()[0]
    _, short = _run(["--max-vram", "8", "--ctx", "8192"])
    assert "Qwen3-8B" in _rows(short)
    _, none = _run(["--search", "no-such-model"])
    assert "(no models match)" in none


def test_models_max_vram_narrows_quantizations() -> None:
    _, text = _run(["--search", "Qwen3-Coder-30B-A3B-Instruct-1M", "--max-vram", "24"])
    row = next(line for line in text.splitlines() if "Instruct-1M" in line)
    assert row.rstrip().endswith("Q3_K_S, Q4_K_S")


def test_models_json(registry: Registry) -> None:
    code, text = _run(["--json"])
    assert code == 0
    data = orjson.loads(text)
    assert [m["model_name"] for m in data] == registry.model_names()
    coder = next(m for m in data if m["model_name"] == "Qwen3-Coder-30B-A3B")
    assert coder["huggingface_id"] == "unsloth/Qwen3-Coder-30B-A3B-Instruct-GGUF"
    assert coder["capabilities"] == ["code"]
    assert coder["min_vram_gb"] == 9.7
    quants = {q["quantization"]: q for q in coder["quantizations"]}
    assert quants["F16"]["files"][1].endswith("-00002-of-00002.gguf")
    _, fitted = _run(["--json", "--max-vram", "24", "--search", "Qwen3-Coder-30B-A3B"])
    for model in orjson.loads(fitted):
        assert all(q["estimated_vram_gb"] <= 24 for q in model["quantizations"])


def test_models_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["--bogus"])[0] == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert _run(["--family", "huge"])[0] == 2
    assert "invalid choice" in capsys.readouterr().err
    code, text = _run(["--help"])
    assert code == 0
    assert "--max-vram" in text


def test_models_command_with_given_registry() -> None:
    custom = Registry("7", "now", (_entry("Q4_K_S"), _entry("F16", vram_requirements_gb=16)))
    out = io.StringIO()
    assert reg.models_command([], out, registry=custom) == 0
    assert out.getvalue().startswith("auxot model registry (v7, 2 entries)")
    assert _rows(out.getvalue()) == ["Foo"]
