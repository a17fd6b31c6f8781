"""What the worker needs before it can start llama-server: the model files and the binary.

The worker calls these between the policy fetch and llama-server's start (and again when a
``policy_update`` names another model). They only glue :mod:`auxot_common.downloads` and
:mod:`auxot_common.llama_binary` to the policy and the worker's settings; the pure helpers at
the end (:func:`dial_down_steps`, :func:`policy_change`) hold the worker's retry and update
rules so that tests can read them without processes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiohttp

from auxot_common import protocol as proto
from auxot_common.downloads import (
    ModelFileError,
    download_model_files,
    hf_settings_from_env,
    verify_local_model,
)
from auxot_common.gpu import GpuInfo
from auxot_common.llama_binary import ensure_llama_server

log = logging.getLogger("auxot.worker")

MIN_DIAL_DOWN_CTX = 2048


class ProvisionError(RuntimeError):
    """The model or the binary cannot be provided; the message tells the user what to do."""


@dataclass(slots=True, frozen=True)
class ModelFiles:
    """The model as llama-server gets it: the GGUF (first shard) and the vision projector."""

    model: Path
    mmproj: Path | None = None


async def provide_model(
    session: aiohttp.ClientSession,
    policy: proto.Policy,
    *,
    model_path: str,
    mmproj_path: str,
    models_dir: Path,
    environ: Mapping[str, str],
) -> ModelFiles:
    """The local model (``--model-path`` wins) or the policy's, downloaded into ``models_dir``.

    Parameters: ``policy`` — the router's resolution (``huggingface_id``, ``files``,
    ``mmproj_file``); ``model_path`` / ``mmproj_path`` — the user's local files (``""``: none);
    ``models_dir`` — the download cache (``AUXOT_MODELS_DIR``); ``environ`` — where
    ``HF_ENDPOINT`` / ``HF_TOKEN`` are read. Raises :class:`ProvisionError` and
    :class:`auxot_common.downloads.DownloadError`.
    """
    if model_path:
        return _local_model(policy, Path(model_path).expanduser(), mmproj_path)
    if not policy.huggingface_id or not policy.files:
        raise ProvisionError(
            f"the router's policy for {policy.model_name!r} names no Hugging Face repository or files "
            "(an air-gapped router, or an older one): pass the GGUF with --model-path (AUXOT_MODEL_FILE)"
        )
    hf = hf_settings_from_env(environ)
    files = list(policy.files) + ([policy.mmproj_file] if policy.mmproj_file else [])
    log.info(
        "model download",
        extra={"repo": policy.huggingface_id, "files": files, "endpoint": hf.endpoint, "models_dir": str(models_dir)},
    )
    paths = await download_model_files(
        session, repo=policy.huggingface_id, files=files, models_dir=models_dir, endpoint=hf.endpoint, token=hf.token
    )
    model = ModelFiles(paths[0], paths[-1] if policy.mmproj_file else None)
    log.info("model ready", extra={"path": str(model.model), "mmproj": str(model.mmproj or ""), "source": "download"})
    return model


def _local_model(policy: proto.Policy, path: Path, mmproj_path: str) -> ModelFiles:
    try:
        verify_local_model(path)
    except ModelFileError as exc:
        raise ProvisionError(str(exc)) from None
    mmproj: Path | None = None
    if mmproj_path:
        mmproj = Path(mmproj_path).expanduser()
        if not mmproj.is_file():
            raise ProvisionError(f"vision projector not found: {mmproj}")
    elif policy.mmproj_file:
        beside = path.parent / Path(policy.mmproj_file).name
        if beside.is_file():
            mmproj = beside
        else:
            log.warning(
                "the model has a vision projector but none is here; images will be refused",
                extra={"expected": str(beside), "hint": "pass --mmproj-path (AUXOT_MMPROJ_FILE)"},
            )
    log.info("model ready", extra={"path": str(path), "mmproj": str(mmproj or ""), "source": "local"})
    return ModelFiles(path, mmproj)


async def provide_binary(
    session: aiohttp.ClientSession,
    *,
    explicit_path: str,
    cache_dir: Path,
    gpu: GpuInfo,
    asset_base_url: str,
) -> Path:
    """The user's llama-server (``--llama-server-path`` wins) or the release build for ``gpu``.

    Raises :class:`auxot_common.llama_binary.NoAssetError` (its message holds the command that
    builds one from source) and :class:`auxot_common.llama_binary.LlamaBinaryError`.
    """
    return await ensure_llama_server(
        session,
        explicit_path=Path(explicit_path) if explicit_path else None,
        cache_dir=cache_dir,
        backend=gpu.backend,
        base_url=asset_base_url,
        driver_version=gpu.driver_version,
    )


def vram_report_gb(gpu: GpuInfo) -> float:
    """``capabilities.vram_gb``: the FREE memory of all GPUs in GB (10^9 bytes, the registry's
    unit) when the probe reports it (nvidia-smi, rocm-smi), else their total; 0 without a GPU.
    Measured before llama-server loads, so it is what the model may use."""
    mib = gpu.free_vram_mb or gpu.total_vram_mb
    return round(mib * 1024 * 1024 / 1e9, 1)


def dial_down_steps(parallel: int, ctx_per_slot: int, floor: int = MIN_DIAL_DOWN_CTX) -> list[tuple[int, int]]:
    """The (parallel, context per slot) settings to try, in order, when llama-server fails to
    start (out of memory): first fewer slots down to 1, then half the context per slot while it
    stays at or above ``floor``. The first entry is what was asked for."""
    steps = [(p, ctx_per_slot) for p in range(max(parallel, 1), 0, -1)]
    ctx = ctx_per_slot
    while ctx // 2 >= floor:
        ctx //= 2
        steps.append((1, ctx))
    return steps


PolicyChange = Literal["model", "settings"]


def policy_change(old: proto.Policy, new: proto.Policy) -> PolicyChange | None:
    """What a ``policy_update`` asks of the worker: another model (download, then restart),
    other settings (restart), or nothing (None)."""
    model_fields = ("model_name", "quantization", "huggingface_id", "files", "mmproj_file")
    if any(getattr(old, name) != getattr(new, name) for name in model_fields):
        return "model"
    if (old.context_size, old.max_parallelism, old.embedding, old.pooling) != (
        new.context_size,
        new.max_parallelism,
        new.embedding,
        new.pooling,
    ):
        return "settings"
    return None
