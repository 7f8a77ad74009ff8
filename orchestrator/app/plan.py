"""``orchestrator plan``: preflight every proxy of an inventory and say what ``run`` would do, and how long.

Read-only (proxy-version calls only, under the same rate limit and credentials as a run), no job table
written: an operator runs it the day before the window to size it and fix the inventory. It takes every
option ``run`` takes, so the estimate uses the rate, concurrency, per-instance guard and window the run
will use. A refused credential stops it at the first call (exit 2), as it stops a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator.app.runs import load_inventory_checked, options_for_inventory
from orchestrator.app.runtime import build_cloud
from orchestrator.cloud.api import CloudApi, ProxyRef
from orchestrator.errors import EXIT_OK, EXIT_PROBLEMS, UsageError
from orchestrator.inventory import ProxyEntry
from orchestrator.limiter import SlidingWindowLimiter, parse_rate
from orchestrator.options import RunOptions, build_options
from orchestrator.outcomes import HttpFailure, TransportFailure, TransportKind
from orchestrator.preflight import Verdict, judge

DEFAULT_UPGRADE_S = 300.0  # when the cloud gives no upgrade_duration: a proxy upgrade takes minutes
_DURATION = re.compile(
    r"(\d+(?:\.\d+)?)(?:\s*(?:-|~|to)\s*(\d+(?:\.\d+)?))?\s*(s|sec|second|min|minute|h|hour)?", re.IGNORECASE
)
_UNIT = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_duration(text: object) -> float | None:
    """``upgrade_duration`` is free text in the API ("about 5 minutes", "2-5 minutes", "300"): the first
    number, or the upper bound of a range, in the unit that follows it (seconds by default)."""
    if isinstance(text, int | float):
        return float(text)
    if not isinstance(text, str):
        return None
    m = _DURATION.search(text)
    if not m:
        return None
    unit = (m.group(3) or "s").lower()
    return float(m.group(2) or m.group(1)) * _UNIT.get(unit, 1)


@dataclass
class PlanRow:
    """One inventory proxy as plan judged it: ``verdict`` upgrade, skip, flag or unreachable (its version
    could not be read), ``reason`` one line, the version it runs, and the cloud's ``upgrade_duration``
    in seconds when it gave one (``parse_duration``)."""

    entry: ProxyEntry
    verdict: str  # upgrade | skip | flag | unreachable
    reason: str
    current_version: str | None = None
    upgrade_duration_s: float | None = None


@dataclass
class PlanResult:
    """Every judged proxy in inventory order, and the options the estimate assumes."""

    rows: list[PlanRow] = field(default_factory=list)
    options: RunOptions = field(default_factory=RunOptions)

    def count(self, verdict: str) -> int:
        """How many proxies got ``verdict``."""
        return sum(1 for r in self.rows if r.verdict == verdict)

    @property
    def unreachable(self) -> int:
        """How many proxies' versions could not be read."""
        return self.count("unreachable")

    def estimate_s(self) -> float:
        """How long the upgrades take: the slowest of sending at the rate limit, the concurrency cap over
        the upgrade durations, and each instance's proxies ``per_instance`` at a time (the availability
        guard counts a proxy from its call until its workflow ends)."""
        return estimate(
            [
                (r.entry.instance_id, r.upgrade_duration_s or DEFAULT_UPGRADE_S)
                for r in self.rows
                if r.verdict == "upgrade"
            ],
            rate_per_s=_per_s(self.options.rate),
            concurrency=self.options.concurrency,
            per_instance=self.options.per_instance,
        )

    def window_note(self) -> str | None:
        """One line on whether the estimate fits one occurrence of ``--window`` (the current or next one
        on this host's clock, its length minus the cutoff), or None without a window."""
        window = self.options.window_spec()
        if window is None:
            return None
        interval = window.current_or_next(datetime.now(UTC))
        if interval is None:
            return "the window is over: no later occurrence"
        usable = (interval.end - interval.start - self.options.cutoff_delta()).total_seconds()
        need = self.estimate_s()
        if usable <= 0:
            return "the window leaves no time to start upgrades after the cutoff"
        if need <= usable:
            return f"fits the window ({_mins(need)} of {_mins(usable)} usable before the cutoff)"
        return (
            f"does NOT fit one window: {_mins(need)} needed, {_mins(usable)} usable before the cutoff; "
            f"about {math.ceil(need / usable)} windows"
        )

    def as_dict(self) -> dict[str, Any]:
        """The ``--format json`` document: ``summary`` (counts by verdict, ``estimated_duration_s``, the
        window note) and ``proxies`` (one object per judged proxy)."""
        return {
            "summary": {v: self.count(v) for v in ("upgrade", "skip", "flag", "unreachable")}
            | {"estimated_duration_s": round(self.estimate_s(), 1), "window": self.window_note()},
            "proxies": [
                {
                    "project_id": r.entry.project_id,
                    "instance_id": r.entry.instance_id,
                    "proxy_id": r.entry.proxy_id,
                    "verdict": r.verdict,
                    "reason": r.reason,
                    "current_version": r.current_version,
                    "target_version": r.entry.target_version,
                    "upgrade_duration_s": r.upgrade_duration_s,
                }
                for r in self.rows
            ],
        }


