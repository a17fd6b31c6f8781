"""The fair backlog: jobs waiting for a free slot, served round-robin across keys.

It has the interface of the ``deque`` it replaces (``append``, ``appendleft``, ``popleft``,
``__len__``), so a dispatcher (or a per-model pool) takes it as is. Order:

- within one key, first come first served;
- across keys, stride scheduling: each key has a *pass*, advanced by ``1 / priority`` for each
  job it gets; the next job comes from the waiting key with the lowest pass (ties: the key that
  started waiting first). A key that starts waiting joins at the current virtual time, so a key
  that was idle cannot bank credit, and a key with 500 waiting jobs gets one slot in every
  ``1 + (other keys)`` while others wait: a single job of another key starts within one job of
  the next free slot. Priority 3 gets three slots for each one of a priority-1 key.
- ``appendleft`` (a dispatch that could not happen, put back) makes the item its key's next
  again and refunds its key's pass.

``position(item_id)`` estimates how many jobs start before one (1 = next), for the queue
position a waiting caller is shown.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class _Lane(Generic[T]):
    items: deque[T] = field(default_factory=deque)
    passes: float = 0.0
    stride: float = 1.0
    since: int = 0  # when it last started waiting (tie-break)


class FairBacklog(Generic[T]):
    """Parameters:
    key_of: an item's (key name, priority >= 1).
    id_of: an item's id, for :meth:`position` (optional).
    """

    def __init__(self, key_of: Callable[[T], tuple[str, int]], id_of: Callable[[T], str] | None = None) -> None:
        self._key_of = key_of
        self._id_of = id_of
        self._front: deque[T] = deque()
        self._lanes: dict[str, _Lane[T]] = {}
        self._vtime = 0.0
        self._counter = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[T]:
        """Every waiting item (not in dispatch order)."""
        yield from self._front
        for lane in self._lanes.values():
            yield from lane.items

    def append(self, item: T) -> None:
        key, priority = self._key_of(item)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.stride = 1.0 / max(priority, 1)
        if not lane.items:  # starts waiting: joins now, with no credit from its idle time
            lane.passes = max(lane.passes, self._vtime)
            self._counter += 1
            lane.since = self._counter
        lane.items.append(item)
        self._len += 1

    def appendleft(self, item: T) -> None:
        """Put back an item just taken (a dispatch that could not happen now): it is its key's
        next again and its key's pass is refunded, so the order across keys is what it was. (A
        global "front" would let items put back one by one pile up ahead of every other key.)"""
        key, priority = self._key_of(item)
        lane = self._lanes.get(key)
        if lane is None:  # it was served at the virtual time
            lane = self._lanes[key] = _Lane(passes=self._vtime, stride=1.0 / max(priority, 1))
            self._counter += 1
            lane.since = self._counter
        else:
            lane.passes -= lane.stride
        lane.items.appendleft(item)
        self._len += 1

    def popleft(self) -> T:
        if self._front:
            self._len -= 1
            return self._front.popleft()
        lane_key = self._next_lane()
        if lane_key is None:
            raise IndexError("pop from an empty backlog")
        lane = self._lanes[lane_key]
        item = lane.items.popleft()
        self._vtime = lane.passes
        lane.passes += lane.stride
        self._len -= 1
        if not lane.items and lane.passes <= self._vtime:
            del self._lanes[lane_key]  # would rejoin at the virtual time anyway: nothing to keep
        return item

    def _next_lane(self) -> str | None:
        best: tuple[float, int] | None = None
        found: str | None = None
        for key, lane in self._lanes.items():
            if lane.items:
                rank = (lane.passes, lane.since)
                if best is None or rank < best:
                    best, found = rank, key
        return found

    def remove(self, item_id: str) -> T | None:
        """Take out the waiting item with this id (its caller left), or None if it is not here."""
        if self._id_of is None:
            return None
        for key, lane in self._lanes.items():
            for index, item in enumerate(lane.items):
                if self._id_of(item) == item_id:
                    del lane.items[index]
                    self._len -= 1
                    if not lane.items:
                        del self._lanes[key]
                    return item
        return None

    def position(self, item_id: str) -> int | None:
        """1 if the item is next, n if n-1 jobs start before it; None if it is not here."""
        if self._id_of is None:
            return None
        for index, item in enumerate(self._front):
            if self._id_of(item) == item_id:
                return index + 1
        for key, lane in self._lanes.items():
            for index, item in enumerate(lane.items):
                if self._id_of(item) == item_id:
                    return len(self._front) + self._ahead(key, lane, index) + 1
        return None

    def _ahead(self, key: str, lane: _Lane[T], index: int) -> int:
        target = lane.passes + index * lane.stride
        ahead = index
        for other_key, other in self._lanes.items():
            if other_key == key or not other.items:
                continue
            gap = target - other.passes
            if gap < 0:
                continue
            # items of the other lane with a lower pass (equal: the earlier waiter goes first)
            steps = gap / other.stride
            count = math.floor(steps) + 1 if steps != math.floor(steps) else int(steps) + (other.since < lane.since)
            ahead += min(len(other.items), count)
        return ahead
