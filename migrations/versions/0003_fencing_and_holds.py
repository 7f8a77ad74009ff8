"""fencing and proxy holds: the intent's send deadline, the sender's cloud clock offset, a proxy index

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 13:31:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("intent_deadline", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_jobs_proxy", ["project_id", "instance_id", "proxy_id"], unique=False)
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cloud_offset_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_column("cloud_offset_s")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_proxy")
        batch_op.drop_column("intent_deadline")
