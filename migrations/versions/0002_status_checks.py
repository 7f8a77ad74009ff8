"""status check constraints: the database refuses a job or run status the code does not know

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 13:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here (not imported from orchestrator.states): a landed migration never changes. A later status
# needs a new migration that replaces the constraint.
JOB_STATUSES = (
    "pending", "in_flight", "unknown", "retry_wait", "accepted", "succeeded", "skipped", "flagged", "failed",
)  # fmt: skip
RUN_STATUSES = ("created", "running", "stopped", "paused", "halted", "finished")


def _in(values: Sequence[str]) -> str:
    return "status IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_check_constraint("status", _in(JOB_STATUSES))
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_check_constraint("status", _in(RUN_STATUSES))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_runs_status"), type_="check")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_jobs_status"), type_="check")
