"""The one job-status enum and the table of moves it may make.

Every status change in the job table goes through ``check_move`` (in memory) and through the store's
conditional UPDATE (in the database), so a move that is not drawn in ``docs/states.md`` cannot happen,
and two workers can never both win the same move.
"""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    """A job's (one proxy's) status in a run; the values are what ``jobs.status`` stores (the CHECK
    constraint of migration 0002 refuses any other). Moves between them: ``ALLOWED``, docs/states.md."""

    PENDING = "pending"  # loaded, waiting to be claimed (preflight not yet done or not needed)
    IN_FLIGHT = "in_flight"  # an upgrade call's intent is recorded; the answer is not
    UNKNOWN = "unknown"  # the call may have reached the cloud but its answer was lost: reconcile first
    RETRY_WAIT = "retry_wait"  # a transient failure; due again at next_attempt_at
    ACCEPTED = "accepted"  # the cloud queued the workflow(s); tracking follows them
    SUCCEEDED = "succeeded"  # postflight read the target version (--no-wait leaves jobs accepted)
    SKIPPED = "skipped"  # nothing to do (already at target)
    FLAGGED = "flagged"  # needs an operator; reason and hint say what to do
    FAILED = "failed"  # gave up (attempts exhausted or a non-retryable error)

    @property
    def terminal(self) -> bool:
        """True for succeeded, skipped, flagged and failed (see ``TERMINAL``)."""
        return self in TERMINAL


TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.SKIPPED, JobStatus.FLAGGED, JobStatus.FAILED}
)

# Statuses a worker may still act on; a run is finished when no job is in one of these.
ACTIVE: frozenset[JobStatus] = frozenset(
    {JobStatus.PENDING, JobStatus.IN_FLIGHT, JobStatus.UNKNOWN, JobStatus.RETRY_WAIT, JobStatus.ACCEPTED}
)

_S = JobStatus
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    # preflight may finish a pending job without an upgrade call (skip, flag) or a read may fail (retry);
    # at the target after an earlier attempt whose answer proved nothing (a re-queued job): reconcile
    _S.PENDING: frozenset({_S.IN_FLIGHT, _S.SKIPPED, _S.FLAGGED, _S.FAILED, _S.RETRY_WAIT, _S.UNKNOWN}),
    _S.IN_FLIGHT: frozenset({_S.ACCEPTED, _S.RETRY_WAIT, _S.FLAGGED, _S.FAILED, _S.SKIPPED, _S.UNKNOWN}),
    # reconciliation: found the workflow (accepted), found nothing (retry_wait = resend), or gave up
    _S.UNKNOWN: frozenset({_S.ACCEPTED, _S.SUCCEEDED, _S.RETRY_WAIT, _S.FLAGGED, _S.FAILED, _S.SKIPPED}),
    _S.RETRY_WAIT: frozenset({_S.IN_FLIGHT, _S.SKIPPED, _S.FLAGGED, _S.FAILED, _S.RETRY_WAIT, _S.UNKNOWN}),
    # tracking: workflows end (succeeded after postflight), fail (policy: retry/flag/fail)
    _S.ACCEPTED: frozenset({_S.SUCCEEDED, _S.FLAGGED, _S.FAILED, _S.RETRY_WAIT}),
    _S.SUCCEEDED: frozenset(),
    _S.SKIPPED: frozenset(),
    # operator re-queue (`orchestrator retry`) is the only way out of a terminal problem state
    _S.FLAGGED: frozenset({_S.PENDING}),
    _S.FAILED: frozenset({_S.PENDING}),
}


STATUS_ORDER: tuple[str, ...] = (
    "succeeded",
    "accepted",
    "skipped",
    "flagged",
    "failed",
    "pending",
    "retry_wait",
    "in_flight",
    "unknown",
)
"""The order reports list job statuses in: where jobs ended, then where they still are."""


class IllegalMove(RuntimeError):
    """A code path tried a status move that the state table forbids: a bug, never an input error."""


def check_move(old: JobStatus, new: JobStatus) -> None:
    """Check the move ``old -> new`` against ``ALLOWED``, in memory, before the store writes it.

    Raises ``IllegalMove`` when the table forbids it (a bug in the caller)."""
    if new not in ALLOWED[old]:
        raise IllegalMove(f"job status {old.value} -> {new.value} is not allowed")


def sources_of(new: JobStatus) -> frozenset[JobStatus]:
    """Statuses from which ``new`` may be reached: the WHERE clause of the guarded UPDATE."""
    return frozenset(old for old, targets in ALLOWED.items() if new in targets)


class RunStatus(enum.StrEnum):
    """A run's status; the values are what ``runs.status`` stores (CHECK constraint, migration 0002).
    docs/states.md says who moves a run between them and which exit code each end gives."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"  # interrupted (signal, crash detected on resume, auth failure, lost database)
    PAUSED = "paused"  # the maintenance window closed; `resume` in the next window continues
    HALTED = "halted"  # the failure breaker tripped or a wave awaits confirmation: a person must decide
    FINISHED = "finished"
