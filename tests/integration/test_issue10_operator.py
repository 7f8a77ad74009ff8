"""Issue 10, kinds 8, 9 and 10, and the review items about what the operator is told: job-table paths
that are wrong say what is wrong; times carry their zone and JSON logs carry no markup; hints name the
real run; ``retry --proxy`` validates first; ``--policy`` is read strictly; an unparseable
``latest_version`` is no verdict; Alembic's own CLI migrates PostgreSQL; send permits are pruned.

The real CLI against the real simulator (through a hostile gateway where the cloud must lie), on both
backends where the job table is what is judged.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.store.schema import HEAD_REVISION
from tests.conftest import PY, ROOT, Result, Sim, clean_env, cli, db_rows, start_sim
from tests.issue10 import (
    CURRENT,
    INSTANCE,
    SUBNET,
    TARGET,
    Hostile,
    fast,
    inventory,
    jobs,
    proxy_id,
    scenario,
)

CLEAN, REJECTS, OLD, MIXED, FAILS = (proxy_id(i) for i in range(1, 6))


def one_error(r: Result) -> str:
    """The one line an operator gets: exit 2, no traceback, nothing else on stderr."""
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2, str(r)
    assert len(lines) == 1 and lines[0].startswith("error: "), str(r)
    assert "Traceback" not in r.err + r.out
    return lines[0]


# ------------------------------------------------------------------------------------------- kind 8
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def offline_inventory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid inventory (no simulator needed: the job table is refused before any call)."""
    import yaml

    tmp = tmp_path_factory.mktemp("inv")
    scen = tmp / "scenario.yaml"
    scen.write_text(yaml.safe_dump(scenario()), encoding="utf-8")
    r = cli("simulator", "--scenario", str(scen), "--export-inventory", str(tmp / "fleet.yaml"))
    assert r.code == 0, str(r)
    return tmp / "fleet.yaml"


READ_COMMANDS = [
    ["status"],
    ["status", "1"],
    ["runs"],
    ["report", "1"],
    ["flagged"],
    ["history", "--proxy", CLEAN],
    ["retry", "1", "--flagged"],
    ["resume"],
    ["worker"],
    ["db", "current"],
]


@pytest.mark.parametrize("args", READ_COMMANDS, ids=[" ".join(a) for a in READ_COMMANDS])
def test_a_mistyped_db_of_a_reading_command_is_refused_naming_it(args: list[str], tmp_path: Path) -> None:
    r = cli(*args, "--db", "typo/windw.db", cwd=tmp_path)
    line = one_error(r)
    assert "typo/windw.db" in line, line
    assert list(tmp_path.iterdir()) == [], "the refused command created something"
    r = cli(*args, env={"ORCHESTRATOR_DB": "sqlite:///typo/windw.db"}, cwd=tmp_path)
    assert "typo/windw.db" in one_error(r)
    assert list(tmp_path.iterdir()) == []


def _random_bytes(p: Path) -> str:
    p.write_bytes(os.urandom(4096))
    return str(p)


def _text_file(p: Path) -> str:
    p.write_text("runs:\n  - this is not a database\n", encoding="utf-8")
    return str(p)


def _directory(p: Path) -> str:
    p.mkdir()
    return str(p)


def _under_a_file(p: Path) -> str:
    p.write_text("x", encoding="utf-8")
    return str(p / "jobs.db")


def _closed_pg(p: Path) -> str:
    return f"postgresql://orch@127.0.0.1:{_closed_port()}/jobs"


def _bad_url(p: Path) -> str:
    return "mysql://orch@127.0.0.1/jobs"


BAD_TABLES: dict[str, tuple[Callable[[Path], str], tuple[str, ...]]] = {
    "random bytes": (_random_bytes, ("not a SQLite database",)),
    "a text file": (_text_file, ("not a SQLite database",)),
    "a directory": (_directory, ("is a directory",)),
    # a reading command may say the table is not there: it is not
    "a path under a file": (_under_a_file, ("not a directory", "no job table at")),
    "postgresql on a closed port": (_closed_pg, ("connection refused at 127.0.0.1:",)),
    "an unsupported database": (_bad_url, ("unsupported database",)),
}


