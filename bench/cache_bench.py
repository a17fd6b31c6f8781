#!/usr/bin/env python3
"""Replay of agentic traffic against four routing policies, in virtual time:

    python bench/cache_bench.py [--seed N] [--prefill-ms 0.2] [--json PATH]

The router's own policy objects (``auxot_common.routing``: cache-aware, least-busy,
round-robin) choose workers for every job, exactly through ``pick`` / ``on_dispatch`` /
``on_complete`` with held jobs re-examined when their hold ends or a slot frees; an "oracle"
sends every conversation to its own worker with unlimited slots and cache. Workers are modelled
like ``bench/fake_llama_server.py`` models llama-server: per slot the longest common prefix with
the slot's previous prompt is free, a slot's prompt is saved to a host-RAM cache when replaced
and restored from it (``restore_ms`` per token), uncached tokens cost ``prefill_ms`` per token on
the worker's one GPU (prefills of concurrent jobs queue), generation runs at ``decode_tps`` per
stream. Virtual time makes the 32 x 10-turn replay (prompts up to 60k tokens: hours of
prefill for a cache-blind policy) take seconds and come out the same on every machine; the
real processes are exercised by tests/test_e2e_cache_routing.py.

Workloads:
  agentic   32 conversations x 10 turns, 5k -> 60k tokens (a shared 4k-token system prompt
            and tools, then the conversation's own history), 2-8 s of tool time between turns,
            plus 20% short one-shot requests (300-2,000 tokens, distinct);
  uniform   32 closed-loop clients sending short distinct prompts (500 tokens): throughput.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from auxot_common import protocol as proto  # noqa: E402
from auxot_common.routing import CacheAwarePolicy, make_policy  # noqa: E402

BYTES_PER_TOKEN = 4  # as the fake llama-server tokenizes


def common_prefix_len(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def text(rng: random.Random, tokens: int) -> str:
    """Distinct text of ``tokens`` tokens (4 bytes each)."""
    return rng.randbytes(tokens * BYTES_PER_TOKEN // 2).hex()


@dataclass
class Params:
    workers: int = 4
    slots: int = 4
    ctx: int = 65536
    prefill_ms: float = 0.2
    restore_ms: float = 0.005
    decode_tps: float = 40.0
    output_tokens: int = 200
    ram_tokens: int = 4 * 65536 * 3  # host-RAM cache per worker, tokens


@dataclass(eq=False)
class SimWorker:
    """What the policy sees (worker_id, free, slots, capabilities, running) plus the cache model."""

    worker_id: str
    slots: int
    params: Params
    running: dict[str, Any] = field(default_factory=dict)
    slot_prompts: list[str] = field(default_factory=list)
    slot_busy: list[bool] = field(default_factory=list)
    slot_last: list[float] = field(default_factory=list)
    ram: list[str] = field(default_factory=list)
    gpu_free_at: float = 0.0

    def __post_init__(self) -> None:
        self.slot_prompts = [""] * self.slots
        self.slot_busy = [False] * self.slots
        self.slot_last = [0.0] * self.slots
        self.capabilities = proto.Capabilities(ctx_size=self.params.ctx, total_slots=self.slots)

    @property
    def free(self) -> int:
        return self.slots - len(self.running)

    def start(self, prompt: str, now: float) -> tuple[int, int, int]:
        """Take a slot like llama-server: (slot, cached tokens, restored tokens)."""
        idle = [s for s in range(self.slots) if not self.slot_busy[s]]
        scored = [(common_prefix_len(self.slot_prompts[s], prompt), -self.slot_last[s], s) for s in idle]
        lcp, _, slot = max(scored)
        if lcp * 10 <= len(prompt):  # below --slot-prompt-similarity 0.1: least recently used slot
            slot = min(idle, key=lambda s: self.slot_last[s])
            lcp = common_prefix_len(self.slot_prompts[slot], prompt)
        old = self.slot_prompts[slot]
        if old and lcp * 2 < len(old):  # the slot loses most of it: saved to the RAM cache
            self.ram.append(old)
            while sum(len(p) for p in self.ram) // BYTES_PER_TOKEN > self.params.ram_tokens:
                self.ram.pop(0)
        restored = 0
        best = max(range(len(self.ram)), key=lambda i: common_prefix_len(self.ram[i], prompt), default=None)
        if best is not None:
            n = common_prefix_len(self.ram[best], prompt)
            if n > lcp:
                restored, lcp = n - lcp, n
                self.ram.pop(best)
        self.slot_prompts[slot] = prompt
        self.slot_busy[slot] = True
        cached = min(lcp // BYTES_PER_TOKEN, len(prompt) // BYTES_PER_TOKEN - 1)
        return slot, cached, restored // BYTES_PER_TOKEN


class OracleWorker(SimWorker):
    """Unlimited slots and cache: a prompt reuses the longest prefix of anything it ever saw."""

    @property
    def free(self) -> int:
        return 1 << 30

    def start(self, prompt: str, now: float) -> tuple[int, int, int]:
        lcp = max((common_prefix_len(p, prompt) for p in self.ram), default=0)
        self.ram.append(prompt)
        return 0, min(lcp // BYTES_PER_TOKEN, len(prompt) // BYTES_PER_TOKEN - 1), 0


@dataclass
class Request:
    job: proto.Job
    prompt: str
    arrival: float
    conversation: int = -1
    turn: int = 0
    ttft: float = 0.0
    cached: int = 0
    tokens: int = 0


class Simulation:
    def __init__(self, mode: str, params: Params) -> None:
        self.mode, self.params = mode, params
        self.now = 0.0
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        cls = OracleWorker if mode == "oracle" else SimWorker
        self.workers = [cls(f"w{i}", params.slots, params) for i in range(params.workers)]
        self.policy = make_policy("cache" if mode == "oracle" else mode)
        self.backlog: list[Request] = []
        self.done: list[Request] = []
        self.home: dict[int, SimWorker] = {}
        self.on_done: Any = None
        self.dispatch_scheduled = False

    def at(self, when: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(self.events, (when, next(self.seq), kind, payload))

    def submit(self, request: Request) -> None:
        self.backlog.append(request)
        self.dispatch()

    def pick(self, request: Request) -> tuple[SimWorker | None, float]:
        if self.mode == "oracle":
            key = request.conversation if request.conversation >= 0 else -next(self.seq) - 1
            worker = self.home.setdefault(key, min(self.workers, key=lambda w: len(w.running)))
            return worker, 0.0
        choice = self.policy.pick(request.job, self.workers, self.now)
        return choice.worker, choice.hold_until

    def dispatch(self) -> None:
        held: list[Request] = []
        while self.backlog:
            request = self.backlog.pop(0)
            worker, hold_until = self.pick(request)
            if worker is None:
                if hold_until:
                    held.append(request)
                    self.at(hold_until, "wake")
                    continue
                self.backlog.insert(0, request)
                break
            self.run(worker, request)
        self.backlog[:0] = held

    def run(self, worker: SimWorker, request: Request) -> None:
        p = self.params
        self.policy.on_dispatch(worker, request.job, self.now)
        worker.running[request.job.job_id] = request
        slot, cached, restored = worker.start(request.prompt, self.now)
        tokens = len(request.prompt) // BYTES_PER_TOKEN
        prefill = (tokens - cached) * p.prefill_ms / 1000 + restored * p.restore_ms / 1000
        start = max(self.now, worker.gpu_free_at)
        worker.gpu_free_at = start + prefill
        first_token = start + prefill
        request.ttft, request.cached, request.tokens = first_token - request.arrival, cached, tokens
        self.at(first_token + p.output_tokens / p.decode_tps, "finish", (worker, slot, request, prefill))

    def finish(self, worker: SimWorker, slot: int, request: Request, prefill: float) -> None:
        del worker.running[request.job.job_id]
        worker.slot_busy[slot] = False
        worker.slot_last[slot] = self.now
        self.policy.on_complete(
            worker.worker_id,
            request.job.job_id,
            input_tokens=request.tokens,
            cache_tokens=request.cached,
            prompt_ms=prefill * 1000,
        )
        self.done.append(request)
        if self.on_done is not None:
            self.on_done(request)
        self.dispatch()

    def loop(self) -> float:
        while self.events:
            when, _, kind, payload = heapq.heappop(self.events)
            self.now = when
            if kind == "finish":
                self.finish(*payload)
            elif kind == "arrive":
                self.submit(payload)
            elif kind == "call":
                payload()
            else:
                self.dispatch()
        return self.now


_ids = itertools.count()


def job_of(messages: list[dict[str, Any]]) -> proto.Job:
    return proto.Job(job_id=f"j{next(_ids)}", messages=messages)


def prompt_of(messages: list[dict[str, Any]]) -> str:
    return "".join(f"<{m['role']}>{m['content']}" for m in messages)


def agentic(mode: str, params: Params, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    sim = Simulation(mode, params)
    system = text(rng, 4000)
    conversations = 32
    turns = 10
    histories: dict[int, list[dict[str, Any]]] = {}

    def turn_request(c: int, t: int) -> Request:
        history = histories.setdefault(c, [{"role": "system", "content": system}])
        target = 5000 + (60000 - 5000) * t // (turns - 1)  # tokens of this turn's prompt
        grow = max(target - len(prompt_of(history)) // BYTES_PER_TOKEN, 100)
        history.append({"role": "user", "content": text(rng, grow)})
        return Request(job_of(list(history)), prompt_of(history), sim.now, c, t)

    def done(request: Request) -> None:
        c, t = request.conversation, request.turn
        if c < 0 or t + 1 >= turns:
            return
        histories[c].append({"role": "assistant", "content": text(rng, params.output_tokens)})
        delay = rng.uniform(2, 8)
        sim.at(sim.now + delay, "call", lambda: sim.submit(turn_request(c, t + 1)))

    sim.on_done = done
    for c in range(conversations):
        sim.at(rng.uniform(0, 30), "call", lambda c=c: sim.submit(turn_request(c, 0)))
    one_shots = conversations * turns // 4  # 20% of all requests
    for _ in range(one_shots):
        messages = [{"role": "user", "content": text(rng, rng.randint(300, 2000))}]
        sim.at(rng.uniform(0, 400), "call", lambda m=messages: sim.submit(Request(job_of(m), prompt_of(m), sim.now)))
    total = sim.loop()
    ttfts = sorted(r.ttft for r in sim.done)
    agent = [r for r in sim.done if r.conversation >= 0]
    return {
        "mode": mode,
        "requests": len(sim.done),
        "prompt_tokens": sum(r.tokens for r in sim.done),
        "cached_tokens": sum(r.cached for r in sim.done),
        "agent_cached_share": sum(r.cached for r in agent) / max(sum(r.tokens for r in agent), 1),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "total_s": total,
        "hit_ratio": [s.get("hit_ratio") for s in (sim.policy.worker_stats(w.worker_id) for w in sim.workers) if s]
        if isinstance(sim.policy, CacheAwarePolicy)
        else [],
    }


def uniform(mode: str, params: Params, seed: int, clients: int = 32, per_client: int = 40) -> dict[str, Any]:
    rng = random.Random(seed)
    sim = Simulation(mode, params)
    left = dict.fromkeys(range(clients), per_client)

    def send(client: int) -> None:
        messages = [{"role": "user", "content": text(rng, 500)}]
        request = Request(job_of(messages), prompt_of(messages), sim.now, conversation=-1, turn=client)
        sim.submit(request)

    def done(request: Request) -> None:
        client = request.turn
        left[client] -= 1
        if left[client] > 0:
            send(client)

    sim.on_done = done
    for client in range(clients):
        sim.at(rng.uniform(0, 1), "call", lambda c=client: send(c))
    total = sim.loop()
    return {"mode": mode, "requests": len(sim.done), "total_s": total, "requests_per_s": len(sim.done) / total}


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    k = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return values[k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prefill-ms", type=float, default=0.2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    params = Params(prefill_ms=args.prefill_ms)
    started = time.monotonic()
    modes = ("least-busy", "round-robin", "cache", "oracle")
    rows = [agentic(mode, params, args.seed) for mode in modes]
    flat = [uniform(mode, params, args.seed) for mode in ("least-busy", "cache")]
    by = {r["mode"]: r for r in rows}
    print(
        f"# cache routing replay ({time.strftime('%Y-%m-%d')}, {platform.machine()},"
        f" Python {platform.python_version()},"
        f" prefill {params.prefill_ms} ms/token, {params.workers} workers x {params.slots} slots; "
        f"{time.monotonic() - started:.0f} s of wall time)\n"
    )
    print("| policy | requests | cached prompt tokens | share of oracle | TTFT p50 | TTFT p99 | total |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        share = r["cached_tokens"] / by["oracle"]["cached_tokens"]
        print(
            f"| {r['mode']} | {r['requests']} | {r['cached_tokens']:,} ({r['cached_tokens'] / r['prompt_tokens']:.0%})"
            f" | {share:.0%} | {r['ttft_p50_s']:.2f} s | {r['ttft_p99_s']:.2f} s | {r['total_s']:.0f} s |"
        )
    print("\n| uniform short prompts | requests | total | requests/s |")
    print("|---|---:|---:|---:|")
    for r in flat:
        print(f"| {r['mode']} | {r['requests']} | {r['total_s']:.1f} s | {r['requests_per_s']:.2f} |")
    cache, least = by["cache"], by["least-busy"]
    checks = {
        "cached >= 90% of oracle": cache["cached_tokens"] >= 0.9 * by["oracle"]["cached_tokens"],
        "TTFT p50 >= 5x better than least-busy": least["ttft_p50_s"] >= 5 * cache["ttft_p50_s"],
        "uniform throughput within 3% of least-busy": flat[1]["requests_per_s"] >= 0.97 * flat[0]["requests_per_s"],
    }
    print()
    for name, ok in checks.items():
        print(f"- {'PASS' if ok else 'FAIL'}: {name}")
    if args.json:
        args.json.write_text(json.dumps({"agentic": rows, "uniform": flat, "checks": checks}, indent=2))


if __name__ == "__main__":
    main()
