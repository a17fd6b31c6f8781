#!/usr/bin/env python3
"""One command for the token-path benchmark, all on loopback:

    python bench/run_bench.py [--quick]

Measures, side by side in one run, streaming chat completions
  direct  straight to a fake llama-server (bench/fake_llama_server.py, --parallel 64),
  proxy   through bench/byte_proxy.py (forwards bytes, parses nothing: the floor),
  router  through auxot_router.py + auxot_worker.py (the worker launches its own fake),
at 1, 16 and 64 concurrent streams, each at 50 tokens/s per stream and flat out.
For each: total tokens/s, ratio to direct, TTFT p50/p99, and CPU milliseconds per 1,000
tokens of the router, the worker, the proxy, the fake and this process (the load generator),
read from /proc before and after each phase (see cpu_seconds). Each phase starts with one
unmeasured request per stream, so connections are open; streams then start staggered and only
a steady-state window is measured (see loadgen.py), so TTFT is not one synchronized burst.

Prints a Markdown table plus the design-budget checks and writes bench/results/latest.json.
If the router or worker cannot start, the direct and proxy rows are still measured and the
error is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import loadgen
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script, only bench/ is on the path; auxot_common is at the root
    sys.path.append(str(ROOT))
BENCH = ROOT / "bench"
RESULTS = BENCH / "results" / "latest.json"
from auxot_common import eventloop  # noqa: E402  (needs ROOT on sys.path)

CONCURRENCY = (1, 16, 64)
SPEEDS = (50.0, 0.0)  # tokens/s per stream; 0 = flat out
TARGETS = ("direct", "proxy", "router")
SCENARIO_NAMES = ("gpu", "streams", "dispatch", "cross", "scale")
SLOTS = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")
# which processes' CPU each path costs (the fake is shown for context, not part of the budget)
CPU_ROLES = {"direct": ("fake",), "proxy": ("proxy", "fake"), "router": ("router", "worker", "fake")}


@dataclass(frozen=True, slots=True)
class Plan:
    """How long each phase measures (seconds) and how long its requests are (tokens)."""

    rated_window: float
    flat_window: float
    flat_ramp: float
    rated_max_tokens: int = 100
    flat_max_tokens: int = 500
    concurrency: tuple[int, ...] = CONCURRENCY
    speeds: tuple[float, ...] = SPEEDS

    def phase(self, speed: float) -> tuple[float, float, int]:
        """(ramp, window, max_tokens) at one token speed.

        At 50 tokens/s the streams start spread over one request's length, so that arrivals
        stay spread as in steady traffic rather than one synchronized burst.
        """
        if speed > 0:
            return self.rated_max_tokens / speed, self.rated_window, self.rated_max_tokens
        return self.flat_ramp, self.flat_window, self.flat_max_tokens


QUICK = Plan(rated_window=3.0, flat_window=2.0, flat_ramp=0.5, concurrency=(64,), speeds=(50.0,))
FULL = Plan(rated_window=10.0, flat_window=6.0, flat_ramp=1.0)


# --- processes ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of one process: its live threads, not its children.

    Summed from each thread's ``se.sum_exec_runtime`` (nanosecond precision) where the kernel
    has /proc/PID/task/TID/sched; otherwise utime + stime of /proc/PID/stat, which comes in
    clock ticks (10 ms): too coarse for a 2-second phase of one stream at 50 tokens/s.
    """
    total, found = 0.0, False
    for sched in Path(f"/proc/{pid}/task").glob("*/sched"):
        with contextlib.suppress(OSError, ValueError):
            line = next((x for x in sched.read_text().splitlines() if x.startswith("se.sum_exec_runtime")), None)
            if line is not None:
                total += float(line.split(":")[1]) / 1e3  # given in milliseconds
                found = True
    if found:
        return total
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces; it ends at ")"
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def child_pids(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_child(child: Child) -> None:
    if child.popen.poll() is None:
        child.popen.send_signal(signal.SIGTERM)
        try:
            child.popen.wait(10)
        except subprocess.TimeoutExpired:
            child.popen.kill()
            child.popen.wait(5)


def stop_pid(pid: int) -> None:
    """A grandchild we did not spawn ourselves (the worker's fake), if its parent left it behind."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


async def wait_until(
    session: aiohttp.ClientSession, url: str, ready: Callable[[Any], bool], children: list[Child], timeout: float
) -> Any:
    """Poll GET url until ``ready(json)``; fails fast if one of ``children`` exits."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        for child in children:
            if child.popen.poll() is not None:
                raise RuntimeError(f"{child.name} exited with {child.popen.returncode}:\n{child.tail()}")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                body = await resp.json(content_type=None)
                last = f"HTTP {resp.status}: {str(body)[:300]}"
                if resp.status == 200 and ready(body):
                    return body
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s ({last})")


@dataclass(slots=True)
class Keys:
    api: str
    gpu: str
    api_hash: str
    gpu_hash: str

    @classmethod
    def make(cls) -> Keys:
        # imported here: it needs ROOT on sys.path, added above
        from auxot_common.auth import API_KEY_PREFIX, GPU_KEY_PREFIX, generate_key, hash_key

        api, gpu = generate_key(API_KEY_PREFIX), generate_key(GPU_KEY_PREFIX)
        return cls(api, gpu, hash_key(api), hash_key(gpu))


@dataclass(slots=True)
class Stack:
    """Every process for one token speed: fake + proxy, and router + worker (+ its fake)."""

    speed: float
    workdir: Path
    keys: Keys
    children: list[Child] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    pids: dict[str, dict[str, int]] = field(default_factory=dict)  # target -> role -> pid
    router_error: str | None = None
    worker_fake: int | None = None

    def env(self) -> dict[str, str]:
        # the worker runs the fake through its shebang; put this venv's python first on PATH
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), "FAKE_LLAMA_TOKENS_PER_SEC": str(self.speed)}

    def spawn(self, name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> Child:
        log = self.workdir / f"{name}-{self.speed:g}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                cmd, cwd=self.workdir, env={**self.env(), **(extra_env or {})},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    async def start(self, session: aiohttp.ClientSession, model: Path) -> None:
        fake_port, proxy_port = free_port(), free_port()
        fake = self.spawn("fake", [sys.executable, str(BENCH / "fake_llama_server.py"), "-m", str(model),
                                   "--port", str(fake_port), "-np", str(SLOTS), "-c", str(4096 * SLOTS)])  # fmt: skip
        proxy = self.spawn("proxy", [sys.executable, str(BENCH / "byte_proxy.py"), "--port", str(proxy_port),
                                     "--backend", f"http://127.0.0.1:{fake_port}"])  # fmt: skip
        self.urls["direct"] = f"http://127.0.0.1:{fake_port}"
        self.urls["proxy"] = f"http://127.0.0.1:{proxy_port}"
        self.pids["direct"] = {"fake": fake.popen.pid}
        self.pids["proxy"] = {"proxy": proxy.popen.pid, "fake": fake.popen.pid}
        await wait_until(session, self.urls["direct"] + "/health", lambda _: True, [fake], 20)
        await wait_until(session, self.urls["proxy"] + "/health", lambda _: True, [proxy], 20)
        try:
            await self._start_router(session, model)
        except (RuntimeError, OSError) as exc:
            self.router_error = str(exc)

    async def _start_router(self, session: aiohttp.ClientSession, model: Path) -> None:
        port = free_port()
        router_env = {
            "AUXOT_HOST": "127.0.0.1", "AUXOT_PORT": str(port), "AUXOT_API_KEY_HASH": self.keys.api_hash,
            "AUXOT_ADMIN_KEY_HASH": self.keys.gpu_hash, "AUXOT_MAX_PARALLEL": str(SLOTS),
            "AUXOT_CTX_SIZE": "4096", "AUXOT_LOG_LEVEL": "warning",
        }  # fmt: skip
        router = self.spawn("router", [sys.executable, str(ROOT / "auxot_router.py")], router_env)
        url = f"http://127.0.0.1:{port}"
        await wait_until(session, url + "/health", lambda _: True, [router], 30)
        worker = self.spawn("worker", [sys.executable, str(ROOT / "auxot_worker.py"),
                                       "--router-url", f"ws://127.0.0.1:{port}/ws", "--model-path", str(model),
                                       "--llama-server-path", str(BENCH / "fake_llama_server.py")],
                            {"AUXOT_LOG_LEVEL": "warning", "AUXOT_GPU_KEY": self.keys.gpu})  # fmt: skip

        def ready(body: Any) -> bool:
            return int(body.get("workers", 0)) >= 1 and int(body.get("available", body.get("total_slots", 1))) > 0

        await wait_until(session, url + "/health", ready, [router, worker], 60)
        fakes = child_pids(worker.popen.pid)
        if not fakes:
            raise RuntimeError("the worker has no child process (where is its llama-server?)")
        self.worker_fake = fakes[0]
        self.urls["router"] = url
        self.pids["router"] = {"router": router.popen.pid, "worker": worker.popen.pid, "fake": fakes[0]}

    def stop(self) -> None:
        for child in reversed(self.children):
            stop_child(child)
        if self.worker_fake is not None:
            stop_pid(self.worker_fake)


# --- phases -------------------------------------------------------------------------------------


def per_1k(seconds: float, tokens: int) -> float | None:
    return round(seconds * 1e6 / tokens, 1) if tokens else None


async def run_phase(stack: Stack, target: str, concurrency: int, plan: Plan) -> dict[str, Any]:
    ramp, window, max_tokens = plan.phase(stack.speed)
    pids = stack.pids[target]
    samples: list[dict[str, float]] = []

    def sample(_: bool) -> None:  # CPU over exactly the window in which tokens are counted
        samples.append({role: cpu_seconds(pid) for role, pid in pids.items()})

    api_key = stack.keys.api if target == "router" else None
    summary = await loadgen.run_load(
        stack.urls[target], api_key, concurrency, duration=window, ramp=ramp, max_tokens=max_tokens,
        on_window=sample, timeout=60,
    )  # fmt: skip
    cpu = {role: samples[-1][role] - samples[0][role] for role in pids}
    cpu["loadgen"] = summary["loadgen_cpu_s"]
    tokens = summary["tokens"]
    return {
        "speed": stack.speed, "concurrency": concurrency, "target": target,
        "requests": summary["requests"], "max_tokens": max_tokens, "tokens": tokens,
        "errors": summary["errors"], "short": summary["short"], "error_samples": summary["error_samples"],
        "elapsed_s": summary["elapsed_s"], "tokens_per_s": summary["tokens_per_s"],
        "ttft_p50_ms": summary["ttft_ms"]["p50"], "ttft_p99_ms": summary["ttft_ms"]["p99"],
        "cpu_ms_per_1k_tokens": {role: per_1k(sec, tokens) for role, sec in cpu.items()},
    }  # fmt: skip


async def run_speed(session: aiohttp.ClientSession, speed: float, plan: Plan, keys: Keys, workdir: Path,
                    model: Path, report: Callable[[str], None]) -> tuple[list[dict[str, Any]], str | None]:  # fmt: skip
    stack = Stack(speed, workdir, keys)
    rows: list[dict[str, Any]] = []
    try:
        await stack.start(session, model)
        if stack.router_error:
            report(f"router + worker unavailable: {stack.router_error}")
        for concurrency in plan.concurrency:
            for target in TARGETS:
                if target in stack.urls:
                    rows.append(await run_phase(stack, target, concurrency, plan))
                    report(_progress(rows[-1]))
    finally:
        stack.stop()
    return rows, stack.router_error


def _progress(row: dict[str, Any]) -> str:
    return (f"  {_speed(row['speed'])} x{row['concurrency']} {row['target']}: {row['tokens_per_s']:,.0f} tok/s, "
            f"{row['errors']} errors, {row['short']} short")  # fmt: skip


# --- report -------------------------------------------------------------------------------------


def _speed(speed: float) -> str:
    return f"{speed:g}/s" if speed else "flat out"


def _num(value: float | None, fmt: str = "{:,.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    direct = {(r["speed"], r["concurrency"]): r["tokens_per_s"] for r in rows if r["target"] == "direct"}
    for row in rows:
        base = direct.get((row["speed"], row["concurrency"]))
        row["ratio_vs_direct"] = round(row["tokens_per_s"] / base, 3) if base else None


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| per stream | streams | path | tokens/s | × direct | TTFT p50 ms | TTFT p99 ms | errors / short "
            "| CPU ms per 1k tokens: router | worker | proxy | fake | loadgen |")  # fmt: skip
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        cpu = r["cpu_ms_per_1k_tokens"]
        cells = [
            _speed(r["speed"]), str(r["concurrency"]), r["target"], _num(r["tokens_per_s"], "{:,.0f}"),
            _num(r["ratio_vs_direct"], "{:.3f}"), _num(r["ttft_p50_ms"]), _num(r["ttft_p99_ms"]),
            f"{r['errors']} / {r['short']}",
            *(_num(cpu.get(role)) for role in ("router", "worker", "proxy", "fake", "loadgen")),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _find(rows: list[dict[str, Any]], speed: float, concurrency: int, target: str) -> dict[str, Any] | None:
    return next((r for r in rows if (r["speed"], r["concurrency"], r["target"]) == (speed, concurrency, target)), None)


def budget_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The performance budget of shared/DESIGN.md, where the rows allow a verdict."""
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, limit: float, ok: Callable[[float, float], bool]) -> None:
        if value is not None:
            checks.append({"check": name, "value": round(value, 3), "limit": limit, "pass": ok(value, limit)})

    rated = {t: _find(rows, 50.0, 64, t) for t in TARGETS}
    if rated["router"] and rated["direct"]:
        r, d = rated["router"], rated["direct"]
        check("64×50/s: router tokens/s ÷ direct", r["ratio_vs_direct"], 0.98, lambda v, lim: v >= lim)
        for pct, limit in (("p50", 5.0), ("p99", 25.0)):
            if r[f"ttft_{pct}_ms"] is not None and d[f"ttft_{pct}_ms"] is not None:
                added = r[f"ttft_{pct}_ms"] - d[f"ttft_{pct}_ms"]
                check(f"64×50/s: TTFT {pct} added by router (ms)", added, limit, lambda v, lim: v <= lim)
    for speed in SPEEDS:
        router, proxy = _find(rows, speed, 64, "router"), _find(rows, speed, 64, "proxy")
        if router and proxy and proxy["cpu_ms_per_1k_tokens"].get("proxy"):
            base = proxy["cpu_ms_per_1k_tokens"]["proxy"]
            for role in ("router", "worker"):
                value = router["cpu_ms_per_1k_tokens"].get(role)
                ratio = value / base if value is not None else None
                check(f"64×{_speed(speed)}: {role} CPU ÷ proxy CPU", ratio, 1.5, lambda v, lim: v <= lim)
    for concurrency in CONCURRENCY:
        router, proxy = _find(rows, 0.0, concurrency, "router"), _find(rows, 0.0, concurrency, "proxy")
        if router and proxy and proxy["tokens_per_s"]:
            ratio = router["tokens_per_s"] / proxy["tokens_per_s"]
            check(f"{concurrency}×flat out: router tokens/s ÷ proxy", ratio, 0.5, lambda v, lim: v >= lim)
    return checks


def checks_markdown(checks: list[dict[str, Any]]) -> str:
    lines = ["| budget check | value | limit | verdict |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']} | {c['limit']} | {'pass' if c['pass'] else 'FAIL'} |" for c in checks]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="auxot-bench-") as tmp:
        yield Path(tmp)


async def run(plan: Plan, quick: bool, report: Callable[[str], None], scenario_names: list[str]) -> dict[str, Any]:
    keys = Keys.make()
    rows: list[dict[str, Any]] = []
    router_errors: list[str] = []
    started, load_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getloadavg()  # the header's "before"
    with workspace() as workdir:
        model = workdir / "bench.gguf"
        model.write_bytes(b"GGUF" + bytes(28))  # any existing file: the fake never reads it
        async with aiohttp.ClientSession() as session:
            for speed in plan.speeds:
                report(f"{_speed(speed)} per stream")
                speed_rows, error = await run_speed(session, speed, plan, keys, workdir, model, report)
                rows += speed_rows
                if error:
                    router_errors.append(error)
        from scenarios import run_scenarios  # imports this module: only once it is loaded

        scenario_rows = await run_scenarios(scenario_names, quick, keys, workdir, report)
    add_ratios(rows)
    return {
        "meta": {
            "quick": quick, "plan": asdict(plan),
            "time": started, "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "loop": eventloop.loop_name(), "load_average": load_before,
        },
        "scenarios": scenario_rows,
        "router_errors": router_errors,
        "rows": rows,
        "budget": budget_checks(rows),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 × 50/s only, short windows: under 2 minutes")
    parser.add_argument("--scenarios", default=",".join(SCENARIO_NAMES),
                        help=f"comma-separated, of {','.join(SCENARIO_NAMES)} (default all; '' for none)")
    parser.add_argument("--skip-grid", action="store_true", help="only the scenarios, not the token-path grid")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.skip_grid:
        plan = replace(plan, speeds=())

    def report(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    names = [n for n in args.scenarios.split(",") if n]
    result = eventloop.run(run(plan, args.quick, report, names))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    meta = result["meta"]
    print(f"Auxot benchmark, {meta['time']}: {meta['cpus']} CPUs, {meta['platform']}, Python {meta['python']}, "
          f"{meta['loop']}; load average before: {', '.join(f'{x:.1f}' for x in meta['load_average'])}\n")
    print(markdown(result["rows"]))
    if result["scenarios"]:
        from scenarios import markdown as scenarios_markdown

        print()
        print(scenarios_markdown(result["scenarios"]))
    if result["budget"]:
        print()
        print(checks_markdown(result["budget"]))
    for error in result["router_errors"]:
        print(f"\nrouter + worker not measured: {error}")
    print(f"\nJSON: {args.output}")


if __name__ == "__main__":
    main()
