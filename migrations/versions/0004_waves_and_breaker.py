"""waves and the failure breaker: per-job wave and failure flag, per-run open wave and acknowledged failures

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 13:32:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("wave", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("counts_failure", sa.Boolean(), server_default="0", nullable=False))
        batch_op.create_index("ix_jobs_run_status_wave", ["run_id", "status", "wave", "id"], unique=False)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("wave_open", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("failures_acked", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("failures_acked")
        batch_op.drop_column("wave_open")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_run_status_wave")
        batch_op.drop_column("counts_failure")
        batch_op.drop_column("wave")
