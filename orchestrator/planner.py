"""``orchestrator plan``: preflight every proxy of an inventory and say what ``run`` would do.

Read-only (proxy-version calls only, under the same rate limit as a run), no job table: an operator can
run it the day before the window to size it and fix the inventory.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.cloud.auth import credentials_from_env
from orchestrator.cloud.client import CloudClient, ProxyRef, make_session
from orchestrator.inventory import Inventory, ProxyEntry
from orchestrator.limiter import SlidingWindowLimiter, parse_rate
from orchestrator.outcomes import HttpFailure, TransportFailure
from orchestrator.preflight import Verdict, judge

_DURATION = re.compile(
    r"(\d+(?:\.\d+)?)(?:\s*(?:-|~|to)\s*(\d+(?:\.\d+)?))?\s*(s|sec|second|min|minute|h|hour)?", re.IGNORECASE
)
_UNIT = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_duration(text: object) -> float | None:
    """``upgrade_duration`` is free text in the API ("about 5 minutes", "2-5 minutes", "300"): the
    first number, or the upper bound of a range, in the unit that follows it (seconds by default)."""
    if isinstance(text, int | float):
        return float(text)
    if not isinstance(text, str):
        return None
    m = _DURATION.search(text)
    if not m:
        return None
    unit = (m.group(3) or "s").lower()
    value = float(m.group(2) or m.group(1))
    return value * _UNIT.get(unit, 1)


@dataclass
class PlanRow:
    entry: ProxyEntry
    verdict: str  # upgrade | skip | flag | unreachable
    reason: str
    current_version: str | None = None
    upgrade_duration_s: float | None = None


@dataclass
class PlanResult:
    rows: list[PlanRow] = field(default_factory=list)
    rate_per_s: float = 1.0

    def count(self, verdict: str) -> int:
        return sum(1 for r in self.rows if r.verdict == verdict)

    @property
    def unreachable(self) -> int:
        return self.count("unreachable")

    def estimate_s(self) -> float:
        """Sending at the rate limit, then the slowest instance's proxies one after another (the cloud
        runs one operation per instance at a time)."""
        todo = [r for r in self.rows if r.verdict == "upgrade"]
        per_instance: dict[str, float] = {}
        for r in todo:
            key = r.entry.instance_id
            per_instance[key] = per_instance.get(key, 0.0) + (r.upgrade_duration_s or 0.0)
        send = len(todo) / self.rate_per_s if self.rate_per_s else 0.0
        return send + max(per_instance.values(), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "summary": {v: self.count(v) for v in ("upgrade", "skip", "flag", "unreachable")}
            | {"estimated_duration_s": round(self.estimate_s(), 1)},
            "proxies": [
                {
                    "project_id": r.entry.project_id,
                    "instance_id": r.entry.instance_id,
                    "proxy_id": r.entry.proxy_id,
                    "verdict": r.verdict,
                    "reason": r.reason,
                    "current_version": r.current_version,
                    "target_version": r.entry.target_version,
                }
                for r in self.rows
            ],
        }


async def make_plan(
    inv: Inventory, *, rate: str, concurrency: int, call_timeout: float, endpoint: str | None
) -> PlanResult:
    r = parse_rate(rate)
    limiter = SlidingWindowLimiter(r)
    result = PlanResult(rate_per_s=r.count / r.period)
    session = make_session()
    try:
        creds = credentials_from_env(
            os.environ, iam_endpoint=os.environ.get("ORCHESTRATOR_IAM_ENDPOINT"), session=session
        )
        client = CloudClient(session, creds, timeout=call_timeout)
        entries = list(inv.entries())
        rows: list[PlanRow | None] = [None] * len(entries)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(entries)):
            queue.put_nowait(i)

        async def work() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                rows[i] = await _one(client, limiter, entries[i], endpoint)

        await asyncio.gather(*(work() for _ in range(min(concurrency, max(1, len(entries))))))
        result.rows = [row for row in rows if row is not None]
        await creds.aclose()
    finally:
        await session.close()
    return result


async def _one(
    client: CloudClient, limiter: SlidingWindowLimiter, e: ProxyEntry, endpoint: str | None
) -> PlanRow:
    ref = ProxyRef(
        e.project_id, e.instance_id, e.proxy_id, endpoint or e.endpoint or "", e.region, e.x_language
    )
    await limiter.acquire()
    info = await client.proxy_version(ref)
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
    t = Table(title="plan: what `run` would do")
    for col in ("proxy", "instance", "current", "target", "would", "why"):
        t.add_column(col, overflow="fold")
    for r in result.rows:
        t.add_row(
            r.entry.name or r.entry.proxy_id,
            r.entry.instance_id,
            r.current_version or "?",
            r.entry.target_version,
            r.verdict,
            r.reason,
        )
    out.print(t)
    est = result.estimate_s()
    out.print(
        f"to upgrade: {result.count('upgrade')}, skip: {result.count('skip')}, flag: {result.count('flag')}, "
        f"unreachable: {result.unreachable}; estimated duration: {math.ceil(est / 60)} min "
        f"(sending at {result.rate_per_s:g}/s, then the busiest instance's upgrades one after another)"
    )
