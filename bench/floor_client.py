"""The floor: the bare aiohttp loop plus the least durable record any tool bound by issue 14's rules keeps.

Issue 14 asks for durable records at close to a bare loop's speed, without giving up: an intent committed
before each call, every answer committed before the job moves on, group commit allowed, no transaction
open across a call. This client is ``bare_client.py`` with exactly that and nothing else, written as
cheaply as Python allows, so the orchestrator's ratio can be read against what the rules themselves cost:

- one SQLite file (WAL, ``synchronous=FULL``, as the orchestrator's job table), two tables: ``jobs``
  (id, proxy, status, attempts, workflow id) and ``attempts`` (one row per call);
- per call, an intent (the job's guarded move to ``in_flight`` and its attempt row) committed before the
  call leaves, and an answer (the attempt's outcome and workflow id, the job's move) committed after;
- group commit: every record queued while a commit runs goes into the next one (one ``BEGIN IMMEDIATE``
  ... ``COMMIT`` with its fsync per group), raw ``sqlite3`` with positional parameters, no events, no
  leases, no limiter, no decision logic, no logging.

``--guards`` adds what a tool that more than one process may run, and that is killed at any moment,
cannot do without, still written as cheaply: jobs are claimed in bulk under a lease (one ``UPDATE ...
RETURNING`` per half a pool), the intent's move is guarded on the claim and its lease and its result
checked (a lost guard sends nothing), the answer's move is guarded on the claim and releases it, and
every move appends an ``events`` row (indexed by job, as an audit trail is read).

``--writer thread`` commits on a writer thread (as the orchestrator does, so the loop never waits for an
fsync); ``--writer inline`` commits on the loop's own thread once per loop turn (no thread hand-off,
but the loop stops for each fsync). bench/run.py runs ``inline``, the faster of the two here (three
runs each at 10,000 proxies, 0 ms: 4,456-5,681 calls/s against 3,487-4,693).

Run: ``python bench/floor_client.py INVENTORY.csv URL DB [--concurrency 64] [--writer thread] [--guards]``.
Prints
one JSON line: ``calls``, ``accepted``, ``elapsed_s``, ``calls_per_s``, ``commits``, ``cpu_s`` (this
process, every thread: user + system).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import resource
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
from bare_client import proxies

Record = tuple[str, tuple[Any, ...]]
Write = tuple[tuple[Record, ...], str, "asyncio.Future[Any]"]
SCHEMA = (
    "CREATE TABLE jobs (id INTEGER PRIMARY KEY, proxy TEXT NOT NULL, status TEXT NOT NULL,"
    " attempts INTEGER NOT NULL, workflow_id TEXT, updated_at TEXT)",
    "CREATE TABLE attempts (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs(id),"
    " number INTEGER NOT NULL, sent_at TEXT NOT NULL, outcome TEXT NOT NULL, workflow_id TEXT,"
    " answered_at TEXT)",
)
INTENT = (
    "UPDATE jobs SET status = 'in_flight', attempts = attempts + 1, updated_at = ?"
    " WHERE id = ? AND status = 'pending'",
    "INSERT INTO attempts (id, job_id, number, sent_at, outcome) VALUES (?, ?, 1, ?, 'in_flight')",
)
ANSWER = (
    "UPDATE attempts SET outcome = ?, workflow_id = ?, answered_at = ? WHERE id = ?",
    "UPDATE jobs SET status = ?, workflow_id = ?, updated_at = ? WHERE id = ?",
)


# --guards: the claim, the guarded moves and the audit trail
GUARDS_SCHEMA = (
    "ALTER TABLE jobs ADD COLUMN claimed_by TEXT",
    "ALTER TABLE jobs ADD COLUMN lease_expires_at TEXT",
    "CREATE INDEX ix_jobs_status ON jobs (status, id)",
    "CREATE TABLE events (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL, at TEXT NOT NULL,"
    " from_status TEXT NOT NULL, to_status TEXT NOT NULL, reason TEXT)",
    "CREATE INDEX ix_events_job ON events (job_id)",
)
CLAIM = (
    "UPDATE jobs SET claimed_by = ?, lease_expires_at = ? WHERE id IN (SELECT id FROM jobs"
    " WHERE status = 'pending' AND (claimed_by IS NULL OR lease_expires_at <= ?) ORDER BY id LIMIT ?)"
    " RETURNING id"
)
GUARDED_INTENT = (
    "UPDATE jobs SET status = 'in_flight', attempts = attempts + 1, updated_at = ?"
    " WHERE id = ? AND status = 'pending' AND claimed_by = ? AND lease_expires_at > ?"
)
GUARDED_ANSWER = (
    "UPDATE jobs SET status = ?, workflow_id = ?, updated_at = ?, claimed_by = NULL, lease_expires_at = NULL"
    " WHERE id = ? AND status = 'in_flight' AND claimed_by = ?"
)
EVENT = "INSERT INTO events (job_id, at, from_status, to_status, reason) VALUES (?, ?, ?, ?, ?)"
ME = "floor-1"
LEASE_S = 30


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def stamp(ahead_s: float = 0.0) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() + ahead_s))


class GroupCommit:
    """Queue writes (a few records each); every group commits in one transaction; each write's future
    resolves after it, to True, or to False when its first record is a guard that matched no row (the
    write's other records are then skipped), or to the rows of a query (``query``)."""

    def __init__(self, conn: sqlite3.Connection, mode: str) -> None:
        self.conn = conn
        self.mode = mode
        self.loop = asyncio.get_running_loop()
        self.commits = 0
        self._pending: list[Write] = []
        self._scheduled = False
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        if mode == "thread":
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()

    def write(self, *records: Record, guarded: bool = False) -> asyncio.Future[Any]:
        return self._queue(records, "guard" if guarded else "")

    def query(self, sql: str, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        return self._queue(((sql, args),), "query")

    def _queue(self, records: tuple[Record, ...], kind: str) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self.loop.create_future()
        if self.mode == "thread":
            self._q.put((records, kind, fut))
        else:
            self._pending.append((records, kind, fut))
            if not self._scheduled:
                self._scheduled = True
                self.loop.call_soon(self._flush_inline)
        return fut

    def _commit(self, group: list[Write]) -> list[Any]:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        results: list[Any] = []
        for records, kind, _ in group:
            if kind == "query":
                sql, args = records[0]
                results.append(c.execute(sql, args).fetchall())
                continue
            won = True
            for i, (sql, args) in enumerate(records):
                n = c.execute(sql, args).rowcount
                if i == 0 and kind == "guard" and n == 0:
                    won = False
                    break
            results.append(won)
        c.execute("COMMIT")
        self.commits += 1
        return results

    def _flush_inline(self) -> None:
        self._scheduled = False
        group, self._pending = self._pending, []
        _resolve_all([f for *_, f in group], self._commit(group))

    def _serve(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            group = [first]
            while True:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._q.put(None)
                    break
                group.append(item)
            results = self._commit(group)
            self.loop.call_soon_threadsafe(_resolve_all, [f for *_, f in group], results)

    def close(self) -> None:
        if self.mode == "thread":
            self._q.put(None)
            self._thread.join()


def _resolve_all(futs: list[asyncio.Future[Any]], results: list[Any]) -> None:
    for f, r in zip(futs, results, strict=True):
        f.set_result(r)


class Claims:
    """--guards: the jobs this process claimed, under a lease, in bulk: a claim of a whole pool is
    committed whenever less than half a pool is left (as the orchestrator's feeder does)."""

    def __init__(self, writer: GroupCommit, size: int) -> None:
        self.writer = writer
        self.size = size
        self.claims = 0
        self._ready: deque[int] = deque()
        self._claiming: asyncio.Future[Any] | None = None

    async def next(self) -> int | None:
        """The next claimed job's id, or None when nothing is left to claim."""
        while True:
            if self._ready:
                job_id = self._ready.popleft()
                if len(self._ready) < self.size // 2:
                    self._claim()
                return job_id
            got = await self._claim()
            if not got and not self._ready:
                return None

    def _claim(self) -> asyncio.Future[Any]:
        if self._claiming is None or self._claiming.done():
            self.claims += 1
            now = stamp()
            fut = self.writer.query(CLAIM, (ME, stamp(LEASE_S), now, self.size))
            fut.add_done_callback(lambda f: self._ready.extend(r[0] for r in f.result()))
            self._claiming = fut
        return self._claiming


async def run(path: str, base: str, db: str, concurrency: int, mode: str, guards: bool) -> dict[str, Any]:
    todo_list = list(proxies(path))
    conn = connect(db)
    for ddl in SCHEMA + (GUARDS_SCHEMA if guards else ()):
        conn.execute(ddl)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO jobs (id, proxy, status, attempts) VALUES (?, ?, 'pending', 0)",
        [(i, p[2]) for i, p in enumerate(todo_list)],
    )
    conn.execute("COMMIT")
    todo = iter(range(len(todo_list)))
    accepted = 0
    calls = 0
    lost = 0
    tails: set[asyncio.Future[Any]] = set()
    headers = {"Content-Type": "application/json;charset=UTF-8", "X-Language": "en-us"}
    writer = GroupCommit(conn, mode)
    claims = Claims(writer, concurrency) if guards else None
    discard: Callable[[asyncio.Future[Any]], None] = tails.discard

    async def next_job() -> int | None:
        if claims is not None:
            return await claims.next()
        return next(todo, None)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted, calls, lost
        while (job_id := await next_job()) is not None:
            project, instance, proxy, source, target = todo_list[job_id]
            now = stamp()
            if claims is None:
                await writer.write((INTENT[0], (now, job_id)), (INTENT[1], (job_id, job_id, now)))
            elif not await writer.write(
                (GUARDED_INTENT, (now, job_id, ME, now)),
                (INTENT[1], (job_id, job_id, now)),
                (EVENT, (job_id, now, "pending", "in_flight", "upgrade call 1")),
                guarded=True,
            ):
                lost += 1  # the claim lapsed or the job moved: nothing is sent
                continue
            url = f"{base}/v3/{project}/instances/{instance}/proxy/{proxy}/upgrade-version"
            body = json.dumps({"source_version": source, "target_version": target}).encode()
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                data = json.loads(await resp.read())
            calls += 1
            item = data["update_result"][0] if resp.status == 200 else {}
            ok = item.get("state") == "ACCEPT"
            accepted += ok
            wf, outcome, now = item.get("workflow_id"), "accepted" if ok else "rejected", stamp()
            # the answer commits before the job moves on (nothing else touches this job); the worker
            # takes its next job meanwhile, as the orchestrator's does
            args = (outcome, wf, now, job_id)
            if claims is None:
                tail = writer.write((ANSWER[0], args), (ANSWER[1], args))
            else:
                tail = writer.write(
                    (ANSWER[0], args),
                    (GUARDED_ANSWER, (*args, ME)),
                    (EVENT, (job_id, now, "in_flight", outcome, "answer")),
                )
            tails.add(tail)
            tail.add_done_callback(discard)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        if tails:
            await asyncio.wait(tails)
        elapsed = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    writer.close()
    done = conn.execute("SELECT count(*) FROM attempts WHERE workflow_id IS NOT NULL").fetchone()[0]
    conn.close()
    return {
        "calls": calls,
        "accepted": accepted,
        "recorded": done,
        "elapsed_s": elapsed,
        "calls_per_s": calls / elapsed if elapsed > 0 else 0.0,
        "commits": writer.commits,
        "guards": guards,
        "claims": claims.claims if claims is not None else 0,
        "lost": lost,
        "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="bare loop + minimum durable records (benchmark floor)")
    ap.add_argument("inventory", help="CSV inventory (bench/run.py writes one)")
    ap.add_argument("url", help="base URL of the loopback server")
    ap.add_argument("db", help="a new SQLite file")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--writer", choices=("thread", "inline"), default="thread")
    ap.add_argument("--guards", action="store_true", help="claims under a lease, guarded moves, events")
    args = ap.parse_args()
    out = asyncio.run(
        run(args.inventory, args.url.rstrip("/"), args.db, args.concurrency, args.writer, args.guards)
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
