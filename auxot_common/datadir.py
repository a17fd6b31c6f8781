"""Where the worker keeps models and llama.cpp builds.

GPU clouds give a container a persistent volume at a known place, and the home directory is often
on a small, throw-away disk. So, in order: ``AUXOT_DATA_DIR`` if set; RunPod serverless's network
volume ``/runpod-volume``; ``/workspace`` (RunPod pods, Vast.ai); else ``~/.auxot``. A volume is
used only if it exists and is writable, and gets an ``auxot`` sub-directory of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

VOLUME_DIRS: tuple[str, ...] = ("/runpod-volume", "/workspace")


def data_dir(env: Mapping[str, str], volumes: Sequence[str] = VOLUME_DIRS) -> Path:
    """The data directory for this machine (see the module docstring)."""
    explicit = env.get("AUXOT_DATA_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    for volume in volumes:
        if os.path.isdir(volume) and os.access(volume, os.W_OK | os.X_OK):
            return Path(volume) / "auxot"
    return Path("~/.auxot").expanduser()
