"""orchestrator/metrics.py: what the engine reports is what a Prometheus scrape of 127.0.0.1 reads, and what
the node_exporter textfile holds; names follow the conventions docs/metrics.md lists."""

from __future__ import annotations

import os
import re
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.metrics import JOB_STATUSES, Metrics, check_textfile_path
from orchestrator.states import JobStatus

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _feed(m: Metrics) -> None:
    m.call("upgrade", "accepted", 0.2)
    m.call("upgrade", "accepted", 0.4)
    m.call("upgrade", "throttled", 0.05)
    m.call("job", "ok", 1.5)
    m.call("upgrade", "not_sent", None)
    m.limiter_wait(0.3)
    m.limiter_wait(0.0)
    m.throttled()
    m.jobs({"succeeded": 7, "flagged": 2, "in_flight": 1})


def test_scrape_over_loopback_shows_every_report() -> None:
    m = Metrics()
    _feed(m)
    server = m.serve(0)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        with urllib.request.urlopen(server.url, timeout=10) as r:
            assert r.status == 200
            body = r.read().decode()
    finally:
        server.close()
    got = _samples(body)
    calls = "orchestrator_calls_total"
    assert got[(calls, (("outcome", "accepted"), ("route", "upgrade")))] == 2
    assert got[(calls, (("outcome", "throttled"), ("route", "upgrade")))] == 1
    assert got[(calls, (("outcome", "ok"), ("route", "job")))] == 1
    assert got[(calls, (("outcome", "not_sent"), ("route", "upgrade")))] == 1
    lat = "orchestrator_call_latency_seconds"
    assert got[(lat + "_count", (("route", "upgrade"),))] == 3  # the unsent call has no latency
    assert got[(lat + "_sum", (("route", "upgrade"),))] == pytest.approx(0.65)
    assert got[(lat + "_bucket", (("le", "0.25"), ("route", "upgrade")))] == 2
    assert got[(lat + "_count", (("route", "job"),))] == 1
    assert got[("orchestrator_limiter_wait_seconds_count", ())] == 2
    assert got[("orchestrator_limiter_wait_seconds_sum", ())] == pytest.approx(0.3)
    assert got[("orchestrator_throttles_total", ())] == 1
    jobs = {s: got[("orchestrator_jobs", (("status", s),))] for s in JOB_STATUSES}
    assert jobs == {**dict.fromkeys(JOB_STATUSES, 0), "succeeded": 7, "flagged": 2, "in_flight": 1}


def test_jobs_gauge_follows_the_latest_counts() -> None:
    m = Metrics()
    m.jobs({"pending": 5})
    m.jobs({JobStatus.SUCCEEDED: 5})  # the store counts by JobStatus
    got = _samples(_scrape_text(m))
    assert got[("orchestrator_jobs", (("status", "pending"),))] == 0
    assert got[("orchestrator_jobs", (("status", "succeeded"),))] == 5


def _scrape_text(m: Metrics) -> str:
    server = m.serve(0)
    try:
        with urllib.request.urlopen(server.url, timeout=10) as r:
            return str(r.read().decode())
    finally:
        server.close()


def test_two_instances_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.throttled()
    assert _samples(_scrape_text(b))[("orchestrator_throttles_total", ())] == 0
    assert _samples(_scrape_text(a))[("orchestrator_throttles_total", ())] == 1


def test_textfile_is_written_whole_and_matches_the_endpoint(tmp_path: Path) -> None:
    m = Metrics()
    _feed(m)
    path = tmp_path / "orchestrator.prom"
    m.write_textfile(str(path))
    assert _samples(path.read_text()) == _samples(_scrape_text(m))
    assert [p.name for p in tmp_path.iterdir()] == ["orchestrator.prom"]  # no temporary left behind


def test_textfile_rewrites_are_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    """node_exporter may read while we write: every read sees a complete file (old or new)."""
    m = Metrics()
    path = tmp_path / "orchestrator.prom"
    m.write_textfile(str(path))
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            text = path.read_text()
            if "orchestrator_throttles_total" not in text:
                bad.append(text)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(200):
            m.throttled()
            m.write_textfile(str(path))
    finally:
        stop.set()
        t.join()
    assert not bad


def test_textfile_must_end_in_prom(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\*\.prom"):
        Metrics().write_textfile(str(tmp_path / "metrics.txt"))
    check_textfile_path("/var/lib/node_exporter/orchestrator.prom")


def test_serve_binds_loopback_only_by_default() -> None:
    server = Metrics().serve(0)
    try:
        bound = server._httpd.socket.getsockname()[0]
        assert bound == "127.0.0.1"
    finally:
        server.close()


def test_every_metric_is_documented_and_named_by_the_conventions() -> None:
    m = Metrics()
    _feed(m)
    doc = DOC.read_text(encoding="utf-8")
    names = {f.name for f in text_string_to_metric_families(_scrape_text(m))}
    assert names == {
        "orchestrator_calls",
        "orchestrator_call_latency_seconds",
        "orchestrator_jobs",
        "orchestrator_limiter_wait_seconds",
        "orchestrator_throttles",
    }
    for family in text_string_to_metric_families(_scrape_text(m)):
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert re.fullmatch(r"orchestrator_[a-z_]+", exposed)
        assert f"`{exposed}`" in doc, exposed
        if family.type == "histogram":
            assert exposed.endswith("_seconds")
    assert os.path.basename(str(DOC)) == "metrics.md"
