"""Issue 15 part 8: the progress display, as an operator sees it.

On a terminal (``orchestrator resume`` driven inside tmux, the screen read back with ``capture-pane``):
the bar stays pinned under the log lines, counts the whole run (right after a resume: the jobs an earlier
process finished are counted), and shows accepted / in flight / waiting, calls per second against the
limit and an ETA. Off a terminal: a ``run.progress`` log line every 10 seconds, whether or not a job
finished meanwhile.

tmux runs on a socket of its own (``-L``), killed at the end; without tmux the terminal test is skipped.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, cli, cli_bg, db_rows, make_inventory

TMUX = shutil.which("tmux")
SUBNET = "Upgrade failed due to insufficient subnet ip"
FAST = ["--poll-initial", "0.3", "--poll-interval", "0.3", "--reconcile-grace", "1"]
BAR = re.compile(
    r"upgrading .*? (\d+)/(\d+) accepted (\d+)  in flight (\d+)  waiting (\d+)  flagged (\d+)  "
    r"calls ([\d.]+)/s of ([\d.]+)/s(?:  ETA (\S+))?"
)


def scenario(n: int, workflow_s: float) -> dict[str, Any]:
    return {
        "seed": 31,
        "speed": 100,
        "latency_s": 0.005,
        "workflow": {
            "pending_s": 20,
            "running_s": workflow_s * 100 - 20,
            "job_visible_after_s": 1,
            "fail_rate": 0,
        },
        "fleet": {"generate": {"proxies": n, "proxies_per_instance": 2, "reject_rate": 0.25}},
    }


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[list[str]]:
    if TMUX is None:
        pytest.skip("no tmux here: apt-get install -y tmux (the terminal progress display is checked in it)")
    socket = ["-L", f"orch-test-{uuid.uuid4().hex[:8]}"]
    yield [TMUX, *socket]
    subprocess.run([TMUX, *socket, "kill-server"], capture_output=True)


def test_progress_bar_on_a_terminal_after_a_resume(sim_factory: Any, tmp_path: Path, tmux: list[str]) -> None:
    sim = sim_factory(scenario(24, 2.0))
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    # an earlier process does the first wave, then waits an hour for the next: stopped there
    log = tmp_path / "first.log"
    first = cli_bg("run", str(inv), "--db", db, "--endpoint", sim.url, "--rate", "20/s", *FAST,
                   "--waves", "8,100%", "--pause-between", "1h", stdout=log)  # fmt: skip
    deadline = time.monotonic() + 60
    while "run.waiting" not in log.read_text():
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 3, log.read_text()
    done_before = db_rows(db, "SELECT count(*) FROM jobs WHERE status IN ('succeeded', 'flagged')")[0][0]
    assert done_before == 8

    # resume on a terminal: 150 x 40, a plain environment as an operator's shell would have
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "HUAWEICLOUD_", "COLUMNS"))
    }
    env.pop("NO_COLOR", None)
    env.update({"TERM": "xterm-256color", "PYTHONPATH": str(ROOT)})
    command = " ".join(
        shlex.quote(a)
        for a in [sys.executable, "-m", "orchestrator", "resume", "1", "--db", db, "--endpoint", sim.url,
                  "--rate", "6/s", "--pause-between", "0s", *FAST]
    ) + "; echo EXIT=$?; sleep 120"  # fmt: skip
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "run", "-x", "150", "-y", "40", "-c", str(tmp_path), command],
        check=True,
        env=env,
    )
    frames: list[list[str]] = []
    deadline = time.monotonic() + 120
    while True:
        shot = subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "run"], capture_output=True, text=True
        ).stdout
        lines = [ln.rstrip() for ln in shot.splitlines() if ln.strip()]
        if any(ln.startswith("EXIT=") for ln in lines):
            final = lines
            break
        frames.append(lines)
        assert time.monotonic() < deadline, "\n".join(lines)
        time.sleep(0.25)

    live = [f for f in frames if f and BAR.search(f[-1])]
    assert len(live) >= 8, frames[-3:]
    running = [f for f in frames if not any(ln.startswith("run 1 (") for ln in f)]  # before the summary
    for f in running:  # whenever the bar is on the screen, it is the bottom line: log lines go above it
        bars = [i for i, ln in enumerate(f) if BAR.search(ln)]
        assert not bars or bars == [len(f) - 1], "\n".join(f)
    with_log = [f for f in live if any("job.flagged" in ln or "resuming run" in ln for ln in f[:-1])]
    assert with_log, live[-1]
    seen = [BAR.search(f[-1]).groups() for f in live]  # type: ignore[union-attr]
    totals = {int(s[1]) for s in seen}
    assert totals == {24}  # the whole run, not the 16 jobs this process had left
    assert int(seen[0][0]) >= 8  # what the earlier process finished is counted from the first frame
    for done, total, accepted, in_flight, waiting, flagged, cps, limit, _eta in seen:
        assert float(limit) == 6.0
        assert float(cps) <= 6.0 * 1.5, cps
        assert int(done) + int(accepted) + int(in_flight) + int(waiting) <= int(total)
        assert int(flagged) <= int(done)
    assert any(float(s[6]) > 0 for s in seen)
    assert any(s[8] for s in seen), "no ETA shown"
    assert [int(s[0]) for s in seen] == sorted(int(s[0]) for s in seen)  # never goes back
    assert any(ln == "EXIT=1" for ln in final), final  # finished, with the rejected proxies flagged
    last_bar = [BAR.search(ln) for ln in final if BAR.search(ln)]
    assert last_bar and last_bar[-1].group(1) == "24", final  # type: ignore[union-attr]


@pytest.mark.slow
def test_progress_lines_off_a_terminal(sim_factory: Any, tmp_path: Path) -> None:
    """Four proxies whose workflows take 21 s: no job finishes for 20 s, yet a line comes every 10 s."""
    sim = sim_factory({**scenario(4, 21.0), "fleet": {"generate": {"proxies": 4, "proxies_per_instance": 2}}})
    inv = make_inventory(sim, tmp_path / "fleet.yaml")
    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    t0 = time.monotonic()
    r = cli("run", str(inv), "--db", db, "--endpoint", sim.url, "--rate", "10/s", "--poll-interval", "1",
            "--poll-initial", "1", "--reconcile-grace", "1")  # fmt: skip
    elapsed = time.monotonic() - t0
    assert r.code == 0, str(r)
    lines = [ln for ln in r.err.splitlines() if "event='run.progress'" in ln]
    assert len(lines) >= int((elapsed - 5) // 10) >= 1, (elapsed, r.err)
    first = dict(re.findall(r"(\w+)=('[^']*'|\S+)", lines[0]))
    assert {
        "done",
        "total",
        "accepted",
        "in_flight",
        "waiting",
        "calls_per_s",
        "limit_per_s",
        "eta_s",
    } <= set(first)
    assert first["total"] == "4" and first["done"] == "0" and first["limit_per_s"] == "10.0"
    assert int(first["accepted"]) + int(first["in_flight"]) + int(first["waiting"]) == 4
    stamps = [re.search(r"timestamp='([^']+)'", ln).group(1) for ln in lines]  # type: ignore[union-attr]
    times = [datetime.fromisoformat(s) for s in stamps]
    for a, b in itertools.pairwise(times):
        assert 9.0 <= (b - a).total_seconds() <= 12.0, stamps
