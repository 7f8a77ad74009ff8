"""Throughput and scale of the orchestrator against a bare aiohttp loop, side by side in one run (issue 14).

One lean loopback server (bench/lean_server.py, its own process) answers every call. Each measurement
runs the real CLI (``orchestrator run|resume|worker|validate|report``) as a child process, and the
baseline (bench/bare_client.py) as another, against that server. Throughput is counted at the server
(upgrade calls between the first and the last); CPU and peak RSS come from the child's own rusage
(``os.wait4``: the orchestrator process only, never the server or the database). Every row is the median
of ``--repeat`` runs; ratios are taken against a baseline measured in the same run, because this
machine is shared and its absolute speed varies. Each target is printed as met or missed with its
figure; the exit code does not depend on timings (0 unless the bench itself failed).

Run from a checkout with the package installed in the active virtualenv (see bench/README.md)::

    python bench/run.py --quick                   # smoke run, small sizes, 1 repeat (a few minutes)
    python bench/run.py                           # full: 10k/100k proxies, 3 repeats (long)
    python bench/run.py --only ratio --repeat 5 --json out.json
    python bench/run.py --only pg,workers --pg-url postgresql://postgres@127.0.0.1:5432/postgres

Groups (``--only``, comma-separated or repeated): ratio, flat, memory, resume, report, track, pg, workers.
The markdown table goes to stdout, progress to stderr, raw samples to the JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable
GROUPS = ("ratio", "flat", "memory", "resume", "report", "track", "pg", "workers")
SOURCE_VERSION = "2.23.12.000"
TARGET_VERSION = "2.24.03.000"
NO_LIMIT = "100000/s"  # "no rate limit": far above anything this machine can send

# Sizes: (full, quick). "ratio" 10k proxies at 0 and 100 ms; "flat" 3k vs 100k at 50 ms; the 100k run
# doubles as the memory, resume and report fixture; "pg_rate" the rate-limited multi-worker run.
SIZES: dict[str, tuple[int, int]] = {
    "ratio": (10_000, 1_000),
    "small": (3_000, 500),
    "big": (100_000, 10_000),
    "pg": (10_000, 1_000),
    "pg_rate": (3_000, 600),
    "track": (3_000, 300),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ inventories
def make_inventory(n: int, directory: Path, seed: int = 14) -> tuple[Path, Path]:
    """Write an N-proxy inventory as YAML and as CSV; return both paths. IDs: project 32 hex (a few
    projects), instance 32 hex + ``in07`` with 1 to 3 proxies each, proxy 32 hex + ``po01``."""
    yaml_path = directory / f"fleet-{n}.yaml"
    csv_path = directory / f"fleet-{n}.csv"
    if yaml_path.exists() and csv_path.exists():
        return yaml_path, csv_path
    rng = random.Random(seed)
    projects = [f"{rng.getrandbits(128):032x}" for _ in range(4)]
    rows: list[tuple[str, str, str]] = []
    while len(rows) < n:
        project = projects[len(rows) % len(projects)]
        instance = f"{rng.getrandbits(128):032x}in07"
        for _ in range(min(1 + rng.randrange(3), n - len(rows))):
            rows.append((project, instance, f"{rng.getrandbits(128):032x}po01"))
    with open(yaml_path, "w", encoding="utf-8") as y:
        y.write(
            f"# {n} generated proxies (bench/run.py)\ndefaults:\n  region: cn-north-4\n"
            f'  source_version: "{SOURCE_VERSION}"\n  target_version: "{TARGET_VERSION}"\n\nproxies:\n'
        )
        for i, (p, inst, px) in enumerate(rows):
            y.write(
                f"  - project_id: {p}\n    instance_id: {inst}\n    proxy_id: {px}\n    name: proxy {i}\n"
            )
    with open(csv_path, "w", encoding="utf-8") as c:
        c.write("project_id,instance_id,proxy_id,region,source_version,target_version,name\n")
        for i, (p, inst, px) in enumerate(rows):
            c.write(f"{p},{inst},{px},cn-north-4,{SOURCE_VERSION},{TARGET_VERSION},proxy {i}\n")
    return yaml_path, csv_path


# ------------------------------------------------------------------------ server
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


class Server:
    """The lean loopback server in its own process, reset between measurements."""

    def __init__(self, tmp: Path) -> None:
        ready = tmp / "server.ready"
        self.out = open(tmp / "server.out", "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [PY, str(BENCH / "lean_server.py"), "--port", "0", "--ready-file", str(ready)],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lean server did not start: {(tmp / 'server.out').read_text()}")
            time.sleep(0.05)
        self.url = ready.read_text(encoding="utf-8").strip()

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data else "GET")
        with _OPENER.open(req, timeout=60) as r:
            answer: dict[str, Any] = json.loads(r.read())
            return answer

    def reset(self, latency_ms: float = 0.0, job_delay_s: float = 1.5) -> None:
        self._call(
            "/_bench/reset",
            {"latency_ms": latency_ms, "job_delay_s": job_delay_s, "source_version": SOURCE_VERSION},
        )

    def count(self) -> dict[str, Any]:
        return self._call("/_bench/count")

    def stats(self) -> dict[str, Any]:
        return self._call("/_bench/stats")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.out.close()


# ----------------------------------------------------------------------- children
def child_env() -> dict[str, str]:
    """The environment of every child: no credentials (the client then sends no auth headers, which the
    loopback server does not check), no HTTP proxy for loopback calls, no colours."""
    drop = ("ORCHESTRATOR_", "HUAWEICLOUD_")
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k.lower() not in proxies}
    env.update({"NO_COLOR": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"})
    return env


def orchestrator_cmd() -> list[str]:
    script = Path(PY).parent / "orchestrator"
    return [str(script)] if script.exists() else [PY, "-m", "orchestrator"]


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc_usage(pid: int) -> tuple[float, float] | None:
    """(utime + stime in seconds, RSS in MB) of a live process, from /proc (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK, int(fields[21]) * _PAGE / 2**20


@dataclass
class Child:
    """One child process, its start time (wall clock) and CPU samples taken while it ran."""

    tag: str
    popen: subprocess.Popen[bytes]
    started: float
    out_path: Path
    err_path: Path
    samples: list[tuple[float, float]] = field(default_factory=list)
    code: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    maxrss_mb: float = 0.0
    signalled: list[str] = field(default_factory=list)
    killed_over_rss: bool = False

    def signal(self, sig: signal.Signals) -> None:
        if self.code is None:
            self.signalled.append(sig.name)
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)

    def sample(self, rss_cap_mb: float) -> None:
        """Record CPU; SIGKILL the child if its RSS passed the cap (the machine is shared)."""
        usage = _proc_usage(self.popen.pid)
        if usage is None:
            return
        self.samples.append((time.time(), usage[0]))
        if usage[1] > rss_cap_mb and "SIGKILL" not in self.signalled:
            log(f"  {self.tag}: RSS {usage[1]:.0f} MB over the cap of {rss_cap_mb:.0f} MB: killed")
            self.killed_over_rss = True
            self.signal(signal.SIGKILL)

    def reap(self, block: bool) -> bool:
        """Reap the child with ``wait4`` (its own rusage: CPU and peak RSS). True once it has exited."""
        if self.code is not None:
            return True
        pid, status, usage = os.wait4(self.popen.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.code = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.code
        ended = time.time()
        self.wall_s = ended - self.started
        self.cpu_s = usage.ru_utime + usage.ru_stime
        # the exit is the last CPU sample: a call made after the last 0.2 s sample can still be placed
        self.samples.append((ended, self.cpu_s))
        self.maxrss_mb = usage.ru_maxrss / 1024.0  # KiB on Linux
        return True

    def tail(self, n: int = 1500) -> str:
        text = ""
        for p in (self.err_path, self.out_path):
            with contextlib.suppress(OSError):
                text += p.read_text(encoding="utf-8", errors="replace")[-n:]
        return text

    def cpu_at(self, t: float) -> float | None:
        """The child's CPU seconds at wall time ``t``, interpolated between samples."""
        s = self.samples
        if not s or t < s[0][0] or t > s[-1][0]:
            return None
        for (t0, c0), (t1, c1) in itertools.pairwise(s):
            if t0 <= t <= t1:
                return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
        return s[-1][1]


def spawn(ctx: Ctx, tag: str, args: list[str], *, cmd: list[str] | None = None) -> Child:
    ctx.seq += 1
    out_path = ctx.tmp / f"{ctx.seq:03d}-{tag}.out"
    err_path = ctx.tmp / f"{ctx.seq:03d}-{tag}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.time()
        popen = subprocess.Popen(
            [*(cmd if cmd is not None else orchestrator_cmd()), *args],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=ctx.tmp,
            env=child_env(),
        )
    child = Child(tag, popen, started, out_path, err_path)
    _SPAWNED.append(child)
    return child


_SPAWNED: list[Child] = []


def kill_leftovers() -> None:
    """Kill and reap every child still alive (a group that failed half-way must leave nothing running)."""
    for c in _SPAWNED:
        if c.code is None and c.popen.poll() is None:
            c.signal(signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                c.reap(block=True)


def wait_all(
    children: list[Child],
    *,
    timeout: float,
    rss_cap_mb: float,
    poll: Callable[[float], None] | None = None,
) -> None:
    """Wait for every child, sampling CPU every 0.2 s and calling ``poll(elapsed)`` (which may signal
    them) as often. Past ``timeout`` seconds they get SIGINT, and SIGKILL 60 s later; a child whose RSS
    passes ``rss_cap_mb`` is killed at once. A child is reaped within 10 ms of its exit: its wall time is
    good to 10 ms (reaped only at each 0.2 s sample, a 1.8 s report read as 2.01 s)."""
    t0 = time.monotonic()
    interrupted_at: float | None = None
    next_sample = 0.0
    while True:
        if all(c.reap(block=False) for c in children):
            return
        elapsed = time.monotonic() - t0
        if elapsed >= next_sample:
            next_sample = elapsed + 0.2
            for c in children:
                if c.code is None:
                    c.sample(rss_cap_mb)
            if poll is not None:
                poll(elapsed)
            if elapsed > timeout and interrupted_at is None:
                interrupted_at = elapsed
                for c in children:
                    c.signal(signal.SIGINT)
            if interrupted_at is not None and elapsed > interrupted_at + 60:
                for c in children:
                    c.signal(signal.SIGKILL)
        time.sleep(0.01)


# -------------------------------------------------------------------- context
@dataclass
class Ctx:
    args: argparse.Namespace
    tmp: Path
    server: Server
    quick: bool
    seq: int = 0
    pg_base: str | None = None  # postgresql://user@host:port (no database)
    pg_note: str = ""
    pg_cluster: Path | None = None
    big_runs: list[dict[str, Any]] = field(default_factory=list)
    fixture: dict[str, Any] | None = None  # a stopped big run: db URL, run name, inventory
    finished: dict[str, Any] | None = None  # a big run taken to its end (report)
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def size(self, key: str) -> int:
        full, quick = SIZES[key]
        return quick if self.quick else full

    def inv(self, n: int) -> tuple[Path, Path]:
        return make_inventory(n, self.tmp)

    def sqlite(self) -> str:
        return f"sqlite:///{self.tmp / f'jobs-{uuid.uuid4().hex[:8]}.db'}"


@dataclass
class Row:
    group: str
    label: str
    figure: str
    reference: str = ""
    ratio: str = ""
    target: str = ""
    result: str = ""  # met | missed | n/a | error
    notes: str = ""


def med(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def fmt(v: float | None, digits: int = 0, unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}{unit}"


def verdict(value: float | None, op: str, bound: float) -> str:
    if value is None:
        return "error"
    ok = value >= bound if op == ">=" else value <= bound
    return "met" if ok else "missed"


# -------------------------------------------------------------- one orchestrator run
def orch_run(
    ctx: Ctx,
    inventory: Path,
    *,
    latency_ms: float,
    db: str,
    concurrency: int = 64,
    rate: str = NO_LIMIT,
    tracking: bool = False,
    workers: int = 0,
    stop_at: int | None = None,
    job_delay_s: float = 1.5,
) -> dict[str, Any]:
    """``orchestrator run`` (plus ``workers`` x ``orchestrator worker``) against a freshly reset server.

    Stopped with SIGINT once the server saw ``stop_at`` upgrade calls or after ``--budget`` seconds;
    the rate is then the rate of the calls made so far. Returns the figures as a dict."""
    ctx.server.reset(latency_ms, job_delay_s)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    flags = ["--rate", rate, "--concurrency", str(concurrency), "--endpoint", ctx.server.url, "--db", db]
    if tracking:
        flags += ["--preflight", "--wait", "--poll-interval", "1", "--poll-initial", "1"]
    else:
        flags += ["--no-preflight", "--no-wait"]
    runner = spawn(ctx, "run", ["run", str(inventory), "--name", name, *flags])
    children = [runner]
    joined = {"done": workers == 0}
    stop = {"sent": False}

    def poll(_elapsed: float) -> None:
        if joined["done"] and (stop_at is None or stop["sent"]):
            return
        count = ctx.server.count()
        if not joined["done"] and (count["calls"] > 0 or runner.code is not None):
            # the runner's first call means the run exists: the workers can join it by name
            for _ in range(workers):
                children.append(spawn(ctx, "worker", ["worker", name, "--db", db]))
            joined["done"] = True
        if stop_at is not None and not stop["sent"] and count["upgrades"] >= stop_at:
            stop["sent"] = True
            for c in children:
                c.signal(signal.SIGINT)

    wait_all(children, timeout=ctx.args.budget, rss_cap_mb=ctx.args.rss_cap_mb, poll=poll)
    st = ctx.server.stats()
    cpu = sum(c.cpu_s for c in children)
    ups = st["upgrades"]
    res: dict[str, Any] = {
        "name": name,
        "db": db,
        "inventory": str(inventory),
        "latency_ms": latency_ms,
        "processes": len(children),
        "exit_codes": [c.code for c in children],
        "stopped": any(c.signalled for c in children),
        "wall_s": max(c.wall_s for c in children),
        "upgrades": ups,
        "calls": st["calls"],
        "counts": st["counts"],
        "calls_per_s": st["upgrade_rate"],
        "busiest_1s_all": st["busiest_1s_all"],
        "busiest_1s_upgrade": st["busiest_1s_upgrade"],
        "cpu_s": cpu,
        "cpu_ms_per_upgrade": 1000.0 * cpu / ups if ups else None,
        "cpu_ms_per_call": 1000.0 * cpu / st["calls"] if st["calls"] else None,
        "maxrss_mb": max(c.maxrss_mb for c in children),
        "server_cpu_s": st["server_cpu_s"],
    }
    # steady state: CPU between the first and the last upgrade call, without start-up and shutdown
    if len(children) == 1 and st["first_upgrade"] and st["last_upgrade"] and ups > 1:
        a, b = runner.cpu_at(st["first_upgrade"]), runner.cpu_at(st["last_upgrade"])
        if a is not None and b is not None:
            res["steady_cpu_ms_per_upgrade"] = 1000.0 * (b - a) / (ups - 1)
    bad = [c for c in children if c.code not in (0, 3) or (c.code == 3 and not c.signalled)]
    if bad or ups == 0:
        res["error"] = f"exit codes {res['exit_codes']}; {bad[0].tail() if bad else runner.tail()}"
        log(f"  ERROR: {res['error'][-600:]}")
    log(
        f"  run {inventory.name} {latency_ms:g} ms x{len(children)}: {fmt(res['calls_per_s'])} calls/s, "
        f"{ups} upgrades, cpu {fmt(res['cpu_ms_per_upgrade'], 2)} ms/upgrade, "
        f"rss {fmt(res['maxrss_mb'])} MB{' (stopped)' if res['stopped'] else ''}"
    )
    return res


def client_run(ctx: Ctx, tag: str, script: str, args: list[str], *, latency_ms: float) -> dict[str, Any]:
    """One baseline client (``bench/<script>`` with ``args``) in its own process against a freshly reset
    server: calls/s counted at the server, CPU and peak RSS from the child's rusage."""
    ctx.server.reset(latency_ms)
    child = spawn(ctx, tag, [str(BENCH / script), *args], cmd=[PY])
    wait_all([child], timeout=ctx.args.budget, rss_cap_mb=ctx.args.rss_cap_mb)
    st = ctx.server.stats()
    res: dict[str, Any] = {
        "calls_per_s": st["upgrade_rate"],
        "upgrades": st["upgrades"],
        "cpu_s": child.cpu_s,
        "cpu_ms_per_upgrade": 1000.0 * child.cpu_s / st["upgrades"] if st["upgrades"] else None,
        "maxrss_mb": child.maxrss_mb,
        "exit_code": child.code,
        "server_cpu_s": st["server_cpu_s"],
    }
    if child.code != 0:
        res["error"] = child.tail()
        log(f"  ERROR {tag}: {child.tail()[-600:]}")
    log(f"  {tag} {Path(args[0]).name} {latency_ms:g} ms: {fmt(res['calls_per_s'])} calls/s")
    return res


def bare_run(ctx: Ctx, csv_path: Path, *, latency_ms: float, concurrency: int = 64) -> dict[str, Any]:
    """bench/bare_client.py: the baseline, no records at all."""
    args = [str(csv_path), ctx.server.url, "--concurrency", str(concurrency)]
    return client_run(ctx, "bare", "bare_client.py", args, latency_ms=latency_ms)


def floor_run(
    ctx: Ctx, csv_path: Path, *, latency_ms: float, concurrency: int = 64, guards: bool = False
) -> dict[str, Any]:
    """bench/floor_client.py: the bare loop plus the least durable record issue 14's rules allow (an
    intent committed before each call, the answer after, group commit, raw sqlite3), committing on the
    loop's own thread (the faster of its two modes on this machine). ``guards``: plus claims under a
    lease, moves guarded on the claim and an event row per move (``--guards``)."""
    db = ctx.tmp / f"floor-{uuid.uuid4().hex[:8]}.db"
    args = [str(csv_path), ctx.server.url, str(db), "--concurrency", str(concurrency), "--writer", "inline"]
    tag = "floor"
    if guards:
        args.append("--guards")
        tag = "floor+guards"
    return client_run(ctx, tag, "floor_client.py", args, latency_ms=latency_ms)


def stopped_note(runs: list[dict[str, Any]], n: int) -> str:
    stopped = [r for r in runs if r.get("stopped")]
    if not stopped:
        return ""
    done = med([float(r["upgrades"]) for r in stopped])
    return f"stopped at {fmt(done)} of {n:,} calls (half or --budget)"


def pair_ratios(runs: list[dict[str, Any]], bases: list[dict[str, Any]]) -> list[float]:
    """calls/s of each run over calls/s of the baseline run paired with it (runs alternate), skipping a
    pair where either made no calls."""
    return [
        r["calls_per_s"] / b["calls_per_s"]
        for r, b in zip(runs, bases, strict=True)
        if r.get("calls_per_s") and b.get("calls_per_s")
    ]


def notes(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def errors_of(runs: list[dict[str, Any]]) -> str:
    errs = [r["error"] for r in runs if r.get("error")]
    return f"{len(errs)} run(s) failed: {errs[0][-200:]!r}" if errs else ""


# --------------------------------------------------------------------------- groups
def group_ratio(ctx: Ctx) -> None:
    n = ctx.size("ratio")
    yaml_path, csv_path = ctx.inv(n)
    raw: dict[str, Any] = {}
    for latency, goal in ((0.0, 0.6), (100.0, 0.85)):
        bare: list[dict[str, Any]] = []
        orch: list[dict[str, Any]] = []
        floor: list[dict[str, Any]] = []
        guarded: list[dict[str, Any]] = []
        for r in range(ctx.args.repeat):
            log(f"ratio: {n} proxies, {latency:g} ms, repeat {r + 1}/{ctx.args.repeat}")
            bare.append(bare_run(ctx, csv_path, latency_ms=latency))
            orch.append(orch_run(ctx, yaml_path, latency_ms=latency, db=ctx.sqlite()))
            floor.append(floor_run(ctx, csv_path, latency_ms=latency))
            guarded.append(floor_run(ctx, csv_path, latency_ms=latency, guards=True))
        pairs = pair_ratios(orch, bare)
        ratio = med(pairs)
        b_rate, o_rate = med([b["calls_per_s"] for b in bare]), med([o["calls_per_s"] for o in orch])
        label = f"{n:,} proxies, {latency:g} ms latency, concurrency 64, SQLite"
        note = notes(stopped_note(orch, n), errors_of(orch + bare))
        ctx.rows.append(
            Row(
                "ratio",
                label,
                f"{fmt(o_rate)} calls/s",
                f"bare aiohttp {fmt(b_rate)} calls/s",
                fmt(ratio, 2, "x"),
                f">= {goal}x",
                verdict(ratio, ">=", goal),
                note,
            )
        )
        cpu = med([o["cpu_ms_per_upgrade"] for o in orch])
        steady = med([o.get("steady_cpu_ms_per_upgrade") for o in orch])
        bare_cpu = med([b["cpu_ms_per_upgrade"] for b in bare])
        ctx.rows.append(
            Row(
                "ratio",
                f"orchestrator CPU per upgrade call ({latency:g} ms)",
                f"{fmt(cpu, 2)} ms",
                f"bare aiohttp {fmt(bare_cpu, 2)} ms",
                fmt(cpu / bare_cpu if cpu and bare_cpu else None, 1, "x"),
                "<= 0.7 ms",
                verdict(cpu, "<=", 0.7),
                f"whole process (start-up included); between first and last call {fmt(steady, 2)} ms",
            )
        )
        # the floors: what the durability rules alone cost, and with the claim, the guards and the
        # audit rows a multi-process, kill-safe tool needs, measured the same way (not targets)
        floor_pairs = pair_ratios(floor, bare)
        guarded_pairs = pair_ratios(guarded, bare)
        for label_of, runs, floor_ratios in (
            ("floor: bare loop + intent and answer committed per call, raw sqlite3", floor, floor_pairs),
            (
                "floor with guards: + claims under a lease, guarded moves, an event per move",
                guarded,
                guarded_pairs,
            ),
        ):
            f_rate = med([f["calls_per_s"] for f in runs])
            f_cpu = med([f["cpu_ms_per_upgrade"] for f in runs])
            of_floor = o_rate / f_rate if o_rate and f_rate else None
            ctx.rows.append(
                Row(
                    "ratio",
                    f"{label_of} ({latency:g} ms)",
                    f"{fmt(f_rate)} calls/s",
                    f"bare aiohttp {fmt(b_rate)} calls/s",
                    fmt(med(floor_ratios), 2, "x"),
                    "",
                    "",
                    notes(
                        f"CPU {fmt(f_cpu, 2)} ms per call",
                        f"orchestrator at {fmt(of_floor, 2, 'x')} of it",
                        errors_of(runs),
                    ),
                )
            )
        raw[f"{latency:g}ms"] = {
            "bare": bare,
            "orchestrator": orch,
            "floor": floor,
            "floor_guards": guarded,
            "pair_ratios": pairs,
            "floor_pair_ratios": floor_pairs,
            "floor_guards_pair_ratios": guarded_pairs,
        }
    ctx.raw["ratio"] = raw


def big_runs(ctx: Ctx) -> list[dict[str, Any]]:
    """The 100k-proxy runs at 50 ms (stopped halfway or at --budget), shared by flat, memory, resume
    and report; made once per bench run, ``--repeat`` of them."""
    n = ctx.size("big")
    yaml_path, _ = ctx.inv(n)
    while len(ctx.big_runs) < ctx.args.repeat:
        log(f"big: {n} proxies, 50 ms, repeat {len(ctx.big_runs) + 1}/{ctx.args.repeat}")
        ctx.big_runs.append(orch_run(ctx, yaml_path, latency_ms=50.0, db=ctx.sqlite(), stop_at=n // 2))
    return ctx.big_runs


def fixture(ctx: Ctx) -> dict[str, Any]:
    """A half-done (stopped with SIGINT) big run on SQLite, for resume and report."""
    if ctx.fixture is None:
        runs = [r for r in big_runs(ctx) if not r.get("error") and r["stopped"]] or big_runs(ctx)
        ctx.fixture = runs[-1]
    return ctx.fixture


def group_flat(ctx: Ctx) -> None:
    small_n, big_n = ctx.size("small"), ctx.size("big")
    yaml_small, _ = ctx.inv(small_n)
    small: list[dict[str, Any]] = []
    for r in range(ctx.args.repeat):
        log(f"flat: {small_n} proxies, 50 ms, repeat {r + 1}/{ctx.args.repeat}")
        small.append(orch_run(ctx, yaml_small, latency_ms=50.0, db=ctx.sqlite()))
    big = big_runs(ctx)
    s_rate, b_rate = med([r["calls_per_s"] for r in small]), med([r["calls_per_s"] for r in big])
    ratio = b_rate / s_rate if s_rate and b_rate else None
    ctx.rows.append(
        Row(
            "flat",
            f"{big_n:,} vs {small_n:,} proxies, 50 ms latency, concurrency 64",
            f"{fmt(b_rate)} calls/s",
            f"{small_n:,} proxies {fmt(s_rate)} calls/s",
            fmt(ratio, 2, "x"),
            ">= 0.85x (within 15%)",
            verdict(ratio, ">=", 0.85),
            "; ".join(x for x in (stopped_note(big, big_n), errors_of(small + big)) if x),
        )
    )
    ctx.raw["flat"] = {"small": small, "big": big}


def group_memory(ctx: Ctx) -> None:
    n = ctx.size("big")
    yaml_path, csv_path = ctx.inv(n)
    raw: dict[str, Any] = {}
    for path in (yaml_path, csv_path):
        runs: list[dict[str, Any]] = []
        for r in range(ctx.args.repeat):
            log(f"memory: validate {path.name}, repeat {r + 1}/{ctx.args.repeat}")
            child = spawn(ctx, "validate", ["validate", str(path)])
            wait_all([child], timeout=ctx.args.budget, rss_cap_mb=ctx.args.rss_cap_mb)
            runs.append(
                {
                    "wall_s": child.wall_s,
                    "maxrss_mb": child.maxrss_mb,
                    "cpu_s": child.cpu_s,
                    "code": child.code,
                }
            )
            if child.code != 0:
                runs[-1]["error"] = child.tail()
        kind = path.suffix.lstrip(".").upper()
        wall, rss = med([x["wall_s"] for x in runs]), med([x["maxrss_mb"] for x in runs])
        err = errors_of(runs)
        ctx.rows.append(
            Row(
                "memory",
                f"`validate` {n:,}-proxy {kind}: peak RSS",
                f"{fmt(rss)} MB",
                target="<= 150 MB",
                result=verdict(rss, "<=", 150),
                notes=err,
            )
        )
        ctx.rows.append(
            Row(
                "memory",
                f"`validate` {n:,}-proxy {kind}: time",
                f"{fmt(wall, 2)} s",
                target="<= 3 s",
                result=verdict(wall, "<=", 3),
                notes=err,
            )
        )
        raw[f"validate_{kind}"] = runs
    big = big_runs(ctx)
    rss = med([r["maxrss_mb"] for r in big])
    ctx.rows.append(
        Row(
            "memory",
            f"`run` {n:,}-proxy YAML: peak RSS",
            f"{fmt(rss)} MB",
            target="<= 150 MB",
            result=verdict(rss, "<=", 150),
            notes=stopped_note(big, n),
        )
    )
    raw["run_maxrss_mb"] = [r["maxrss_mb"] for r in big]
    ctx.raw["memory"] = raw


def group_resume(ctx: Ctx) -> None:
    fx = fixture(ctx)
    n = ctx.size("big")
    runs: list[dict[str, Any]] = []
    for r in range(ctx.args.repeat):
        log(f"resume: {fx['name']} ({fx['upgrades']} of {n} sent), repeat {r + 1}/{ctx.args.repeat}")
        ctx.server.reset(0.0)
        child = spawn(ctx, "resume", ["resume", fx["name"], "--db", fx["db"]])
        seen: dict[str, float] = {}

        def poll(_elapsed: float, child: Child = child, seen: dict[str, float] = seen) -> None:
            if "first_upgrade" in seen:
                return
            count = ctx.server.count()
            if count["calls"] and "first_call" not in seen:
                seen["first_call"] = count["first_call"]
            if count["upgrades"]:
                seen["first_upgrade"] = time.time()  # within 0.2 s; the stats give the exact time below
                child.signal(signal.SIGINT)

        wait_all([child], timeout=ctx.args.budget, rss_cap_mb=ctx.args.rss_cap_mb, poll=poll)
        st = ctx.server.stats()
        res = {
            "to_first_call_s": st["first_call"] - child.started if st["first_call"] else None,
            "to_first_upgrade_s": st["first_upgrade"] - child.started if st["first_upgrade"] else None,
            "maxrss_mb": child.maxrss_mb,
            "code": child.code,
        }
        if child.code not in (0, 3) or res["to_first_call_s"] is None:
            res["error"] = child.tail()
            log(f"  ERROR resume: {child.tail()[-600:]}")
        log(f"  resume: first call after {fmt(res['to_first_call_s'], 2)} s")
        runs.append(res)
    first = med([x["to_first_call_s"] for x in runs])
    up = med([x["to_first_upgrade_s"] for x in runs])
    ctx.rows.append(
        Row(
            "resume",
            f"`resume` of a stopped {n:,}-proxy run: start to first call",
            f"{fmt(first, 2)} s",
            target="<= 2 s",
            result=verdict(first, "<=", 2),
            notes="; ".join(
                x
                for x in (
                    f"to first upgrade call {fmt(up, 2)} s; run stopped (SIGINT) after "
                    f"{fx['upgrades']:,} of {n:,} calls",
                    errors_of(runs),
                )
                if x
            ),
        )
    )
    ctx.raw["resume"] = {"fixture": fx, "runs": runs}


def finished_run(ctx: Ctx) -> dict[str, Any]:
    """A big run at 0 ms taken to its end: every job answered, with its attempt and its workflow (the
    report an auditor reads after a window). Made once per bench run."""
    if ctx.finished is None:
        n = ctx.size("big")
        yaml_path, _ = ctx.inv(n)
        log(f"report: a finished run of {n} proxies at 0 ms")
        ctx.finished = orch_run(ctx, yaml_path, latency_ms=0.0, db=ctx.sqlite())
    return ctx.finished


def group_report(ctx: Ctx) -> None:
    n = ctx.size("big")
    raw: dict[str, Any] = {}
    half = fixture(ctx)
    done = finished_run(ctx)
    # a finished run that did not finish (--budget, an error) is labelled as such, not as finished
    label = "finished" if not done.get("stopped") and not done.get("error") else "unfinished (see its run)"
    for which, fx in (("half-done", half), (label, done)):
        raw[which] = report_rows(ctx, fx, n, f"{which} run, {fmt(float(fx['upgrades']))} answered")
    ctx.raw["report"] = raw


def report_rows(ctx: Ctx, fx: dict[str, Any], n: int, what: str) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for kind in ("csv", "json"):
        runs: list[dict[str, Any]] = []
        for r in range(ctx.args.repeat):
            log(f"report: {what}, --format {kind}, repeat {r + 1}/{ctx.args.repeat}")
            child = spawn(ctx, f"report-{kind}", ["report", fx["name"], "--db", fx["db"], "--format", kind])
            wait_all([child], timeout=ctx.args.budget, rss_cap_mb=ctx.args.rss_cap_mb)
            res: dict[str, Any] = {
                "wall_s": child.wall_s,
                "maxrss_mb": child.maxrss_mb,
                "cpu_s": child.cpu_s,
                "code": child.code,
                "bytes": child.out_path.stat().st_size,
            }
            if child.killed_over_rss:
                res["error"] = f"killed: RSS over --rss-cap-mb {ctx.args.rss_cap_mb:.0f}"
            elif child.code != 0:
                res["error"] = child.tail()
            child.out_path.unlink(missing_ok=True)
            runs.append(res)
            if child.killed_over_rss:
                break  # the same again would only load the shared machine
        wall, rss = med([x["wall_s"] for x in runs]), med([x["maxrss_mb"] for x in runs])
        size = med([float(x["bytes"]) for x in runs]) or 0.0
        note = f"{size / 1e6:.1f} MB written" + (f"; {errors_of(runs)}" if errors_of(runs) else "")
        ctx.rows.append(
            Row(
                "report",
                f"`report --format {kind}` of {n:,} jobs ({what}): time",
                f"{fmt(wall, 2)} s",
                target="<= 2 s",
                result=verdict(wall, "<=", 2),
                notes=note,
            )
        )
        ctx.rows.append(
            Row(
                "report",
                f"`report --format {kind}` of {n:,} jobs ({what}): peak RSS",
                f"{fmt(rss)} MB",
                target="<= 100 MB",
                result=verdict(rss, "<=", 100),
            )
        )
        raw[kind] = runs
    return raw


def group_track(ctx: Ctx) -> None:
    n = ctx.size("track")
    yaml_path, _ = ctx.inv(n)
    runs: list[dict[str, Any]] = []
    plain: list[dict[str, Any]] = []
    for r in range(ctx.args.repeat):
        log(f"track: {n} proxies, tracking on, repeat {r + 1}/{ctx.args.repeat}")
        runs.append(orch_run(ctx, yaml_path, latency_ms=0.0, db=ctx.sqlite(), tracking=True))
        plain.append(orch_run(ctx, yaml_path, latency_ms=0.0, db=ctx.sqlite()))
    per_proxy = med([r["calls"] / r["upgrades"] if r["upgrades"] else None for r in runs])
    cpu_call = med([r["cpu_ms_per_call"] for r in runs])
    cpu_proxy = med([r["cpu_s"] * 1000.0 / r["upgrades"] if r["upgrades"] else None for r in runs])
    plain_cpu = med([r["cpu_ms_per_upgrade"] for r in plain])
    routes = {k: med([float(r["counts"][k]) for r in runs]) for k in runs[0]["counts"]} if runs else {}
    mix = ", ".join(f"{k} {fmt(v)}" for k, v in routes.items() if v)
    ctx.rows.append(
        Row(
            "track",
            f"tracking path, {n:,} proxies, 0 ms (preflight, polls at 1 s, postflight): calls per proxy",
            fmt(per_proxy, 2),
            notes=notes(f"calls: {mix}", stopped_note(runs, n), errors_of(runs)),
        )
    )
    ctx.rows.append(
        Row(
            "track",
            "tracking path: CPU per call (per proxy)",
            f"{fmt(cpu_call, 2)} ms ({fmt(cpu_proxy, 2)} ms)",
            f"no tracking {fmt(plain_cpu, 2)} ms per proxy",
            fmt(cpu_proxy / plain_cpu if cpu_proxy and plain_cpu else None, 1, "x"),
            notes="workflows complete 1.5 s after ACCEPT",
        )
    )
    ctx.raw["track"] = {"tracking": runs, "no_tracking": plain}


# ------------------------------------------------------------------ PostgreSQL
def _pg_bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    d = Path(out.strip())
    return d if (d / "initdb").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_pg(ctx: Ctx) -> str | None:
    """The base URL of a PostgreSQL server: ``--pg-url``, or a throw-away cluster started here (as the
    ``postgres`` user when root, as tests/conftest.py does; durable settings, fsync on)."""
    if ctx.pg_base or ctx.pg_note:
        return ctx.pg_base
    if ctx.args.pg_url:
        parts = urllib.parse.urlsplit(ctx.args.pg_url)
        ctx.pg_base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        return ctx.pg_base
    bindir = _pg_bindir()
    if bindir is None:
        ctx.pg_note = "no PostgreSQL: give --pg-url or install Debian's postgresql"
        return None
    base = Path(tempfile.mkdtemp(prefix="orch-bench-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = base / "data"
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
            f"-c listen_addresses=127.0.0.1 -p {port} -c max_connections=200 "
            f"-c unix_socket_directories={base}",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    ctx.pg_cluster = base
    ctx.pg_base = f"postgresql://postgres@127.0.0.1:{port}"
    log(f"pg: started a throw-away cluster at {ctx.pg_base} (fsync on)")
    return ctx.pg_base


def stop_pg(ctx: Ctx) -> None:
    if ctx.pg_cluster is None:
        return
    bindir = _pg_bindir()
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if bindir is not None:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(ctx.pg_cluster / "data"), "-m", "immediate", "stop"],
            capture_output=True,
        )
    shutil.rmtree(ctx.pg_cluster, ignore_errors=True)


def _pg_admin(base: str, sql: str) -> None:
    import asyncio

    import asyncpg  # type: ignore[import-untyped]  # the orchestrator's PostgreSQL driver

    async def go() -> None:
        conn = await asyncpg.connect(base + "/postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


@contextlib.contextmanager
def pg_db(base: str) -> Iterator[str]:
    name = f"bench_{uuid.uuid4().hex[:12]}"
    _pg_admin(base, f'CREATE DATABASE "{name}"')
    try:
        yield f"{base}/{name}"
    finally:
        with contextlib.suppress(Exception):
            _pg_admin(base, f'DROP DATABASE "{name}" WITH (FORCE)')


def group_pg(ctx: Ctx) -> None:
    base = ensure_pg(ctx)
    n = ctx.size("pg")
    if base is None:
        ctx.rows.append(Row("pg", "PostgreSQL one process vs SQLite", "-", result="n/a", notes=ctx.pg_note))
        return
    yaml_path, _ = ctx.inv(n)
    lite: list[dict[str, Any]] = []
    pg: list[dict[str, Any]] = []
    for r in range(ctx.args.repeat):
        log(f"pg: {n} proxies, 0 ms, SQLite then PostgreSQL, repeat {r + 1}/{ctx.args.repeat}")
        lite.append(orch_run(ctx, yaml_path, latency_ms=0.0, db=ctx.sqlite()))
        with pg_db(base) as url:
            pg.append(orch_run(ctx, yaml_path, latency_ms=0.0, db=url))
    pairs = pair_ratios(pg, lite)
    ctx.rows.append(
        Row(
            "pg",
            f"PostgreSQL, one process, {n:,} proxies, 0 ms, concurrency 64",
            f"{fmt(med([p['calls_per_s'] for p in pg]))} calls/s",
            f"SQLite {fmt(med([s['calls_per_s'] for s in lite]))} calls/s",
            fmt(med(pairs), 2, "x"),
            ">= 0.5x",
            verdict(med(pairs), ">=", 0.5),
            "; ".join(
                x
                for x in (
                    f"CPU {fmt(med([p['cpu_ms_per_upgrade'] for p in pg]), 2)} ms per call",
                    stopped_note(pg + lite, n),
                    errors_of(pg + lite),
                )
                if x
            ),
        )
    )
    ctx.raw["pg"] = {"sqlite": lite, "postgresql": pg, "pair_ratios": pairs}


def group_workers(ctx: Ctx) -> None:
    base = ensure_pg(ctx)
    if base is None:
        ctx.rows.append(
            Row("workers", "four workers + runner vs one process", "-", result="n/a", notes=ctx.pg_note)
        )
        return
    n, n_rate = ctx.size("pg"), ctx.size("pg_rate")
    c = ctx.args.pg_concurrency
    yaml_path, _ = ctx.inv(n)
    one: list[dict[str, Any]] = []
    five: list[dict[str, Any]] = []
    for r in range(ctx.args.repeat):
        log(f"workers: {n} proxies, 50 ms, 1 vs 5 processes, repeat {r + 1}/{ctx.args.repeat}")
        with pg_db(base) as url:
            one.append(orch_run(ctx, yaml_path, latency_ms=50.0, db=url, concurrency=c))
        with pg_db(base) as url:
            five.append(orch_run(ctx, yaml_path, latency_ms=50.0, db=url, concurrency=5 * c, workers=4))
    pairs = pair_ratios(five, one)
    ctx.rows.append(
        Row(
            "workers",
            f"PostgreSQL, runner + 4 `worker`s vs one process, {n:,} proxies, 50 ms, no rate limit",
            f"{fmt(med([f['calls_per_s'] for f in five]))} calls/s",
            f"one process {fmt(med([o['calls_per_s'] for o in one]))} calls/s",
            fmt(med(pairs), 2, "x"),
            ">= 2.5x",
            verdict(med(pairs), ">=", 2.5),
            notes(
                f"--concurrency {c} for one process (latency bound {c / 0.05:,.0f} calls/s), {5 * c} "
                "run-wide for five (the cap is run-wide on PostgreSQL)",
                stopped_note(one + five, n),
                errors_of(one + five),
            ),
        )
    )
    rate = ctx.args.pg_rate
    count = int(rate.split("/")[0])
    yaml_rate, _ = ctx.inv(n_rate)
    limited: list[dict[str, Any]] = []
    for r in range(ctx.args.repeat):
        log(f"workers: {n_rate} proxies, 50 ms, 5 processes, --rate {rate}, repeat {r + 1}/{ctx.args.repeat}")
        with pg_db(base) as url:
            limited.append(
                orch_run(ctx, yaml_rate, latency_ms=50.0, db=url, concurrency=5 * c, rate=rate, workers=4)
            )
    worst = max((x["busiest_1s_all"] for x in limited), default=None)
    ctx.rows.append(
        Row(
            "workers",
            f"PostgreSQL, runner + 4 `worker`s, --rate {rate}: busiest 1 s window at the server",
            f"{fmt(worst)} calls",
            f"achieved {fmt(med([x['calls_per_s'] for x in limited]))} upgrade calls/s",
            target=f"<= {count} (every run)",
            result=verdict(worst, "<=", count),
            notes="; ".join(
                x
                for x in (
                    "all routes, exact sliding window over arrival times",
                    stopped_note(limited, n_rate),
                    errors_of(limited),
                )
                if x
            ),
        )
    )
    ctx.raw["workers"] = {"one": one, "five": five, "pair_ratios": pairs, "rate_limited": limited}


RUNNERS: dict[str, Callable[[Ctx], None]] = {
    "ratio": group_ratio,
    "flat": group_flat,
    "memory": group_memory,
    "resume": group_resume,
    "report": group_report,
    "track": group_track,
    "pg": group_pg,
    "workers": group_workers,
}


# --------------------------------------------------------------------------- output
def table(rows: list[Row], repeat: int) -> str:
    head = f"| measurement (median of {repeat}) | figure | compared with | ratio | target | result | notes |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = (r.label, r.figure, r.reference, r.ratio, r.target, r.result, r.notes)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def meta(ctx: Ctx) -> dict[str, Any]:
    def sh(*cmd: str, cwd: Path | None = None) -> str:
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, cwd=cwd, env=child_env()
            ).stdout.strip()
        except OSError:
            return ""

    where = sh(PY, "-c", "import orchestrator, pathlib; print(pathlib.Path(orchestrator.__file__).parent)")
    code = Path(where).parent if where else ROOT
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "orchestrator_package": where,
        "orchestrator_commit": sh("git", "rev-parse", "HEAD", cwd=code),
        "orchestrator_dirty": bool(sh("git", "status", "--porcelain", "--", "orchestrator", cwd=code)),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "args": vars(ctx.args),
        "sizes": {k: ctx.size(k) for k in SIZES},
        "server": ctx.server.url,
    }


def compile_package(where: str) -> None:
    """Byte-compile the measured package (and its migrations) once, before any child starts.

    An editable install has no ``.pyc`` files, and where ``PYTHONDONTWRITEBYTECODE`` is set (this machine
    image sets it) no child writes them: in a fresh clone each child compiled every module it imported
    again (0.04-0.08 s of CPU per ``run``, measured), which the CPU rows counted as the orchestrator's.
    The test suite's conftest does the same for its processes."""
    import compileall

    if not where:
        return
    pkg = Path(where)
    for folder in (pkg, pkg.parent / "migrations"):
        if folder.is_dir():
            compileall.compile_dir(folder, quiet=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Orchestrator throughput and scale vs a bare aiohttp loop (issue 14).",
        epilog="Groups: " + ", ".join(GROUPS),
    )
    ap.add_argument(
        "--quick", action="store_true", help="small sizes (1k/10k proxies), 1 repeat unless given"
    )
    ap.add_argument("--repeat", type=int, default=None, help="runs per row, median reported [3; --quick 1]")
    ap.add_argument("--json", dest="json_path", help="write results here [bench/results/run-TIME.json]")
    ap.add_argument("--only", action="append", default=[], help="only these groups (comma-separated)")
    ap.add_argument("--pg-url", help="PostgreSQL server to use (else a throw-away cluster, if installed)")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds one child may run before SIGINT; its rate counts the calls made so far [300; quick 60]",
    )
    ap.add_argument("--pg-concurrency", type=int, default=8, help="per-process concurrency, workers row [8]")
    ap.add_argument(
        "--pg-rate", default="200/s", help="run-wide rate of the rate-limited workers row [200/s]"
    )
    ap.add_argument(
        "--rss-cap-mb", type=float, default=3000.0, help="kill a child whose RSS passes this [3000]"
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (inventories, dbs, logs)"
    )
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.budget is None:
        args.budget = 60.0 if args.quick else 300.0
    only = [g.strip() for item in args.only for g in item.split(",") if g.strip()]
    unknown = [g for g in only if g not in GROUPS]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    args.only = only or list(GROUPS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    log(f"temporary directory {tmp}; groups {', '.join(args.only)}; repeat {args.repeat}")
    server = Server(tmp)
    ctx = Ctx(args=args, tmp=tmp, server=server, quick=args.quick)
    failed = False
    started = time.monotonic()
    try:
        info = meta(ctx)
        log(f"measuring {info['orchestrator_package']} at {info['orchestrator_commit'][:10]}")
        compile_package(info["orchestrator_package"])
        for group in GROUPS:
            if group in args.only:
                try:
                    RUNNERS[group](ctx)
                except Exception as exc:  # one broken group must not lose the others' figures
                    kill_leftovers()
                    failed = True
                    log(f"group {group} failed: {type(exc).__name__}: {exc}")
                    ctx.rows.append(
                        Row(group, group, "-", result="error", notes=f"{type(exc).__name__}: {exc}")
                    )
    finally:
        kill_leftovers()
        server.stop()
        stop_pg(ctx)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    info["loadavg_end"] = os.getloadavg()
    out = table(ctx.rows, args.repeat)
    print(out)
    json_path = (
        Path(args.json_path)
        if args.json_path
        else BENCH / "results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": info, "rows": [vars(r) for r in ctx.rows], "raw": ctx.raw, "table": out}
    json_path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    log(f"wrote {json_path} ({info['elapsed_s']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
