"""Shared fixtures: a real simulator process on 127.0.0.1, the real CLI as a subprocess, and job tables on
SQLite files and on a real PostgreSQL server.

PostgreSQL: ``ORCHESTRATOR_TEST_PG_URL`` (a server someone started) wins; otherwise, when Debian's server
binaries are on the machine, a throw-away cluster is started for the session (as the ``postgres`` user
when running as root, since initdb refuses root). Without either, PostgreSQL cases are skipped with a
message saying so; CI always has one.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Every process the suite starts talks to 127.0.0.1 only, over plain HTTP or, in the TLS cases, with its own
# CA passed as --ca-bundle. aiohttp builds a verifying SSL context when it is imported, which parses the
# whole system CA bundle named here (about 80 ms of CPU in each of the suite's ~900 processes). An empty
# file instead: a certificate is then still found, only when a handshake needs one, through the hashed
# directory (SSL_CERT_DIR, or OpenSSL's default one).
os.environ["SSL_CERT_FILE"] = os.devnull


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
        terminate(self.proc)


def terminate(proc: subprocess.Popen[Any]) -> None:
    """Stop a server this test suite started: SIGTERM (it closes cleanly), SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def stop_process(p: subprocess.Popen[Any]) -> None:
    """Kill one process a test started (by its pid), thawing it first if it was frozen."""
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait(10)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Background processes a test started; whatever is left is killed (by pid) at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        stop_process(p)


def text_of(path: Path) -> str:
    """A file's text so far ("" before it exists), for assertion messages."""
    return path.read_text(errors="replace") if path.exists() else ""