@pytest.mark.parametrize("command", ["status", "run", "db upgrade"])
@pytest.mark.parametrize("case", list(BAD_TABLES), ids=list(BAD_TABLES))
def test_a_bad_job_table_says_what_is_wrong_in_one_line(
    case: str, command: str, tmp_path: Path, offline_inventory: Path
) -> None:
    make, fragments = BAD_TABLES[case]
    where = make(tmp_path / "jobs.db")
    args = [str(offline_inventory) if a == "INV" else a for a in command.replace("run", "run INV").split()]
    before = sorted(p.name for p in tmp_path.iterdir())
    for r in (cli(*args, "--db", where), cli(*args, env={"ORCHESTRATOR_DB": where})):
        line = one_error(r)
        assert any(f in line for f in fragments), line
        assert "unparseable" not in line and "orch@" not in line.replace("orch@127", ""), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "the refused command created something"


def test_an_unwritable_directory_is_named(tmp_path: Path, offline_inventory: Path) -> None:
    """As root every directory is writable: the commands then run without the capability that makes it
    so (``setpriv``), in a directory owned by another user, as an operator without the right would."""
    ro = tmp_path / "ro"
    ro.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no directory can be refused")
        shutil.chown(ro, "nobody")
        ro.chmod(0o755)
        drop = "-dac_override,-dac_read_search"
        prefix = ["setpriv", "--bounding-set", drop, "--inh-caps", drop, "--"]
    else:
        ro.chmod(0o555)
    for args in (["db", "upgrade"], ["run", str(offline_inventory)]):
        p = subprocess.run(
            [*prefix, PY, "-m", "orchestrator", *args, "--db", str(ro / "jobs.db")],
            env=clean_env(), capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        line = one_error(Result(p.returncode, p.stdout, p.stderr))
        assert "not writable" in line and str(ro) in line, line
    assert list(ro.iterdir()) == []


# -------------------------------------------------------------------- a story run for kinds 9 and 10
@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sim, str, Path]]:
    """Two finished runs on one SQLite table: run 1 upgrades one proxy; run 2 flags four in four ways (a
    subnet REJECT, a proxy not on the source version, a partial accept, a failed workflow) and upgrades one.
    Run 2 is what the operator reads: every hint must name run 2, not run 1 nor a placeholder."""
    tmp = tmp_path_factory.mktemp("story")
    sim = start_sim(
        tmp,
        scenario(
            [
                {"id": CLEAN},
                {"id": REJECTS, "reject": SUBNET},
                {"id": OLD, "current_version": "2.23.06.000"},
                {"id": MIXED, "nodes": 2, "reject": SUBNET, "reject_nodes": [1]},
                {"id": FAILS, "workflow": "fail", "fail_reason": "the proxy node did not come back"},
                {"id": proxy_id(6)},
            ]
        ),
    )
    try:
        import yaml

        inv = inventory(sim, tmp / "fleet.yaml")
        data = yaml.safe_load(inv.read_text(encoding="utf-8"))
        first = tmp / "first.yaml"
        first.write_text(yaml.safe_dump({**data, "proxies": data["proxies"][-1:]}), encoding="utf-8")
        second = tmp / "second.yaml"
        second.write_text(yaml.safe_dump({**data, "proxies": data["proxies"][:-1]}), encoding="utf-8")
        db = f"sqlite:///{tmp / 'jobs.db'}"
        r1 = cli("run", str(first), "--db", db, "--endpoint", sim.url, *fast())
        assert r1.code == 0, str(r1)
        r2 = cli("run", str(second), "--db", db, "--endpoint", sim.url, *fast())
        assert r2.code == 1, str(r2)
        (tmp / "run2.out").write_text(r2.out, encoding="utf-8")
        yield sim, db, tmp
    finally:
        sim.stop()


# ------------------------------------------------------------------------------------------- kind 9
TIME = re.compile(r"(?<![+\-\d:])\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?")
ZONE = re.compile(r"^\s?(?:UTC|GMT|Z\b|[A-Z]{2,5}\b|[+-]\d{2}:?\d{2})")
# a table or report that states its zone once, in its title or a column header
TABLE_ZONE = re.compile(r"(?:times in |\()(?:UTC|[A-Z][A-Za-z_]+(?:/[A-Za-z_+-]+)+)\b")


