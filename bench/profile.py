"""Profile one ``orchestrator run`` against the lean loopback server with py-spy, and say where time goes.

Starts bench/lean_server.py, writes an N-proxy inventory, runs ``py-spy record --format raw`` around
``orchestrator run INV --no-preflight --no-wait --rate 100000/s --concurrency 64`` (SQLite), then prints
the headline: samples by thread, by package of the frame on top (own time) and of any frame on the stack
(total time), and the top functions by own and by total time. The collapsed stacks stay in ``--out`` (load
them into speedscope.app or flamegraph.pl for a picture). py-spy is on PyPI (``pip install py-spy``).

Run: ``python bench/profile.py [--proxies 3000] [--latency-ms 0] [--out DIR] [--db URL] [--summarize FILE]``.
``--summarize FILE`` only summarises an existing raw (collapsed) py-spy file.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from run import Server, child_env, make_inventory, orchestrator_cmd

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _package(path: str) -> str:
    """The package of a frame's file as py-spy prints it (relative to its sys.path entry):
    ``sqlalchemy``, ``asyncio``, ``orchestrator.store``, or the module file for a top-level module."""
    if path.startswith("<"):  # generated code: <sqlalchemy generated ...>, <frozen importlib...>
        return "sqlalchemy" if "sqlalchemy" in path else path.split()[0].lstrip("<").rstrip(">")
    parts = path.replace("\\", "/").split("/")
    if "orchestrator" in parts:
        rest = parts[parts.index("orchestrator") + 1 :]
        return "orchestrator." + rest[0].removesuffix(".py") if rest else "orchestrator"
    return parts[0].removesuffix(".py") if len(parts) > 1 else parts[0]


# Frames that mean "this thread is waiting", which py-spy does not always recognise as idle: an executor
# thread blocked on its queue, the event loop in epoll, aiosqlite's thread waiting for a statement.
IDLE = (
    "_worker (concurrent/futures/thread.py:81)",
    "EpollSelector.select (selectors.py:468)",
    "_connection_worker_thread (aiosqlite/core.py:59)",
)


def _frame(text: str) -> tuple[str, str]:
    m = _FRAME.match(text.strip())
    if not m:
        return text.strip(), text.strip()
    file = m.group("file")
    return f"{m.group('func')} ({file.rsplit('/', 1)[-1]})", _package(file)


def summarize(raw: Path, top: int = 15) -> str:
    """The headline of a py-spy raw (collapsed) profile recorded with ``--threads``."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    own_pkg: Counter[str] = Counter()
    total_pkg: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = busy = idle = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        samples += n
        frames = stack.split(";")
        if frames[-1] in IDLE:
            idle += n
            continue
        busy += n
        if frames and frames[0].startswith(("thread", "process")):
            while frames and frames[0].startswith(("thread", "process")):
                if frames[0].startswith("thread"):
                    threads[frames[0]] += n
                frames = frames[1:]
        if not frames:
            continue
        parsed = [_frame(f) for f in frames]
        own[parsed[-1][0]] += n
        own_pkg[parsed[-1][1]] += n
        for name in {f for f, _ in parsed}:
            total[name] += n
        for pkg in {p for _, p in parsed}:
            total_pkg[pkg] += n
        for name in {f for f, p in parsed if p.startswith("orchestrator.") and p != "orchestrator.cli"}:
            ours[name] += n
    if not busy:
        return "no samples"

    def pct(c: int) -> str:
        return f"{100.0 * c / busy:5.1f}%"

    out = [f"{samples} samples: {busy} busy, {idle} waiting (dropped; percentages are of busy samples)"]
    if threads:
        out.append("\nby thread:")
        out += [f"  {pct(c)}  {t}" for t, c in threads.most_common(6)]
    out.append("\nby package, own time (frame on top):")
    out += [f"  {pct(c)}  {p}" for p, c in own_pkg.most_common(top)]
    out.append("\nby package, total time (anywhere on the stack):")
    out += [f"  {pct(c)}  {p}" for p, c in total_pkg.most_common(top)]
    out.append("\ntop functions by own time:")
    out += [f"  {pct(c)}  {f}" for f, c in own.most_common(top)]
    out.append("\norchestrator functions by total time (cli excluded):")
    out += [f"  {pct(c)}  {f}" for f, c in ours.most_common(top + 5)]
    out.append("\ntop functions by total time:")
    out += [f"  {pct(c)}  {f}" for f, c in total.most_common(top + 10)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description="py-spy profile of one orchestrator run (bench/README.md)")
    ap.add_argument("--proxies", type=int, default=3000)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rate-hz", type=int, default=100, help="py-spy samples per second [100]")
    ap.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL (CPU view)")
    ap.add_argument("--out", help="directory for profile.txt [a temporary one, printed]")
    ap.add_argument(
        "--db", help="job table URL, e.g. an empty PostgreSQL database [a new SQLite file in a temporary dir]"
    )
    ap.add_argument("--summarize", help="only summarise this existing raw py-spy file")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="orch-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="orch-profile-work-"))
    server = Server(work)
    try:
        server.reset(args.latency_ms)
        inventory, _ = make_inventory(args.proxies, work)
        raw = out / "profile.txt"
        cmd = [
            spy,
            "record",
            "--format",
            "raw",
            "--threads",
            *(["--gil"] if args.gil else []),
            "--rate",
            str(args.rate_hz),
            "-o",
            str(raw),
            "--",
            *orchestrator_cmd(),
            "run",
            str(inventory),
            "--no-preflight",
            "--no-wait",
            "--rate",
            "100000/s",
            "--concurrency",
            str(args.concurrency),
            "--endpoint",
            server.url,
            "--db",
            args.db or f"sqlite:///{work / 'jobs.db'}",
        ]
        with open(out / "run.err", "wb") as err:
            subprocess.run(cmd, cwd=work, env=child_env(), stdout=subprocess.DEVNULL, stderr=err, check=False)
        stats = server.stats()
        print(
            f"{args.proxies} proxies, {args.latency_ms:g} ms: {stats['upgrades']} upgrade calls, "
            f"{stats['upgrade_rate'] or 0:.0f} calls/s under py-spy; raw profile {raw}"
        )
        print(summarize(raw))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
