"""The fair backlog: round-robin across keys weighted by priority, FIFO within a key, deque
interface, queue positions."""

from __future__ import annotations

from auxot_common.fairness import FairBacklog

Item = tuple[str, int, str]  # (key, priority, id)


def backlog() -> FairBacklog[Item]:
    return FairBacklog(key_of=lambda i: (i[0], i[1]), id_of=lambda i: i[2])


def drain(b: FairBacklog[Item]) -> list[str]:
    out = []
    while b:
        out.append(b.popleft()[2])
    return out


def test_one_key_is_fifo_like_a_deque() -> None:
    b = backlog()
    for i in range(5):
        b.append(("a", 1, f"a{i}"))
    assert len(b) == 5
    assert drain(b) == ["a0", "a1", "a2", "a3", "a4"]


def test_a_single_job_of_another_key_is_next_behind_a_burst() -> None:
    b = backlog()
    for i in range(100):
        b.append(("a", 1, f"a{i}"))
    assert b.popleft()[2] == "a0"  # one already started
    b.append(("b", 1, "b0"))
    assert b.position("b0") == 1
    assert b.popleft()[2] == "b0"


def test_round_robin_across_keys_and_weights() -> None:
    b = backlog()
    for i in range(6):
        b.append(("a", 1, f"a{i}"))
        b.append(("b", 1, f"b{i}"))
    order = drain(b)
    assert order[:6] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    b = backlog()
    for i in range(8):
        b.append(("hi", 3, f"h{i}"))
        b.append(("lo", 1, f"l{i}"))
    order = drain(b)[:8]
    assert sum(x.startswith("h") for x in order) == 6  # three for each one of the priority-1 key


def test_an_idle_key_banks_no_credit() -> None:
    b = backlog()
    for i in range(10):
        b.append(("a", 1, f"a{i}"))
    for _ in range(5):
        b.popleft()
    for i in range(3):  # b arrives late with 3 jobs: it alternates, it does not take all three first
        b.append(("b", 1, f"b{i}"))
    assert drain(b)[:4] in (["b0", "a5", "b1", "a6"], ["a5", "b0", "a6", "b1"])


def test_a_closed_loop_caller_cannot_jump_twice() -> None:
    b = backlog()
    for i in range(10):
        b.append(("a", 1, f"a{i}"))
    b.append(("b", 1, "b0"))
    order = [b.popleft()[2], b.popleft()[2]]
    assert "b0" in order
    b.append(("b", 1, "b1"))  # b resubmits at once
    assert b.popleft()[2].startswith("a")


def test_appendleft_puts_an_item_back_first() -> None:
    b = backlog()
    b.append(("a", 1, "a0"))
    b.append(("b", 1, "b0"))
    first = b.popleft()
    b.appendleft(first)
    assert len(b) == 2 and b.popleft() == first
    assert b.position("zz") is None


def test_positions_follow_the_dispatch_order() -> None:
    b = backlog()
    for i in range(4):
        b.append(("a", 1, f"a{i}"))
    for i in range(2):
        b.append(("b", 2, f"b{i}"))
    b.append(("c", 1, "c0"))
    expected = {}
    probe = backlog()
    for item in list(b):
        probe.append(item)
    for index, item_id in enumerate(drain(probe), start=1):
        expected[item_id] = index
    assert {i: b.position(i) for i in expected} == expected


def test_items_put_back_one_by_one_do_not_jump_ahead_of_other_keys() -> None:
    """A dispatcher that takes each new job and puts it back (no slot free) must not build a
    private queue ahead of every other key: B's one job is still next after A's first."""
    backlog: FairBacklog[tuple[str, str]] = FairBacklog(key_of=lambda e: (e[0], 1), id_of=lambda e: e[1])
    for i in range(10):
        backlog.append(("A", f"a{i}"))
        backlog.appendleft(backlog.popleft())
    backlog.append(("B", "b0"))
    assert [backlog.popleft()[1] for _ in range(3)] == ["a0", "b0", "a1"]


def test_a_waiting_item_can_be_taken_out_by_id() -> None:
    backlog: FairBacklog[tuple[str, str]] = FairBacklog(key_of=lambda e: (e[0], 1), id_of=lambda e: e[1])
    for item in (("A", "a0"), ("A", "a1"), ("B", "b0")):
        backlog.append(item)
    assert backlog.remove("a1") == ("A", "a1") and backlog.remove("nope") is None
    assert backlog.remove("b0") == ("B", "b0")
    assert len(backlog) == 1 and backlog.popleft() == ("A", "a0") and not backlog
