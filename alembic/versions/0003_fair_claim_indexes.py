"""indexes for claiming images request by request

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_images_request_pk_status_id", "images", ["request_pk", "status", "id"])
    op.create_index("ix_processing_requests_status", "processing_requests", ["status"])


def downgrade() -> None:
    op.drop_index("ix_processing_requests_status", table_name="processing_requests")
    op.drop_index("ix_images_request_pk_status_id", table_name="images")
