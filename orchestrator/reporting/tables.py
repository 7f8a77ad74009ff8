"""Terminal tables (rich) for status, runs, history and flagged (the long report table is in
``report_table.py``).

Every text that comes from outside (run and proxy names, cloud messages, reasons, hints) goes into a
``rich.text.Text`` and never through console markup, so ``[/bold]`` in a cloud message prints as itself.
Ids (proxy, instance, workflow, request) are never wrapped or cut in the middle: their columns do not wrap,
and when the terminal is too narrow they are shortened at the end with an ellipsis, the same way in
every table; csv and json always carry them in full.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator.reporting.text import Zone, human_time, zone_label
from orchestrator.store.reports import (
    STATUS_ORDER,
    FlaggedGroup,
    HistoryEntry,
    RunSummary,
)

ID_WIDTH = 36  # Huawei Cloud ids are 32 hex digits + a 4-character kind suffix, or a 36-character UUID
_PROBLEMS = ("flagged", "failed")


def _t(value: object, style: str = "") -> Text:
    """Outside text, printed literally (no markup, no emoji codes)."""
    return Text("" if value is None else str(value), style=style)


def _id_column(table: Table, header: str, width: int = ID_WIDTH) -> None:
    table.add_column(header, no_wrap=True, overflow="ellipsis", min_width=min(width, 12), max_width=width)


class RunLike(Protocol):
    """Anything with a run's id, name and status (``RunInfo``, the store's ``RunRow``)."""

    @property
    def id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def status(self) -> str: ...


def counts_table(run: RunLike, counts: Mapping[str, int], *, title: str | None = None) -> Table:
    """Jobs of a run by status (statuses in :data:`STATUS_ORDER`, empty ones left out). ``counts`` may be
    keyed by status strings or ``JobStatus`` members; the run's name is printed literally."""
    total = sum(counts.values())
    heading = title if title is not None else f"run {run.id} ({run.name}): {run.status}, {total} proxies"
    t = Table(title=_t(heading))
    t.add_column("status")
    t.add_column("proxies", justify="right")
    seen = {str(k): v for k, v in counts.items()}
    for st in STATUS_ORDER:
        if seen.get(st):
            t.add_row(st, str(seen[st]))
    for st, n in seen.items():  # a status this release does not order yet is still shown
        if st not in STATUS_ORDER and n:
            t.add_row(_t(st), str(n))
    return t


def runs_table(runs: Sequence[RunSummary], *, tz: Zone = None) -> Table:
    """Runs with their times (zone in the header), jobs and jobs needing an operator. Run names are
    printed whole (they are valid RUN arguments): the column never shortens them."""
    label = zone_label(tz)
    longest = max((len(s.run.name) for s in runs), default=4)
    t = Table(title=f"runs (times in {label})")
    t.add_column("id", justify="right", no_wrap=True)
    t.add_column("name", no_wrap=True, min_width=longest)
    t.add_column("status", no_wrap=True)
    t.add_column("created", no_wrap=True)
    t.add_column("finished", no_wrap=True)
    t.add_column("proxies", justify="right")
    t.add_column("flagged/failed", justify="right")
    t.add_column("last stop", overflow="fold")
    for s in runs:
        r = s.run
        t.add_row(
            str(r.id),
            _t(r.name),
            _t(r.status),
            human_time(r.created_at, tz),
            human_time(r.finished_at, tz),
            str(s.jobs),
            str(s.needs_operator),
            _t(r.stop_reason),
        )
    return t


def history_table(entries: Sequence[HistoryEntry], *, tz: Zone = None, title: str | None = None) -> Table:
    """A proxy's or an instance's history: one row per call, workflow and event, oldest first. The proxy
    column appears when the entries span more than one proxy (an instance's history)."""
    label = zone_label(tz)
    many = len({e.proxy_id for e in entries if e.proxy_id}) > 1
    t = Table(title=_t(title) if title else None, box=box.SIMPLE_HEAD, expand=True, pad_edge=False)
    t.add_column(f"at ({label})", no_wrap=True)
    t.add_column("run", overflow="fold", max_width=24)
    if many:
        _id_column(t, "proxy")
    _id_column(t, "what")
    t.add_column("state", no_wrap=True)
    t.add_column("runs / target", no_wrap=True)
    t.add_column("detail / reason", ratio=1, min_width=20, overflow="fold")
    for e in entries:
        versions = Text()
        if e.version_before or e.version_after:
            versions = _t(f"{e.version_before or '?'}\n→ {e.version_after or '?'}")
        what = Text(e.kind)
        if e.kind == "workflow":
            what.append("\n" + (e.ref or "(no id)"))
        elif e.ref:
            what.append(" " + e.ref)
        why = Text(e.detail or "")
        extras = ((e.reason, ""), (e.rule and f"rule: {e.rule}", "dim"), (e.who and f"by {e.who}", "dim"))
        for extra, style in extras:
            if extra:
                why.append(("\n" if why.plain else "") + extra, style)
        cells: list[Any] = [human_time(e.at, tz), _t(f"{e.run_id} {e.run_name}")]
        if many:
            cells.append(_t(e.proxy_id or "(run)"))
        cells += [what, _t(e.state), versions, why]
        t.add_row(*cells)
    return t


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def print_flagged(
    groups: Sequence[FlaggedGroup], console: Console, *, run_id: int, run_name: str, tz: Zone = None
) -> None:
    """What needs an operator in a run, grouped by rule: per group its count, one hint and the retry
    command for the group, then its proxies with their own reasons."""
    if not groups:
        console.print(_t(f"run {run_id} ({run_name}): nothing needs an operator"))
        return
    total = sum(g.count for g in groups)
    console.print(
        _t(
            f"run {run_id} ({run_name}): {_plural(total, 'proxy needs', 'proxies need')} an operator, "
            f"{_plural(len(groups), 'rule', 'rules')}"
        )
    )
    for g in groups:
        head = Text()
        head.append(f"\n{g.count} {g.status}", "bold")
        head.append(f" by rule {g.rule or '(none)'}")
        if g.counts_failure:
            head.append(" (counts toward the failure breaker)", "dim")
        console.print(head)
        if g.hint:
            hint = Text("  hint: " + g.hint)
            if g.other_hints:
                hint.append(f" (and {g.other_hints} other hints in this group: see report)", "dim")
            console.print(hint)
        if g.rule:
            console.print(
                _t(f"  re-queue this group: orchestrator retry {run_id} --rule {g.rule}"), style="dim"
            )
        t = Table(box=box.SIMPLE, show_edge=False, pad_edge=False, expand=True)
        _id_column(t, "proxy")
        _id_column(t, "instance")
        t.add_column("name", max_width=30, overflow="fold")
        t.add_column(f"since ({zone_label(tz)})", no_wrap=True)
        t.add_column("reason", ratio=1, min_width=20, overflow="fold")
        for p in g.proxies:
            t.add_row(
                _t(p.proxy_id), _t(p.instance_id), _t(p.name), human_time(p.updated_at, tz), _t(p.reason)
            )
        console.print(t)
