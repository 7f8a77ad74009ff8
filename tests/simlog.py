"""Reading the simulator's call log: the helpers the integration tests judge a run by.

The simulator (the "gateway") records one entry per call it handled: ``seq``, ``route``, ``proxy_id``,
``received_at``/``answered_at`` (wall-clock seconds), ``http_status``, ``effect`` (upgrade calls:
``"applied"`` when the cloud acted on it), ``workflows`` (the ids the call created), ... These helpers
are the one copy of the questions several test files ask of that log.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

Record = dict[str, Any]
"""One entry of ``Sim.log()``."""

ARRIVAL_JITTER_S = 0.15
"""How late the simulator may stamp a call's ``received_at``, in seconds.

The simulator stamps ``received_at`` when its event loop gets round to the request, not when the
request reached its socket. On a loaded machine (2 CPUs shared by the orchestrator, the simulator and
a database) that loop stalls for 100 ms and more, then stamps every request queued meanwhile at once:
arrivals that the client spread out land in the log compressed, several with the same ``received_at``.
A full-period window over those stamps can then hold ``rate + 1`` or ``rate + 2`` calls although the
client never sent more than ``rate`` in any period (a real failure: 12 calls in 0.937 s at 10/s, with
pairs of identical stamps).

The client's limiter keeps its window on the real send times, with a 50 ms margin, and
``tests/unit/test_limiter.py`` checks that exactly, in virtual time. At the gateway the tests therefore
count over a window shortened by this lag (``gateway_width``): if every stamp lags its send by between
0 and ``ARRIVAL_JITTER_S``, two stamps ``rate`` calls apart are still at least
``period + margin - ARRIVAL_JITTER_S`` apart, so no window of ``period - ARRIVAL_JITTER_S`` holds
``rate + 1`` of them. A limiter that lets a burst through is still caught: ``rate + 1`` calls sent
together land within milliseconds of each other, well inside the shortened window
(``tests/unit/test_simlog.py`` shows both sides). What the shortened window does not see is a limiter
that is steadily a little too fast (by up to about a sixth); that is the unit test's job.

Several processes sharing a run on PostgreSQL are held to the rate by run-wide permits
(``orchestrator/gate.py``), counted over the period plus the same kind of margin on the database's
clock; the same tolerance applies to them.
"""


# ----------------------------------------------------------------------------- sliding windows
def _fullest(times: Sequence[float], width: float) -> tuple[int, int]:
    """``(lo, hi)`` such that ``times[lo:hi]`` is the first fullest window ``(t - width, t]``.

    ``times`` must be sorted. A window of this shape is as full as the fullest half-open window
    ``[x, x + width)`` anywhere, so the count is "the most events within any ``width`` seconds".
    """
    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width!r}")
    best = (0, 0)
    lo = 0
    for hi, t in enumerate(times):
        while times[lo] <= t - width:
            lo += 1
        if hi + 1 - lo > best[1] - best[0]:
            best = (lo, hi + 1)
    return best


def max_in_window(times: Iterable[float], width: float) -> int:
    """The most events in any sliding window ``(t - width, t]`` (the times need not be sorted)."""
    lo, hi = _fullest(sorted(times), width)
    return hi - lo


def gateway_width(period: float) -> float:
    """The window the gateway checks count over: ``period`` less the simulator's stamping lag
    (see ``ARRIVAL_JITTER_S`` for why)."""
    if not period > ARRIVAL_JITTER_S:
        raise ValueError(f"period {period!r} s is not longer than the arrival jitter {ARRIVAL_JITTER_S} s")
    return period - ARRIVAL_JITTER_S


def gateway_worst(times: Iterable[float], period: float) -> int:
    """The most calls the simulator stamped within any ``period`` window, tolerating its stamping lag.

    Compare with the limit (``worst <= rate``). For "the run was not starved" (``worst >= rate * 0.6``)
    use the plain ``max_in_window(times, period)``: a shorter window would only make that lower bound
    stricter, for no reason.
    """
    return max_in_window(times, gateway_width(period))


def busiest_window(log: Iterable[Record], width: float) -> list[tuple[int, str, float]]:
    """``(seq, route, seconds after the first call)`` of the calls in the fullest ``width`` window:
    a failure message that shows what arrived together."""
    recs = sorted(log, key=lambda r: r["received_at"])
    lo, hi = _fullest([r["received_at"] for r in recs], width)
    t0 = recs[0]["received_at"] if recs else 0.0
    return [(r["seq"], r["route"], round(r["received_at"] - t0, 3)) for r in recs[lo:hi]]


# ----------------------------------------------------------------------------- upgrade calls
def upgrade_calls(log: Iterable[Record]) -> list[Record]:
    """The upgrade calls, in the order the simulator received them (``seq``)."""
    return sorted((r for r in log if r["route"] == "upgrade"), key=lambda r: r["seq"])


def upgrades_by_proxy(log: Iterable[Record]) -> dict[str, list[Record]]:
    """Each proxy's upgrade calls, in ``seq`` order."""
    by: dict[str, list[Record]] = defaultdict(list)
    for rec in upgrade_calls(log):
        by[rec["proxy_id"]].append(rec)
    return by


def upgrades_per_proxy(log: Iterable[Record]) -> Counter[str]:
    """How many upgrade calls each proxy got, whatever their answer."""
    return Counter(r["proxy_id"] for r in log if r["route"] == "upgrade")


def applied_per_proxy(log: Iterable[Record]) -> Counter[str]:
    """How many upgrade calls of each proxy the cloud acted on (``effect == "applied"``): "upgraded
    exactly once" is a count of 1 here, whatever was lost or refused around it."""
    return Counter(r["proxy_id"] for r in log if r["route"] == "upgrade" and r["effect"] == "applied")


def sent_after_applied(log: Iterable[Record]) -> dict[str, list[Record]]:
    """Proxies that got any upgrade call after the first one the cloud applied, with all their upgrade
    calls: the orchestrator sent again although the upgrade had happened (even a refused resend counts,
    it shows the orchestrator did not know)."""
    bad: dict[str, list[Record]] = {}
    for proxy, calls in upgrades_by_proxy(log).items():
        first = next((i for i, c in enumerate(calls) if c["effect"] == "applied"), None)
        if first is not None and first + 1 < len(calls):
            bad[proxy] = calls
    return bad


def created_workflow_ids(log: Iterable[Record]) -> set[str]:
    """Every workflow id the cloud created (accepted nodes only; a REJECTed node's id starts nothing)."""
    return {w for r in log if r["route"] == "upgrade" for w in r.get("workflows") or []}
