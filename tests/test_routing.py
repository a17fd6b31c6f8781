"""Unit tests of the cache-aware routing policy (auxot_common/routing.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from auxot_common import anthropic_api as anthropic
from auxot_common import protocol as proto
from auxot_common.routing import (
    BLOCK_BYTES,
    BaselinePolicy,
    CacheAwarePolicy,
    PrefixIndex,
    RoutingConfig,
    job_prefix_key,
    make_policy,
    prefix_key,
    prompt_segments,
    session_hint,
)

CAPTURES = Path(__file__).parent / "data" / "client-captures"


@dataclass
class FakeWorker:
    """The fields of the router's WorkerConnection that the policy reads."""

    worker_id: str
    slots: int = 2
    ctx: int = 65536
    running: dict[str, Any] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.slots - len(self.running)

    @property
    def capabilities(self) -> proto.Capabilities:
        return proto.Capabilities(ctx_size=self.ctx, total_slots=self.slots)


def words(seed: str, n_bytes: int) -> str:
    """Distinct text of about ``n_bytes`` bytes."""
    out: list[str] = []
    size = 0
    while size < n_bytes:
        out.append(f"{seed}{len(out)}")
        size += len(out[-1]) + 1
    return " ".join(out)


def conversation(
    seed: str, turns: int, turn_bytes: int = 8000, system: str = "You are helpful."
) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for t in range(turns):
        messages.append({"role": "user", "content": words(f"{seed}u{t}-", turn_bytes)})
        messages.append({"role": "assistant", "content": words(f"{seed}a{t}-", 200)})
    messages.append({"role": "user", "content": f"{seed}: next question"})
    return messages


_ids = iter(range(1_000_000))


def job(messages: list[dict[str, Any]], tools: list[Any] | None = None, session: str = "") -> proto.Job:
    return proto.Job(job_id=f"j{next(_ids)}", messages=messages, tools=tools or [], session=session)


def run(policy: CacheAwarePolicy, j: proto.Job, workers: list[FakeWorker], now: float) -> FakeWorker:
    """Pick, dispatch (the job occupies a slot until completed)."""
    choice = policy.pick(j, workers, now)
    worker: FakeWorker = choice.worker
    assert worker is not None
    policy.on_dispatch(worker, j, now)
    worker.running[j.job_id] = j
    return worker


def finish(policy: CacheAwarePolicy, worker: FakeWorker, j: proto.Job, *, cached: int, prompt_ms: float = 0.0) -> None:
    worker.running.pop(j.job_id)
    tokens = policy.tokens(job_prefix_key(j).total_bytes)
    policy.on_complete(worker.worker_id, j.job_id, input_tokens=tokens, cache_tokens=cached, prompt_ms=prompt_ms)


# --- prefix keys ------------------------------------------------------------------------------


def test_the_next_turn_extends_the_previous_turns_key() -> None:
    turn1 = conversation("c1", 3)
    turn2 = [*turn1, {"role": "assistant", "content": "ok"}, {"role": "user", "content": words("more", 9000)}]
    k1, k2 = job_prefix_key(job(turn1)), job_prefix_key(job(turn2))
    assert len(k1.hashes) >= 10
    assert k2.hashes[: len(k1.hashes)] == k1.hashes
    assert len(k2.hashes) > len(k1.hashes)


def test_long_shared_prefixes_stay_distinguishable() -> None:
    """Two sessions with the same 100 KB of system prompt and tools differ after it (no cap)."""
    system = words("system", 100_000)
    a, b = (
        job_prefix_key(job(conversation("a", 2, system=system))),
        job_prefix_key(job(conversation("b", 2, system=system))),
    )
    shared = sum(1 for x, y in zip(a.hashes, b.hashes, strict=False) if x == y)
    assert shared >= 100_000 // BLOCK_BYTES - 1
    assert a.hashes[-1] != b.hashes[-1]
    assert len(a.hashes) > shared


