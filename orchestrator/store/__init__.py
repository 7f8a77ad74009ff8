"""The one persistence gateway: every connection to the job table of the program lives in this package."""

from orchestrator.errors import DatabaseUnavailable
from orchestrator.store.gateway import JobStore, describe_url, open_store
from orchestrator.store.jobs import Requeued, UnknownProxies
from orchestrator.store.rows import (
    AttemptAnswer,
    AttemptRow,
    Claimed,
    Intent,
    JobRow,
    Move,
    NewJob,
    NewWorkflow,
    Registration,
    RunRow,
    RunState,
    WorkerRow,
    WorkflowRow,
)
from orchestrator.store.runs import UnfinishedRun, WavePlanner
from orchestrator.store.sql import DatabaseDown
from orchestrator.store.workers import ProxiesHeld, RunLocked, new_worker_id

__all__ = [
    "AttemptAnswer",
    "AttemptRow",
    "Claimed",
    "DatabaseDown",
    "DatabaseUnavailable",
    "Intent",
    "JobRow",
    "JobStore",
    "Move",
    "NewJob",
    "NewWorkflow",
    "ProxiesHeld",
    "Registration",
    "Requeued",
    "RunLocked",
    "RunRow",
    "RunState",
    "UnfinishedRun",
    "UnknownProxies",
    "WavePlanner",
    "WorkerRow",
    "WorkflowRow",
    "describe_url",
    "new_worker_id",
    "open_store",
]
