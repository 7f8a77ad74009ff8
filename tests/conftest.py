"""Shared fixtures: a real simulator process on 127.0.0.1, the real CLI as a subprocess, and job tables on
SQLite files and on a real PostgreSQL server.

PostgreSQL: ``ORCHESTRATOR_TEST_PG_URL`` (a server someone started) wins; otherwise, when Debian's server
binaries are on the machine, a throw-away cluster is started for the session (as the ``postgres`` user
when running as root, since initdb refuses root). Without either, PostgreSQL cases are skipped with a
message saying so; CI always has one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


# ----------------------------------------------------------------- simulator
@dataclass
class Sim:
    url: str
    proc: subprocess.Popen[bytes]
    log_file: Path
    scenario_file: Path
    stdout: Path = field(default=Path("/dev/null"))

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def log(self) -> list[dict[str, Any]]:
        return list(self._get("/_sim/log"))

    def fleet(self) -> list[dict[str, Any]]:
        data = self._get("/_sim/fleet")
        return list(data["proxies"] if isinstance(data, dict) and "proxies" in data else data)

    def stats(self) -> dict[str, Any]:
        return dict(self._get("/_sim/stats"))

    def patch(self, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            self.url + "/_sim/patch",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_sim(tmp: Path, scenario: dict[str, Any] | str, name: str = "sim") -> Sim:
    scen = tmp / f"{name}-scenario.yaml"
    scen.write_text(scenario if isinstance(scenario, str) else yaml.safe_dump(scenario), encoding="utf-8")
    ready = tmp / f"{name}.ready"
    log = tmp / f"{name}-calls.jsonl"
    out = tmp / f"{name}.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(
            [
                PY,
                "-m",
                "orchestrator",
                "simulator",
                "--port",
                "0",
                "--scenario",
                str(scen),
                "--log-file",
                str(log),
                "--ready-file",
                str(ready),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"simulator did not start: {out.read_text()}")
        time.sleep(0.05)
    sim = Sim(ready.read_text().strip(), proc, log, scen, out)
    sim.stats()  # a long-running gateway is warm: the first request of a new process is not typical
    return sim


@pytest.fixture
def sim_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Sim] = []

    def make(scenario: dict[str, Any] | str, name: str = "sim") -> Sim:
        s = start_sim(tmp_path, scenario, name)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


# ----------------------------------------------------------------------- CLI
@dataclass
class Result:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out[-4000:]}\n--- stderr\n{self.err[-4000:]}"


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "HUAWEICLOUD_"))}
    env.update({"NO_COLOR": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    input: str | None = None,
) -> Result:
    p = subprocess.run(
        [PY, "-m", "orchestrator", *args],
        cwd=cwd,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input if input is not None else "",
    )
    return Result(p.returncode, p.stdout, p.stderr)


def cli_bg(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, stdout: Path | None = None
) -> subprocess.Popen[bytes]:
    fh = open(stdout, "ab") if stdout else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [PY, "-m", "orchestrator", *args],
        cwd=cwd,
        env=clean_env(env),
        stdout=fh,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


# ---------------------------------------------------------------- PostgreSQL
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    d = Path(out.strip())
    return d if (d / "initdb").exists() else None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str | None]:
    """A base URL (without database) of a running PostgreSQL, or None."""
    given = os.environ.get("ORCHESTRATOR_TEST_PG_URL")
    if given:
        yield given.rsplit("/", 1)[0]
        return
    bindir = _pg_bindir()
    if bindir is None:
        yield None
        return
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="orch-pg-"))
    data = base / "data"
    run_as: list[str] = []
    if as_root:
        shutil.chown(base, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(base / "log"),
            "-w",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -c fsync=off -c max_connections=200 "
            f"-c unix_socket_directories={base}",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


def _create_pg_db(base: str) -> str:
    import asyncio

    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"

    async def go() -> None:
        conn = await asyncpg.connect(base + "/postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(go()) if not _loop_running() else None
    return f"{base}/{name}"


def _loop_running() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty job table on each backend (the PostgreSQL case carries the ``postgres`` marker)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    pg_server: str | None = request.getfixturevalue("pg_server")  # no server started for SQLite cases
    if pg_server is None:
        pytest.skip("no PostgreSQL here (set ORCHESTRATOR_TEST_PG_URL or install postgresql)")
    return _create_pg_db(pg_server)


@pytest.fixture
def pg_url(pg_server: str | None) -> str:
    """A fresh, empty PostgreSQL database (cases using it carry the ``postgres`` marker)."""
    if pg_server is None:
        pytest.skip("no PostgreSQL here (set ORCHESTRATOR_TEST_PG_URL or install postgresql)")
    return _create_pg_db(pg_server)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``postgres`` on every case that needs a PostgreSQL server: ``db_url``'s PostgreSQL parameter carries
    it already; a case that asks for ``pg_url`` or ``pg_server`` itself gets it here."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "pg_url" in names or ("pg_server" in names and "db_url" not in names):
            item.add_marker(pytest.mark.postgres)


# ------------------------------------------------------------------ helpers
def make_inventory(sim: Sim, path: Path, fmt: str = "yaml") -> Path:
    """An inventory for the simulator's fleet, through the product's own export command."""
    r = cli("simulator", "--scenario", str(sim.scenario_file), "--export-inventory", str(path))
    assert r.code == 0, str(r)
    return path


def db_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Run a read query on the job table the way an auditor would (synchronous, outside the program)."""
    import asyncio

    from sqlalchemy import text

    from orchestrator.store import db

    async def go() -> list[tuple[Any, ...]]:
        engine = db.create_engine(db.normalize_url(url))
        try:
            async with engine.connect() as conn:
                return [tuple(r) for r in (await conn.execute(text(sql))).all()]
        finally:
            await engine.dispose()

    return asyncio.run(go())