def test_tools_come_after_the_system_prompt_and_change_what_follows() -> None:
    messages = conversation("t", 2, system=words("sys", 5000))
    tools1 = [{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]
    tools2 = [{"type": "function", "function": {"name": "write", "parameters": {"type": "object"}}}]
    segments = prompt_segments(messages, tools1)
    assert segments[1].startswith(b"[{") and b"read" in segments[1]
    k1, k2 = job_prefix_key(job(messages, tools1)), job_prefix_key(job(messages, tools2))
    assert k1.hashes[:2] == k2.hashes[:2]  # the system prompt's blocks
    assert k1.hashes[-1] != k2.hashes[-1]


def test_completion_prompts_are_keyed_as_text() -> None:
    text = words("p", 10_000)
    j = proto.Job(job_id="x", kind="completion", params={"prompt": text})
    assert job_prefix_key(j) == prefix_key([text.encode()])


def test_session_hints_from_headers_and_body() -> None:
    assert session_hint({"x-claude-code-session-id": "abc"}, {}) == session_hint(
        {"x-claude-code-session-id": "abc"}, {}
    )
    assert session_hint({"session-id": "abc"}, {}) != ""
    assert session_hint({"x-session-id": "s"}, {}) != session_hint({"x-session-id": "t"}, {})
    assert session_hint({}, {"prompt_cache_key": "k"}) != ""
    assert session_hint({}, {"user": "u"}) != session_hint({}, {"prompt_cache_key": "u"})
    assert session_hint({}, {}) == ""
    assert len(session_hint({"x-session-id": "x" * 10_000}, {})) == 16


# --- the index --------------------------------------------------------------------------------


def test_index_evicts_the_tail_of_the_oldest_prompt_first() -> None:
    index = PrefixIndex(capacity=10, ttl_s=100)
    old = [bytes([1, i]) for i in range(6)]
    new = [bytes([2, i]) for i in range(6)]
    index.insert(old, now=1.0)
    index.insert(new, now=2.0)
    assert len(index) == 10
    assert index.match(new, now=3.0) == (6, 2.0)
    assert index.match(old, now=3.0) == (4, 1.0)  # its two deepest blocks went first


def test_index_entries_expire() -> None:
    index = PrefixIndex(capacity=100, ttl_s=10)
    hashes = [b"a", b"b"]
    index.insert(hashes, now=0.0)
    assert index.match(hashes, now=9.0)[0] == 2
    assert index.match(hashes, now=11.0)[0] == 0


def _deepest_held(index: PrefixIndex, hashes: list[bytes], now: float) -> int:
    """The answer by definition: the deepest block of the chain the index holds, fresh."""
    horizon = now - index.ttl_s
    stamps = index._stamps
    held = [i + 1 for i, h in enumerate(hashes) if h in stamps and stamps[h] >= horizon]
    return max(held, default=0)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "insert", "insert", "miss", "wait"]),
            st.lists(st.integers(0, 3), min_size=1, max_size=12),  # a prompt: block contents
        ),
        max_size=40,
    ),
    st.integers(4, 40),
)
def test_index_match_finds_the_deepest_held_block_of_a_long_chain(ops: list[tuple[str, list[int]]], cap: int) -> None:
    """Conversations that share beginnings (a system prompt, earlier turns) and diverge: after
    any inserts, capacity evictions, expiries and miss corrections, ``match`` (a binary search)
    gives what a scan of every block would."""
    index = PrefixIndex(capacity=cap, ttl_s=5.0)
    now = 0.0
    for op, blocks in ops:
        hashes = [bytes(blocks[: i + 1]) for i in range(len(blocks))]  # chained, like prefix_key's
        if op == "insert":
            now += 1.0
            index.insert(hashes, now)
        elif op == "miss":
            _, stamp = index.match(hashes, now)
            index.evict_not_newer_than(stamp)
        else:
            now += 3.0
        assert index.match(hashes, now)[0] == _deepest_held(index, hashes, now)


# --- choosing ---------------------------------------------------------------------------------


def test_a_follow_up_turn_goes_back_to_its_warm_worker_even_if_busier() -> None:
    policy = CacheAwarePolicy()
    workers = [FakeWorker("A"), FakeWorker("B")]
    turn1 = conversation("c", 4)
    j1 = job(turn1)
    first = run(policy, j1, workers, now=1.0)
    finish(policy, first, j1, cached=0)
    other = workers[1] if first is workers[0] else workers[0]
    first.running["someone-else"] = object()  # the warm worker is now busier than the other
    j2 = job([*turn1, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}])
    choice = policy.pick(j2, workers, now=2.0)
    assert choice.worker is first
    assert choice.expected_cached_tokens > 5000
    assert other.free > first.free


