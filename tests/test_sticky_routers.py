"""Several routers on one Redis: a conversation stays on the worker that holds its prompt,
whichever router receives its turns (auxot_common/affinity.py, targeted streams in queue.py).

Two router processes share a real ``redis-server``; each has its own worker (the fake
llama-server with its prompt cache). Either router may read a job from the shared stream; the
one whose worker is cold moves it to the warm one's targeted stream.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster
from tests.support import http
from tests.support.procs import RouterProcess, WorkerProcess
from tests.support.redis_server import RedisServer
from tests.support.reliability import TOKEN, Reaper, running_on, start_routers, start_workers_on, wait_for

pytestmark = pytest.mark.timeout(120)

FAKE = {"FAKE_LLAMA_PREFILL_MS_PER_TOKEN": "0.5", "FAKE_LLAMA_CACHE_RAM_TOKENS": "200000"}


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def chat(router: RouterProcess, messages: list[dict[str, Any]], max_tokens: int = 4) -> http.Response:
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens}
    return http.post(f"{router.url}/v1/chat/completions", body, headers=router.headers(), timeout=60)


def opening(i: int) -> list[dict[str, Any]]:
    """~12 KB its own from the first byte: a cold prefill costs ~1.5 s at 0.5 ms/token."""
    text = " ".join(f"fact {j} of conversation {i} is {j * 13 + i}." for j in range(400))
    return [{"role": "system", "content": f"Assistant {i}."}, {"role": "user", "content": text}]


def both_see_both_workers(routers: list[RouterProcess]) -> bool:
    return all(len(r.health().get("worker_list", [])) == 2 for r in routers)


def test_turns_sent_to_either_router_reuse_the_prompt_on_its_worker(
    fake_cluster: Cluster, redis: RedisServer, reaper: Reaper
) -> None:
    a, b = start_routers(
        fake_cluster, ["router-a", "router-b"], AUXOT_REDIS_URL=redis.url, AUXOT_MAX_PARALLEL="2",
        AUXOT_CTX_SIZE="32768", AUXOT_HEALTH_REFRESH="0.2",
    )  # fmt: skip
    workers: list[WorkerProcess] = start_workers_on(fake_cluster, [(a, "worker-a", FAKE), (b, "worker-b", FAKE)])
    wait_for(lambda: both_see_both_workers([a, b]), 10, "both routers to see both workers")
    routers = [a, b]

    def conversation(i: int) -> list[tuple[str, int, int]]:
        """Four turns, sent alternately to A and B: (serving worker, prompt, cached) each."""
        messages = opening(i)
        served: list[tuple[str, int, int]] = []
        for turn in range(4):
            reply = chat(routers[(i + turn) % 2], messages)
            assert reply.status == 200, reply.body[:300]
            usage = reply.json()["usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            served.append((reply.headers["x-auxot-worker"], usage["prompt_tokens"], cached))
            content = reply.json()["choices"][0]["message"]["content"]
            messages = [
                *messages,
                {"role": "assistant", "content": content},
                {"role": "user", "content": f"go on {turn}"},
            ]
        return served

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(conversation, range(4)))
    for i, served in enumerate(results):
        first_worker = served[0][0]
        for turn, (worker, prompt, cached) in enumerate(served[1:], start=1):
            assert worker == first_worker, (i, turn, served)
            assert cached >= 0.9 * prompt, (i, turn, served)
    assert all(_metric(r, "auxot_prompt_cache_hit_ratio") > 0 for r in routers)

    # A turn sent to the cold router is served by the warm worker from its cache, whichever
    # router reads it from the shared stream: the cold router moves it (the hand-off itself is
    # tested against a real Redis in test_queue_sticky.py), or the warm router, whose blocked
    # read Redis may serve first, takes it directly.
    warm_id = results[0][0][0]
    cold = next(r for r in routers if warm_id not in own_workers(r))
    messages = [*opening(0), {"role": "user", "content": "one more turn"}]
    reply = chat(cold, messages)
    usage = reply.json()["usage"]
    assert reply.headers["x-auxot-worker"] == warm_id
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0.9 * usage["prompt_tokens"]

    # Its warm worker dies while it runs a turn (nothing sent yet): the turn is re-queued and
    # served by the other worker, once, whichever router received it.
    messages = [*opening(0), {"role": "user", "content": "FAKE:slow_first_token:3"}]
    box: dict[str, http.Response] = {}
    caller = threading.Thread(target=lambda: box.setdefault("r", chat(cold, messages, max_tokens=5)))
    caller.start()
    victim = wait_for(lambda: running_on(workers), 20, "the turn to reach a worker")
    assert victim is not None
    survivor = next(w for w in workers if w is not victim)
    before = survivor.fake_stats()["requests_completed"]
    reaper.kill_worker(victim)
    caller.join(30)
    reply = box["r"]
    assert reply.status == 200, reply.body[:300]
    assert reply.json()["choices"][0]["message"]["content"] == TOKEN * 5
    assert reply.headers["x-auxot-worker"] != warm_id
    assert survivor.fake_stats()["requests_completed"] == before + 1


def own_workers(router: RouterProcess) -> set[str]:
    health = router.health()
    return {w["id"] for w in health.get("worker_list", []) if w.get("instance") == health["instance"]}


def _metric(router: RouterProcess, name: str) -> float:
    text = http.get(f"{router.url}/metrics", headers=router.headers()).body.decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    return sum(values)