def estimate(
    upgrades: list[tuple[str, float]], *, rate_per_s: float, concurrency: int, per_instance: int
) -> float:
    """Pure: the makespan of ``upgrades`` ((instance, seconds) each) when starts are spaced by the rate,
    at most ``concurrency`` run at once and at most ``per_instance`` per instance. Each start takes the
    first upgrade in order whose instance has room, as the claim does (it skips a busy instance's
    siblings): an instance with many proxies never holds back the instances listed after it."""
    import heapq
    from collections import deque

    if not upgrades:
        return 0.0
    spacing = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
    waiting: dict[str, deque[tuple[int, float]]] = {}
    for i, (instance, dur) in enumerate(upgrades):
        waiting.setdefault(instance, deque()).append((i, dur))
    ready = [(q[0][0], instance) for instance, q in waiting.items()]  # instances with room, by next index
    heapq.heapify(ready)
    running: list[tuple[float, str]] = []  # (end, instance) of upgrades under way
    active: dict[str, int] = dict.fromkeys(waiting, 0)
    t = end = 0.0
    while ready or running:
        while running and running[0][0] <= t:
            _, instance = heapq.heappop(running)
            active[instance] -= 1
            if waiting[instance] and active[instance] == per_instance - 1:
                heapq.heappush(ready, (waiting[instance][0][0], instance))
        if ready and len(running) < concurrency:
            _, instance = heapq.heappop(ready)
            _, dur = waiting[instance].popleft()
            active[instance] += 1
            heapq.heappush(running, (t + dur, instance))
            end = max(end, t + dur)
            if waiting[instance] and active[instance] < per_instance:
                heapq.heappush(ready, (waiting[instance][0][0], instance))
            t += spacing
        elif running:
            t = max(t, running[0][0])
    return end


async def make_plan(inv: Any, options: RunOptions, cloud: CloudApi) -> PlanResult:
    """Read every proxy's version under the run's rate limit and judge it. Raises ``UsageError`` at the
    first refused credential (401/403) or certificate failure: no more calls are sent."""
    rate = parse_rate(options.rate)
    limiter = SlidingWindowLimiter(rate)
    result = PlanResult(options=options)
    entries = list(inv.entries())
    rows: list[PlanRow | None] = [None] * len(entries)
    refused: list[str] = []

    async def one(i: int) -> None:
        start = await limiter.acquire()
        if refused:
            return
        e = entries[i]
        ref = ProxyRef(
            e.project_id,
            e.instance_id,
            e.proxy_id,
            options.endpoint_override or e.endpoint or "",
            e.region,
            e.x_language,
        )
        info = await cloud.proxy_version(ref, on_sent=start.sent)
        if isinstance(info, HttpFailure) and info.http_status in (401, 403):
            what = "refused the credentials" if info.http_status == 401 else "denied permission"
            refused.append(
                f"the cloud {what} "
                f"({info.error_code or info.http_status}: {info.error_msg or 'no message'}); "
                "plan stopped at the first refusal (a key locks after five bad signatures)"
            )
            return
        if isinstance(info, TransportFailure) and info.kind is TransportKind.TLS:
            refused.append(f"TLS: {info.detail}")
            return
        rows[i] = _row(e, info)

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(1, len(entries)):
        queue.put_nowait(i)

    async def worker() -> None:
        while not refused:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one(i)

    if entries:
        await one(0)  # the first call alone: a refused credential costs one call, not `concurrency`
        await asyncio.gather(*(worker() for _ in range(min(options.concurrency, len(entries)))))
    if refused:
        raise UsageError(refused[0])
    result.rows = [row for row in rows if row is not None]
    return result


