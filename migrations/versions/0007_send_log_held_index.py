"""send_log: a partial index on the permits still held

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 03:20:00

A send permit's check counts the permits of the run still held (``done_at IS NULL``, lease not run out).
With only ``ix_send_log_run_at`` that count read every row the run's ``send_log`` keeps (the last
``max(60 s, 3 x lease)`` of starts, pruned once a minute): 1.4 ms per check at 10,000 calls, under the
run's lock, and growing with the rate. The held permits are at most the run's concurrency, so a partial
index on them keeps the check's cost flat. Both backends support partial indexes; a plain
``CREATE INDEX`` needs no table rebuild on SQLite, so the audit views (0006) stay as they are.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HELD = "done_at IS NULL"


def upgrade() -> None:
    op.create_index(
        "ix_send_log_held",
        "send_log",
        ["run_id", "lease_expires_at"],
        unique=False,
        sqlite_where=sa.text(HELD),
        postgresql_where=sa.text(HELD),
    )


def downgrade() -> None:
    op.drop_index("ix_send_log_held", table_name="send_log")
