"""image ids are never reused on SQLite (AUTOINCREMENT)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 00:00:00

A claim is (image id, attempt). SQLite gives a new row the largest id + 1, so after a
DELETE of the newest request its image ids came back for the next upload, and a stale
claim holder of a deleted image could match the new row with the same id and attempt.
AUTOINCREMENT never hands out an id again. PostgreSQL's sequences never did; nothing
changes there. Only `images` is rebuilt: its rows are the units of work, and no foreign
key points at it (rebuilding processing_requests would cascade into its webhook events
under SQLite's foreign_keys pragma).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # The copy keeps every id, and SQLite's sequence starts above the largest of them.
    with op.batch_alter_table("images", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
        pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("images", recreate="always", table_kwargs={"sqlite_autoincrement": False}):
        pass
