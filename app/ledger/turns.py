"""Which images to claim next: unfinished requests take turns, so no batch waits behind
another, and images waiting for a retry hold up nobody."""

from datetime import timedelta

from sqlalchemy import bindparam, case, or_, select, text
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import UNFINISHED_REQUEST_STATUSES, Image, ImageStatus, ProcessingRequest


def not_waiting_for_retry(now):
    return or_(Image.retry_at.is_(None), Image.retry_at <= now)


# Built once: the feeder runs these many times a second, and building a statement costs
# more Python than running it.
_UNFINISHED_REQUESTS_IN_TURN = (
    select(ProcessingRequest.id)
    .where(ProcessingRequest.status.in_(UNFINISHED_REQUEST_STATUSES))
    .order_by(case((ProcessingRequest.id > bindparam("after"), 0), else_=1), ProcessingRequest.id)
    .limit(bindparam("turns"))
)
_PENDING_OF_REQUEST = (
    select(Image.id)
    .where(
        Image.request_pk == bindparam("request_pk"),
        Image.status == ImageStatus.PENDING,
        not_waiting_for_retry(bindparam("now")),
    )
    .order_by(Image.id)
    .limit(bindparam("share"))
)
# Only images waiting for a retry have a retry_at in the future (a claimed image's has
# passed), so no status test: it would tempt the planners to scan every pending image.
_NEXT_RETRY = (
    select(Image.retry_at).where(Image.retry_at > bindparam("now")).order_by(Image.retry_at).limit(1)
)
# The status as a literal: SQLite uses a partial index (ix_images_processing_id) only when
# the query's own terms imply its condition, and a bound parameter implies nothing.
PROCESSING = text(f"images.status = '{ImageStatus.PROCESSING.value}'")
_EXPIRED_CLAIMS = (
    select(Image.id)
    .where(PROCESSING, Image.claimed_at < bindparam("cutoff"))
    .order_by(Image.id)
    .limit(bindparam("limit"))
)


def expired_claim_ids(session: Session, lease: timedelta, limit: int) -> list[int]:
    """Images claimed by a process that stopped renewing its lease (it died)."""
    cutoff = utcnow() - lease
    return list(session.connection().scalars(_EXPIRED_CLAIMS, {"cutoff": cutoff, "limit": limit}))


def next_claimable_ids(session: Session, limit: int, after_request_pk: int = 0) -> tuple[list[int], int]:
    """Pending image ids to claim next, and the last request served (pass it back next
    time).

    Unfinished requests take turns: each round serves up to `limit` of them, starting
    after `after_request_pk` and wrapping around, and shares `limit` images between them,
    oldest first within each, so a small batch is not stuck behind big ones however many
    arrive. Images waiting for a retry are skipped; a turn of requests that only have
    such images passes straight on to the next, so they hold up nobody."""
    connection = session.connection()
    now = utcnow()
    served = after_request_pk
    seen: set[int] = set()
    while True:
        turn = list(connection.scalars(_UNFINISHED_REQUESTS_IN_TURN, {"after": served, "turns": limit}))
        if not turn or turn[0] in seen:  # none, or all the way round without finding work
            return [], served
        share = -(-limit // len(turn))  # ceiling division
        ids: list[int] = []
        for request_pk in turn:
            ids += connection.scalars(
                _PENDING_OF_REQUEST, {"request_pk": request_pk, "share": share, "now": now}
            )
        served = turn[-1]
        if ids or len(turn) < limit:  # a short turn held every unfinished request
            return sorted(ids), served
        seen.update(turn)


def seconds_until_next_retry(session: Session) -> float | None:
    """How long until the earliest image waiting for a retry may be claimed; None when
    no image waits."""
    now = utcnow()
    retry_at = session.connection().scalar(_NEXT_RETRY, {"now": now})
    return None if retry_at is None else max(0.0, (retry_at - now).total_seconds())
