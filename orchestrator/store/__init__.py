"""The one persistence gateway: every SQLAlchemy session of the program lives in this package."""

from orchestrator.store.store import (
    JobRow,
    JobStore,
    NewJob,
    NewWorkflow,
    RunLocked,
    RunRow,
    WorkflowRow,
    open_store,
)

__all__ = [
    "JobRow",
    "JobStore",
    "NewJob",
    "NewWorkflow",
    "RunLocked",
    "RunRow",
    "WorkflowRow",
    "open_store",
]
