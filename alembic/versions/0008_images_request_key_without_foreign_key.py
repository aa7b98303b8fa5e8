"""images.request_pk without a foreign key of its own (product_id -> products covers it)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 22:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch_op:
        batch_op.drop_constraint("fk_images_request_pk_processing_requests", type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("images") as batch_op:
        batch_op.create_foreign_key(
            "fk_images_request_pk_processing_requests",
            "processing_requests",
            ["request_pk"],
            ["id"],
            ondelete="CASCADE",
        )