def wait_until(
    what: str,
    cond: Callable[[], Any],
    timeout: float,
    procs: Iterable[subprocess.Popen[Any]] = (),
    outputs: Callable[[], str] = str,
    every: float = 0.1,
) -> Any:
    """Poll ``cond`` until it returns something truthy (returned); fail after ``timeout`` seconds or when
    one of ``procs`` exits first, with ``outputs()`` in the message. An error of ``cond`` counts as "not
    yet" (tables not there yet, a server restarting, ...)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            value = cond()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{outputs()}")
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: process {p.pid} exited {p.returncode} first\n{outputs()}")
        time.sleep(every)


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


# Simulator processes kept between cases (one pool per pytest-xdist worker): a case's simulator is an idle
# one reset to the case's scenario and call log (``POST /_sim/reset``: a new fleet, log and counters, as
# if just started), so the suite starts a handful of simulator processes instead of four hundred (each
# start cost about half a second of CPU, a quarter of the suite's). A simulator a case stopped or killed
# is not reused; one that cannot be reset (calls still in flight after 3 s) is stopped.
_IDLE_SIMS: list[Sim] = []


def _reset_sim(sim: Sim, tmp: Path, scenario: dict[str, Any] | str, name: str) -> Sim | bool:
    """``sim``'s process serving ``scenario`` with a new call log in ``tmp``; else whether the process
    can still be reused (True: it refused the scenario and serves its old one; False: it is gone, or
    calls stayed in flight)."""
    scen = tmp / f"{name}-scenario.yaml"
    scen.write_text(scenario if isinstance(scenario, str) else yaml.safe_dump(scenario), encoding="utf-8")
    log = tmp / f"{name}-calls.jsonl"
    body = json.dumps({"scenario": str(scen), "log_file": str(log)}).encode()
    deadline = time.monotonic() + 3
    while sim.proc.poll() is None:
        req = urllib.request.Request(
            sim.url + "/_sim/reset", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=10):
                return Sim(sim.url, sim.proc, log, scen, sim.stdout)
        except urllib.error.HTTPError as exc:
            if exc.code == 400:
                return True
            if exc.code != 409 or time.monotonic() > deadline:
                return False
        except OSError:
            return False
        time.sleep(0.05)
    return False


def _stop_idle_sims() -> None:
    while _IDLE_SIMS:
        _IDLE_SIMS.pop().stop()


atexit.register(_stop_idle_sims)


@pytest.fixture
def sim_factory(tmp_path: Path) -> Iterator[Any]:
    """``make(scenario, name="sim")``: a simulator serving ``scenario`` (a mapping or YAML text) with its
    call log in ``tmp_path``: a pooled process reset to it, or a new one."""
    used: list[Sim] = []

    def make(scenario: dict[str, Any] | str, name: str = "sim") -> Sim:
        s: Sim | None = None
        while _IDLE_SIMS and s is None:
            idle = _IDLE_SIMS.pop()
            got = _reset_sim(idle, tmp_path, scenario, name)
            if isinstance(got, Sim):
                s = got
            elif got:  # a scenario it refused: a new process says why, as before
                _IDLE_SIMS.append(idle)
                break
            else:
                idle.stop()
        if s is None:
            s = start_sim(tmp_path, scenario, name)
        used.append(s)
        return s

    yield make
    for s in used:
        if s.proc.poll() is None:
            with contextlib.suppress(OSError):
                s.proc.send_signal(signal.SIGCONT)  # a case may have left it stopped
            _IDLE_SIMS.append(s)


@pytest.fixture
def hostile_factory(tmp_path: Path) -> Iterator[Any]:
    """``make(upstream, rules, name="hostile")``: a fault-injecting gateway in front of ``upstream``
    (``tests/issue10.py``), stopped at the end."""
    from tests.issue10 import start_hostile

    started: list[Any] = []

    def make(upstream: str, rules: list[dict[str, Any]], name: str = "hostile") -> Any:
        h = start_hostile(tmp_path, upstream, rules, name)
        started.append(h)
        return h

    yield make
    for h in started:
        h.stop()


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
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    # Under pytest-xdist every worker starts a cluster of its own (its own folder and socket directory); a
    # port found free can still be taken by another worker's cluster before this one binds it: try another.
    for attempt in range(5):
        port = _free_port()
        started = subprocess.run(
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
            capture_output=True,
        )
        if started.returncode == 0:
            break
        if attempt == 4:
            raise RuntimeError(
                f"PostgreSQL did not start: {(base / 'log').read_text(errors='replace')[-2000:]}"
            )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


_PG_TEMPLATES: dict[str, str] = {}


def _create_pg_db(base: str, *, migrated: bool = True) -> str:
    """A new database on the server at ``base``: a copy of one migrated to head once per session
    (``CREATE DATABASE ... TEMPLATE``: Alembic on a new PostgreSQL database costs about 0.65 s of CPU in
    the process that runs it, and nearly every PostgreSQL case starts from one), or an empty one
    (``migrated=False``: the cases that test migrating, marked ``empty_db``)."""
    import asyncio

    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    if _loop_running():
        return f"{base}/{name}"
    template = _pg_template(base) if migrated else None

    async def go() -> None:
        conn = await asyncpg.connect(base + "/postgres")
        try:
            clause = f' TEMPLATE "{template}"' if template else ""
            await conn.execute(f'CREATE DATABASE "{name}"{clause}')
        finally:
            await conn.close()

    asyncio.run(go())
    return f"{base}/{name}"


def _pg_template(base: str) -> str:
    """The name of this session's migrated template database on ``base`` (made on first use)."""
    if base not in _PG_TEMPLATES:
        import asyncio

        from orchestrator.store import db

        url = _create_pg_db(base, migrated=False)

        async def migrate() -> None:
            engine = db.create_engine(db.normalize_url(url))
            try:
                await db.upgrade(engine)
            finally:
                await engine.dispose()  # a template must have no session open when it is copied

        asyncio.run(migrate())
        _PG_TEMPLATES[base] = url.rsplit("/", 1)[1]
    return _PG_TEMPLATES[base]


