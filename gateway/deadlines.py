"""Deadlines for many waiting futures on one loop timer.

Every proxied request waits for its upstream's response headers under a deadline.
``asyncio.timeout`` costs, per wait, a timeout object, two coroutines, a loop timer (under
uvloop a libuv handle made, started, stopped and freed) and the task's cancel/uncancel
bookkeeping; on Python 3.11 also three ``getpid()`` system calls (every ``get_running_loop()``
checks the loop's pid: CPython 3.11 ``Modules/_asynciomodule.c``). Here a wait is one heap push:
the future the waiter awaits is failed with ``TimeoutError`` at its deadline by a single timer
armed for the earliest one, and futures that completed in time are dropped from the heap lazily.
The timer fires at the deadline (``loop.call_at``, as asyncio's), not at some later sweep.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any

# Futures done in time stay in the heap until they reach its top (the usual case: waits end
# roughly in the order they began) or until the heap outgrows this, when it is rebuilt without
# them; the bound then doubles over what is still waiting, so the rebuilds cost O(1) per wait.
_COMPACT_FLOOR = 256


class Deadlines:
    """Fails futures with ``TimeoutError`` when their deadlines (loop time) pass."""

    __slots__ = ("_armed_at", "_compact_at", "_heap", "_loop", "_seq", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, asyncio.Future[Any]]] = []
        self._seq = itertools.count().__next__  # ties broken by arrival, never by future
        self._compact_at = _COMPACT_FLOOR
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def __len__(self) -> int:
        """Entries held: futures still waiting, and done ones not yet dropped."""
        return len(self._heap)

    def add(self, future: asyncio.Future[Any], when: float) -> None:
        """Fail ``future`` with TimeoutError at loop time ``when`` unless it is done by then."""
        heap = self._heap
        while heap and heap[0][2].done():
            heapq.heappop(heap)
        if len(heap) >= self._compact_at:
            heap[:] = [entry for entry in heap if not entry[2].done()]
            heapq.heapify(heap)
            self._compact_at = max(_COMPACT_FLOOR, 2 * len(heap))
        heapq.heappush(heap, (when, self._seq(), future))
        if self._timer is None or when < self._armed_at:
            if self._timer is not None:
                self._timer.cancel()
            self._armed_at = when
            self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        heap = self._heap
        now = self._loop.time()
        while heap:
            when, _, future = heap[0]
            if future.done():
                heapq.heappop(heap)
            elif when > now:
                self._armed_at = when
                self._timer = self._loop.call_at(when, self._fire)
                return
            else:
                heapq.heappop(heap)
                future.set_exception(TimeoutError("the deadline passed"))
