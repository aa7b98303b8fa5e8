"""background imports: a large upload is answered once checked and stored after the
answer; the request is `importing` meanwhile (a new status value), and holds what
its CSV will give and when its import last stored a chunk

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 19:00:00

`total_products` and `total_images` stay what is stored (the ledger finishes a request when
its images are all counted); `expected_products` and `expected_images` are what the checked
CSV holds, NULL for uploads stored before their answer.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("processing_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expected_products", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("expected_images", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("import_progress_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("processing_requests", schema=None) as batch_op:
        batch_op.drop_column("import_progress_at")
        batch_op.drop_column("expected_images")
        batch_op.drop_column("expected_products")
