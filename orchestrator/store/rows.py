"""What the job table hands out and takes in: frozen rows and typed inputs, no SQL and no session.

Every other module speaks in these (``JobRow``, ``RunRow``, ``NewJob``, ``Move``...), so the engine, the
steps and the reports never see a driver's tuple or an ORM object. Times are timezone-aware UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from orchestrator.states import JobStatus, RunStatus


@dataclass(frozen=True, slots=True)
class NewJob:
    """What the inventory contributes to a job row (the store does not import the inventory)."""

    project_id: str
    instance_id: str
    proxy_id: str
    endpoint: str
    target_version: str
    source_version: str | None = None
    region: str | None = None
    x_language: str = "en-us"
    name: str | None = None
    line: int | None = None


@dataclass(frozen=True, slots=True)
class RunRow:
    """One row of ``runs``: ``options`` is the stored ``RunOptions.to_dict()``; ``wave_open`` the highest
    wave whose upgrades may start; ``failures_acked`` the breaker failures an operator acknowledged
    (``resume --ack``). Columns: docs/schema.md."""

    id: int
    name: str
    inventory_path: str
    inventory_sha256: str
    status: RunStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    options: dict[str, Any]
    stop_reason: str | None
    wave_open: int = 1
    failures_acked: int = 0


@dataclass(frozen=True, slots=True)
class JobRow:
    """One row of ``jobs``: one proxy of one run. ``attempt_count`` counts upgrade calls recorded,
    ``read_failures`` consecutive failed reads (preflight, reconcile, postflight); ``claimed_by`` and
    ``lease_expires_at`` the claim; ``intent_deadline`` the moment after which the process that recorded
    the latest intent never sends it; ``wave`` is 1-based. Times on the job table's clock. Columns:
    docs/schema.md."""

    id: int
    run_id: int
    project_id: str
    instance_id: str
    proxy_id: str
    name: str | None
    region: str | None
    endpoint: str
    x_language: str
    source_version: str | None
    target_version: str
    status: JobStatus
    attempt_count: int
    read_failures: int
    next_attempt_at: datetime | None
    reason: str | None
    hint: str | None
    rule: str | None
    current_version: str | None
    latest_version: str | None
    claimed_by: str | None
    lease_expires_at: datetime | None
    intent_deadline: datetime | None
    wave: int
    counts_failure: bool
    inventory_line: int | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One row of ``attempts``: one upgrade call, written (outcome ``in_flight``) before the request
    leaves and completed by its answer. ``outcome`` values: docs/states.md; ``transport`` the
    ``TransportKind`` of a failure below HTTP; ``cloud_offset_s`` the sender's measured offset of the
    cloud's clock to the job table's (cloud = ``sent_at`` + offset), None when unmeasured."""

    id: int
    job_id: int
    number: int
    worker: str | None
    sent_at: datetime
    answered_at: datetime | None
    http_status: int | None
    error_code: str | None
    error_msg: str | None
    request_id: str | None
    outcome: str
    rule: str | None
    transport: str | None
    cloud_offset_s: float | None


