"""Issue 15 parts 3 and 8 through the real CLI against the real simulator: ``report`` columns (the version
the proxy actually runs, first sent, accepted, workflow ended, duration), ids never cut in the middle in
the table and whole in csv/json, ``workflows`` an array of objects in json; and ``report --format html
-o window.html`` rendered in headless Chromium with the job table's numbers in its DOM.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestrator.store import db as dbmod
from tests.conftest import cli, db_rows, make_inventory
from tests.integration.test_html_report import CHROMIUM, _look, expected, png_colours

SUBNET = "Upgrade failed due to insufficient subnet ip"
MIXED = "0f46fc46396e4fb19a0cb52f578e9511po01"  # two nodes, the second REJECTs: flagged with both workflows
REJECTING = "0f46fc46396e4fb19a0cb52f578e9511po02"
AT_TARGET = "1f46fc46396e4fb19a0cb52f578e9511po01"
SOURCE, TARGET = "2.23.12.000", "2.24.03.000"
FAST = ["--poll-initial", "0.5", "--poll-interval", "0.5", "--reconcile-grace", "1", "--rate", "20/s"]
WORKFLOW_S = 2.0  # pending + running, real seconds (scenario seconds / speed)
ELLIPSIS = "…"


def scenario() -> dict[str, Any]:
    return {
        "seed": 17,
        "speed": 100,
        "latency_s": 0.005,
        "workflow": {"pending_s": 50, "running_s": 150, "job_visible_after_s": 1, "fail_rate": 0},
        "fleet": {
            "instances": [
                {
                    "id": "517ea793ab91438cbfcd9c4b1c958b1ein07",
                    "proxies": [
                        {"id": MIXED, "nodes": 2, "reject": SUBNET, "reject_nodes": [1]},
                        {"id": REJECTING, "reject": SUBNET},
                    ],
                },
                {
                    "id": "617ea793ab91438cbfcd9c4b1c958b1ein07",
                    "proxies": [{"id": AT_TARGET, "current_version": TARGET}],
                },
            ],
            "generate": {"proxies": 5, "proxies_per_instance": 2, "multi_node_rate": 0},
        },
    }


def aware(v: Any) -> datetime:
    """A time read back from either backend (SQLite hands stored UTC back naive, as text)."""
    t = v if isinstance(v, datetime) else datetime.fromisoformat(str(v))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def assert_ids_whole_or_ellipsized(text: str, ids: set[str]) -> None:
    """Every id-like token is a whole id, or an id's beginning ending in an ellipsis: never its middle or
    its end (which is what cutting or wrapping an id produces)."""
    tokens = re.findall(r"(?<![0-9a-z-])[0-9a-f]{8}[0-9a-z-]*…?", text)
    assert tokens
    for tok in tokens:
        if tok in ids:
            continue
        assert tok.endswith(ELLIPSIS), tok
        assert any(i.startswith(tok[:-1]) for i in ids), tok


def test_report_columns_csv_json_table_and_html(sim_factory: Any, tmp_path: Path, db_url: str) -> None:
    sim = sim_factory(scenario())
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    db = ["--db", db_url]
    r = cli("run", str(inv), *db, "--endpoint", sim.url, "--name", "report-window", *FAST)
    assert r.code == 1, str(r)
    fleet = {p["proxy_id"]: p for p in sim.fleet()}
    issued: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for rec in sim.log():
        if rec["route"] == "upgrade":
            issued[rec["proxy_id"]] += [(i["workflow_id"], i["state"]) for i in rec.get("items") or []]

    # ------------------------------------------------------------------ json
    rj = cli("report", "report-window", *db, "--format", "json", "--tz", "Asia/Shanghai")
    assert rj.code == 0, str(rj)
    records = {rec["proxy_id"]: rec for rec in json.loads(rj.out)}
    assert set(records) == set(fleet)
    sent = {
        p: aware(t)
        for p, t in db_rows(
            db_url,
            "SELECT j.proxy_id, min(a.sent_at) FROM attempts a JOIN jobs j ON j.id = a.job_id GROUP BY 1",
        )
    }
    for proxy, rec in records.items():
        # the version the proxy runs, as the simulator says; the inventory's is kept apart
        assert rec["current_version"] == fleet[proxy]["current_version"], rec
        assert rec["inventory_version"] == SOURCE and rec["target_version"] == TARGET
        assert isinstance(rec["workflows"], list)
        assert [(w["workflow_id"], w["state"]) for w in rec["workflows"]] == issued.get(proxy, [])
        assert all(set(w) == {"workflow_id", "state", "status", "ended"} for w in rec["workflows"])
        for key in ("first_sent", "accepted", "workflow_ended"):
            assert rec[key] is None or rec[key].endswith("+08:00"), (key, rec)
        if proxy in sent:
            assert abs((datetime.fromisoformat(rec["first_sent"]) - sent[proxy]).total_seconds()) < 0.002
    succeeded = [rec for rec in records.values() if rec["status"] == "succeeded"]
    assert len(succeeded) == 5
    for rec in succeeded:
        first, acc, end = (
            datetime.fromisoformat(rec[k]) for k in ("first_sent", "accepted", "workflow_ended")
        )
        # sent_at is this host's clock corrected to the database's (estimated at each commit), accepted is
        # the database's own: on PostgreSQL they may disagree by milliseconds
        assert first - timedelta(milliseconds=50) <= acc <= end, rec
        assert rec["duration_s"] == pytest.approx((end - first).total_seconds(), abs=0.002)
        # the end is the cloud's time (whole seconds) moved by an offset measured from Date headers
        assert WORKFLOW_S - 1.5 <= rec["duration_s"] <= WORKFLOW_S + 5.0, rec
        assert [w["status"] for w in rec["workflows"]] == ["Completed"]
    skipped = records[AT_TARGET]
    assert skipped["status"] == "skipped" and skipped["current_version"] == TARGET
    assert skipped["first_sent"] is None and skipped["duration_s"] is None and skipped["workflows"] == []
    mixed = records[MIXED]
    assert mixed["status"] == "flagged" and sorted(w["state"] for w in mixed["workflows"]) == [
        "ACCEPT",
        "REJECT",
    ]
    assert records[REJECTING]["status"] == "flagged" and SUBNET in records[REJECTING]["reason"]
    assert records[REJECTING]["hint"]

    # ------------------------------------------------------------------ csv: whole ids
    rc = cli("report", "1", *db, "--format", "csv")
    assert rc.code == 0, str(rc)
    rows = list(csv.DictReader(io.StringIO(rc.out)))
    assert {row["proxy_id"] for row in rows} == set(fleet)
    wf_ids = {w for ws in issued.values() for w, _ in ws}
    in_csv = set(re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", rc.out))
    assert in_csv == wf_ids
    assert {r["current_version"] for r in rows if r["status"] == "succeeded"} == {TARGET}

    # ------------------------------------------------------------------ table: ids never cut in the middle
    ids = set(fleet) | wf_ids | {p["instance_id"] for p in fleet.values()}
    wide = cli("report", "1", *db, env={"COLUMNS": "200"})
    assert wide.code == 0, str(wide)
    for i in set(fleet) | wf_ids:
        assert i in wide.out, i
    assert_ids_whole_or_ellipsized(wide.out, ids)
    assert "not polled yet" not in wide.out and "REJECT" in wide.out
    assert not re.search(r"\s-\d", wide.out)  # no negative duration
    for width in ("100", "80"):
        narrow = cli("report", "1", *db, env={"COLUMNS": width})
        assert narrow.code == 0, str(narrow)
        assert ELLIPSIS in narrow.out
        assert_ids_whole_or_ellipsized(narrow.out, ids)
        assert max(len(line) for line in narrow.out.splitlines()) <= int(width), width

    # ------------------------------------------------------------------ the HTML window report
    page = tmp_path / "window.html"
    rh = cli("report", "report-window", *db, "--format", "html", "-o", str(page), "--tz", "Asia/Shanghai")
    assert rh.code == 0 and page.exists(), str(rh)
    html = page.read_text(encoding="utf-8")
    assert "<script src" not in html and "<link" not in html  # self-contained (Chromium checks requests)
    if CHROMIUM is None:
        pytest.skip("no chromium here: apt-get install -y chromium (the report's columns were checked)")
    want = asyncio.run(_expected(db_url))
    seen = asyncio.run(_look(page))
    errors = [
        e
        for e in seen["events"]
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert not errors, errors
    requests = [
        e["params"]["request"]["url"]
        for e in seen["events"]
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
    got = seen["dom"]["values"]
    for key, value in want["values"].items():
        if key.startswith("latency-p") or key == "latency-max":
            assert float(got[key]) == pytest.approx(value, abs=1e-3), key
        else:
            assert got[key] == value, (key, got.get(key), value)
    assert got["run-id"] == "1" and got["rate-limit"] == "20"
    assert got["count-succeeded"] == "5" and got["count-flagged"] == "2" and got["count-skipped"] == "1"
    assert seen["dom"]["workflows"] == want["workflows"] and set(want["workflows"]) == wf_ids
    assert sorted(seen["dom"]["flagged"]) == sorted(want["flagged"]) == sorted([MIXED, REJECTING])
    assert "Asia/Shanghai" in seen["dom"]["header"] and "report-window" in seen["dom"]["title"]
    colours, ink = png_colours(seen["png"])
    assert colours >= 8 and 0.01 < ink < 0.9, (colours, ink)


async def _expected(url: str) -> dict[str, Any]:
    engine = dbmod.create_engine(dbmod.normalize_url(url))
    try:
        async with engine.connect() as conn:
            return await expected(conn, 1)
    finally:
        await engine.dispose()
