"""images wait for a retry after a transient failure: retry_at and transient_failures

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("images", sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "images", sa.Column("transient_failures", sa.Integer(), server_default="0", nullable=False)
    )
    # Partial: only images that have waited for a retry are in it, so uploads do not pay for it.
    op.create_index(
        "ix_images_retry_at",
        "images",
        ["retry_at"],
        sqlite_where=sa.text("retry_at IS NOT NULL"),
        postgresql_where=sa.text("retry_at IS NOT NULL"),
    )
    # The fair claim query filters on retry_at: keep it answerable from the index alone.
    op.create_index(
        "ix_images_request_pk_status_id_retry_at", "images", ["request_pk", "status", "id", "retry_at"]
    )
    op.drop_index("ix_images_request_pk_status_id", table_name="images")


def downgrade() -> None:
    op.create_index("ix_images_request_pk_status_id", "images", ["request_pk", "status", "id"])
    op.drop_index("ix_images_request_pk_status_id_retry_at", table_name="images")
    op.drop_index("ix_images_retry_at", table_name="images")
    with op.batch_alter_table("images") as batch_op:
        batch_op.drop_column("transient_failures")
        batch_op.drop_column("retry_at")
