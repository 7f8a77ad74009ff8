"""Operator actions on a run: ``retry`` re-queues chosen flagged/failed jobs (each one an event with who did
it); ``resume --ack`` acknowledges the failure breaker (in ``runs``)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from orchestrator.app.common import find_run, opened, show_time, zone
from orchestrator.errors import UsageError
from orchestrator.states import JobStatus
from orchestrator.store import UnknownProxies


async def requeue(
    run_ref: str,
    *,
    db: str | None,
    want_flagged: bool,
    want_failed: bool,
    proxies: Sequence[str],
    rules: Sequence[str],
    tz: str | None,
    out: Console,
) -> None:
    """Move chosen flagged/failed jobs of a run back to pending (history kept); ``resume`` sends them.
    Unknown ``--proxy`` ids are refused before anything changes; a proxy whose workflow was last seen
    running is said so (with when): ``resume`` looks at that workflow first and sends nothing to the proxy
    while it runs."""
    zone_ = zone(tz)
    statuses = []
    if want_flagged or not want_failed:
        statuses.append(JobStatus.FLAGGED)
    if want_failed or not want_flagged:
        statuses.append(JobStatus.FAILED)
    async with opened(db, create=False) as store:
        run = await find_run(store, run_ref)
        try:
            result = await store.requeue(
                run.id, statuses=statuses, proxy_ids=list(proxies), rules=list(rules)
            )
        except UnknownProxies as exc:
            raise UsageError(str(exc)) from None
        for proxy, workflow, status, seen in result.running:
            out.print(
                Text(
                    f"proxy {proxy}: its workflow {workflow} was {status} when last checked "
                    f"({show_time(seen, zone_)}): nothing is sent to it while that workflow runs "
                    "(resume looks at it first)"
                )
            )
        if result.moved:
            out.print(
                Text(
                    f"re-queued {result.moved} jobs of run {run.id}; "
                    f"send them with: orchestrator resume {run.id}"
                )
            )
        else:
            out.print(Text(f"nothing re-queued in run {run.id}"))
