"""One image processed per distinct URL of a request; the other rows naming it are copies.

At upload (app/services/batches.py) the first row of each URL in a request is the source
and counts its copies; every later row naming that URL is a COPY row pointing at it. COPY
rows are never claimed. When the source's outcome is recorded, the same transaction
gives every copy the source's result (status, output key, sizes, error) and counts each
copy as a row of its own, so the request's counters and its exactly-once finish stay
per row. Copies share the source's output key: one object, nothing extra to store or
delete.
"""

from collections.abc import Sequence

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db.models import Image, ImageStatus
from app.ledger.units import ImageOutcome

# The columns a copy takes from its source.
RESULT_COLUMNS = (
    "status",
    "output_key",
    "error_code",
    "error_message",
    "input_bytes",
    "output_bytes",
    "width",
    "height",
    "source_format",
    "kept_original",
    "reused",
    "finished_at",
)


def record_copies(
    session: Session,
    outcomes: Sequence[ImageOutcome],
    succeeded: dict[int, int],
    failed: dict[int, int],
    reused: dict[int, int],
) -> None:
    """Give the copies of these just-recorded sources their result, in the caller's
    transaction, and add them to the per-request tallies (reused: those that reused an
    earlier output, among the succeeded). Guarded by the COPY status: a
    copy takes a result once."""
    if not outcomes:
        return
    images = Image.__table__
    source = images.alias("source")
    updated = session.connection().execute(
        update(images)
        .where(
            images.c.source_image_id == source.c.id,
            source.c.id.in_([outcome.unit.image_id for outcome in outcomes]),
            images.c.status == ImageStatus.COPY,
        )
        .values({name: source.c[name] for name in RESULT_COLUMNS})
        .returning(images.c.request_pk, images.c.status, images.c.reused)
    )
    for request_pk, status, was_reused in updated:
        tally = succeeded if status == ImageStatus.SUCCEEDED else failed
        tally[request_pk] = tally.get(request_pk, 0) + 1
        if was_reused:
            reused[request_pk] = reused.get(request_pk, 0) + 1