def test_six_conversations_over_two_workers_all_come_back() -> None:
    policy = CacheAwarePolicy()
    workers = [FakeWorker("A"), FakeWorker("B")]
    homes: dict[int, FakeWorker] = {}
    firsts = [job(conversation(f"conv{i}", 3)) for i in range(6)]
    for i, j in enumerate(firsts):
        w = run(policy, j, workers, now=float(i))
        finish(policy, w, j, cached=0)
        homes[i] = w
    assert {w.worker_id for w in homes.values()} == {"A", "B"}  # spread while cold
    for i, j in enumerate(firsts):
        j2 = job([*j.messages, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])
        assert policy.pick(j2, workers, now=10.0 + i).worker is homes[i]


def test_short_uncached_prompts_spread_by_load() -> None:
    policy = CacheAwarePolicy()
    workers = [FakeWorker("A", slots=4), FakeWorker("B", slots=4)]
    chosen = [run(policy, job([{"role": "user", "content": f"hi {i}"}]), workers, now=float(i)) for i in range(4)]
    assert sorted(w.worker_id for w in chosen) == ["A", "A", "B", "B"]


def test_shared_short_system_prompt_does_not_pile_jobs_on_one_worker() -> None:
    policy = CacheAwarePolicy()
    workers = [FakeWorker("A", slots=4), FakeWorker("B", slots=4)]
    system = words("shared", 3000)  # one block: ~850 tokens, ~0.17 s of prefill
    chosen = [run(policy, job(conversation(f"s{i}", 0, system=system)), workers, now=float(i)) for i in range(4)]
    assert sorted(w.worker_id for w in chosen) == ["A", "A", "B", "B"]


def test_a_job_waits_a_bounded_time_for_its_busy_warm_worker() -> None:
    config = RoutingConfig(max_hold_s=2.0)
    policy = CacheAwarePolicy(config)
    warm, idle = FakeWorker("A", slots=1), FakeWorker("B", slots=1)
    turn1 = conversation("long", 12, turn_bytes=10_000)  # ~35k tokens: ~7 s of prefill at 0.2 ms
    j1 = job(turn1)
    policy.on_dispatch(warm, j1, now=0.0)  # its prompt processing is long done by t=10
    warm.running["other"] = object()  # full
    j2 = job([*turn1, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}])
    held = policy.pick(j2, [warm, idle], now=11.0)
    assert held.worker is None and held.hold_until == pytest.approx(13.0)
    assert policy.pick(j2, [warm, idle], now=12.5).worker is None
    assert policy.pick(j2, [warm, idle], now=13.0).worker is idle  # waited long enough
    # had the warm worker freed up meanwhile, it would have had the job
    j3 = job([*j2.messages, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}])
    assert policy.pick(j3, [warm, idle], now=14.0).worker is None
    warm.running.clear()
    assert policy.pick(j3, [warm, idle], now=14.5).worker is warm


def test_by_default_a_long_turn_waits_out_a_typical_job_on_its_warm_worker() -> None:
    # A warm worker frees its next slot after about one job (~5 s: prefill + decode). A turn
    # that saves ~7 s of prefill must still be held when that slot frees, not sent cold at 3 s.
    policy = CacheAwarePolicy()
    warm, idle = FakeWorker("A", slots=1), FakeWorker("B", slots=1)
    turn1 = conversation("long", 12, turn_bytes=10_000)  # ~35k tokens: ~7 s of prefill at 0.2 ms
    policy.on_dispatch(warm, job(turn1), now=0.0)
    warm.running["other"] = object()  # full
    j2 = job([*turn1, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}])
    held = policy.pick(j2, [warm, idle], now=11.0)
    assert held.worker is None and 11.0 + 5.5 < held.hold_until <= 11.0 + policy.config.max_hold_s
    assert policy.pick(j2, [warm, idle], now=16.0).worker is None
    warm.running.clear()  # its slot frees after a typical job
    assert policy.pick(j2, [warm, idle], now=16.0).worker is warm