def _row(e: ProxyEntry, info: Any) -> PlanRow:
    if isinstance(info, HttpFailure):
        return PlanRow(
            e, "unreachable", f"HTTP {info.http_status} {info.error_code or ''}: {info.error_msg or ''}"
        )
    if isinstance(info, TransportFailure):
        return PlanRow(e, "unreachable", f"{info.kind.value}: {info.detail}")
    j = judge(info, source_version=e.source_version, target_version=e.target_version)
    verdict = {Verdict.UPGRADE: "upgrade", Verdict.SKIP: "skip", Verdict.FLAG: "flag"}[j.verdict]
    dur = parse_duration((info.risk or {}).get("upgrade_duration"))
    reason = j.reason if j.verdict is not Verdict.UPGRADE else f"{info.current_version} -> {e.target_version}"
    return PlanRow(e, verdict, reason, info.current_version, dur)


def render_plan(result: PlanResult, out: Console) -> None:
    """Print the plan as a table, then the counts with the estimate and what it assumes, then the window
    note."""
    t = Table(title="plan: what `run` would do")
    for col in ("proxy", "instance", "current", "target", "would", "why"):
        t.add_column(col, overflow="fold")
    for r in result.rows:
        t.add_row(
            *(
                Text(str(v))
                for v in (
                    r.entry.name or r.entry.proxy_id,
                    r.entry.instance_id,
                    r.current_version or "?",
                    r.entry.target_version,
                    r.verdict,
                    r.reason,
                )
            )
        )
    out.print(t)
    est = result.estimate_s()
    o = result.options
    out.print(
        Text(
            f"to upgrade: {result.count('upgrade')}, skip: {result.count('skip')}, "
            f"flag: {result.count('flag')}, "
            f"unreachable: {result.unreachable}; estimated duration: {_mins(est)} (rate {o.rate}, "
            f"concurrency {o.concurrency}, at most {o.per_instance} proxies of an instance at once, "
            "each upgrade as long as the cloud's upgrade_duration)"
        )
    )
    note = result.window_note()
    if note:
        out.print(Text(f"window {o.window}: {note}"))


async def plan_inventory(
    inventory: str,
    *,
    kw: Mapping[str, Any],
    policy_file: str | None,
    fmt: str,
    out: Console,
    cloud: CloudApi | None = None,
) -> int:
    """``orchestrator plan INVENTORY``: the options as ``run`` builds them, the inventory validated, every
    proxy's version read (``cloud``: the HTTP client on the environment's credentials when None), the
    plan printed (``fmt`` ``json`` or a table). Returns 0, or 1 when some version could not be read.
    Raises ``UsageError`` for bad options, half-configured or refused credentials, or a certificate that
    fails verification, and ``InputErrors`` for a bad inventory."""
    try:
        base = build_options(RunOptions(), kw)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    inv = load_inventory_checked(inventory, base.endpoint_override)
    options = options_for_inventory(base, kw, inv, policy_file)
    closer = None
    if cloud is None:
        built = await build_cloud(options)
        cloud, closer = built.api, built.close
    try:
        result = await make_plan(inv, options, cloud)
    finally:
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()
    if fmt == "json":
        import json

        out.print_json(json.dumps(result.as_dict()))
    else:
        render_plan(result, out)
    return EXIT_OK if not result.unreachable else EXIT_PROBLEMS


def _per_s(rate: str) -> float:
    r = parse_rate(rate)
    return r.count / r.period


def _mins(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{math.ceil(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
