"""End to end: cache-aware routing with the real llama-server (tiny model) and the fake one."""

from __future__ import annotations

import concurrent.futures
from typing import Any

from tests.conftest import Cluster
from tests.support import http
from tests.support.procs import RouterProcess


def chat(router: RouterProcess, messages: list[dict[str, Any]], **extra: Any) -> http.Response:
    body = {"model": "m", "messages": messages, "max_tokens": 4, "temperature": 0, **extra}
    return http.post(f"{router.url}/api/openai/v1/chat/completions", body, headers=router.headers(), timeout=120)


def opening(i: int) -> list[dict[str, Any]]:
    """A conversation's first turn: ~1,200 bytes of text its own from the first byte."""
    topic = f"Conversation {i}: " + " ".join(f"item{i}x{j} is number {j * 7 + i}." for j in range(60))
    return [{"role": "system", "content": f"Assistant number {i}."}, {"role": "user", "content": topic}]


def test_second_turns_reuse_the_prompt_on_the_worker_that_holds_it(cluster: Cluster) -> None:
    """Two workers x 2 slots, six conversations: each second turn goes back to the worker of its
    first and llama-server serves >= 90% of its prompt from cache (slot or host-RAM cache)."""
    router = cluster.router(AUXOT_CTX_SIZE="2048", AUXOT_MAX_PARALLEL="2")
    cluster.worker(router, name="worker-a")
    cluster.worker(router, name="worker-b")
    router.wait_workers(2, free=4)

    firsts = [opening(i) for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        first_answers = list(pool.map(lambda m: chat(router, m), firsts))
    assert all(r.status == 200 for r in first_answers), [r.body[:200] for r in first_answers]
    served_by = [r.headers["x-auxot-worker"] for r in first_answers]
    assert len(set(served_by)) == 2  # the six spread over both workers

    for i in reversed(range(6)):
        reply = first_answers[i].json()["choices"][0]["message"]
        turn2 = [*firsts[i], {"role": "assistant", "content": reply["content"]}, {"role": "user", "content": "And?"}]
        second = chat(router, turn2)
        assert second.status == 200, second.body[:300]
        usage = second.json()["usage"]
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert cached >= 0.9 * usage["prompt_tokens"], (i, usage)
        assert second.headers["x-auxot-worker"] == served_by[i]
        assert second.headers["x-auxot-cached-tokens"] == str(cached)

    workers = router.health()["worker_list"]
    assert sorted(w["cache"]["jobs"] for w in workers) and sum(w["cache"]["jobs"] for w in workers) == 12
    assert all(w["cache"]["hit_ratio"] >= 0.5 for w in workers)  # every second turn was a hit


def test_streaming_names_the_worker_and_reports_cached_tokens_in_usage(fake_cluster: Cluster) -> None:
    router = fake_cluster.router(AUXOT_CTX_SIZE="8192", AUXOT_MAX_PARALLEL="2")
    fake_cluster.worker(router, name="worker-a")
    fake_cluster.worker(router, name="worker-b")
    router.wait_workers(2, free=4)
    first = chat(router, opening(1))
    reply = first.json()["choices"][0]["message"]["content"]
    turn2 = [*opening(1), {"role": "assistant", "content": reply}, {"role": "user", "content": "And?"}]
    streamed = chat(router, turn2, stream=True, stream_options={"include_usage": True})
    assert streamed.status == 200
    assert streamed.headers["x-auxot-worker"] == first.headers["x-auxot-worker"]
    assert "x-auxot-cached-tokens" not in streamed.headers  # known only at the end: in the usage
    usage_events = [e for e in streamed.body.split(b"\n") if b'"usage"' in e and b"cached_tokens" in e]
    assert usage_events and b'"cached_tokens":0' not in usage_events[-1]