def test_a_hold_never_outlasts_the_prefill_it_saves() -> None:
    policy = CacheAwarePolicy()  # cap 10 s
    warm, idle = FakeWorker("A", slots=1), FakeWorker("B", slots=1)
    turn1 = conversation("mid", 4, turn_bytes=10_000)  # ~12k tokens: ~2.4 s of prefill
    policy.on_dispatch(warm, job(turn1), now=0.0)
    warm.running["other"] = object()
    j2 = job([*turn1, {"role": "user", "content": "b"}])
    held = policy.pick(j2, [warm, idle], now=11.0)
    assert held.worker is None and 11.0 + 1.0 < held.hold_until < 11.0 + 4.0
    assert policy.pick(j2, [warm, idle], now=held.hold_until).worker is idle


def test_no_hold_when_the_saving_is_small() -> None:
    policy = CacheAwarePolicy()
    warm, idle = FakeWorker("A", slots=1), FakeWorker("B", slots=1)
    small = conversation("small", 1, turn_bytes=4000)  # ~1,200 tokens: 0.25 s of prefill
    policy.on_dispatch(warm, job(small), now=0.0)
    warm.running["other"] = object()
    assert policy.pick(job([*small, {"role": "user", "content": "?"}]), [warm, idle], now=1.0).worker is idle


def test_nothing_free_means_no_choice() -> None:
    policy = CacheAwarePolicy()
    full = FakeWorker("A", slots=1, running={"x": object()})
    choice = policy.pick(job(conversation("n", 1)), [full], now=0.0)
    assert choice.worker is None and choice.hold_until == 0.0


def test_measured_prefill_rate_steers_cold_long_prompts() -> None:
    """A GPU that prefills 10x slower over a dozen jobs gets the cold long prompt last."""
    policy = CacheAwarePolicy()
    slow, fast = FakeWorker("slow", slots=4), FakeWorker("fast", slots=4)
    for n in range(12):
        for worker, ms in ((slow, 2000.0), (fast, 200.0)):
            j = job([{"role": "user", "content": words(f"{worker.worker_id}{n}-", 16_000)}])
            policy.on_dispatch(worker, j, now=0.0)
            worker.running[j.job_id] = j
            finish(policy, worker, j, cached=0, prompt_ms=ms)
    assert policy.workers["slow"].ms_per_token > 5 * policy.workers["fast"].ms_per_token
    slow.running.clear()
    fast.running.update({"a": 1, "b": 2})  # the fast one is busier, but a 10k-token prefill dominates
    assert policy.pick(job(conversation("cold", 4)), [slow, fast], now=1.0).worker is fast


def test_a_few_slow_readings_do_not_send_a_warm_conversation_elsewhere() -> None:
    """Two identical workers; B's first prefills were timed while four shared the machine (5x
    slower than A's later ones). B's conversation still goes back to B, which holds its prompt."""
    policy = CacheAwarePolicy()
    a, b = FakeWorker("A", slots=2, ctx=2048), FakeWorker("B", slots=2, ctx=2048)
    openings = [
        [{"role": "system", "content": f"Assistant {i}."}, {"role": "user", "content": words(f"c{i}-", 1300)}]
        for i in range(6)
    ]
    jobs = [job(m) for m in openings]
    for worker, batch, ms in ((b, (0, 1), 900.0), (a, (2, 3), 250.0), (a, (4, 5), 120.0)):
        for i in batch:
            policy.on_dispatch(worker, jobs[i], now=0.0)
            worker.running[jobs[i].job_id] = jobs[i]
        for i in batch:
            finish(policy, worker, jobs[i], cached=0, prompt_ms=ms)
    assert policy.workers["B"].ms_per_token > 4 * policy.workers["A"].ms_per_token
    for i, holder in ((0, b), (1, b), (2, a), (5, a)):
        turn2 = job([*openings[i], {"role": "assistant", "content": "ok"}, {"role": "user", "content": "And?"}])
        assert policy.pick(turn2, [a, b], now=1.0).worker is holder