def naked_times(text: str) -> list[str]:
    """Times of day in ``text`` not followed by a zone label (UTC, EST, CST, +08:00, Z...), unless the
    output says its zone once ("times in America/New_York", "times (UTC)")."""
    if TABLE_ZONE.search(text):
        return []
    naked = []
    for m in TIME.finditer(text):
        after = text[m.end() : m.end() + 8]
        if not ZONE.match(after):
            naked.append(text[max(0, m.start() - 20) : m.end() + 8])
    return naked


READS = [
    ["status", "2"],
    ["status"],
    ["runs"],
    ["runs", "--format", "csv"],
    ["report", "2"],
    ["report", "2", "--format", "csv"],
    ["report", "2", "--format", "json"],
    ["flagged", "2"],
    ["history", "--proxy", REJECTS],
]
ZONES = {
    "TZ=America/New_York": (
        {"TZ": "America/New_York"},
        [],
        ("EST", "EDT", "-05:00", "-04:00", "America/New_York"),
    ),
    "--tz Asia/Shanghai": ({}, ["--tz", "Asia/Shanghai"], ("CST", "+08:00", "Asia/Shanghai")),
    "default UTC": ({}, [], ("UTC", "+00:00", "Z")),
}


@pytest.mark.parametrize("zone", list(ZONES), ids=list(ZONES))
@pytest.mark.parametrize("args", READS, ids=[" ".join(a) for a in READS])
def test_every_time_shown_carries_its_zone(args: list[str], zone: str, story: tuple[Sim, str, Path]) -> None:
    _sim, db, _tmp = story
    env, extra, labels = ZONES[zone]
    r = cli(*args, "--db", db, *extra, env=env)
    assert r.code == 0, str(r)
    assert naked_times(r.out) == [], r.out
    if args != ["status", "2"]:  # a finished run's status shows no time
        assert TIME.search(r.out), f"no time shown at all: {r.out}"
        assert any(label in r.out for label in labels), r.out


def test_no_workflow_ends_before_it_was_sent(story: tuple[Sim, str, Path]) -> None:
    """The cloud's workflow times have whole seconds: a report never shows one ending before its call
    was sent, nor a negative duration."""
    from datetime import datetime

    _sim, db, _tmp = story
    r = cli("report", "2", "--db", db, "--format", "json")
    assert r.code == 0, str(r)
    rows = json.loads(r.out)
    checked = 0
    for row in rows:
        if row.get("first_sent") and row.get("workflow_ended"):
            sent = datetime.fromisoformat(row["first_sent"])
            assert datetime.fromisoformat(row["workflow_ended"]) >= sent, row
            checked += 1
        if row.get("duration_s") is not None:
            assert row["duration_s"] >= 0, row
    assert checked >= 3, rows


def test_json_logs_carry_no_markup(sim_factory: Callable[..., Sim], tmp_path: Path) -> None:
    """Every notice of a run as JSON events, none with rich markup: the clock warning, the flagged
    summary, a stop by a signal and its resume."""
    sim = sim_factory(
        scenario(
            [{"id": CLEAN}, {"id": REJECTS, "reject": SUBNET}], clock_offset_s=600
        )  # a skewed cloud clock
    )
    inv = inventory(sim, tmp_path / "fleet.yaml")
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    r = cli("--log-format", "json", "run", str(inv), "--db", db, "--endpoint", sim.url, *fast())
    assert r.code == 1, str(r)
    resumed = cli("--log-format", "json", "resume", "1", "--db", db)
    retried = cli("--log-format", "json", "retry", "1", "--proxy", "nosuch", "--db", db)
    assert retried.code == 2
    markup = re.compile(
        r"\[/?(?:bold|dim|italic|red|green|yellow|blue|magenta|cyan|white|reset)\b[^\]]*\]|\[/\]"
    )
    events = []
    for out in (r, resumed, retried):
        for line in out.err.splitlines():
            if not line.strip():
                continue
            event = json.loads(line)  # every line is one JSON object
            events.append(event)
            for value in event.values():
                assert not (isinstance(value, str) and markup.search(value)), line
    assert any("clock" in json.dumps(e) for e in events), events


# ------------------------------------------------------------------------------------------ kind 10
COMMAND = re.compile(r"orchestrator (\w+)(?: (\S+))?")


