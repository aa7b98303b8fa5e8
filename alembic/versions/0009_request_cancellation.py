"""cancelling a request: its cancelled images counted, and when the cancel came

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 23:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A server default: uploads insert requests without naming this column on every path.
    with op.batch_alter_table("processing_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cancelled_images", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True))
        # Retention looks for finished requests by the time they finished.
        batch_op.create_index("ix_processing_requests_completed_at", ["completed_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("processing_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_processing_requests_completed_at")
        batch_op.drop_column("cancelled_at")
        batch_op.drop_column("cancelled_images")
