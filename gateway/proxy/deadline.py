"""``asyncio.timeout(delay)`` for a loop known in advance: the same semantics, fewer calls.

On Python 3.11 every ``asyncio.get_running_loop()`` (and ``current_task()`` without a loop) is a
``getpid()`` system call: the C accelerator checks the loop's pid each time (CPython 3.11
``Modules/_asynciomodule.c``, dropped in 3.12). ``asyncio.timeout`` makes three such calls on the
way in, on every proxied request's first-byte wait. This does what CPython 3.11's
``asyncio.timeouts.Timeout`` does, with the loop given:

- on expiry the task is cancelled; on the way out, if that cancellation is the one ending the
  block (``uncancel()`` back to the count found on entry) it becomes ``TimeoutError``;
- any other cancellation (the client went away) stays a ``CancelledError``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    """``async with Deadline(loop, delay):`` raises TimeoutError if the block outlasts ``delay``."""

    __slots__ = ("_cancelling", "_delay", "_expired", "_handle", "_loop", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self._delay = delay
        self._expired = False
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task(self._loop)  # the loop given: no getpid()
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._handle = self._loop.call_later(self._delay, self._expire)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def _expire(self) -> None:
        self._handle = None
        self._expired = True
        assert self._task is not None
        self._task.cancel()
