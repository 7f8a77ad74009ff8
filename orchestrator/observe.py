"""Logs and progress from the engine's events.

The engine emits stable event names (``upgrade.accepted``, ``job.flagged``...) with fields; this module
turns them into structlog lines (console or ``--log-format json``) and, on a terminal, a rich progress
bar. A redaction processor masks any field whose name says it holds a credential, whatever logs it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.cloud.redact import MASK

_SECRET_KEYS = ("token", "password", "secret", "authorization", "sk", "credential", "cookie")
_QUIET_EVENTS = {"upgrade.sent", "preflight.done", "workflow.status"}


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        low = key.lower()
        if any(low == s or low.endswith("_" + s) or low.startswith(s + "_") for s in _SECRET_KEYS):
            event[key] = MASK
    return event


def configure_logging(*, fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    """stderr only: stdout carries the summary and reports that operators pipe into files."""
    out = stream or sys.stderr
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif fmt == "plain" or not out.isatty():
        renderer = structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"])
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


class NoticeConsole(Console):
    """stderr for the operator's notices: the run banner, what a resume will do, ``error:`` lines.

    With ``--log-format json`` a log shipper reads stderr line by line and every line must parse, so
    then each notice becomes one log event (``notice``, or ``error`` for an ``error:`` line) instead of
    free text. Set ``json_lines`` once logging is configured."""

    json_lines = False

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if not self.json_lines:
            super().print(*objects, **kwargs)
            return
        if all(isinstance(o, str) for o in objects):
            text = " ".join(objects)
        else:
            with self.capture() as captured:
                super().print(*objects, **kwargs)
            text = captured.get()
        text = text.strip()
        log = structlog.get_logger("orchestrator")
        if text.startswith("error:"):
            log.error("error", message=text.removeprefix("error:").strip())
        elif text:
            log.info("notice", message=text)


class RunEvents:
    """Events -> log lines (+ a progress bar on a terminal). ``total`` jobs; done = terminal statuses."""

    def __init__(
        self,
        *,
        total: int,
        done: int = 0,
        console: Console | None = None,
        progress: bool | None = None,
        verbose: bool = False,
        accepted_is_done: bool = False,
    ) -> None:
        self.log = structlog.get_logger("orchestrator")
        self.console = console or Console(stderr=True)
        show = self.console.is_terminal if progress is None else progress
        self.total = total
        self.done = done
        self.verbose = verbose
        self._final = {"succeeded", "skipped", "flagged", "failed"} | (
            {"accepted"} if accepted_is_done else set()
        )
        self._progress = Progress(
            TextColumn("[bold]upgrading"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[tally]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not show,
            transient=False,
        )
        self._task = self._progress.add_task("run", total=total, completed=done, tally="")
        self._tally: dict[str, int] = {}

    def __enter__(self) -> RunEvents:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def emit(self, event: str, **fields: Any) -> None:
        kind = event.split(".", 1)[1] if "." in event else ""
        if event.startswith("job.") and kind in self._final:
            self.done += 1
            key = kind
            self._tally[key] = self._tally.get(key, 0) + 1
            tally = " ".join(f"{k}={v}" for k, v in sorted(self._tally.items()))
            self._progress.update(self._task, completed=self.done, tally=tally)
            if self._progress.disable and (
                self.done % max(1, self.total // 20) == 0 or self.done == self.total
            ):
                self.log.info("run.progress", done=self.done, total=self.total, **self._tally)
        level = "debug" if event in _QUIET_EVENTS and not self.verbose else "info"
        if event.endswith(("flagged", "failed", "error", "crashed", "throttled", "move_lost")):
            level = "warning"
        getattr(self.log, level)(event, **fields)