def _loop_running() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh job table on each backend (the PostgreSQL case carries the ``postgres`` marker): a SQLite
    file not made yet (the program makes it at head from the schema snapshot, ``store/fresh.py``), or a
    new PostgreSQL database at head (``_create_pg_db``; empty for a case marked ``empty_db``)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    pg_server: str | None = request.getfixturevalue("pg_server")  # no server started for SQLite cases
    if pg_server is None:
        pytest.skip("no PostgreSQL here (set ORCHESTRATOR_TEST_PG_URL or install postgresql)")
    return _create_pg_db(pg_server, migrated=request.node.get_closest_marker("empty_db") is None)


def on_both_backends_once(argname: str, values: list[Any], ids: list[str] | None = None) -> Any:
    """``parametrize`` a ``db_url`` case over ``values``: every value on SQLite, the first on PostgreSQL
    too. For matrices whose values are the concern (answer kinds, signals) and the backend is not: the
    store's SQL runs on both backends in tests/unit/test_store.py and each case function still runs on
    both; only the product of the two lists is cut (it cost a PostgreSQL run per value)."""
    names = ids or [str(v) for v in values]
    params = [pytest.param("sqlite", v, id=f"sqlite-{n}") for v, n in zip(values, names, strict=True)]
    pg = pytest.mark.postgres
    params.append(pytest.param("postgresql", values[0], id=f"postgresql-{names[0]}", marks=pg))
    return pytest.mark.parametrize(("db_url", argname), params, indirect=["db_url"])


@pytest.fixture
def pg_url(request: pytest.FixtureRequest, pg_server: str | None) -> str:
    """A new PostgreSQL database at head, or empty for a case marked ``empty_db`` (cases using it carry
    the ``postgres`` marker)."""
    if pg_server is None:
        pytest.skip("no PostgreSQL here (set ORCHESTRATOR_TEST_PG_URL or install postgresql)")
    return _create_pg_db(pg_server, migrated=request.node.get_closest_marker("empty_db") is None)


def pytest_configure(config: pytest.Config) -> None:
    """Byte-compile the package once, before any case starts a process.

    The integration cases start about a thousand ``orchestrator`` processes. An editable install has no
    ``.pyc`` files, and where ``PYTHONDONTWRITEBYTECODE`` is set (this machine image sets it) no process
    writes them either: each one compiled every module it imported again, about 0.25 s of CPU per process
    (measured), a fifth of the suite's CPU. Python still reads ``.pyc`` files with that variable set.
    Done by the controller only (pytest-xdist workers carry ``workerinput``)."""
    if hasattr(config, "workerinput"):
        return
    import compileall

    root = Path(__file__).resolve().parent.parent
    for folder in ("orchestrator", "migrations"):
        if (root / folder).is_dir():
            compileall.compile_dir(root / folder, quiet=2)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``postgres`` on every case that needs a PostgreSQL server: ``db_url``'s PostgreSQL parameter carries
    it already; a case that asks for ``pg_url`` or ``pg_server`` itself gets it here.

    Then the ``slow`` cases first (a stable sort: the order within each kind is kept): under pytest-xdist
    the long ones start at once and the short ones fill the workers around them, instead of one long case
    starting last and running alone."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "pg_url" in names or ("pg_server" in names and "db_url" not in names):
            item.add_marker(pytest.mark.postgres)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# ------------------------------------------------------------------ helpers
def make_inventory(sim: Sim, path: Path, fmt: str = "yaml") -> Path:
    """An inventory for the simulator's fleet, written by the code behind ``orchestrator simulator
    --export-inventory`` (called in-process: a process per case cost half a second of CPU each; the command
    itself is tested in tests/integration/test_issue10_operator.py and test_simulator.py)."""
    from orchestrator.simulator import Scenario, scenario_to_inventory

    scenario_to_inventory(Scenario.load(str(sim.scenario_file)), str(path), fmt=fmt)
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
