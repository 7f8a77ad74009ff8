"""store/reports.py and orchestrator/reporting/: the report, history, runs and flagged listings of a job
table with a known story (tests/report_data.py) on a real SQLite file, as csv, json and tables.

Outside text is printed literally (markup never interpreted, formulas escaped in csv), ids are whole or
shortened at the end with an ellipsis (never split), hints have ``{run}`` filled, times carry a zone.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import insert

from orchestrator import reporting
from orchestrator.reporting.text import csv_cell, duration, human_time_zoned, iso_time, shorten, zone
from orchestrator.store import db, reports
from orchestrator.store.models import Job, Run
from tests import report_data as d

ALL_IDS = {d.P1, d.P2, d.P3, d.P4, d.I1, d.I2, d.W1, d.W3, d.W4}
_ID_LIKE = re.compile(r"[0-9a-f]{8}[0-9a-f-]*(?:po0\d|in0\d)?…?")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[d.Readable]:
    url = db.normalize_url(f"sqlite:///{tmp_path / 'jobs.db'}")
    eng = db.create_engine(url)
    await db.upgrade(eng)
    async with eng.begin() as conn:
        await d.populate(conn)
    await eng.dispose()
    yield d.Readable(url)


async def _rows(engine: d.Readable, run_id: int, **kw: Any) -> list[reports.ReportRow]:
    async with engine.connect() as conn:
        return [r async for r in reports.report_rows(conn, run_id, **kw)]


async def _write(engine: d.Readable, run_id: int, fmt: str, tz: str | None = None) -> str:
    out = io.StringIO()
    async with engine.connect() as conn:
        await reporting.write_report_parts(reports.report_parts(conn, run_id), fmt, out, tz=tz)
    return out.getvalue()


# ------------------------------------------------------------------------------------- report rows
async def test_report_rows_carry_times_versions_and_workflows(engine: d.Readable) -> None:
    rows = {r.proxy_id: r for r in await _rows(engine, 1)}
    assert list(rows) == [d.P1, d.P2, d.P3, d.P4]  # inventory order
    p1, p2, p3, p4 = rows[d.P1], rows[d.P2], rows[d.P3], rows[d.P4]
    assert (p1.first_sent, p1.accepted, p1.workflow_ended) == (
        d.t(1, "00:01:00.250"),
        d.t(1, "00:01:01"),
        d.t(1, "00:11:00"),
    )
    assert p1.duration_s == 599.75 and p1.first_sent is not None and p1.first_sent.tzinfo is not None
    assert p1.workflows == (reports.WorkflowBrief(d.W1, "ACCEPT", "Completed", d.t(1, "00:11:00")),)
    # a REJECT then, after a re-queue, an ACCEPT: accepted and duration follow the accepted workflow
    assert [w.state for w in p2.workflows] == ["REJECT", "ACCEPT"] and p2.workflows[0].workflow_id is None
    assert p2.accepted == d.t(1, "08:01:02.500") and p2.duration_s == 29939.4 and p2.attempts == 2
    # what the proxy runs is current_version; the inventory's version is kept apart
    assert (p3.current_version, p3.inventory_version, p3.target_version) == (d.SRC, d.SRC, d.TGT)
    assert p3.first_sent == d.t(1, "00:02:00") and p3.accepted is None and p3.duration_s is None
    assert p3.hint == d.HINT_5XX.replace("{run}", "1") and p3.rule == "http-5xx"
    assert p4.first_sent is None and p4.workflows == ()


async def test_an_open_accepted_workflow_leaves_the_end_unknown(engine: d.Readable) -> None:
    (p1,) = [r for r in await _rows(engine, 2) if r.proxy_id == d.P1]
    assert p1.accepted == d.t(2, "01:06:00") and p1.workflow_ended is None and p1.duration_s is None
    assert p1.workflows == (reports.WorkflowBrief(d.W4, "ACCEPT", "Running", None),)


async def test_status_filter_and_unknown_run(engine: d.Readable) -> None:
    assert [r.proxy_id for r in await _rows(engine, 1, statuses=["failed", "skipped"])] == [d.P3, d.P4]
    assert await _rows(engine, 99) == []


async def test_a_consumer_that_stops_early_leaves_the_connection_usable(engine: d.Readable) -> None:
    async with engine.connect() as conn:
        gen = reports.report_rows(conn, 1, batch=1)
        first = await anext(gen)
        await gen.aclose()
        assert first.proxy_id == d.P1
        assert (await reports.status_counts(conn, 1)) == {"succeeded": 2, "failed": 1, "skipped": 1}


async def test_report_streams_in_chunks(tmp_path: Path) -> None:
    """A 2,500-job run is written in several chunks while it is read, not gathered first."""
    url = db.normalize_url(f"sqlite:///{tmp_path / 'big.db'}")
    eng = db.create_engine(url)
    try:
        await db.upgrade(eng)
        now = datetime(2026, 3, 1, tzinfo=UTC)
        async with eng.begin() as conn:
            await conn.execute(insert(Run), [{**d.RUNS[0]}])
            base = {k: v for k, v in d.JOBS[0].items() if k != "id"}
            await conn.execute(
                insert(Job),
                [
                    {**base, "proxy_id": f"{i:032x}po01", "created_at": now, "updated_at": now}
                    for i in range(2500)
                ],
            )

        class Spy(io.StringIO):
            writes = 0

            def write(self, s: str) -> int:
                Spy.writes += 1
                return super().write(s)

        out = Spy()
        async with d.Readable(url).connect() as conn:
            n = await reporting.write_report_parts(reports.report_parts(conn, 1, batch=500), "json", out)
        assert n == 2500 and len(json.loads(out.getvalue())) == 2500
        assert Spy.writes >= 3
    finally:
        await eng.dispose()


# ------------------------------------------------------------------------------------- csv and json
async def test_csv_escapes_formulas_and_keeps_ids_whole(engine: d.Readable) -> None:
    text = await _write(engine, 1, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["proxy_id"] for r in rows] == [d.P1, d.P2, d.P3, d.P4]
    by = {r["proxy_id"]: r for r in rows}
    assert by[d.P3]["name"] == "'" + d.NAMES[d.P3]
    assert by[d.P2]["name"] == d.NAMES[d.P2]  # markup is not a formula: left as it is
    assert by[d.P2]["workflows"] == f"REJECT; {d.W3} ACCEPT Completed"
    assert by[d.P1]["first_sent"] == "2026-03-01T00:01:00.250+00:00"
    assert by[d.P1]["duration_s"] == "599.75" and by[d.P4]["duration_s"] == ""
    assert by[d.P3]["hint"] == d.HINT_5XX.replace("{run}", "1")
    for r in rows:
        for cell in r.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell


@pytest.mark.parametrize("value", ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"])
def test_csv_cell_escapes_every_formula_start(value: str) -> None:
    assert csv_cell(value) == "'" + value
    assert csv_cell("a=b") == "a=b" and csv_cell(-1) == -1 and csv_cell(None) == ""


async def test_json_has_workflow_objects_full_ids_and_zoned_times(engine: d.Readable) -> None:
    data = json.loads(await _write(engine, 1, "json", tz="Asia/Shanghai"))
    by = {r["proxy_id"]: r for r in data}
    assert by[d.P2]["workflows"] == [
        {"workflow_id": None, "state": "REJECT", "status": None, "ended": None},
        {
            "workflow_id": d.W3,
            "state": "ACCEPT",
            "status": "Completed",
            "ended": "2026-03-01T16:20:00.000+08:00",
        },
    ]
    assert by[d.P1]["first_sent"] == "2026-03-01T08:01:00.250+08:00"
    assert by[d.P3]["name"] == d.NAMES[d.P3]  # json needs no formula escape
    assert by[d.P3]["hint"] == d.HINT_5XX.replace("{run}", "1")
    assert set(by[d.P1]) == set(reporting.REPORT_CSV_COLUMNS)
    assert json.loads(await _write(engine, 99, "json")) == []


async def test_unknown_format_or_zone_is_refused(engine: d.Readable) -> None:
    with pytest.raises(ValueError, match="format"):
        await _write(engine, 1, "xml")
    with pytest.raises(ValueError, match="time zone"):
        await _write(engine, 1, "csv", tz="Mars/Olympus")


# ------------------------------------------------------------------------------------- tables
def _console(width: int) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor")


def _assert_ids_never_split(text: str) -> None:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    for token in _ID_LIKE.findall(plain):
        if token.endswith("…"):
            assert any(i.startswith(token[:-1]) for i in ALL_IDS), token
        elif len(token) >= 20:
            assert token in ALL_IDS, f"an id cut without an ellipsis: {token!r}"


@pytest.mark.parametrize("width", [80, 120, 160, 200, 260])
async def test_report_table_keeps_markup_literal_and_ids_whole_or_ellipsized(
    engine: d.Readable, width: int
) -> None:
    con = _console(width)
    async with engine.connect() as conn:
        n = await reporting.print_report_table(reports.report_rows(conn, 1), con)
        assert n == 4
    out = con.file.getvalue()  # type: ignore[attr-defined]
    assert ("[/bold]orders-proxy-2" if width >= 120 else "[/bold]orde…") in out
    assert "times (UTC)" in out
    assert "orchestrator retry 1 --rule http-5xx" in re.sub(r"\s+", " ", out)
    _assert_ids_never_split(out)
    if width >= 200:
        for i in (d.P1, d.P2, d.P3, d.P4, d.W1, d.W3):
            assert i in out


async def test_control_characters_in_cloud_text_are_shown_not_sent_to_the_terminal(
    engine: d.Readable,
) -> None:
    rows = await _rows(engine, 1)
    evil = rows[2]._replace(reason="boom \x1b[2J\x1b[31mred\x07")
    con = _console(200)
    printer = reporting.ReportTablePrinter(con)
    printer.add(evil)
    printer.close()
    out = con.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b[2J" not in out and "\x07" not in out and "\\x1b[2J" in out


async def test_rich_tables_print_outside_text_literally(engine: d.Readable) -> None:
    con = _console(120)
    async with engine.connect() as conn:
        run2 = await reports.get_run(conn, 2)
        assert run2 is not None
        con.print(reporting.counts_table(run2, await reports.status_counts(conn, 2)))
        con.print(reporting.runs_table(await reports.list_runs(conn)))
        reporting.print_history(await reports.history(conn, proxy_id=d.P2), con, title="[/x] history")
        reporting.print_flagged(await reports.flagged_by_rule(conn, 2), con, run_id=2, run_name=run2.name)
    out = re.sub(r"\x1b\[[0-9;]*m", "", con.file.getvalue())  # type: ignore[attr-defined]
    assert "[/x] canary 2026-03-02" in out  # the run name, whole, in the runs table
    assert "[/bold] instance is" in out and "[/bold]orders-proxy-2" in out
    assert "[/x] history" in out
    assert "orchestrator retry 2 --rule reject-busy" in out  # hint filled
    _assert_ids_never_split(out)


def test_run_names_are_never_shortened_in_the_runs_table() -> None:
    long_name = "fleet-ap-southeast-1-2026-03-01T00:00:00-canary-wave-one"
    run = reports.RunInfo(7, long_name, "finished", d.t(1, "00:00"), None, None, None, {}, "/x", 1, 0)
    con = Console(file=io.StringIO(), width=90)
    con.print(reporting.runs_table([reports.RunSummary(run, {"succeeded": 3})]))
    assert long_name in con.file.getvalue()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------- history
async def test_history_keeps_an_earlier_flag_after_a_later_success(engine: d.Readable) -> None:
    async with engine.connect() as conn:
        entries = await reports.history(conn, proxy_id=d.P2)
    assert [e.at for e in entries] == sorted(e.at for e in entries)
    moves = [(e.run_id, e.state) for e in entries if e.kind == "event" and e.ref == "move"]
    assert moves == [(1, "flagged"), (1, "accepted"), (1, "succeeded"), (2, "flagged")]
    retry = next(e for e in entries if e.ref == "retry")
    assert retry.who == "alice@jump-1 (pid 4242)" and retry.detail == "flagged -> pending"
    calls = [(e.run_id, e.ref, e.state, e.detail) for e in entries if e.kind == "call"]
    assert calls == [
        (1, "#1", "flag", "HTTP 200"),
        (1, "#2", "accepted", "HTTP 200"),
        (2, "#1", "flag", "HTTP 200"),
    ]
    wfs = [(e.ref, e.state, e.reason) for e in entries if e.kind == "workflow"]
    assert wfs == [("", "REJECT", d.REJECT_MSG), (d.W3, "ACCEPT", None), ("", "REJECT", "instance is busy")]
    first_call = next(e for e in entries if e.kind == "call")
    assert (first_call.run_name, first_call.version_before, first_call.version_after) == (
        d.RUN1_NAME,
        d.SRC,
        d.TGT,
    )
    # run-level events of the runs involved appear without a proxy
    assert any(e.ref == "resume" and e.proxy_id is None for e in entries)


async def test_history_of_an_instance_since_a_date(engine: d.Readable) -> None:
    async with engine.connect() as conn:
        entries = await reports.history(conn, instance_id=d.I1, since=datetime(2026, 3, 2))
        with pytest.raises(ValueError):
            await reports.history(conn)
    assert entries and all(e.at >= d.t(2, "00:00") for e in entries)
    assert {e.proxy_id for e in entries} == {d.P1, d.P2, None}
    assert [e.ref for e in entries if e.kind == "workflow"] == ["", d.W4]


async def test_history_renders_as_csv_and_json(engine: d.Readable) -> None:
    async with engine.connect() as conn:
        entries = await reports.history(conn, proxy_id=d.P1)
    out = io.StringIO()
    reporting.write_records([reporting.history_record(e) for e in entries], "json", out)
    data = json.loads(out.getvalue())
    assert [x["ref"] for x in data if x["kind"] == "workflow"] == [d.W1, d.W4]
    assert data[0]["at"].endswith("+00:00")
    out = io.StringIO()
    reporting.write_records([reporting.history_record(e, "Asia/Shanghai") for e in entries], "csv", out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(rows) == len(entries) and rows[0]["at"].endswith("+08:00")


# ------------------------------------------------------------------------------------- runs, flagged
async def test_runs_since_and_status_filters(engine: d.Readable) -> None:
    async with engine.connect() as conn:
        everything = await reports.list_runs(conn)
        recent = await reports.list_runs(conn, since=datetime(2026, 3, 2, tzinfo=UTC))
        halted = await reports.list_runs(conn, statuses=["halted", "stopped"])
        one = await reports.list_runs(conn, limit=1)
    assert [s.run.id for s in everything] == [3, 2, 1]
    assert [s.run.id for s in recent] == [3, 2]
    assert [s.run.id for s in halted] == [3, 2]
    assert [s.run.id for s in one] == [3]
    run1 = everything[-1]
    assert (
        run1.jobs == 4
        and run1.needs_operator == 1
        and run1.counts == {"succeeded": 2, "failed": 1, "skipped": 1}
    )
    assert run1.run.options["window"] == d.RUN1_OPTIONS["window"]
    rec = reporting.run_record(run1)
    assert rec["finished_at"] == "2026-03-01T09:00:00.000+00:00" and rec["needs_operator"] == 1


async def test_flagged_groups_by_rule_with_one_filled_hint(engine: d.Readable) -> None:
    async with engine.begin() as conn:
        # two more jobs of run 2 flagged by the same rule, one with a different hint
        extra = {k: v for k, v in d.JOBS[5].items() if k != "id"}
        await conn.execute(
            insert(Job),
            [
                {**extra, "proxy_id": "p-extra-1", "reason": "REJECT: busy again"},
                {**extra, "proxy_id": "p-extra-2", "hint": "call the DBA"},
            ],
        )
    async with engine.connect() as conn:
        groups = await reports.flagged_by_rule(conn, 2)
        only = await reports.flagged_by_rule(conn, 2, rule="no-such-rule")
    assert only == []
    (g,) = groups
    assert (g.rule, g.status, g.count, g.other_hints) == ("reject-busy", "flagged", 3, 1)
    assert g.hint == d.HINT_BUSY.replace("{run}", "2")
    assert [p.proxy_id for p in g.proxies] == [d.P2, "p-extra-1", "p-extra-2"]
    assert [p.reason for p in g.proxies][:2] == ["REJECT: instance is busy", "REJECT: busy again"]
    rec = reporting.flagged_record(g)
    assert rec["count"] == 3 and rec["proxies"][0]["instance_id"] == d.I1
    out = io.StringIO()
    reporting.write_records(reporting.flagged_rows(groups), "csv", out)
    lines = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(x["rule"], x["proxy_id"], x["group_count"]) for x in lines] == [
        ("reject-busy", p, "3") for p in (d.P2, "p-extra-1", "p-extra-2")
    ]


# ------------------------------------------------------------------------------------- window data
async def test_window_report_numbers(engine: d.Readable) -> None:
    async with engine.connect() as conn:
        w = await reports.window_report(conn, 1)
        with pytest.raises(LookupError):
            await reports.window_report(conn, 99)
    assert w.calls == 6 and w.rate_limit_per_s == 2.0 and w.concurrency == 4
    first = int(d.t(1, "00:01:00").timestamp())
    assert w.calls_per_second[0] == (first, 2)  # P1 and P2 were sent in the same second
    assert (
        w.latency.count == 6 and w.latency.p50 == pytest.approx(0.2) and w.latency.max == pytest.approx(2.0)
    )
    assert [(x.wave, x.total, x.done) for x in w.waves] == [(1, 2, 2), (2, 2, 2)]
    assert [x.workflow_id for x in w.workflows] == [d.W1, d.W3]
    assert [e.kind for e in w.events] == ["run", "run", "retry", "resume", "run"]
    page = reporting.html_report(w, tz="Asia/Shanghai")
    assert "orchestrator retry 1 --rule http-5xx" in page and "{run}" not in page
    assert "Asia/Shanghai" in page


# ------------------------------------------------------------------------------------- small rules
def test_time_and_duration_formats() -> None:
    t = d.t(1, "00:01:00.250")
    assert iso_time(t) == "2026-03-01T00:01:00.250+00:00"
    assert iso_time(t.replace(tzinfo=None)) == "2026-03-01T00:01:00.250+00:00"  # naive is UTC
    assert human_time_zoned(t) == "2026-03-01 00:01:00 UTC"
    assert human_time_zoned(t, "Asia/Shanghai") == "2026-03-01 08:01:00 +08:00"
    assert zone("utc") is UTC
    assert [duration(x) for x in (None, 0.25, 42, 599.75, 29939.4)] == [
        "",
        "0.25s",
        "42s",
        "10m00s",
        "8h18m59s",
    ]
    assert shorten(d.P1, 12) == d.P1[:11] + "…" and shorten(d.P1, 36) == d.P1


def test_json_report_lines_are_exactly_json_dumps_of_each_record() -> None:
    """The report's one kept encoder writes what ``json.dumps`` writes for each record (escapes, non-ASCII,
    None, floats and nested workflows included): one record per line, an array around them."""
    from orchestrator.reporting import streams, text

    when = datetime(2026, 12, 1, 8, 0, 1, 250000, tzinfo=UTC)
    rows = [
        reports.ReportRow(
            7,
            i,
            "p" * 32,
            "i" * 32,
            "x" * 32,
            name,
            2,
            "flagged",
            3,
            "2.23",
            "2.24",
            None,
            when,
            None,
            None,
            duration,
            'subnet "full"\nline',
            "retry {run}",
            "upgrade:reject",
            (
                reports.WorkflowBrief("wf-1", "REJECT", None, None),
                reports.WorkflowBrief(None, "REJECT", "x", when),
            ),
        )
        for i, (name, duration) in enumerate([("proxy ü 代理", 1.5), (None, None), ("a\\b\t", 1e-7)])
    ]
    out = io.StringIO()
    writer = streams.ReportWriter("json", out)
    writer.add_all(rows)
    assert writer.close() == 3
    lines = out.getvalue().splitlines()
    assert lines[0] == "[" and lines[-1] == "]"
    iso = text.iso_formatter(None)
    want = [json.dumps(streams.report_record(r, iso=iso)) for r in rows]
    assert [line.removesuffix(",") for line in lines[1:-1]] == want
    assert json.loads(out.getvalue())[0]["name"] == "proxy ü 代理"
