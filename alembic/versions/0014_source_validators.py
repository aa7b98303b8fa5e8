"""re-imports: each source's validators and hash per owner, its output per encoding

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 10:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "source_validators",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_scope", sa.String(length=64), nullable=False),
        sa.Column("url_sha256", sa.String(length=64), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("etag", sa.Text(), nullable=True),
        sa.Column("last_modified", sa.Text(), nullable=True),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("no_store", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_source_validators")),
        sa.UniqueConstraint(
            "owner_scope", "url_sha256", name=op.f("uq_source_validators_owner_scope_url_sha256")
        ),
    )
    with op.batch_alter_table("source_validators", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_source_validators_updated_at"), ["updated_at"], unique=False)
    op.create_table(
        "source_outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source_id", sa.Integer(), nullable=False),
        sa.Column("encoding", sa.String(length=255), nullable=False),
        sa.Column("output_key", sa.Text(), nullable=False),
        sa.Column("content_type", sa.String(length=32), nullable=False),
        sa.Column("thumbnail_key", sa.Text(), nullable=True),
        sa.Column("input_bytes", sa.Integer(), nullable=True),
        sa.Column("output_bytes", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("source_format", sa.String(length=16), nullable=True),
        sa.Column("kept_original", sa.Boolean(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["source_id"],
            ["source_validators.id"],
            name=op.f("fk_source_outputs_source_id_source_validators"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_source_outputs")),
        sa.UniqueConstraint("source_id", "encoding", name=op.f("uq_source_outputs_source_id_encoding")),
    )
    # Server defaults: uploads insert requests and images without naming these columns.
    with op.batch_alter_table("processing_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reused_images", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reused", sa.Boolean(), nullable=True))


def downgrade() -> None:
    # Dropping a column rebuilds the table on SQLite: it keeps AUTOINCREMENT (0012).
    with op.batch_alter_table("images", schema=None, table_kwargs={"sqlite_autoincrement": True}) as batch_op:
        batch_op.drop_column("reused")
    with op.batch_alter_table("processing_requests", schema=None) as batch_op:
        batch_op.drop_column("reused_images")
    op.drop_table("source_outputs")
    with op.batch_alter_table("source_validators", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_source_validators_updated_at"))
    op.drop_table("source_validators")