def test_the_session_hint_breaks_ties() -> None:
    policy = CacheAwarePolicy()
    workers = [FakeWorker("A"), FakeWorker("B")]
    first = run(policy, job([{"role": "user", "content": "short"}], session="s1"), workers, now=0.0)
    first.running.clear()
    again = policy.pick(job([{"role": "user", "content": "different"}], session="s1"), workers, now=1.0)
    assert again.worker is first


# --- ground truth -----------------------------------------------------------------------------


def test_a_miss_evicts_what_the_worker_must_have_lost() -> None:
    policy = CacheAwarePolicy()
    worker = FakeWorker("A", slots=8)
    p0, p1, p2 = (conversation(s, 3) for s in ("p0", "p1", "p2"))
    for t, messages in enumerate((p0, p1, p2)):
        j = job(messages)
        policy.on_dispatch(worker, j, now=float(t))
        worker.running[j.job_id] = j
        finish(policy, worker, j, cached=0)
    follow = job([*p1, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}])
    assert policy.pick(follow, [worker], now=3.0).expected_cached_tokens > 5000
    run(policy, follow, [worker], now=3.0)
    finish(policy, worker, follow, cached=3)  # llama-server had lost p1 (and so older p0)
    assert policy.workers["A"].misses_corrected == 1
    index, now = policy.workers["A"].index, 4.0
    assert index.match(job_prefix_key(job(p0)).hashes, now)[0] == 0
    assert index.match(job_prefix_key(job(p2)).hashes, now)[0] > 0  # sent after p1: kept
    assert index.match(job_prefix_key(follow).hashes, now)[0] > 0  # now really there


def test_hit_ratio_and_reset() -> None:
    policy = CacheAwarePolicy()
    worker = FakeWorker("A")
    messages = conversation("h", 3)
    j1 = run(policy, job(messages), [worker], now=0.0)
    j = next(iter(worker.running.values()))
    finish(policy, j1, j, cached=0)
    j2 = job([*messages, {"role": "user", "content": "x"}])
    run(policy, j2, [worker], now=1.0)
    finish(policy, worker, j2, cached=policy.tokens(job_prefix_key(j2).total_bytes) - 5)
    stats = policy.worker_stats("A")
    assert stats["jobs"] == 2 and stats["hit_ratio"] == 0.5
    policy.on_worker_reset("A")  # llama-server restarted: nothing cached any more
    assert (
        policy.pick(job([*messages, {"role": "user", "content": "y"}]), [worker], now=2.0).expected_cached_tokens == 0
    )
    policy.on_worker_gone("A")
    assert "A" not in policy.workers and policy.worker_stats("A")["jobs"] == 0


def test_baselines_and_modes() -> None:
    workers = [FakeWorker("A"), FakeWorker("B", running={"x": 1})]
    assert BaselinePolicy("least-busy").pick(job([]), workers).worker is workers[0]
    rr = BaselinePolicy("round-robin")
    picks = {rr.pick(job([]), [FakeWorker("A"), FakeWorker("B")]).worker.worker_id for _ in range(2)}
    assert picks == {"A", "B"}
    assert isinstance(make_policy("cache"), CacheAwarePolicy)
    with pytest.raises(ValueError, match="unknown routing mode"):
        make_policy("random")


# --- volatile prefixes: real client captures --------------------------------------------------


def test_claude_codes_next_turn_extends_its_previous_prompt_byte_for_byte() -> None:
    """Claude Code moves ``cache_control`` to the newest message every turn and sends a billing
    header block: neither reaches the worker, so turn 2's prompt starts with all of turn 1's."""
    capture = orjson.loads((CAPTURES / "claude-code-2.1.330-tool-result-turn.json").read_bytes())
    first, second = (r["body"] for r in capture["requests"][:2])
    assert first["messages"] != second["messages"][: len(first["messages"])]  # the raw bodies differ
    streams = []
    for body in (first, second):
        chat = anthropic.translate_request(body, max_output_tokens=32000)
        streams.append(b"".join(prompt_segments(chat.messages, chat.tools)))
    assert len(streams[0]) > 40_000 and streams[1].startswith(streams[0])
    assert b"x-anthropic-billing-header" not in streams[0]
    k1, k2 = prefix_key([streams[0]]), prefix_key([streams[1]])
    assert k2.hashes[: len(k1.hashes)] == k1.hashes
