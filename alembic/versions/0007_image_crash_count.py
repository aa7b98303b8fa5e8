"""crashes charged to an image, apart from its claim count

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 21:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A server default: uploads bulk-insert images without naming this column.
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("crash_count", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_column("crash_count")