def test_hints_name_the_real_run_with_one_next_step(story: tuple[Sim, str, Path]) -> None:
    _sim, db, tmp = story
    assert "orchestrator flagged 2" in (tmp / "run2.out").read_text()
    for args in (["flagged", "2"], ["flagged"], ["report", "2"]):
        r = cli(*args, "--db", db)
        assert r.code == 0, str(r)
        assert "RUN" not in r.out and "{run}" not in r.out, r.out
        for cmd, arg in COMMAND.findall(r.out):
            if cmd in ("retry", "resume", "flagged", "report", "status"):
                assert arg == "2", f"{args}: 'orchestrator {cmd} {arg}' in {r.out}"
        assert "orchestrator retry 2 --flagged" in r.out, r.out
    rep = json.loads(cli("report", "2", "--db", db, "--format", "json").out)
    rows = rep if isinstance(rep, list) else rep.get("jobs") or rep.get("rows") or []
    flagged = [row for row in rows if row.get("status") in ("flagged", "failed")]
    assert {row["proxy_id"] for row in flagged} == {REJECTS, OLD, MIXED, FAILS}, rows
    for row in flagged:
        hint, reason = row.get("hint") or "", row.get("reason") or ""
        commands = {c for c in COMMAND.findall(hint)}
        assert len(commands) <= 1, f"more than one next step: {hint}"
        assert "would upgrade" not in hint and "again" not in hint, hint
        assert INSTANCE not in reason, f"the reason repeats the instance id: {reason}"
        assert "{run}" not in hint and "RUN" not in hint, hint


def test_retry_with_an_unknown_proxy_changes_nothing(tmp_path: Path, story: tuple[Sim, str, Path]) -> None:
    _sim, _db, story_tmp = story
    copy = tmp_path / "jobs.db"
    shutil.copy(story_tmp / "jobs.db", copy)
    url = f"sqlite:///{copy}"
    before = jobs(url, 2)
    events = db_rows(url, "SELECT count(*) FROM events")[0][0]
    r = cli("retry", "2", "--proxy", REJECTS, "--proxy", "nosuchproxy", "--db", url)
    assert "nosuchproxy" in one_error(r)
    assert jobs(url, 2) == before
    assert db_rows(url, "SELECT count(*) FROM events")[0][0] == events
    assert db_rows(url, "SELECT status FROM runs WHERE id = 2")[0][0] == "finished"


# ------------------------------------------------------------------------------------ --policy FILE
BAD_POLICIES = {
    "duplicate key": (
        "rules:\n  - name: a\n    match: {http_status: 409}\n    action: flag\n    action: retry\n", 5
    ),
    "yes for true": ("rules:\n  - name: a\n    match: {sent: yes}\n    action: flag\n", 3),
    "octal-looking status": ("rules:\n  - name: a\n    match: {http_status: 0409}\n    action: flag\n", 3),
    "unknown key": ("rules:\n  - name: a\n    match: {}\n    action: flag\n    severity: high\n", 5),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_POLICIES), ids=list(BAD_POLICIES))
def test_policy_file_is_read_strictly_with_file_and_line(
    case: str, tmp_path: Path, offline_inventory: Path
) -> None:
    text, line = BAD_POLICIES[case]
    policy = tmp_path / "policy.yaml"
    policy.write_text(text, encoding="utf-8")
    db = tmp_path / "jobs.db"
    for command in ("run", "plan"):
        r = cli(command, str(offline_inventory), "--policy", str(policy), "--db", str(db))
        assert r.code == 2, str(r)
        errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
        assert errors and all(f"{policy}:" in e for e in errors), str(r)
        assert any(f"{policy}:{line}:" in e for e in errors), str(r)
    assert not db.exists()


# ----------------------------------------------------------------- unparseable latest_version
UNREADABLE_LATEST = ["n/a", "", "latest", "2.24.x"]


