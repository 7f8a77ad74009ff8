"""Terminal tables for status, runs, flagged (rich) and history (fixed-width text, as the long report
table in ``report_table.py``: rich squeezes a wrapping column to nothing on a narrow console).

Every text that comes from outside (run and proxy names, cloud messages, reasons, hints) goes into a
``rich.text.Text`` and never through console markup, so ``[/bold]`` in a cloud message prints as itself.
Ids (proxy, instance, workflow, request) are never wrapped or cut in the middle: their columns do not wrap,
and when the terminal is too narrow they are shortened at the end with an ellipsis, the same way in
every table; csv and json always carry them in full.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, TextIO, TypeVar, cast

from rich import box
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from orchestrator.reporting.plain import Clipped, Column, PlainTable, printable
from orchestrator.reporting.text import Zone, human_time, zone_label
from orchestrator.states import STATUS_ORDER

if TYPE_CHECKING:  # the report queries' module: the end-of-run counts table does not need it
    from orchestrator.store.reports import FlaggedGroup, HistoryEntry, RunSummary

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
    def id(self) -> int:
        """The run's id."""
        ...

    @property
    def name(self) -> str:
        """The run's name, printed literally."""
        ...

    @property
    def status(self) -> str:
        """The run's status value (``RunStatus``)."""
        ...


_Status = TypeVar("_Status", bound=str)  # a status string or a JobStatus member


def counts_table(run: RunLike, counts: Mapping[_Status, int], *, title: str | None = None) -> Table:
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


def runs_table(runs: Sequence[RunSummary], *, tz: Zone = None) -> RenderableType:
    """Runs with their times (zone in the header), jobs and jobs needing an operator. Run names are
    printed whole (they are valid RUN arguments): the column never shortens them. When the one-line-per-run
    table is wider than the console, each run's status, counts, times and last stop go under its name
    instead, so a long name does not squeeze the other columns to nothing (or off the screen)."""
    return _RunsTable(list(runs), tz)


class _RunsTable:
    def __init__(self, runs: list[RunSummary], tz: Zone) -> None:
        self.runs = runs
        self.tz = tz

    def _table(self, *, wide: bool) -> Table:
        tz = self.tz
        longest = max((len(s.run.name) for s in self.runs), default=4)
        t = Table(title=f"runs (times in {zone_label(tz)})")
        t.add_column("id", justify="right", no_wrap=True)
        if not wide:  # one column under the name: the name is the only thing that must not wrap
            t.add_column("name / status / created / finished / last stop", min_width=longest, overflow="fold")
            for s in self.runs:
                r = s.run
                cell = _t(r.name)
                cell.append(f"\n{r.status}: {s.jobs} proxies, {s.needs_operator} flagged/failed")
                cell.append(f"\ncreated {human_time(r.created_at, tz)}")
                if r.finished_at is not None:
                    cell.append(f"\nfinished {human_time(r.finished_at, tz)}")
                if r.stop_reason:
                    cell.append("\nlast stop: ")
                    cell.append(_t(r.stop_reason))
                t.add_row(str(r.id), cell)
            return t
        t.add_column("name", no_wrap=True, min_width=longest)
        t.add_column("status", no_wrap=True)
        t.add_column("created", no_wrap=True)
        t.add_column("finished", no_wrap=True)
        t.add_column("proxies", justify="right")
        t.add_column("flagged/failed", justify="right")
        t.add_column("last stop", overflow="fold")
        for s in self.runs:
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

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        wide = self._table(wide=True)
        natural = Measurement.get(console, options.update(max_width=10_000), wide).maximum  # unclamped
        if natural <= options.max_width:
            yield wide
        else:
            yield self._table(wide=False)


def print_history(
    entries: Sequence[HistoryEntry], console: Console, *, tz: Zone = None, title: str | None = None
) -> None:
    """Print a proxy's or an instance's history: one row per call, workflow and event, oldest first
    (fixed-width text, widths from the console width: see ``plain.py``). The proxy column appears when
    the entries span more than one proxy (an instance's history); the versions column from 150
    characters (in the detail otherwise)."""
    width = console.width
    many = len({e.proxy_id for e in entries if e.proxy_id}) > 1
    show_versions = width >= 150
    fixed = 19 + 22 + 10 + (13 if show_versions else 0)
    n_ids = 2 if many else 1
    n_cols = 5 + n_ids + (1 if show_versions else 0) - 1
    gaps = (n_cols - 1) * len(PlainTable.GAP)
    id_width = max(12, min(36, (width - gaps - fixed - 24) // n_ids))
    detail_width = max(24, width - gaps - fixed - n_ids * id_width)
    cols = [Column(f"at ({zone_label(tz)})", 19), Column("run", 22)]  # its id is what RUN arguments take
    if many:
        cols.append(Column("proxy", id_width))
    cols += [Column("what", id_width), Column("state", 10)]
    if show_versions:
        cols.append(Column("runs / target", 13))
    cols.append(Column("detail / reason", detail_width, clip=False))
    out = cast(TextIO, console.file)
    if title:
        out.write(printable(title) + "\n")
    table = PlainTable(cols, out)
    table.header()
    for e in entries:
        versions = [f"{e.version_before or '?'}", f"→ {e.version_after or '?'}"] if e.version_after else []
        what = (
            [e.kind, Clipped(e.ref or "(no id)")] if e.kind == "workflow" else [f"{e.kind} {e.ref}".strip()]
        )
        detail = [x for x in (e.detail, e.reason) if x]
        detail += [x for x in (e.rule and f"rule: {e.rule}", e.who and f"by {e.who}") if x]
        if versions and not show_versions:
            detail.append("runs " + " ".join(versions))
        cells: list[list[str]] = [[human_time(e.at, tz)], [f"{e.run_id} {e.run_name}"]]
        if many:
            cells.append([e.proxy_id or "(run)"])
        cells += [what, [e.state or ""]]
        if show_versions:
            cells.append(versions)
        cells.append(detail)
        table.row(cells)
    out.flush()


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
        _id_column(t, "proxy / name")
        _id_column(t, "instance")
        t.add_column(f"reason / since ({zone_label(tz)})", ratio=1, min_width=20)
        for p in g.proxies:
            proxy = _t(p.proxy_id)
            if p.name:
                proxy.append("\n" + p.name, "dim")
            why = _t(p.reason)
            if p.updated_at:
                why.append(("\n" if why.plain else "") + human_time(p.updated_at, tz), "dim")
            t.add_row(proxy, _t(p.instance_id), why)
        console.print(t)
