"""Several router processes on one port: a small fork supervisor.

One Python process uses one core. ``AUXOT_PROCESSES=N`` starts N router processes that listen on
the same port (``SO_REUSEPORT``: the kernel spreads new connections over them) and share the
job queue in one real Redis, exactly like N routers on N hosts. This module only supervises:

- each child runs ``target(slot)`` in a fresh process (forked before any event loop exists) and
  exits with its return code;
- SIGTERM / SIGINT / SIGHUP sent to the supervisor go to every child (each drains or reloads by
  itself); after SIGTERM or SIGINT the supervisor waits for all of them and exits with the worst
  exit code;
- a child that dies on its own is started again, after a delay that grows while children keep
  dying young (a broken port or Redis must not become a fork loop); its jobs are taken over by
  the others through Redis (stale consumers' entries are claimed, as for a dead router host).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

log = logging.getLogger("auxot.processes")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOPPING = (signal.SIGTERM, signal.SIGINT)
YOUNG_S = 10.0  # a child that dies sooner than this after its start counts as failing to start
MAX_DELAY_S = 30.0


def run_processes(count: int, target: Callable[[int], int], *, restart_delay_s: float = 1.0) -> int:
    """Run ``target(slot)`` for ``slot`` in ``range(count)`` in child processes until a stopping
    signal; returns 0 when every child ended with 0, else the first non-zero exit code."""
    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started at, monotonic)
    stopping = False
    worst = 0

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in STOPPING:
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def start(slot: int) -> None:
        # signals stay blocked across fork: a child must never run the supervisor's handler
        # (it would signal its siblings) before it restored the defaults
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    for signum in FORWARDED:
                        signal.signal(signum, signal.SIG_DFL)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
                    code = target(slot)
                except BaseException:  # the child must end here, whatever happened
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children[pid] = (slot, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    for slot in range(count):
        start(slot)
    log.info("router processes started", extra={"processes": count, "pids": sorted(children)})
    delay = restart_delay_s
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        entry = children.pop(pid, None)
        if entry is None:
            continue
        slot, started = entry
        code = os.waitstatus_to_exitcode(status)
        if stopping:  # how the shutdown went: a child that crashed earlier was replaced
            if code and not worst:
                worst = code if code > 0 else 128 - code
            continue
        lived = time.monotonic() - started
        delay = min(delay * 2, MAX_DELAY_S) if lived < YOUNG_S else restart_delay_s
        log.error(
            "a router process exited; starting another",
            extra={"pid": pid, "exit_code": code, "lived_s": round(lived, 1), "restart_in_s": delay},
        )
        time.sleep(delay)
        if not stopping:
            start(slot)
    return worst if stopping else 1


def parse_processes(value: str) -> int:
    """``AUXOT_PROCESSES``: a count from 1 to 64, or ``auto`` (one per CPU this process may use)."""
    text = value.strip().lower()
    if text == "auto":
        return max(min(len(os.sched_getaffinity(0)), 64), 1)
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"expected a number of processes or 'auto', got {value!r}") from None
    if not 1 <= count <= 64:
        raise ValueError(f"expected 1 to 64 processes, got {count}")
    return count
