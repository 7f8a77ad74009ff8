"""Prometheus metrics of a run (``--metrics-port``, ``--metrics-textfile``): docs/metrics.md lists them.

One :class:`Metrics` per process, with its own ``CollectorRegistry`` (never prometheus_client's global
one: tests and embedders create several, and the global registry's process and GC collectors are not
ours to publish). The engine reports through four methods (:meth:`Metrics.call`,
:meth:`Metrics.limiter_wait`, :meth:`Metrics.throttled`, :meth:`Metrics.jobs`); they are cheap (a lock and
an add) and thread-safe. Labels take values from small fixed sets (routes, outcomes, job statuses), never
ids: a label per proxy would make one time series per proxy.

Names follow the Prometheus conventions (https://prometheus.io/docs/practices/naming/): an
``orchestrator_`` prefix, base units (seconds), ``_total`` on counters (prometheus_client appends it).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
    write_to_textfile,
)

# No ``*_created`` series (a creation timestamp per counter and histogram): Prometheus does not need them
# and they double the families a scrape shows. The switch is process-wide; this module is its only user.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: answer latency of one API call, seconds: the API answers in tens to hundreds of milliseconds, the
#: simulator's slow scenarios and timeouts in seconds (the default call timeout is 30 s)
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: time a call waited for a send permit (rate window and concurrency), seconds
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: job statuses always exported (0 when empty), so a dashboard's series do not appear and vanish
JOB_STATUSES = (
    "pending",
    "in_flight",
    "unknown",
    "retry_wait",
    "accepted",
    "succeeded",
    "skipped",
    "flagged",
    "failed",
)


_Status = TypeVar("_Status", bound=str)  # a status string or a JobStatus member


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """The running ``/metrics`` endpoint: where it listens (``port`` is the bound one when 0 was asked)."""

    host: str
    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """The scrape address, ``http://HOST:PORT/metrics`` (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and wait for the server thread (at most 5 s)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class Metrics:
    """The run's metrics in their own registry (``self.registry``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._calls = Counter(
            "orchestrator_calls",
            "Cloud API calls made, by route (upgrade, proxy_version, job, ...) and outcome.",
            ["route", "outcome"],
            registry=r,
        )
        self._latency = Histogram(
            "orchestrator_call_latency_seconds",
            "Time from sending a cloud API call to its answer (or failure), by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._jobs = Gauge(
            "orchestrator_jobs", "Jobs of the run by status (the whole run).", ["status"], registry=r
        )
        self._limiter_wait = Histogram(
            "orchestrator_limiter_wait_seconds",
            "Time a call waited for a send permit (rate limit and concurrency) before it was sent.",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self._throttles = Counter(
            "orchestrator_throttles",
            "Answers that throttled us (HTTP 429 or the gateway's throttling error codes).",
            registry=r,
        )
        for status in JOB_STATUSES:
            self._jobs.labels(status).set(0)

    def call(self, route: str, outcome: str, latency_s: float | None) -> None:
        """Count one API call on ``route`` that ended in ``outcome`` (both from small fixed sets) and
        observe its latency in seconds (None when it was never sent)."""
        self._calls.labels(route, outcome).inc()
        if latency_s is not None:
            self._latency.labels(route).observe(max(latency_s, 0.0))

    def limiter_wait(self, seconds: float) -> None:
        """Observe how long one call waited for its send permit, in seconds."""
        self._limiter_wait.observe(max(seconds, 0.0))

    def throttled(self) -> None:
        """Count one throttling answer."""
        self._throttles.inc()

    def jobs(self, counts: Mapping[_Status, int]) -> None:
        """Set the run's jobs by status (``{status: n}``; a known status missing from ``counts`` is 0)."""
        by_name = {str(k): n for k, n in counts.items()}
        for status in (*JOB_STATUSES, *(k for k in by_name if k not in JOB_STATUSES)):
            self._jobs.labels(status).set(by_name.get(status, 0))

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Serve ``GET /metrics`` on ``host:port`` from a daemon thread (port 0: any free port). Bound to
        127.0.0.1 unless told otherwise: metrics name the run's routes and counts, for this host's
        Prometheus agent, not the network. Raises OSError when the address cannot be bound."""
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(host, int(httpd.server_port), httpd, thread)

    def write_textfile(self, path: str) -> None:
        """Write the metrics for node_exporter's textfile collector: atomically (a temporary file in the
        same folder, then a rename, so the collector never reads half a file). Raises ValueError when
        ``path`` does not end in ``.prom`` (the collector reads nothing else), OSError when unwritable."""
        check_textfile_path(path)
        write_to_textfile(path, self.registry)


def check_textfile_path(path: str) -> None:
    """Raise ValueError unless ``path`` names a ``.prom`` file (what node_exporter's collector reads): for
    the CLI to refuse ``--metrics-textfile`` at start-up rather than after the run."""
    if not path.endswith(".prom"):
        raise ValueError(
            f"--metrics-textfile {path!r}: node_exporter's textfile collector only reads *.prom files"
        )
