"""The run-wide gate never lets a call leave under a permit that aged past its freshness budget.

The store here is a stand-in for ``JobStore``'s permit operations (the SQL itself is exercised against
both backends in ``tests/unit/test_store.py`` and by the multi-worker runs); what is tested is the
gate's decisions: a permit taken later than ``FRESH_FRACTION`` of the margin after it was asked for is
released unused and another is asked for; permits that ended ride on the next ask (or the flusher).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from orchestrator.gate import FRESH_FRACTION, RELEASE_EVERY_S, SAFETY_S, SharedGate
from orchestrator.limiter import Rate
from orchestrator.store.permits import CAP_FULL_RETRY_S
from tests.virtual import run_virtual


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class PermitStore:
    """Grants permits with consecutive ids; ``delays`` (seconds of the fake clock) is how long each
    successive request takes to answer."""

    def __init__(self, clock: Clock, delays: list[float]) -> None:
        self.clock = clock
        self.delays = delays
        self.asked: list[int] = []
        self.released: list[int] = []  # marked done: carried by an ask or released on their own
        self.carried: list[list[int]] = []  # what each ask carried
        self._next = 1

    async def try_send_slots(self, run_id: int, **kw: Any) -> tuple[list[int], float]:
        want = int(kw["want"])
        self.asked.append(want)
        self.carried.append(list(kw.get("release", ())))
        self.released.extend(kw.get("release", ()))
        self.clock.t += self.delays.pop(0) if self.delays else 0.001
        ids = list(range(self._next, self._next + want))
        self._next += want
        return ids, 0.0

    async def release_send_slots(self, ids: list[int]) -> None:
        self.released.extend(ids)


def _gate(store: PermitStore, clock: Clock) -> SharedGate:
    return SharedGate(store, 1, "w", Rate(10, 1.0), 8, lease_s=30.0, mono=clock)  # type: ignore[arg-type]


async def test_a_permit_answered_in_time_is_used() -> None:
    clock = Clock()
    store = PermitStore(clock, [0.002])
    gate = _gate(store, clock)
    async with gate.slot():
        pass
    await gate.close()
    assert store.asked == [1]
    assert gate.stale == 0
    assert store.released == [1]


@pytest.mark.parametrize(
    ("delay", "stale"),
    [
        (FRESH_FRACTION * SAFETY_S - 0.001, 0),  # just inside the budget: used
        (FRESH_FRACTION * SAFETY_S + 0.001, 1),  # just past it: released unused, another asked for
        (5.0, 1),  # a stalled process: same
    ],
)
async def test_a_permit_that_aged_past_its_budget_is_released_unused(delay: float, stale: int) -> None:
    clock = Clock()
    store = PermitStore(clock, [delay])
    gate = _gate(store, clock)
    async with gate.slot():
        used = store._next - 1
    await gate.close()
    assert gate.stale == stale
    assert len(store.asked) == 1 + stale
    # the stale permit and the one used are both released (the stale one still counts as a start)
    assert sorted(store.released) == list(range(1, used + 1))


async def test_ended_permits_ride_on_the_next_ask() -> None:
    """A permit that ended is marked done by the next ask, not by a release of its own a commit later;
    only what no ask took is released by the flusher."""
    clock = Clock()
    store = PermitStore(clock, [])
    gate = _gate(store, clock)
    async with gate.slot():
        pass
    async with gate.slot():
        pass
    await gate.close()
    assert store.carried == [[], [1]]
    assert sorted(store.released) == [1, 2]  # 2 by the flusher (close)


async def test_a_failed_ask_leaves_its_ended_permits_for_the_flusher() -> None:
    clock = Clock()

    class Failing(PermitStore):
        async def try_send_slots(self, run_id: int, **kw: Any) -> tuple[list[int], float]:
            if len(self.asked) == 1:
                self.asked.append(0)
                raise RuntimeError("the job table went away")
            return await super().try_send_slots(run_id, **kw)

    store = Failing(clock, [])
    gate = _gate(store, clock)
    async with gate.slot():
        pass
    with pytest.raises(RuntimeError):
        async with gate.slot():
            pass
    # not lost with the failed ask: written by the flusher, without waiting for close()
    for _ in range(50):
        if store.released:
            break
        await asyncio.sleep(RELEASE_EVERY_S)
    assert store.released == [1]
    await gate.close()
    assert store.released == [1]


async def test_close_releases_permits_granted_but_never_used() -> None:
    clock = Clock()
    store = PermitStore(clock, [])
    gate = _gate(store, clock)
    gate._granted.extend([(7, clock.t), (8, clock.t)])  # asked for two senders, one of which left
    await gate.close()
    assert sorted(store.released) == [7, 8]


class CapStore(PermitStore):
    """Refuses every ask with "the cap is reached" (the store's 20 ms answer) until ``refusals`` ran out;
    records the loop time of every ask."""

    def __init__(self, clock: Clock, refusals: int) -> None:
        super().__init__(clock, [])
        self.refusals = refusals
        self.asked_at: list[float] = []

    async def try_send_slots(self, run_id: int, **kw: Any) -> tuple[list[int], float]:
        self.asked_at.append(asyncio.get_running_loop().time())
        if self.refusals > 0:
            self.refusals -= 1
            self.asked.append(int(kw["want"]))
            self.carried.append(list(kw.get("release", ())))
            return [], CAP_FULL_RETRY_S
        return await super().try_send_slots(run_id, **kw)


def test_a_refused_process_asks_once_per_answered_wait_whoever_of_its_senders_waits() -> None:
    """Ten senders of one process wait at the cap: the process asks once, waits the 20 ms it was told,
    asks once again, never once per sender in a burst (each ask is a transaction on the run's lock, and
    a burst's second ask would get the places its first just freed, ahead of the other processes)."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        store = CapStore(Clock(), refusals=2)
        gate = SharedGate(store, 1, "w", Rate(100, 1.0), 10, lease_s=30.0, mono=loop.time)  # type: ignore[arg-type]

        async def sender() -> None:
            async with gate.slot():
                pass

        await asyncio.gather(*(sender() for _ in range(10)))
        await gate.close()
        return store.asked_at

    asked_at = run_virtual(scenario)
    # two refused asks 20 ms apart, then the one granting all ten
    assert len(asked_at) == 3, asked_at
    assert asked_at[1] - asked_at[0] == pytest.approx(CAP_FULL_RETRY_S, abs=1e-6)
    assert asked_at[2] - asked_at[1] == pytest.approx(CAP_FULL_RETRY_S, abs=1e-6)


async def test_an_ask_whose_sender_was_cancelled_serves_the_senders_still_waiting() -> None:
    """A sender cancelled while its ask is in flight: the ask still commits, and what it grants goes to
    the senders still waiting (here one that asked meanwhile); nothing is left held after close()."""
    clock = Clock()
    answer = asyncio.Event()

    class Slow(PermitStore):
        async def try_send_slots(self, run_id: int, **kw: Any) -> tuple[list[int], float]:
            await answer.wait()
            return await super().try_send_slots(run_id, **kw)

    store = Slow(clock, [])
    gate = _gate(store, clock)
    used: list[str] = []

    async def send(tag: str) -> None:
        async with gate.slot():
            used.append(tag)

    first = asyncio.create_task(send("first"))
    second = asyncio.create_task(send("second"))
    for _ in range(3):
        await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    answer.set()
    await second
    assert used == ["second"]
    assert store.asked == [1, 1]  # the second sender asked too while the first ask was still out
    # the cancelled sender's ask handed its permit to the sender still waiting: one of the two permits
    # served the call, the other waits in stock for the next sender (released by close() here)
    assert len(gate._granted) == 1
    await gate.close()
    assert gate.stale == 0
    assert sorted(store.released) == [1, 2]  # the one used, and the one never used
