"""Logs, notices and progress from the engine's events.

The engine emits stable event names (``job.flagged``, ``call``, ``run.throttled``...) with fields; this
module turns them into structlog lines (console, ``key=value`` or ``--log-format json``), a progress
display pinned under the log on a terminal (a progress line every few seconds otherwise), and metrics.

Two promises: a failure to write a line (the reader of stderr went away: ``| head``) never stops or
stalls the engine, and outside text (cloud messages, run names) is printed literally, never as markup.
A redaction processor masks any field whose name says it holds a credential, whatever logs it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog
from rich.console import Console
from rich.text import Text

from orchestrator.cloud.redact import MASK

_SECRET_KEYS = ("token", "password", "secret", "authorization", "sk", "credential", "cookie")
_QUIET_EVENTS = {"call", "preflight.done", "workflow.status", "job.accepted", "job.succeeded", "job.skipped",
                 "job.retry_wait", "job.unknown", "job.in_flight"}  # fmt: skip
_WARN_SUFFIXES = ("flagged", "failed", "error", "crashed", "throttled", "move_lost", "fenced")
_FINAL = ("succeeded", "skipped", "flagged", "failed")


class SafeStream:
    """A text stream whose writes never raise: once the reader is gone (EPIPE, a closed file) further
    writes are dropped. The run goes on; what it does is in the job table."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        """Write ``text``; returns its length even when it was dropped (the stream broke, now or before)."""
        if self.broken:
            return len(text)
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            self.broken = True
            return len(text)

    def flush(self) -> None:
        """Flush the stream; a failure marks it broken instead of raising."""
        if self.broken:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self.broken = True

    def isatty(self) -> bool:
        """Whether the stream is a terminal (False when it cannot tell)."""
        try:
            return bool(self._stream.isatty())
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        """The wrapped stream's file descriptor (raises as the wrapped stream does when it has none)."""
        return self._stream.fileno()

    @property
    def encoding(self) -> str:
        """The wrapped stream's encoding, ``utf-8`` when it names none."""
        return getattr(self._stream, "encoding", "utf-8") or "utf-8"


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        low = key.lower()
        if any(low == s or low.endswith("_" + s) or low.startswith(s + "_") for s in _SECRET_KEYS):
            event[key] = MASK
    return event


