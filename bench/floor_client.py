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

``--writer thread`` commits on a writer thread (as the orchestrator does, so the loop never waits for an
fsync); ``--writer inline`` commits on the loop's own thread once per loop turn (no thread hand-off,
but the loop stops for each fsync). bench/run.py runs ``inline``, the faster of the two here (three
runs each at 10,000 proxies, 0 ms: 4,456-5,681 calls/s against 3,487-4,693).

Run: ``python bench/floor_client.py INVENTORY.csv URL DB [--concurrency 64] [--writer thread]``. Prints
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
from collections.abc import Callable
from typing import Any

import aiohttp
from bare_client import proxies

Record = tuple[str, tuple[Any, ...]]
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


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


class GroupCommit:
    """Queue records; every group commits in one transaction; each record's future resolves after it."""

    def __init__(self, conn: sqlite3.Connection, mode: str) -> None:
        self.conn = conn
        self.mode = mode
        self.loop = asyncio.get_running_loop()
        self.commits = 0
        self._pending: list[tuple[tuple[Record, ...], asyncio.Future[None]]] = []
        self._scheduled = False
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        if mode == "thread":
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()

    def write(self, *records: Record) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.loop.create_future()
        if self.mode == "thread":
            self._q.put((records, fut))
        else:
            self._pending.append((records, fut))
            if not self._scheduled:
                self._scheduled = True
                self.loop.call_soon(self._flush_inline)
        return fut

    def _commit(self, group: list[tuple[tuple[Record, ...], asyncio.Future[None]]]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        for records, _ in group:
            for sql, args in records:
                c.execute(sql, args)
        c.execute("COMMIT")
        self.commits += 1

    def _flush_inline(self) -> None:
        self._scheduled = False
        group, self._pending = self._pending, []
        self._commit(group)
        for _, fut in group:
            fut.set_result(None)

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
            self._commit(group)
            self.loop.call_soon_threadsafe(_resolve_all, [f for _, f in group])

    def close(self) -> None:
        if self.mode == "thread":
            self._q.put(None)
            self._thread.join()


def _resolve_all(futs: list[asyncio.Future[None]]) -> None:
    for f in futs:
        f.set_result(None)


async def run(path: str, base: str, db: str, concurrency: int, mode: str) -> dict[str, float]:
    todo_list = list(proxies(path))
    conn = connect(db)
    for ddl in SCHEMA:
        conn.execute(ddl)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO jobs (id, proxy, status, attempts) VALUES (?, ?, 'pending', 0)",
        [(i, p[2]) for i, p in enumerate(todo_list)],
    )
    conn.execute("COMMIT")
    todo = iter(enumerate(todo_list))
    accepted = 0
    calls = 0
    tails: set[asyncio.Future[None]] = set()
    headers = {"Content-Type": "application/json;charset=UTF-8", "X-Language": "en-us"}
    writer = GroupCommit(conn, mode)
    discard: Callable[[asyncio.Future[None]], None] = tails.discard

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted, calls
        for job_id, (project, instance, proxy, source, target) in todo:
            now = stamp()
            await writer.write((INTENT[0], (now, job_id)), (INTENT[1], (job_id, job_id, now)))
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
            tail = writer.write((ANSWER[0], args), (ANSWER[1], args))
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
        "cpu_s": (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="bare loop + minimum durable records (benchmark floor)")
    ap.add_argument("inventory", help="CSV inventory (bench/run.py writes one)")
    ap.add_argument("url", help="base URL of the loopback server")
    ap.add_argument("db", help="a new SQLite file")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--writer", choices=("thread", "inline"), default="thread")
    args = ap.parse_args()
    out = asyncio.run(run(args.inventory, args.url.rstrip("/"), args.db, args.concurrency, args.writer))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
