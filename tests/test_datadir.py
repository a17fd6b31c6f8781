"""Data directory detection for GPU clouds, and the worker's defaults that follow it."""

from __future__ import annotations

from pathlib import Path

from auxot_common.datadir import data_dir
from auxot_worker import WorkerConfig


def test_volumes_in_order_and_the_explicit_setting_wins(tmp_path: Path) -> None:
    runpod, workspace = tmp_path / "runpod-volume", tmp_path / "workspace"
    volumes = (str(runpod), str(workspace))
    assert data_dir({"HOME": str(tmp_path)}, volumes) == Path("~/.auxot").expanduser()
    workspace.mkdir()
    assert data_dir({}, volumes) == workspace / "auxot"
    runpod.mkdir()
    assert data_dir({}, volumes) == runpod / "auxot"
    assert data_dir({"AUXOT_DATA_DIR": str(tmp_path / "mine")}, volumes) == tmp_path / "mine"


def test_worker_keeps_models_and_builds_in_the_data_dir(tmp_path: Path) -> None:
    config = WorkerConfig.from_sources({"AUXOT_GPU_KEY": "adm_x"}, {"AUXOT_DATA_DIR": str(tmp_path)})
    assert config.models_dir == str(tmp_path / "models")
    assert config.llama_cache_dir == str(tmp_path / "llama-server")
    explicit = WorkerConfig.from_sources(
        {"AUXOT_GPU_KEY": "adm_x"}, {"AUXOT_DATA_DIR": str(tmp_path), "AUXOT_MODELS_DIR": "/models"}
    )
    assert explicit.models_dir == "/models"
