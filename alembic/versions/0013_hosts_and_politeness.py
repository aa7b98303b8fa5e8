"""per-host politeness: each image's origin host, a row per host (backoff, failures in a
row), when an image first waited for its origin, and how many hosts a request names

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 00:00:00

The claim counts the images of a host being processed (a partial index holds only those,
so uploads pay nothing for it) and skips hosts in backoff; a transient origin failure
puts its host in backoff and its image back to wait, until FETCH_RETRY_WINDOW_SECONDS
after `waiting_since`. Images stored before this revision have no host and no limit.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PROCESSING = sa.text("status = 'processing'")
IN_BACKOFF = sa.text("backoff_until IS NOT NULL")


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("backoff_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error_code", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_hosts")),
    )
    op.create_index(
        "ix_hosts_backoff_until", "hosts", ["backoff_until"], sqlite_where=IN_BACKOFF, postgresql_where=IN_BACKOFF
    )
    with op.batch_alter_table("processing_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host_count", sa.Integer(), nullable=True))
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(
            "ix_images_processing_host", ["host"], sqlite_where=PROCESSING, postgresql_where=PROCESSING
        )


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_index("ix_images_processing_host", sqlite_where=PROCESSING, postgresql_where=PROCESSING)
        batch_op.drop_column("waiting_since")
        batch_op.drop_column("host")
    with op.batch_alter_table("processing_requests", schema=None) as batch_op:
        batch_op.drop_column("host_count")
    op.drop_index("ix_hosts_backoff_until", table_name="hosts", sqlite_where=IN_BACKOFF, postgresql_where=IN_BACKOFF)
    op.drop_table("hosts")
