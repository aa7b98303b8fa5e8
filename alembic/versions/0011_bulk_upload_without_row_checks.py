"""uploads insert without a foreign-key check per row; expired claims found by a partial index

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28 00:00:00

Each foreign key on a bulk-loaded table costs a lookup and a row lock per inserted row:
on PostgreSQL about 1.2 s of a 100,000-row upload for images.product_id and 0.35 s for
products.request_pk. Only create_batch inserts these rows, in one transaction with their
request, and deleting a request deletes its images and products explicitly
(app/services/lifecycle.py), so the keys guarded nothing the code does not. The index on
(status, id) took an entry for every pending image; expired claims only need the few
images being processed.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PROCESSING = sa.text("status = 'processing'")


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_constraint("fk_images_product_id_products", type_="foreignkey")
        batch_op.drop_index("ix_images_status_id")
        batch_op.create_index(
            "ix_images_processing_id", ["id"], sqlite_where=PROCESSING, postgresql_where=PROCESSING
        )
    with op.batch_alter_table("products", schema=None) as batch_op:
        batch_op.drop_constraint("fk_products_request_pk_processing_requests", type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("products", schema=None) as batch_op:
        batch_op.create_foreign_key(
            "fk_products_request_pk_processing_requests",
            "processing_requests",
            ["request_pk"],
            ["id"],
            ondelete="CASCADE",
        )
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_index("ix_images_processing_id", sqlite_where=PROCESSING, postgresql_where=PROCESSING)
        batch_op.create_index("ix_images_status_id", ["status", "id"])
        batch_op.create_foreign_key(
            "fk_images_product_id_products", "products", ["product_id"], ["id"], ondelete="CASCADE"
        )
