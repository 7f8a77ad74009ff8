"""A run's typed options, stored as JSON on the run so that a resume keeps what the run started with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from orchestrator.limiter import parse_rate


@dataclass(frozen=True, slots=True)
class RunOptions:
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
    ca_bundle: str | None = None
    seed: int | None = None  # backoff jitter seed (reproducible chaos tests)

    def __post_init__(self) -> None:
        parse_rate(self.rate)
        if not 1 <= self.concurrency <= 1000:
            raise ValueError("concurrency must be between 1 and 1000")
        for name in ("timeout", "connect_timeout", "poll_interval", "lease", "heartbeat"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.heartbeat * 2 > self.lease:
            raise ValueError("lease must be at least twice the heartbeat interval")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunOptions:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def override(self, **changes: Any) -> RunOptions:
        """Options of a resumed run: the stored ones, with what the command line set explicitly."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


DEFAULT = RunOptions()
