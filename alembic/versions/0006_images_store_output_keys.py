"""images store the output's storage key; URLs are built when read

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 21:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MARKER = "/processed_images/"


def upgrade() -> None:
    # Every URL written so far was "{base}/processed_images/{key}": keep the key.
    find = "strpos" if op.get_bind().dialect.name == "postgresql" else "instr"
    op.execute("ALTER TABLE images RENAME COLUMN output_url TO output_key")
    op.execute(
        f"UPDATE images SET output_key = substr(output_key, {find}(output_key, '{MARKER}') + {len(MARKER)}) "
        f"WHERE {find}(output_key, '{MARKER}') > 0"
    )


def downgrade() -> None:
    # The base URL is not known here: the column gets its old name and keeps the keys.
    op.execute("ALTER TABLE images RENAME COLUMN output_key TO output_url")
