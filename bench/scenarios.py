"""The scenarios of issue 12, run by ``bench/run_bench.py`` after its token-path grid.

  gpu        a fake llama-server that behaves like a GPU (FAKE_LLAMA_GPU_STEPS: 32 slots, 45
             tokens/s per stream in one decode step for all, prefill proportional to the prompt):
             direct vs the byte proxy vs router + worker, streams ending and restarting in step,
             and staggered; the router row's note gives its and the worker's CPU ÷ the proxy's
  anthropic  the same GPU-like load, staggered, on /v1/messages
  responses  the same again on /v1/responses (Codex's API)
  streams    N concurrent streams at 10 tokens/s: direct fake vs router (4 simulated workers);
             the router's memory per open stream (RSS growth ÷ N)
  dispatch   100 simulated workers (bench/sim_worker.py), one-token jobs: jobs/s through the
             embedded queue and through a real redis-server
  cross      router A takes the requests, the worker is on router B, one real Redis: vs the same
             load sent to B (same-instance)
  scale      1 and 2 router processes on one real Redis, one port each (a balancer, or the load
             generator here, spreads callers), a simulated worker on each: tokens/s

Each scenario's rows carry the ratio to its own baseline, measured in the same run.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import loadgen
from run_bench import BENCH, ROOT, Child, Keys, child_pids, cpu_seconds, free_port, stop_child, stop_pid, wait_until


@dataclass(frozen=True, slots=True)
class ScenarioPlan:
    gpu_tokens: int  # max_tokens of a GPU-like request
    gpu_window: float
    prompt_bytes: int  # of each GPU-like prompt (4 bytes a token)
    streams: int  # concurrent streams of the memory scenario
    streams_window: float
    dispatch_window: float
    cross_window: float


QUICK_SCENARIOS = ScenarioPlan(
    gpu_tokens=48, gpu_window=3.0, prompt_bytes=2000, streams=300, streams_window=2.0,
    dispatch_window=2.0, cross_window=2.0,
)  # fmt: skip
FULL_SCENARIOS = ScenarioPlan(
    gpu_tokens=256, gpu_window=20.0, prompt_bytes=4000, streams=2000, streams_window=10.0,
    dispatch_window=8.0, cross_window=8.0,
)  # fmt: skip
GPU_SLOTS = 32
GPU_RATE = 45.0
PREFILL_RATE = 40_000.0  # prompt tokens/s of one GPU step: 32 prompts of 1,000 tokens ≈ 0.8 s


@dataclass(slots=True)
class Procs:
    workdir: Path
    keys: Keys
    children: list[Child] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> Child:
        import os
        import subprocess

        log = self.workdir / f"{name}-{len(self.children)}.log"
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        full_env = {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), "AUXOT_LOG_LEVEL": "warning", **env}
        with log.open("wb") as out:
            popen = subprocess.Popen(cmd, cwd=self.workdir, env=full_env, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    def fake(self, port: int, slots: int, env: dict[str, str]) -> Child:
        model = self.workdir / "bench.gguf"
        cmd = [sys.executable, str(BENCH / "fake_llama_server.py"), "-m", str(model), "--port", str(port),
               "-np", str(slots), "-c", str(4096 * slots)]  # fmt: skip
        return self.spawn("fake", cmd, env)

    async def router(self, session: aiohttp.ClientSession, slots: int, redis_url: str = "") -> tuple[str, Child]:
        port = free_port()
        env = {
            "AUXOT_HOST": "127.0.0.1", "AUXOT_PORT": str(port), "AUXOT_API_KEY_HASH": self.keys.api_hash,
            "AUXOT_ADMIN_KEY_HASH": self.keys.gpu_hash, "AUXOT_MAX_PARALLEL": str(min(slots, 512)),
            "AUXOT_CTX_SIZE": "4096", "AUXOT_REDIS_URL": redis_url, "AUXOT_MAX_QUEUE": "100000",
            "AUXOT_MAX_REQUESTS": "100000",
        }  # fmt: skip
        child = self.spawn("router", [sys.executable, str(ROOT / "auxot_router.py")], env)
        url = f"http://127.0.0.1:{port}"
        await wait_until(session, url + "/health", lambda _: True, [child], 30)
        return url, child

    async def worker(self, session: aiohttp.ClientSession, url: str, env: dict[str, str], router: Child) -> Child:
        model = self.workdir / "bench.gguf"
        cmd = [sys.executable, str(ROOT / "auxot_worker.py"), "--gpu-key", self.keys.gpu, "--router-url",
               url.replace("http", "ws") + "/ws", "--model-path", str(model),
               "--llama-server-path", str(BENCH / "fake_llama_server.py")]  # fmt: skip
        child = self.spawn("worker", cmd, env)
        await wait_until(session, url + "/health", _has_workers(1), [router, child], 60)
        self.orphans += child_pids(child.popen.pid)
        return child

    async def sim_workers(
        self, session: aiohttp.ClientSession, url: str, router: Child, workers: int, slots: int, rate: float
    ) -> Child:
        cmd = [sys.executable, str(BENCH / "sim_worker.py"), "--router-url", url.replace("http", "ws") + "/ws",
               "--workers", str(workers), "--slots", str(slots), "--tokens-per-sec", str(rate)]  # fmt: skip
        child = self.spawn("sim", cmd, {"AUXOT_GPU_KEY": self.keys.gpu})
        await wait_until(session, url + "/health", _has_workers(workers), [router, child], 60)
        return child

    def redis(self) -> tuple[str, Child]:
        port = free_port()
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--protected-mode", "no", "--dir", str(self.workdir)]  # fmt: skip
        child = self.spawn("redis", cmd, {})
        time.sleep(0.3)
        return f"redis://127.0.0.1:{port}/0", child

    def stop(self) -> None:
        for child in reversed(self.children):
            stop_child(child)
        for pid in self.orphans:
            stop_pid(pid)
        self.children.clear()
        self.orphans.clear()


def _has_workers(n: int) -> Callable[[Any], bool]:
    def ready(body: Any) -> bool:
        return int(body.get("workers", 0)) >= n and int(body.get("available", body.get("total_slots", 1))) > 0

    return ready


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def row(scenario: str, path: str, streams: int, summary: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "scenario": scenario, "path": path, "streams": streams, "tokens_per_s": summary["tokens_per_s"],
        "requests_per_s": round(summary["requests"] / summary["elapsed_s"], 1) if summary["elapsed_s"] else None,
        "ttft_p50_ms": summary["ttft_ms"]["p50"], "ttft_p99_ms": summary["ttft_ms"]["p99"],
        "errors": summary["errors"], "short": summary["short"], "error_samples": summary["error_samples"],
        **extra,
    }  # fmt: skip


async def measure(
    url: str, key: str | None, streams: int, *, window: float, ramp: float, max_tokens: int,
    pids: dict[str, int], prompt: str = "Say tok.", api: str = "openai",
) -> tuple[dict[str, Any], dict[str, float | None]]:  # fmt: skip
    samples: list[dict[str, float]] = []

    def sample(_: bool) -> None:
        samples.append({role: cpu_seconds(pid) for role, pid in pids.items()})

    summary = await loadgen.run_load(url, key, streams, duration=window, ramp=ramp, max_tokens=max_tokens,
                                     on_window=sample, timeout=120, prompt=prompt, api=api)  # fmt: skip
    tokens = summary["tokens"]
    cpu = {role: (round((samples[-1][role] - samples[0][role]) * 1e6 / tokens, 1) if tokens else None) for role in pids}
    return summary, cpu


async def gpu_scenario(session: aiohttp.ClientSession, procs: Procs, plan: ScenarioPlan,
                       report: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    env = {"FAKE_LLAMA_TOKENS_PER_SEC": str(GPU_RATE), "FAKE_LLAMA_GPU_STEPS": "1",
           "FAKE_LLAMA_PROMPT_TOKENS_PER_SEC": str(PREFILL_RATE)}  # fmt: skip
    fake_port = free_port()
    fake = procs.fake(fake_port, GPU_SLOTS, env)
    direct = f"http://127.0.0.1:{fake_port}"
    await wait_until(session, direct + "/health", lambda _: True, [fake], 20)
    proxy_port = free_port()
    proxy = procs.spawn("proxy", [sys.executable, str(BENCH / "byte_proxy.py"), "--port", str(proxy_port),
                                  "--backend", direct], {})  # fmt: skip
    proxied = f"http://127.0.0.1:{proxy_port}"
    await wait_until(session, proxied + "/health", lambda _: True, [proxy], 20)
    url, router = await procs.router(session, GPU_SLOTS)
    worker = await procs.worker(session, url, env, router)
    prompt = "@@n@@ " + ("tok " * (plan.prompt_bytes // 4))[: plan.prompt_bytes]  # unique: no cache hits
    length = plan.gpu_tokens / GPU_RATE
    rows: list[dict[str, Any]] = []
    paths = {"direct": (direct, None, {"fake": fake.popen.pid}),
             "proxy": (proxied, None, {"proxy": proxy.popen.pid}),
             "router": (url, procs.keys.api, {"router": router.popen.pid, "worker": worker.popen.pid})}  # fmt: skip
    phases = [("gpu in step", 0.0, "openai"), ("gpu staggered", length, "openai"),
              ("gpu staggered anthropic", length, "anthropic"),
              ("gpu staggered responses", length, "responses")]  # fmt: skip
    for name, ramp, api in phases:
        for path, (target, key, pids) in paths.items():
            if api != "openai" and path != "router":
                continue  # llama-server's own /v1/messages and /v1/responses are not ours: vs the OpenAI row
            summary, cpu = await measure(target, key, GPU_SLOTS, window=plan.gpu_window, ramp=ramp,
                                         max_tokens=plan.gpu_tokens, pids=pids, prompt=prompt, api=api)  # fmt: skip
            rows.append(row(name, path, GPU_SLOTS, summary, cpu_ms_per_1k_tokens=cpu))
            report(_line(rows[-1]))
        _cpu_against_proxy(rows, name)
    procs.stop()
    return rows


def _cpu_against_proxy(rows: list[dict[str, Any]], scenario: str) -> None:
    """The router row's note: its and the worker's CPU per token as multiples of the byte proxy's
    under the same load (the proxy row of this phase, or of the OpenAI phase before it)."""
    router = next((r for r in reversed(rows) if r["scenario"] == scenario and r["path"] == "router"), None)
    phases = (scenario, "gpu staggered")
    proxy = next((r for r in reversed(rows) if r["path"] == "proxy" and r["scenario"] in phases), None)
    if router is None or proxy is None:
        return
    base = (proxy.get("cpu_ms_per_1k_tokens") or {}).get("proxy")
    cpu = router.get("cpu_ms_per_1k_tokens") or {}
    if base and cpu.get("router") is not None and cpu.get("worker") is not None:
        ratios = f"router {cpu['router'] / base:.2f}×, worker {cpu['worker'] / base:.2f}×"
        router["note"] = f"CPU vs byte proxy ({base:.1f}): {ratios}"


async def streams_scenario(session: aiohttp.ClientSession, procs: Procs, plan: ScenarioPlan,
                           report: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    n, rate, tokens = plan.streams, 10.0, 50
    fake_port = free_port()
    fake = procs.fake(fake_port, n, {"FAKE_LLAMA_TOKENS_PER_SEC": str(rate)})
    direct = f"http://127.0.0.1:{fake_port}"
    await wait_until(session, direct + "/health", lambda _: True, [fake], 20)
    url, router = await procs.router(session, 512)
    workers = -(-n // 500)
    await procs.sim_workers(session, url, router, workers, -(-n // workers), rate)
    rows: list[dict[str, Any]] = []
    ramp = tokens / rate
    summary, cpu = await measure(direct, None, n, window=plan.streams_window, ramp=ramp, max_tokens=tokens,
                                 pids={"fake": fake.popen.pid})  # fmt: skip
    rows.append(row(f"{n} streams × 10/s", "direct", n, summary, cpu_ms_per_1k_tokens=cpu))
    report(_line(rows[-1]))
    idle = rss_kib(router.popen.pid)
    peak: list[int] = []

    def sample_rss() -> None:
        peak.append(rss_kib(router.popen.pid))

    loop = asyncio.get_running_loop()
    handle = loop.call_later(ramp + plan.streams_window / 2, sample_rss)
    summary, cpu = await measure(url, procs.keys.api, n, window=plan.streams_window, ramp=ramp, max_tokens=tokens,
                                 pids={"router": router.popen.pid})  # fmt: skip
    handle.cancel()
    per_stream = round((max(peak) - idle) / n, 1) if peak else None
    note = f"router RSS {idle // 1024} → {max(peak, default=idle) // 1024} MiB: {per_stream} KiB per open stream"
    rows.append(row(f"{n} streams × 10/s", "router + sim workers", n, summary, cpu_ms_per_1k_tokens=cpu, note=note))
    report(_line(rows[-1]))
    procs.stop()
    return rows


async def dispatch_scenario(session: aiohttp.ClientSession, procs: Procs, plan: ScenarioPlan,
                            report: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    for queue in ("embedded", "redis"):
        redis_url = procs.redis()[0] if queue == "redis" else ""
        url, router = await procs.router(session, 8, redis_url)
        await procs.sim_workers(session, url, router, 100, 8, 0.0)
        summary, cpu = await measure(url, procs.keys.api, 200, window=plan.dispatch_window, ramp=0.5, max_tokens=1,
                                     pids={"router": router.popen.pid})  # fmt: skip
        rows.append(row(f"dispatch, 100 workers, {queue} queue", "router + sim workers", 200, summary,
                        cpu_ms_per_1k_tokens=cpu, note="jobs/s = requests/s (one-token jobs)"))  # fmt: skip
        report(_line(rows[-1]))
        procs.stop()
    return rows


async def cross_scenario(session: aiohttp.ClientSession, procs: Procs, plan: ScenarioPlan,
                         report: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    redis_url, _ = procs.redis()
    url_a, router_a = await procs.router(session, 64, redis_url)
    url_b, router_b = await procs.router(session, 64, redis_url)
    await procs.sim_workers(session, url_b, router_b, 1, 64, 50.0)
    rows: list[dict[str, Any]] = []
    pids = {"router": router_a.popen.pid, "worker": router_b.popen.pid}
    for name, url in (("same instance", url_b), ("cross instance", url_a)):
        summary, cpu = await measure(url, procs.keys.api, 64, window=plan.cross_window, ramp=2.0, max_tokens=100,
                                     pids=pids)  # fmt: skip
        rows.append(row(f"cross-instance, 64 × 50/s ({name})", "router A → Redis → router B" if url == url_a
                        else "router B", 64, summary, cpu_ms_per_1k_tokens=cpu))  # fmt: skip
        report(_line(rows[-1]))
    procs.stop()
    return rows


async def scale_scenario(session: aiohttp.ClientSession, procs: Procs, plan: ScenarioPlan,
                         report: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    for count in (1, 2):
        redis_url, _ = procs.redis()
        urls = []
        for _ in range(count):
            url, router = await procs.router(session, 256, redis_url)
            await procs.sim_workers(session, url, router, 1, 256, 0.0)
            urls.append(url)
        results = await asyncio.gather(*(
            loadgen.run_load(url, procs.keys.api, 32, duration=plan.cross_window, ramp=0.5, max_tokens=500)
            for url in urls
        ))  # fmt: skip
        merged = {
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in results), 1),
            "requests": sum(r["requests"] for r in results), "elapsed_s": results[0]["elapsed_s"],
            "ttft_ms": results[0]["ttft_ms"], "errors": sum(r["errors"] for r in results),
            "short": sum(r["short"] for r in results),
            "error_samples": [e for r in results for e in r["error_samples"]][:5],
        }  # fmt: skip
        rows.append(row(f"scale, flat out, {count} router process(es)", f"{count} × (router + sim worker)",
                        32 * count, merged))  # fmt: skip
        report(_line(rows[-1]))
        procs.stop()
    return rows


SCENARIOS = {
    "gpu": gpu_scenario, "streams": streams_scenario, "dispatch": dispatch_scenario,
    "cross": cross_scenario, "scale": scale_scenario,
}  # fmt: skip


async def run_scenarios(names: list[str], quick: bool, keys: Keys, workdir: Path,
                        report: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    plan = QUICK_SCENARIOS if quick else FULL_SCENARIOS
    rows: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as session:
        for name in names:
            procs = Procs(workdir, keys)
            report(f"scenario {name}")
            try:
                rows += await SCENARIOS[name](session, procs, plan, report)
            except (RuntimeError, OSError) as exc:
                rows.append({"scenario": name, "path": "–", "error": str(exc)[:500]})
                report(f"  {name} failed: {exc}")
            finally:
                procs.stop()
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against the first row of its scenario family (direct, or same-instance, or 1 process)."""
    base: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "error" in r:
            continue
        family = r["scenario"].split(" (")[0].removesuffix(" anthropic").removesuffix(" responses")
        if family.startswith("scale"):
            family = "scale"
        if family.startswith("dispatch"):
            r["ratio"] = None
            continue
        first = base.setdefault(family, r)
        r["ratio"] = round(r["tokens_per_s"] / first["tokens_per_s"], 3) if first["tokens_per_s"] else None
        for pct in ("p50", "p99"):
            a, b = r[f"ttft_{pct}_ms"], first[f"ttft_{pct}_ms"]
            r[f"ttft_{pct}_added_ms"] = round(a - b, 1) if a is not None and b is not None and r is not first else None


