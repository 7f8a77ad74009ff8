"""Real faults for the fault-tolerance tests (issue 11): a private PostgreSQL cluster a test may restart or
stop, libfaketime for a skewed clock, freezing a process (SIGSTOP) at a chosen moment, a hostile server
as a subprocess, a TLS listener that counts connections, and the two invariants every such test ends on.

Everything listens on 127.0.0.1 only; nothing here connects outside this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PY, ROOT, Sim, _free_port, _pg_bindir, clean_env, db_rows, text_of
from tests.simlog import created_workflow_ids, sent_after_applied, upgrade_calls

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
FAST = ["--poll-initial", "0.2", "--poll-interval", "0.2", "--reconcile-grace", "1", "--seed", "1"]


# ------------------------------------------------------------------ scenarios and waiting
def scenario(
    n: int, *, seed: int = 11, latency_s: float = 0.01, running_s: float = 400, **extra: Any
) -> dict[str, Any]:
    """A clean generated fleet of ``n`` proxies, one per instance; workflow times in scenario seconds
    (speed 200: ``running_s`` 400 is 2 s of real time)."""
    base: dict[str, Any] = {
        "seed": seed,
        "speed": 200,
        "latency_s": latency_s,
        "workflow": {"pending_s": 100, "running_s": running_s, "job_visible_after_s": 100},
        "fleet": {"generate": {"proxies": n, "proxies_per_instance": 1}},
    }
    base.update(extra)
    return base


def rows(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """``conftest.db_rows`` with bound parameters (``:name``): worker ids hold colons."""
    import asyncio

    from sqlalchemy import text

    from orchestrator.store import db

    async def go() -> list[tuple[Any, ...]]:
        engine = db.create_engine(db.normalize_url(url))
        try:
            async with engine.connect() as conn:
                return [tuple(r) for r in (await conn.execute(text(sql), params)).all()]
        finally:
            await engine.dispose()

    return asyncio.run(go())


# ------------------------------------------------------------------ the invariants
def recorded_workflow_ids(db: str) -> set[str]:
    return {w for (w,) in db_rows(db, "SELECT workflow_id FROM workflows WHERE workflow_id IS NOT NULL")}


def assert_no_second_upgrade(sim: Sim, db: str) -> list[dict[str, Any]]:
    """The simulator's log shows no upgrade call after an applied one for the same proxy, and every
    workflow id the cloud issued is in the job table. Returns the log."""
    log = sim.log()
    twice = {
        p: [(r["seq"], r["http_status"], r["effect"], r["workflows"]) for r in calls]
        for p, calls in sent_after_applied(log).items()
    }
    assert not twice, (
        f"{len(twice)} proxies got an upgrade call after an applied one: {dict(list(twice.items())[:4])}"
    )
    missing = created_workflow_ids(log) - recorded_workflow_ids(db)
    assert not missing, (
        f"{len(missing)} workflow ids the cloud issued are not in the job table: {sorted(missing)[:5]}"
    )
    return log


def parse_ts(value: Any) -> datetime:
    """A timestamp column read through a raw query: a datetime (PostgreSQL) or text (SQLite, UTC)."""
    ts = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def upgraded_proxies(sim: Sim) -> set[str]:
    return {r["proxy_id"] for r in upgrade_calls(sim.log())}


def job_statuses(db: str, run_id: int = 1) -> dict[str, str]:
    return {p: s for p, s in db_rows(db, f"SELECT proxy_id, status FROM jobs WHERE run_id = {run_id}")}


# ------------------------------------------------------------------ clocks
def faketime_env(offset_s: int) -> dict[str, str]:
    """Environment that runs a process with its wall clock ``offset_s`` seconds off (Debian's libfaketime);
    the monotonic clock stays real. Skips the test when the library is not installed."""
    if not FAKETIME_LIB.exists():
        pytest.skip(f"libfaketime is not installed ({FAKETIME_LIB}; apt-get install faketime)")
    return {
        "LD_PRELOAD": str(FAKETIME_LIB),
        "FAKETIME": f"{offset_s:+d}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }


# ------------------------------------------------------------------ processes and sockets
def client_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process ``pid`` holds (from /proc): maps a process to its rows in
    ``pg_stat_activity.client_port``."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def sqlite_file(db: str) -> Path:
    return Path(db.split("///", 1)[1])


def sqlite_unlocked(db: str) -> bool:
    """No process holds the SQLite job table's write lock right now."""
    import sqlite3

    conn = sqlite3.connect(sqlite_file(db), timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def freeze_when(
    p: subprocess.Popen[Any], ready: Callable[[], Any], *, tries: int = 300, settle: float = 0.3
) -> Any:
    """SIGSTOP ``p`` at a moment ``ready()`` (asked while it is stopped, ``settle`` s after the stop, so
    whatever it had already sent has arrived) returns something truthy; returns that value and leaves
    ``p`` stopped. Between tries ``p`` runs a little."""
    for _ in range(tries):
        assert p.poll() is None, f"process {p.pid} exited {p.returncode} before it could be frozen"
        p.send_signal(signal.SIGSTOP)
        time.sleep(settle)
        try:
            value = ready()
        except Exception:
            value = None
        if value:
            return value
        p.send_signal(signal.SIGCONT)
        time.sleep(0.05 + 0.1 * (_ % 3))
    raise AssertionError(f"process {p.pid} never reached the wanted state to freeze in")


def freeze_holding_run_lock(
    p: subprocess.Popen[Any], url: str, *, table: str = "send_log", tries: int = 40, wait_s: float = 1.5
) -> None:
    """SIGSTOP ``p`` while its PostgreSQL session is idle in a transaction that holds an advisory lock
    (the run's lock, taken by its permit or claim batch), and leave it stopped.

    Made deterministic rather than caught by chance (a batch holds the lock for a millisecond or two):
    this session takes ``table`` in EXCLUSIVE mode, so the next batch that got the run's lock blocks on
    its first write to ``table`` with the lock held. If that batch is ``p``'s, ``p`` is stopped and the
    table released: the blocked statement completes on the server, and the session waits, idle in its
    transaction, for a process that no longer reads. If another process's batch got there first, the
    table is released and the next try begins. Each try holds the table under ``wait_s`` (below the
    program's 5 s ``lock_timeout``). Raises AssertionError if ``p`` exits or is never caught."""
    import asyncio

    import asyncpg

    loop = asyncio.new_event_loop()
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")

    async def caught_in(conn: Any, ports: set[int]) -> bool | None:
        """True: a session of ``p`` on this database holds an advisory lock and waits on a lock; False:
        another process's session does; None: neither yet. (Other tests share the server: their
        sessions, on other databases, are left out.)"""
        found = await conn.fetch(
            "SELECT a.client_port FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
            " WHERE a.pid <> pg_backend_pid() AND a.datname = current_database() GROUP BY a.client_port"
            " HAVING bool_or(l.locktype = 'advisory' AND l.granted) AND bool_or(NOT l.granted)"
        )
        if not found:
            return None
        return any(port in ports for (port,) in found)

    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for _ in range(tries):
                assert p.poll() is None, f"process {p.pid} exited {p.returncode} before it could be frozen"
                ports = client_ports(p.pid)
                tx = conn.transaction()
                await tx.start()
                await conn.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
                verdict = None
                deadline = time.monotonic() + wait_s
                while verdict is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                    verdict = await caught_in(conn, ports)
                if verdict:
                    p.send_signal(signal.SIGSTOP)
                await tx.rollback()
                if verdict:
                    for _ in range(100):
                        if frozen_in(await conn.fetch(IDLE_HOLDING_ADVISORY), ports):
                            return
                        await asyncio.sleep(0.02)
                    p.send_signal(signal.SIGCONT)
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
        raise AssertionError(f"process {p.pid} was never caught holding the run's lock")

    try:
        loop.run_until_complete(go())
    finally:
        loop.close()


# Sessions idle in a transaction that holds a granted advisory lock, by client port.
IDLE_HOLDING_ADVISORY = (
    "SELECT a.client_port FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND a.state = 'idle in transaction'"
)


def frozen_in(found: Iterable[Any], ports: set[int]) -> list[int]:
    """The client ports among ``found`` (rows of :data:`IDLE_HOLDING_ADVISORY`) that are in ``ports``."""
    return [row[0] for row in found if row[0] in ports]


# ------------------------------------------------------------------ a private PostgreSQL cluster
class PgCluster:
    """A throw-away PostgreSQL cluster on 127.0.0.1 that a test may restart or stop (never the session's
    shared server). Started like conftest's: initdb and pg_ctl as the ``postgres`` user when root."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="orch-pg-private-"))
        self.data = self.base / "data"
        self.port = _free_port()
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self._ctl_run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def _ctl_run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.run_as, str(self.bindir / tool), *args], check=True, capture_output=True, text=True
        )

    def _pg_ctl(self, *args: str) -> None:
        self._ctl_run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "log"), "-w", *args)

    def start(self) -> None:
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off -c max_connections=100 "
            f"-c unix_socket_directories={self.base}"
        )
        self._pg_ctl("-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "stop")

    def restart(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "restart")

    def running(self) -> bool:
        return (
            subprocess.run(
                [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"],
                capture_output=True,
            ).returncode
            == 0
        )

    def new_db(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.sql("postgres", f'CREATE DATABASE "{name}"')
        return f"{self.url}/{name}"

    def sql(self, db: str, statement: str) -> None:
        import asyncio

        import asyncpg

        async def go() -> None:
            conn = await asyncpg.connect(f"{self.url}/{db}")
            try:
                await conn.execute(statement)
            finally:
                await conn.close()

        asyncio.run(go())

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            subprocess.run(
                [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                capture_output=True,
            )
        shutil.rmtree(self.base, ignore_errors=True)


def private_cluster() -> Iterator[PgCluster]:
    """For a module-scoped fixture: a PostgreSQL cluster of the module's own, for tests that restart or
    stop the server."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries here (pg_config --bindir)")
    cluster = PgCluster(bindir)
    try:
        yield cluster
    finally:
        cluster.destroy()


def fresh_db(cluster: PgCluster) -> str:
    """A new database on ``cluster``, started again first if an earlier test left it stopped."""
    if not cluster.running():
        cluster.start()
    return cluster.new_db()


# ------------------------------------------------------------------ hostile servers
def start_hostile(
    tmp: Path,
    upstream: str | None,
    rules: Iterable[dict[str, Any]] = (),
    *,
    tls: tuple[Path, Path] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m tests.hostile`` in front of ``upstream``; returns the process and its URL."""
    ready = tmp / f"hostile-{uuid.uuid4().hex[:6]}.ready"
    args = [PY, "-m", "tests.hostile", "--rules", json.dumps(list(rules)), "--ready-file", str(ready)]
    if upstream:
        args += ["--upstream", upstream]
    if tls is not None:
        args += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    out = open(tmp / "hostile.out", "ab")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=clean_env())
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"hostile server did not start: {text_of(tmp / 'hostile.out')}")
        time.sleep(0.05)
    return proc, ready.read_text().strip()


def hostile_log(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url.replace("https://", "http://") + "/_hostile/log", timeout=30) as r:
        return list(json.loads(r.read()))


def self_signed_cert(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the openssl command; Debian images have it)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make a test certificate")
    cert, key = tmp / "self.pem", tmp / "self.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1", "-days", "2",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


class CountingListener:
    """A listener on 127.0.0.1 that counts TCP connections; with ``tls`` it offers that certificate
    (a client that does not trust it fails the handshake). Nothing is ever answered."""

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.accepted = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._ctx: ssl.SSLContext | None = None
        if tls is not None:
            self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            with contextlib.suppress(Exception):
                conn.settimeout(5)
                if self._ctx is not None:
                    with self._ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def rss_wrapped(*args: str, rss_file: Path) -> list[str]:
    """A command line running the orchestrator CLI in a Python that writes its own peak RSS (KiB) to
    ``rss_file`` when it exits, however it exits."""
    code = (
        "import atexit, resource, sys\n"
        f"atexit.register(lambda: open({str(rss_file)!r}, 'w').write("
        "str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
        "from orchestrator.cli import main\n"
        "sys.argv = ['orchestrator', *sys.argv[1:]]\n"
        "main()\n"
    )
    return [sys.executable, "-c", code, *args]
