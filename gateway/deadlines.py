"""Deadlines for many waiting futures on one loop timer.

Every proxied request waits for its upstream's response headers under a deadline.
``asyncio.timeout`` costs, per wait, a timeout object, two coroutines, a loop timer (under
uvloop a libuv handle made, started, stopped and freed) and the task's cancel/uncancel
bookkeeping; on Python 3.11 also three ``getpid()`` system calls (every ``get_running_loop()``
checks the loop's pid: CPython 3.11 ``Modules/_asynciomodule.c``). Here a wait is one heap push:
the future the waiter awaits is failed with ``TimeoutError`` at its deadline by a single timer
armed for the earliest one, and futures that completed in time are dropped from the heap lazily.
The timer fires at the deadline (``loop.call_at``, as asyncio's), not at some later sweep.

A waiter hands its entry back (``forget``) once it has the future's outcome: an entry can sit in
the heap long after that (behind a wait still running, up to its first-byte time), and a done
future holds its outcome, a response's parser and body reader, or an exception whose traceback
holds the request's frames: its body (up to ``max_body``) and headers.
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
        # [when, seq, future]; the future is None once its waiter has forgotten it
        self._heap: list[list[Any]] = []
        self._seq = itertools.count().__next__  # ties broken by arrival, never by future
        self._compact_at = _COMPACT_FLOOR
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def __len__(self) -> int:
        """Entries held: futures still waiting, and done ones not yet dropped."""
        return len(self._heap)

    def add(self, future: asyncio.Future[Any], when: float) -> list[Any]:
        """Fail ``future`` with TimeoutError at loop time ``when`` unless it is done by then.

        Returns its entry, for ``forget`` once the future's outcome is taken.
        """
        heap = self._heap
        while heap and _over(heap[0]):
            heapq.heappop(heap)
        if len(heap) >= self._compact_at:
            heap[:] = [entry for entry in heap if not _over(entry)]
            heapq.heapify(heap)
            self._compact_at = max(_COMPACT_FLOOR, 2 * len(heap))
        entry = [when, self._seq(), future]
        heapq.heappush(heap, entry)
        if self._timer is None or when < self._armed_at:
            if self._timer is not None:
                self._timer.cancel()
            self._armed_at = when
            self._timer = self._loop.call_at(when, self._fire)
        return entry

    @staticmethod
    def forget(entry: list[Any]) -> None:
        """The entry's future is done with: the heap no longer holds it (nor what it holds)."""
        entry[2] = None

    def _fire(self) -> None:
        self._timer = None
        heap = self._heap
        # What the timer was armed for is due when it fires, whatever loop.time() reads: uvloop's
        # clock counts whole milliseconds and its timers round, so it may read a little before.
        # Re-arming for that remainder would spin the loop until the next tick.
        now = max(self._loop.time(), self._armed_at)
        while heap:
            when, _, future = heap[0]
            if future is None or future.done():
                heapq.heappop(heap)
            elif when > now:
                self._armed_at = when
                self._timer = self._loop.call_at(when, self._fire)
                return
            else:
                heapq.heappop(heap)
                future.set_exception(TimeoutError("the deadline passed"))


def _over(entry: list[Any]) -> bool:
    future = entry[2]
    return future is None or bool(future.done())
