"""Which images to claim next: unfinished requests take turns, so no batch waits behind
another, and images waiting for a retry hold up nobody; with a HostRoom, images of hosts
at their limit or backing off are passed over (app/ledger/hosts.py)."""

from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, case, or_, select, text
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import UNFINISHED_REQUEST_STATUSES, Image, ImageStatus, ProcessingRequest

if TYPE_CHECKING:  # app/ledger/hosts.py builds on the statements here
    from app.ledger.hosts import HostRoom


def not_waiting_for_retry(now):
    return or_(Image.retry_at.is_(None), Image.retry_at <= now)


# Built once: the feeder runs these many times a second, and building a statement costs
# more Python than running it.
_UNFINISHED_REQUESTS_IN_TURN = (
    select(ProcessingRequest.id, ProcessingRequest.host_count)
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
_PENDING_OF_REQUEST_WITH_HOSTS = _PENDING_OF_REQUEST.add_columns(Image.host)
# The same for PostgreSQL, written so that only the fair-claim index can give its order.
# With `request_pk = ?` and ORDER BY id, the primary key gives that order too, and when a
# request holds most of the table PostgreSQL walks it from the start, past every earlier
# request's images (26-202 ms a claim at 3,000,000 pending images; 0.1 ms this way,
# docs/performance.md). SQLite would sort every pending image of the request for this
# form, so it keeps the one above.
_PENDING_OF_REQUEST_BY_INDEX = (
    select(Image.id, Image.host)
    .where(
        Image.request_pk >= bindparam("request_pk"),
        Image.request_pk <= bindparam("request_pk"),
        Image.status == ImageStatus.PENDING,
        not_waiting_for_retry(bindparam("now")),
    )
    .order_by(Image.request_pk, Image.id)
    .limit(bindparam("share"))
)
# Past images of hosts with no room, a request naming several hosts is read this much
# further, so its other hosts' images flow; bounded, so a claim stays cheap.
LOOKAHEAD_IMAGES = 256
_PENDING_OF_REQUEST_AFTER = (
    select(Image.id, Image.host)
    .where(
        Image.request_pk == bindparam("request_pk"),
        Image.status == ImageStatus.PENDING,
        Image.id > bindparam("after_id"),
        not_waiting_for_retry(bindparam("now")),
    )
    .order_by(Image.id)
    .limit(LOOKAHEAD_IMAGES)
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
    """Pending image ids to claim next, with no regard to hosts, and the last request
    served (pass it back next time); see next_claimable."""
    picked, served = next_claimable(session, limit, after_request_pk)
    return [image_id for image_id, _ in picked], served


def next_claimable(
    session: Session, limit: int, after_request_pk: int = 0, room: "HostRoom | None" = None
) -> tuple[list[tuple[int, str | None]], int]:
    """Pending images to claim next, as (id, host), and the last request served (pass it
    back next time).

    Unfinished requests take turns: each round serves up to `limit` of them, starting
    after `after_request_pk` and wrapping around, and shares `limit` images between them,
    oldest first within each, so a small batch is not stuck behind big ones however many
    arrive. Images waiting for a retry are skipped; a turn of requests that only have
    such images passes straight on to the next, so they hold up nobody. With `room`,
    images of a host without room are skipped too (a request naming several hosts is
    read up to LOOKAHEAD_IMAGES further for others), and each image taken spends it."""
    connection = session.connection()
    pending_with_hosts = (
        _PENDING_OF_REQUEST_BY_INDEX
        if connection.dialect.name == "postgresql"
        else _PENDING_OF_REQUEST_WITH_HOSTS
    )
    now = utcnow()
    served = after_request_pk
    seen: set[int] = set()
    while True:
        turn = connection.execute(_UNFINISHED_REQUESTS_IN_TURN, {"after": served, "turns": limit}).all()
        if not turn or turn[0].id in seen:  # none, or all the way round without finding work
            return [], served
        share = -(-limit // len(turn))  # ceiling division
        picked: list[tuple[int, str | None]] = []
        passed_over_before = room.passed_over if room is not None else 0
        last_given = served
        for request_pk, host_count in turn:
            parameters = {"request_pk": request_pk, "share": share, "now": now}
            if room is None:
                picked += ((id_, None) for id_, _host in connection.execute(pending_with_hosts, parameters))
                continue
            candidates = connection.execute(pending_with_hosts, parameters).all()
            taken = [(image_id, host) for image_id, host in candidates if room.take(host)]
            if len(taken) < len(candidates) and (host_count or 0) > 1:
                parameters["after_id"] = candidates[-1].id
                for image_id, host in connection.execute(_PENDING_OF_REQUEST_AFTER, parameters):
                    if len(taken) >= share:
                        break
                    if room.take(host):
                        taken.append((image_id, host))
            picked += taken
            if taken:
                last_given = request_pk
        # When hosts ran out of room, the turn ends with the last request given images:
        # the ones passed over come first next time, so a tight limit keeps the turns fair.
        cut_short = room is not None and room.passed_over > passed_over_before and picked
        served = last_given if cut_short else turn[-1].id
        if picked or len(turn) < limit:  # a short turn held every unfinished request
            return sorted(picked), served
        seen.update(row.id for row in turn)


def seconds_until_next_retry(session: Session) -> float | None:
    """How long until the earliest image waiting for a retry may be claimed; None when
    no image waits."""
    now = utcnow()
    retry_at = session.connection().scalar(_NEXT_RETRY, {"now": now})
    return None if retry_at is None else max(0.0, (retry_at - now).total_seconds())
