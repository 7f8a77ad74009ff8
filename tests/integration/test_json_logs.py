"""With ``--log-format json`` every line on stderr is a JSON object, the run banner and ``error:``
lines included: a log shipper reads stderr line by line and a free-text line breaks its parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import cli, make_inventory

FAST = ["--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1", "--seed", "1"]
SCENARIO = {
    "seed": 3,
    "speed": 200,
    "latency_s": 0.005,
    "workflow": {"pending_s": 1, "running_s": 2, "job_visible_after_s": 0.5},
    "fleet": {"generate": {"proxies": 4, "proxies_per_instance": 1, "reject_rate": 0.5}},
}


def json_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    parsed = []
    for ln in lines:
        try:
            parsed.append(json.loads(ln))
        except ValueError:
            raise AssertionError(f"not a JSON line on stderr: {ln!r}") from None
    return parsed


def test_run_banner_and_summary_notices_are_json_events(sim_factory, tmp_path: Path) -> None:
    sim = sim_factory(SCENARIO)
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    db = str(tmp_path / "jobs.db")
    args = ["--log-format", "json", "run", str(inv), "--db", db, "--endpoint", sim.url, "--rate", "50/s"]
    r = cli(*args, *FAST)
    assert r.code in (0, 1), str(r)
    events = json_lines(r.err)
    notices = [e["message"] for e in events if e["event"] == "notice"]
    assert any(n.startswith("run 1 (") and "4 proxies" in n for n in notices), notices
    assert any(e["event"].startswith("job.") for e in events)
    assert "│" in r.out or "succeeded" in r.out  # stdout keeps the human summary table

    again = cli("--log-format", "json", "resume", "1", "--db", db)
    assert again.code in (0, 1), str(again)
    assert "already finished" in again.out
    json_lines(again.err)  # whatever it logged parses


def test_error_lines_are_json_events_naming_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "defaults:\n"
        "  project_id: 0123456789abcdef0123456789abcdef\n"
        "  region: cn-north-4\n"
        "  source_version: 2.23.0\n"
        "  target_version: 2.24.0\n"
        "proxies:\n"
        "  - instance_id: zz\n"
        "    proxy_id: 0123456789abcdef0123456789abcdefpo01\n",
        encoding="utf-8",
    )
    db = tmp_path / "jobs.db"
    r = cli("--log-format", "json", "run", str(bad), "--db", str(db))
    assert r.code == 2, str(r)
    events = json_lines(r.err)
    assert [e["level"] for e in events] == ["error"], events
    assert events[0]["message"].startswith(f"{bad}:7: proxies[0].instance_id: "), events
    assert not db.exists()

    usage = cli("--log-format", "json", "status", "--db", str(db), "no-such-run")
    assert usage.code == 2, str(usage)
    assert [e["level"] for e in json_lines(usage.err)] == ["error"], usage.err
