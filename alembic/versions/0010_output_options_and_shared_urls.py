"""per-request output options; keep_smaller's flag; one image processed per URL of a request

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-28 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("processing_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("options", sa.Text(), nullable=True))
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kept_original", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("source_image_id", sa.Integer(), nullable=True))
        # A server default: uploads bulk-insert images without naming this column.
        batch_op.add_column(sa.Column("copies", sa.Integer(), server_default="0", nullable=False))
        batch_op.create_index(
            "ix_images_source_image_id",
            ["source_image_id"],
            unique=False,
            sqlite_where=sa.text("source_image_id IS NOT NULL"),
            postgresql_where=sa.text("source_image_id IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_images_source_image_id",
            sqlite_where=sa.text("source_image_id IS NOT NULL"),
            postgresql_where=sa.text("source_image_id IS NOT NULL"),
        )
        batch_op.drop_column("copies")
        batch_op.drop_column("source_image_id")
        batch_op.drop_column("kept_original")
    with op.batch_alter_table("processing_requests", schema=None) as batch_op:
        batch_op.drop_column("options")
