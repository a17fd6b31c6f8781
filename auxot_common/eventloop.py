"""The event loop both roles run on: uvloop where it is installed, asyncio's own otherwise.

uvloop (libuv) makes socket reads, writes and callbacks cheaper; on the token path that is a
large part of what the router and the worker spend per token (see README, Benchmark). It is an
optional dependency: without it (or with ``AUXOT_UVLOOP=0``, to compare) the standard loop runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


def uvloop_enabled(env: dict[str, str] | None = None) -> bool:
    """Whether :func:`run` will use uvloop: installed, and not switched off."""
    flag = (os.environ if env is None else env).get("AUXOT_UVLOOP", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)``, on uvloop when :func:`uvloop_enabled`."""
    if uvloop_enabled():
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


def loop_name() -> str:
    """For logs and benchmark tables: which loop :func:`run` picks."""
    return "uvloop" if uvloop_enabled() else "asyncio"