@pytest.mark.parametrize("latest", UNREADABLE_LATEST, ids=[repr(v) for v in UNREADABLE_LATEST])
def test_an_unparseable_latest_version_is_no_verdict(
    latest: str, sim_factory: Callable[..., Sim], hostile_factory: Callable[..., Hostile], tmp_path: Path
) -> None:
    sim = sim_factory(scenario([{"id": CLEAN}]))
    body = json.dumps({"current_version": CURRENT, "latest_version": latest, "can_upgrade": True})
    rule = {"route": "proxy_version", "action": "raw", "status": 200, "body": body}
    gw = hostile_factory(sim.url, [{**rule, "calls": [1]}])
    inv = inventory(sim, tmp_path / "fleet.yaml")
    p = cli("plan", str(inv), "--endpoint", gw.url, "--format", "json")
    assert p.code == 0, str(p)
    assert json.loads(p.out)["summary"]["upgrade"] == 1, p.out
    gw.set_rules([{**rule, "calls": [1, 2]}])  # the run's credential probe and its preflight
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    r = cli("run", str(inv), "--db", db, "--endpoint", gw.url, *fast())
    assert r.code == 0, str(r)
    assert jobs(db)[CLEAN]["status"] == "succeeded"
    assert [c["proxy_id"] for c in sim.log() if c["route"] == "upgrade"] == [CLEAN]


# -------------------------------------------------------------------------------- Alembic's CLI
def _alembic(ini: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "alembic", "-c", str(ini), *args],
        env=clean_env(), capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.empty_db  # migrates an empty database itself
def test_alembic_cli_migrates_postgresql(pg_url: str, tmp_path: Path) -> None:
    """``alembic upgrade head`` / ``downgrade base`` / ``current`` on a postgresql:// URL, with the
    drivers the orchestrator depends on (no psycopg)."""
    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {ROOT / 'migrations'}\nsqlalchemy.url = {pg_url}\n")
    for args in (["upgrade", "head"], ["downgrade", "base"], ["upgrade", "head"]):
        p = _alembic(ini, *args)
        assert p.returncode == 0, p.stderr[-3000:]
    assert db_rows(pg_url, "SELECT version_num FROM alembic_version") == [(HEAD_REVISION,)]
    p = _alembic(ini, "current")
    assert p.returncode == 0 and HEAD_REVISION in p.stdout, p.stdout + p.stderr
    r = cli("db", "current", "--db", pg_url)
    assert r.code == 0 and r.out.strip() == HEAD_REVISION, str(r)


@pytest.mark.empty_db  # migrates an empty database itself
def test_processes_started_together_on_a_new_database_all_migrate_it(pg_url: str) -> None:
    procs = [
        subprocess.Popen(
            [PY, "-m", "orchestrator", "db", "upgrade", "--db", pg_url],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in procs]
    for p in procs:
        for stream in (p.stdout, p.stderr):
            if stream is not None:
                stream.close()
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    assert db_rows(pg_url, "SELECT version_num FROM alembic_version") == [(HEAD_REVISION,)]


# ------------------------------------------------------------------------------- send_log pruning
def test_send_permits_are_pruned_once_they_left_the_window(pg_url: str) -> None:
    """PostgreSQL's run-wide permits (``send_log``): the heartbeat's prune deletes ended permits older than
    the window it is given, and keeps live ones and recent ones."""
    from datetime import timedelta

    from sqlalchemy import text

    from orchestrator.store import NewJob, open_store
    from orchestrator.store import db as dbmod

    job = NewJob(
        project_id="0" * 32, instance_id=INSTANCE, proxy_id=CLEAN, endpoint="", target_version=TARGET
    )

    async def go() -> tuple[int, int]:
        store = await open_store(pg_url)
        engine = dbmod.create_engine(pg_url)
        try:
            run, _reg = await store.create_run(
                name="prune", inventory_path="/dev/null", inventory_sha256="0" * 64, options={},
                jobs=lambda: iter([job]), runner_id="test:1:abc", lease_s=30,
            )  # fmt: skip
            now = store.db_now()
            async with engine.begin() as conn:
                for age, done in ((600, True), (600, False), (5, True)):
                    await conn.execute(
                        text("INSERT INTO send_log (run_id, at, worker, done_at) VALUES (:r, :at, 'w', :d)"),
                        {"r": run.id, "at": now - timedelta(seconds=age), "d": now if done else None},
                    )
            return await store.prune_send_log(run.id, keep_s=60), run.id
        finally:
            await engine.dispose()
            await store.close()

    pruned, run_id = asyncio.run(go())
    assert pruned == 1
    left = db_rows(pg_url, f"SELECT done_at IS NULL FROM send_log WHERE run_id = {run_id} ORDER BY id")
    assert [bool(r[0]) for r in left] == [True, False]
