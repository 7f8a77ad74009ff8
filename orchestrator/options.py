"""A run's typed options: parsed from the command line (and the inventory's ``window:``), validated once,
stored as JSON on the run so that a resume and every worker keep what the run started with.

What is NOT stored: anything secret (the ``--notify`` URL: webhook URLs carry tokens), and what belongs to
one process (``--yes``, ``--tz``, metrics). Durations are stored as the text the operator typed
(``30m``), so ``status`` shows them as given; ``RunOptions`` parses them on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from typing import Any

from orchestrator.limiter import parse_rate

ORDERS = ("inventory", "shuffle", "instance")


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Options of one run (all seconds unless named otherwise). Raises ValueError (one line, naming the
    option) for an invalid combination or value."""

    rate: str = "10/s"
    concurrency: int = 8
    timeout: float = 30.0  # seconds for one call, from its start
    connect_timeout: float = 10.0
    endpoint_override: str | None = None
    policy: dict[str, Any] | None = None  # policy_to_dict() of the run's policy
    wait: bool = True  # follow workflows to their end (False: stop at ACCEPT)
    preflight: bool = True
    poll_initial: float = 10.0  # first workflow check after ACCEPT (Terraform: 10 s)
    poll_interval: float = 10.0
    poll_timeout: float = 3600.0  # give up waiting for a workflow (flag) after this
    reconcile_grace: float = 30.0  # a lost answer's workflow must be visible after this long
    lease: float = 30.0  # job/worker lease; a dead worker's jobs are taken over after it
    heartbeat: float = 5.0
    drain_timeout: float = 30.0  # graceful stop: how long in-flight calls may take to answer
    db_outage_timeout: float = 60.0  # how long to wait for a job table that went away before stopping
    ca_bundle: str | None = None
    seed: int | None = None  # backoff jitter seed (reproducible chaos tests)
    # the maintenance window (docs/scheduling.md)
    window: str | None = None  # ISO 8601 interval or weekly form, as typed
    cutoff: str = "0s"  # no new upgrade call after window end minus this
    wait_for_window: bool = False
    # waves, the failure breaker, the availability guard
    waves: str | None = None  # "1,5,25%,100%"
    order: str = "inventory"
    order_seed: int | None = None
    pause_between: str = "0s"
    confirm: bool = False
    max_failures: str | None = None  # "2" or "10%"
    per_instance: int = 1

    def __post_init__(self) -> None:
        parse_rate(self.rate)
        if not 1 <= self.concurrency <= 1000:
            raise ValueError("--concurrency must be between 1 and 1000")
        for name in ("timeout", "connect_timeout", "poll_interval", "lease", "heartbeat"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.heartbeat * 2 > self.lease:
            raise ValueError("--lease must be at least twice the heartbeat interval")
        if self.db_outage_timeout < 0:
            raise ValueError("--db-outage-timeout must not be negative")
        if self.endpoint_override is not None:
            from orchestrator.cloud.endpoints import validate_endpoint

            try:
                object.__setattr__(self, "endpoint_override", validate_endpoint(self.endpoint_override))
            except ValueError as exc:
                raise ValueError(f"--endpoint: {exc}") from None
        if self.order not in ORDERS:
            raise ValueError(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if not 1 <= self.per_instance <= 100:
            raise ValueError("--per-instance must be between 1 and 100")
        # parse once here, so a bad stored or typed value is refused before anything is written
        self.window_spec()
        self.cutoff_delta()
        self.pause_delta()
        self.wave_spec()
        self.breaker()
        if self.window is not None:
            from orchestrator.schedule.window import check_cutoff

            spec = self.window_spec()
            assert spec is not None
            try:
                check_cutoff(spec, self.cutoff_delta())
            except ValueError as exc:
                raise ValueError(f"--cutoff: {exc}") from None

    # ------------------------------------------------------------------------------ parsed views
    def window_spec(self) -> Any:
        """The parsed window (``schedule.window.Window``) or None. Raises ValueError naming ``--window``."""
        if self.window is None:
            return None
        from orchestrator.schedule.window import parse_window

        try:
            return parse_window(self.window)
        except ValueError as exc:
            raise ValueError(f"--window: {exc}") from None

    def cutoff_delta(self) -> timedelta:
        """``--cutoff`` parsed: no new upgrade call starts later than this before the window's end.
        Raises ValueError naming the option."""
        return _duration("--cutoff", self.cutoff)

    def pause_delta(self) -> timedelta:
        """``--pause-between`` parsed: the least pause between one wave's end and the next wave's start.
        Raises ValueError naming the option."""
        return _duration("--pause-between", self.pause_between)

    def wave_spec(self) -> Any:
        """The parsed ``--waves`` (``schedule.waves.WaveSpec``) or None (one wave). Raises ValueError
        naming the option."""
        if self.waves is None:
            return None
        from orchestrator.schedule.waves import parse_waves

        try:
            return parse_waves(self.waves)
        except ValueError as exc:
            raise ValueError(f"--waves: {exc}") from None

    def breaker(self) -> Any:
        """The parsed ``--max-failures`` (``schedule.breaker.Breaker``) or None (no limit). Raises
        ValueError naming the option."""
        if self.max_failures is None:
            return None
        from orchestrator.schedule.breaker import parse_max_failures

        try:
            return parse_max_failures(self.max_failures)
        except ValueError as exc:
            raise ValueError(f"--max-failures: {exc}") from None

    # ---------------------------------------------------------------------------------- storage
    def to_dict(self) -> dict[str, Any]:
        """Every field by name, JSON-ready (what ``runs.options`` stores; ``from_dict`` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunOptions:
        """Options stored on a run; validated like typed ones (a stored endpoint goes through the same
        validator as ``--endpoint``). Raises ValueError naming the option."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def stored(cls, data: Mapping[str, Any], run_id: int) -> RunOptions:
        """``from_dict`` for a run's stored options, a bad value being a one-line usage error."""
        from orchestrator.errors import UsageError

        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise UsageError(f"run {run_id}'s stored options: {exc} (pass a valid one to resume)") from None

    def override(self, **changes: Any) -> RunOptions:
        """These options with what the command line set explicitly (None: not given). Raises ValueError
        naming the option when the result is invalid."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def changed_from(self, other: RunOptions) -> list[str]:
        """Names of the options that differ (for the event log of a resume with new options)."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def _duration(flag: str, text: str) -> timedelta:
    from orchestrator.schedule.durations import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


# Command-line keyword -> RunOptions field (click's parameter names; None values mean "not given").
CLI_KEYS: dict[str, str] = {
    "rate": "rate",
    "concurrency": "concurrency",
    "timeout": "timeout",
    "endpoint": "endpoint_override",
    "ca_bundle": "ca_bundle",
    "wait": "wait",
    "preflight": "preflight",
    "poll_initial": "poll_initial",
    "poll_interval": "poll_interval",
    "poll_timeout": "poll_timeout",
    "reconcile_grace": "reconcile_grace",
    "lease": "lease",
    "heartbeat": "heartbeat",
    "drain_timeout": "drain_timeout",
    "db_outage_timeout": "db_outage_timeout",
    "seed": "seed",
    "window": "window",
    "cutoff": "cutoff",
    "wait_for_window": "wait_for_window",
    "waves": "waves",
    "order": "order",
    "pause_between": "pause_between",
    "confirm": "confirm",
    "max_failures": "max_failures",
    "per_instance": "per_instance",
}


def cli_overrides(kw: Mapping[str, Any]) -> dict[str, Any]:
    """The RunOptions fields the command line set explicitly."""
    return {CLI_KEYS[k]: v for k, v in kw.items() if k in CLI_KEYS and v is not None}


def build_options(base: RunOptions, kw: Mapping[str, Any], **extra: Any) -> RunOptions:
    """``base`` with the command line's explicit values (and ``extra``) applied, validated.
    Raises ValueError with a one-line message naming the option."""
    return base.override(**cli_overrides(kw), **extra)


DEFAULT = RunOptions()
