"""jobs.disk_bytes: what a job's folder holds on disk, so the per-key storage quota counts checkpoints and logs too

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("disk_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    # Jobs that ended before this revision: their listed artifacts are the best figure at hand (workers measure the
    # whole folder from now on, and a download's archive re-measures it).
    op.execute(
        "UPDATE jobs SET disk_bytes = COALESCE((SELECT SUM(artifacts.size_bytes) FROM artifacts "
        "WHERE artifacts.job_id = jobs.id), 0)"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("disk_bytes")