class _ConsoleLogger:
    """structlog's output through a rich Console, so log lines go above a live progress display."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def msg(self, message: str) -> None:
        with contextlib.suppress(Exception):
            self._console.print(Text(message), soft_wrap=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


_state: dict[str, Any] = {"console": None, "json": False}


def configure_logging(*, fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> Console:
    """stderr only: stdout carries the summaries and reports that operators pipe into files. Returns the
    console every notice and the progress display use."""
    out = SafeStream(stream or sys.stderr)
    console = Console(file=out, highlight=False, soft_wrap=True)  # type: ignore[arg-type]
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "plain" or not out.isatty():
        renderer = structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"])
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=console.is_terminal and not console.no_color)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=lambda *_a: _ConsoleLogger(console),
        cache_logger_on_first_use=False,
    )
    _state["console"] = console
    _state["json"] = fmt == "json"
    _state["level"] = level
    return console


def notice_console() -> Console:
    """The stderr console configured by ``configure_logging`` (a safe default before it ran)."""
    console = _state.get("console")
    if console is None:
        console = configure_logging()
    return console


def notice(text: str, *, style: str | None = None) -> None:
    """One line for the operator on stderr: printed literally (never markup); a JSON ``notice`` event
    (``error`` for an ``error:`` line) under ``--log-format json``."""
    if _state["json"]:
        log = structlog.get_logger("orchestrator")
        if text.startswith("error:"):
            log.error("error", message=text.removeprefix("error:").strip())
        else:
            log.info("notice", message=text)
        return
    with contextlib.suppress(Exception):
        notice_console().print(Text(text, style=style or ""), soft_wrap=True)


class RunEvents:
    """Events -> log lines, the progress display and metrics.

    Progress counts the whole run (every process's work, after a resume too): ``update(counts)`` is fed
    the run's counts by status (each second, from the run-wide controls' read). ``calls`` per second are
    this process's, shown against ``rate_per_s``."""

    def __init__(
        self,
        *,
        total: int,
        console: Console | None = None,
        progress: bool | None = None,
        rate_per_s: float = 0.0,
        every_s: float = 10.0,
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.log = structlog.get_logger("orchestrator")
        self._debug = _state.get("level") == "debug"
        self.console = console or notice_console()
        self.show = self.console.is_terminal if progress is None else progress
        self.total = total
        self.rate_per_s = rate_per_s
        self.every_s = every_s
        self.metrics = metrics
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._calls: list[float] = []
        self._started = clock()
        self._done_at_start: int | None = None
        self._last_line = clock()
        self._live: Any = None
        self._wall = wall
        self._waiting: tuple[datetime, str] | None = None  # (until, reason) from the last run.waiting

    # ----------------------------------------------------------------------------- display
    def __enter__(self) -> RunEvents:
        if self.show:
            from rich.live import Live

            with contextlib.suppress(Exception):
                # rendered on each refresh (not only on update) so a wait's countdown ticks every second
                self._live = Live(
                    console=self.console, refresh_per_second=2, transient=False, get_renderable=self._render
                )
                self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            with contextlib.suppress(Exception):
                self._live.refresh()
                self._live.stop()
            self._live = None

    def update(self, counts: dict[str, int]) -> None:
        """The run's job counts by status (all processes)."""
        self._counts = dict(counts)
        done = self.done
        if self._done_at_start is None:
            self._done_at_start = done
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.jobs(self._counts)
        if self._live is not None:
            with contextlib.suppress(Exception):
                self._live.refresh()
        elif self._clock() - self._last_line >= self.every_s:
            self._last_line = self._clock()
            self.log.info("run.progress", **self.snapshot())

    @property
    def done(self) -> int:
        """Jobs of the run in a final status (succeeded, skipped, flagged, failed) at the last ``update``."""
        return sum(self._counts.get(s, 0) for s in _FINAL)

    def snapshot(self) -> dict[str, Any]:
        """done/total, what is in flight or waiting, this process's calls per second, and an ETA."""
        c = self._counts
        now = self._clock()
        recent = [t for t in self._calls if t > now - 10.0]
        # over the last 10 s, or over the time since the start when shorter: dividing the first seconds'
        # calls by 10 showed a run at its limit as a fraction of it
        cps = len(recent) / min(10.0, max(1.0, now - self._started)) if recent else 0.0
        done = self.done
        left = max(0, self.total - done)
        gained = done - (self._done_at_start or 0)
        elapsed = max(1e-6, now - self._started)
        eta = left / (gained / elapsed) if gained > 0 else None
        return {
            "done": done,
            "total": self.total,
            "accepted": c.get("accepted", 0),
            "in_flight": c.get("in_flight", 0) + c.get("unknown", 0),
            "waiting": c.get("pending", 0) + c.get("retry_wait", 0),
            "flagged": c.get("flagged", 0) + c.get("failed", 0),
            "calls_per_s": round(cps, 1),
            "limit_per_s": round(self.rate_per_s, 1),
            "eta_s": None if eta is None else round(eta),
        }

    def waiting_line(self) -> str | None:
        """What the run waits for and a countdown (``waiting for the maintenance window opening ...: in
        01:02:03``), while the last ``run.waiting`` still holds: None once its time passed or a call was
        made since."""
        waiting = self._waiting
        if waiting is None:
            return None
        until, reason = waiting
        left = int((until - self._wall()).total_seconds())
        if left < 0:
            return None
        hours, rest = divmod(left, 3600)
        return f"{reason}: in {hours:02d}:{rest // 60:02d}:{rest % 60:02d}"

    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        s = self.snapshot()
        grid = Table.grid(padding=(0, 1))
        grid.add_row(
            Text("upgrading", style="bold"),
            ProgressBar(total=max(1, s["total"]), completed=s["done"], width=30),
            Text(f"{s['done']}/{s['total']}"),
            Text(
                f"accepted {s['accepted']}  in flight {s['in_flight']}  waiting {s['waiting']}  "
                f"flagged {s['flagged']}  calls {s['calls_per_s']}/s of {s['limit_per_s']}/s"
                + (f"  ETA {_eta(s['eta_s'])}" if s["eta_s"] is not None else "")
            ),
        )
        waiting = self.waiting_line()
        return grid if waiting is None else Group(grid, Text(waiting, style="yellow"))

    # ------------------------------------------------------------------------------ events
    def emit(self, event: str, **fields: Any) -> None:
        """The ``Events`` hook. ``call`` (one cloud call: ``route``, ``outcome``, ``latency_s`` in seconds)
        feeds the calls-per-second figure and the metrics, no log line. Other events become a log line
        (fields that are None left out): warning for names ending in a problem (``flagged``, ``failed``,
        ``error``, ``throttled``, ``fenced``...), debug for per-job chatter (dropped unless the level is
        debug), info otherwise. Never raises."""
        if event == "run.waiting":
            with contextlib.suppress(Exception):
                until = datetime.fromisoformat(fields["until"])
                self._waiting = (until, str(fields.get("reason", "waiting")))
        if event == "call":
            self._waiting = None
            self._calls.append(self._clock())
            if len(self._calls) > 4096:
                del self._calls[:2048]
            if self.metrics is not None:
                with contextlib.suppress(Exception):
                    self.metrics.call(
                        fields.get("route", "?"), fields.get("outcome", "?"), fields.get("latency_s", 0.0)
                    )
            return
        level = "debug" if event in _QUIET_EVENTS else "info"
        if event.endswith(_WARN_SUFFIXES):
            level = "warning"
        elif level == "debug" and not self._debug:
            return  # per-job chatter costs CPU on every call even when the logger drops it
        with contextlib.suppress(Exception):
            getattr(self.log, level)(event, **{k: v for k, v in fields.items() if v is not None})


def _eta(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