@dataclass(frozen=True, slots=True)
class WorkflowRow:
    """One row of ``workflows``: an ``update_result`` item (``source`` ``answer``) or a workflow found by
    reconcile (``reconciled``); ``state`` ACCEPT or REJECT; ``job_status``, ``progress`` and
    ``fail_reason`` as the latest ``GET /jobs?id=`` gave them (docs/api-contract.md, section 5)."""

    id: int
    job_id: int
    attempt_id: int | None
    workflow_id: str | None
    instance_id: str | None
    state: str
    error_message: str | None
    source: str
    job_status: str | None
    progress: str | None
    fail_reason: str | None
    created_at: datetime
    checked_at: datetime | None
    ended_at: datetime | None


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One row of ``workers``: a process registered on a run (``role`` runner or worker; ``id`` is
    ``host:pid:random``), its heartbeat and lease, ``left_at`` once it left, ``claimed`` jobs it claimed."""

    id: str
    run_id: int
    role: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    lease_expires_at: datetime
    left_at: datetime | None
    claimed: int


@dataclass(frozen=True, slots=True)
class NewWorkflow:
    """One ``update_result`` item (source ``answer``) or a workflow found by reconcile (``reconciled``)."""

    workflow_id: str | None
    state: str
    error_message: str | None = None
    instance_id: str | None = None
    source: str = "answer"


@dataclass(frozen=True, slots=True)
class AttemptAnswer:
    """What one upgrade call came back with, as the attempt row records it (replaces an untyped dict).

    ``outcome``: the decision's action value (accepted, retry, flag, fail, skip, reconcile, stop_run), or
    ``not_sent``/``lost``/``reconciled`` for the other ways an attempt ends.
    """

    outcome: str
    rule: str | None = None
    http_status: int | None = None
    error_code: str | None = None
    error_msg: str | None = None
    request_id: str | None = None
    transport: str | None = None
    sent_at: datetime | None = None  # when the call really left (after the limiter), if it did


@dataclass(frozen=True, slots=True)
class Move:
    """One guarded job move: from ``frm`` (the status the mover saw) to ``to``, in one commit.

    ``fields`` names job columns (reason, hint, rule, next_attempt_at, current_version, latest_version,
    risk, read_failures, counts_failure, source_version, target_version: ``MOVE_FIELDS``): the only
    columns a move may set. ``release`` drops the mover's
    claim. ``workflows`` are recorded with it (attached to ``attempt_id`` when given), and
    ``attempt_answer`` completes that attempt. Every move appends an event (``event_reason`` overrides
    the reason it records).
    """

    frm: JobStatus
    to: JobStatus
    fields: Mapping[str, Any] = field(default_factory=dict)
    release: bool = True
    workflows: tuple[NewWorkflow, ...] = ()
    attempt_id: int | None = None
    attempt_answer: AttemptAnswer | None = None
    event_reason: str | None = None


MOVE_FIELDS = frozenset(
    {
        "reason",
        "hint",
        "rule",
        "next_attempt_at",
        "current_version",
        "latest_version",
        "risk",
        "read_failures",
        "counts_failure",
        "source_version",
        "target_version",
    }
)


@dataclass(frozen=True, slots=True)
class RunState:
    """What the run-wide controls need, read in one query: the run row plus its counts.

    ``finished``: jobs in a terminal status; ``failures``: of those, counted by the breaker (minus none:
    ``failures_acked`` is on ``run``); ``not_started``: pending or retry_wait jobs with no intent now;
    ``in_flight``: jobs with work under way (in_flight, unknown, accepted); ``open_unfinished``: jobs of waves
    <= ``run.wave_open`` not yet finished; ``waves``: the highest wave number; ``last_wave_finished_at``: when
    the open wave's end was recorded (None before); ``db_now``: the clock every comparison of this run uses
    (the database's on PostgreSQL).
    """

    run: RunRow
    total: int
    finished: int
    failures: int
    not_started: int
    in_flight: int
    open_unfinished: int
    waves: int
    last_wave_finished_at: datetime | None
    db_now: datetime
    next_wave_size: int = 0
    by_status: Mapping[str, int] = field(default_factory=dict)  # job counts by status value


@dataclass(frozen=True, slots=True)
class Registration:
    """A process's place in a run: its worker id, the dead holders it took over, and the lease it holds
    (``lease_until`` in the database's clock; ``db_now`` the same clock at registration)."""

    worker_id: str
    taken_over: tuple[WorkerRow, ...]
    db_now: datetime
    lease_until: datetime


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one claim returned: the jobs (now leased to the claimer) and the database's clock."""

    jobs: list[JobRow]
    db_now: datetime


@dataclass(frozen=True, slots=True)
class Intent:
    """A recorded intent: the attempt row, its number, and the claim's lease deadline (database clock)."""

    attempt_id: int
    number: int
    deadline: datetime | None
