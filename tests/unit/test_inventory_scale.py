"""Memory at fleet scale (issue 14, target 3): validating a 100,000-proxy inventory, and streaming its
entries, stay within 150 MB peak RSS, for YAML and CSV. Memory, not time: it does not depend on how busy
the machine is. Each check runs in its own process, whose peak RSS ``os.wait4`` reports exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

N = 100_000
LIMIT_KB = 150 * 1024
PROJECT = "054e292c9880d4992f02c0196d3ea468"

pytestmark = pytest.mark.slow


def _ids(k: int) -> tuple[str, str]:
    return f"{k:032x}in07", f"{k * 7919:032x}po01"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 100,000-proxy inventory in both formats (about 13 and 15 MB), every proxy on its own instance."""
    root = tmp_path_factory.mktemp("scale")
    yaml_path, csv_path = root / "fleet.yaml", root / "fleet.csv"
    with yaml_path.open("w", encoding="utf-8") as y, csv_path.open("w", encoding="utf-8") as c:
        y.write(
            f"defaults:\n  project_id: {PROJECT}\n  region: cn-north-4\n"
            "  source_version: '2.23.12.000'\n  target_version: '2.24.03.000'\nproxies:\n"
        )
        c.write("project_id,instance_id,proxy_id,region,source_version,target_version,name\n")
        for k in range(N):
            instance, proxy = _ids(k)
            y.write(f"  - instance_id: {instance}\n    proxy_id: {proxy}\n    name: proxy {k}\n")
            c.write(f"{PROJECT},{instance},{proxy},cn-north-4,2.23.12.000,2.24.03.000,proxy {k}\n")
    return {"yaml": yaml_path, "csv": csv_path}


def _peak_rss_kb(args: list[str], tmp: Path) -> tuple[int, str]:
    """(peak RSS in KiB of the child alone, its stdout); fails the test if the child fails. The output
    goes to files, so nothing reaps the child before ``os.wait4`` reads its resource usage."""
    out_path, err_path = tmp / "out.txt", tmp / "err.txt"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err_path.read_text()
    return usage.ru_maxrss, out_path.read_text()  # Linux: ru_maxrss is in kilobytes


@pytest.mark.parametrize("fmt", ["yaml", "csv"])
def test_validate_of_100k_proxies_peaks_under_150_mb(
    fleet: dict[str, Path], fmt: str, tmp_path: Path
) -> None:
    peak, out = _peak_rss_kb(["-m", "orchestrator", "validate", str(fleet[fmt])], tmp_path)
    assert f"proxies:   {N} on {N} instance(s) in 1 project(s)" in out.splitlines()
    assert peak <= LIMIT_KB, f"validate {fmt}: peak RSS {peak / 1024:.0f} MB"


@pytest.mark.parametrize("fmt", ["yaml", "csv"])
def test_loading_and_streaming_100k_entries_peaks_under_150_mb(
    fleet: dict[str, Path], fmt: str, tmp_path: Path
) -> None:
    # what a run does with the file: validate it, then walk the entries to queue them
    script = (
        "import sys\n"
        "from orchestrator.inventory import load_inventory\n"
        "inv = load_inventory(sys.argv[1])\n"
        "n = 0\n"
        "for _ in range(2):\n"
        "    for entry in inv.entries():\n"
        "        n += entry.line > 0\n"
        "print(n)\n"
    )
    peak, out = _peak_rss_kb(["-c", script, str(fleet[fmt])], tmp_path)
    assert out.strip() == str(2 * N)
    assert peak <= LIMIT_KB, f"load + 2 passes of entries() {fmt}: peak RSS {peak / 1024:.0f} MB"


def test_run_of_100k_proxies_peaks_under_150_mb(fleet: dict[str, Path], tmp_path: Path) -> None:
    """``run`` creates the 100k jobs (streamed into one transaction) and works on them against a loopback
    server that ACCEPTs every call; stopped with SIGINT after a few seconds of upgrades, its peak RSS
    (creation and engine alike) stays under the bound. Memory, not time."""
    import signal
    import socket
    import sqlite3
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Accept(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # upgrade-version
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            inst = self.path.split("/instances/")[1].split("/")[0]
            body = (
                f'{{"update_result":[{{"instance_id":"{inst}","workflow_id":"wf-{inst}","state":"ACCEPT",'
                '"error_message":null}]}'
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_a: object) -> None:
            return None

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadingHTTPServer(("127.0.0.1", port), Accept)
    Thread(target=server.serve_forever, daemon=True).start()
    db = tmp_path / "jobs.db"
    try:
        out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
        with out_path.open("w") as out, err_path.open("w") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "orchestrator",
                    "--log-format",
                    "plain",
                    "run",
                    str(fleet["yaml"]),
                    "--db",
                    str(db),
                    "--endpoint",
                    f"http://127.0.0.1:{port}",
                    "--no-preflight",
                    "--no-wait",
                    "--rate",
                    "100000/s",
                    "--concurrency",
                    "64",
                ],
                stdout=out,
                stderr=err,
                env={
                    k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "HUAWEICLOUD_"))
                },
            )
            deadline = time.monotonic() + 120
            sent = 0
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(1)
                try:
                    with sqlite3.connect(db) as conn:
                        sent = conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
                except sqlite3.Error:
                    continue
                if sent >= 2000:
                    break
            proc.send_signal(signal.SIGINT)
            _, status, usage = os.wait4(proc.pid, 0)
    finally:
        server.shutdown()
    assert sent >= 2000, err_path.read_text()[-2000:]
    assert os.waitstatus_to_exitcode(status) == 3, err_path.read_text()[-2000:]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == N
    print(f"run peak RSS {usage.ru_maxrss / 1024:.0f} MB")
    assert usage.ru_maxrss <= LIMIT_KB, f"peak RSS {usage.ru_maxrss / 1024:.0f} MB"