def _line(r: dict[str, Any]) -> str:
    return (f"  {r['scenario']} / {r['path']}: {r['tokens_per_s']:,.0f} tok/s, {r.get('requests_per_s')} req/s, "
            f"TTFT p50 {r['ttft_p50_ms']} ms, {r['errors']} errors")  # fmt: skip


def _num(value: Any, fmt: str = "{:,.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| scenario | path | streams | tokens/s | jobs/s | × base | TTFT p50 ms (added) | TTFT p99 ms (added) "
             "| errors | CPU ms/1k tok: router (or proxy) | worker | note |", "|" + "---|" * 12]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['scenario']} | not measured: {r['error'][:200]} |" + " |" * 10)
            continue
        cpu = r.get("cpu_ms_per_1k_tokens") or {}
        cells = [
            r["scenario"], r["path"], str(r["streams"]), _num(r["tokens_per_s"], "{:,.0f}"),
            _num(r.get("requests_per_s"), "{:,.0f}"), _num(r.get("ratio"), "{:.3f}"),
            f"{_num(r['ttft_p50_ms'])} ({_num(r.get('ttft_p50_added_ms'), '{:+.1f}')})",
            f"{_num(r['ttft_p99_ms'])} ({_num(r.get('ttft_p99_added_ms'), '{:+.1f}')})",
            f"{r['errors']} / {r['short']}", _num(cpu.get("router", cpu.get("proxy"))), _num(cpu.get("worker")),
            r.get("note", ""),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
