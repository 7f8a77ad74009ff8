"""A virtual-time asyncio loop for tests: minutes of timers run in milliseconds.

``VirtualTimeLoop``'s clock (``loop.time``, hence ``asyncio.sleep`` and every ``call_later``) jumps
straight to the next timer instead of waiting, so the limiter, the fake cloud's fleet and the steps share
one consistent fake clock. Sockets still work (a ready socket is served at once, without moving the
clock), but a thread's wait is invisible to the loop: code that waits on a thread (the SQLite writer)
must run inline (``open_store(..., inline=True)``).

Use ``run_virtual(make)`` from a plain (non-async) test: ``make`` is called inside the loop, so objects
that read ``asyncio.get_running_loop().time`` at construction see the virtual clock.
"""

from __future__ import annotations

import asyncio
import math
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _InstantSelector(selectors.DefaultSelector):
    """Never blocks on a timeout: moves the virtual clock forward by it instead (whole nanoseconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.now_ns = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout > 0:
            self.now_ns += math.ceil(timeout * 1e9)
            timeout = 0
        result: list[tuple[selectors.SelectorKey, int]] = super().select(timeout)
        return result


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` starts at 0 and advances only by the timeouts it would wait."""

    def __init__(self) -> None:
        self._instant = _InstantSelector()
        super().__init__(self._instant)

    def time(self) -> float:
        return self._instant.now_ns / 1e9


def run_virtual(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``make()`` to its end on a fresh ``VirtualTimeLoop``; returns its result."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(make())
