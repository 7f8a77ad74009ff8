"""The job table's schema revision this release expects.

The newest migration's revision id. Every command that opens the job table compares it with the table's
``alembic_version`` (one SELECT through the driver) and loads Alembic only when the table is behind. A
unit test ties it to Alembic's head, so a new migration that forgets to move it fails the suite instead of
going unrun. Keep docs/schema.md in step with every migration.
"""

HEAD_REVISION = "0007"
