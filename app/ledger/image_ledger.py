"""The ledger: which image is whose, and what became of it. The database is the truth.

    claim_next(limit, turn)  -> Claim       the next images, requests taking turns
                                            (app/ledger/turns.py) and hosts kept to their
                                            limit (app/ledger/hosts.py), plus expired claims
    claim_images(ids)        -> WorkUnits   guarded pending -> processing, with a lease,
                                            within each host's room
    renew_leases / release / charge_crashes  guarded by the claim they name
    record_outcomes(outcomes)               guarded processing -> succeeded/failed/cancelled,
                                            request counters, and the request finished
                                            exactly once; or, after a transient failure,
                                            back to pending, not claimable before retry_at
                                            (an origin's: its host's backoff, and only for
                                            FETCH_RETRY_WINDOW_SECONDS)
    cancel(request_pk)                      guarded pending -> cancelled for its images; the
                                            request ends `cancelled` when nothing of it is
                                            in flight any more (at once, or when the last
                                            outcome is recorded)
    retry_failed(session, request_pk, codes) failed images of a finished request back to
                                            pending, their copies with them; the request
                                            runs (and finishes) again

What happens between a claim and its outcome (fetch -> compress -> store) is the
stages' business (app/pipeline/), and which process does it is the runner's
(app/runners/); app/tasks.py holds the task bodies every runner calls. Every state change
is guarded by the claim's attempt number, so a unit handled twice (a lost lease, a crash
and restart, a duplicate message) changes nothing the second time.

`attempts` counts claims and is the claim's token; `crash_count` counts only the worker
crashes an image was being decoded in (charge_crashes). Hand-backs and expired leases
are not the image's fault and charge nothing.
"""

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import Integer, and_, any_, bindparam, case, func, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, sessionmaker

from app.db.base import utcnow
from app.db.models import (
    FINISHED_REQUEST_STATUSES,
    Image,
    ImageStatus,
    ProcessingRequest,
    RequestStatus,
)
from app.ledger.copies import RESULT_COLUMNS, record_copies
from app.ledger.hosts import HostPoliteness, HostRoom, next_host_back, record_host_answers
from app.ledger.revalidation import attach_revalidation, remember_sources
from app.ledger.turns import (
    expired_claim_ids,
    next_claimable,
    not_waiting_for_retry,
    seconds_until_next_retry,
)
from app.ledger.units import EncodingKeys, ImageOutcome, WorkUnit, options_from_json
from app.webhooks.events import create_finished_event

log = logging.getLogger(__name__)


def retry_delay_seconds(transient_failures: int, base_seconds: float, max_seconds: float) -> float:
    """Backoff before the next try of an image that failed transiently that many times
    before: base, doubling, capped."""
    return min(max_seconds, base_seconds * 2 ** min(transient_failures, 32))


def _final_status(outcome: ImageOutcome) -> ImageStatus:
    if outcome.cancelled:
        return ImageStatus.CANCELLED
    return ImageStatus.SUCCEEDED if outcome.succeeded else ImageStatus.FAILED


def _outcome_params(outcome: "ImageOutcome") -> dict:
    return {
        "image_id": outcome.unit.image_id,
        "attempt": outcome.unit.attempt,
        "new_status": _final_status(outcome),
        "new_output_key": outcome.output_key,
        "new_error_code": outcome.error_code,
        "new_error_message": outcome.error_message,
        "new_input_bytes": outcome.input_bytes,
        "new_output_bytes": outcome.output_bytes,
        "new_width": outcome.width,
        "new_height": outcome.height,
        "new_source_format": outcome.source_format,
        "new_fetch_ms": outcome.fetch_ms,
        "new_compress_ms": outcome.compress_ms,
        "new_kept_original": outcome.kept_original,
        "new_reused": outcome.reused if outcome.succeeded else None,
    }


def _log_recorded(outcomes: Sequence[ImageOutcome]) -> None:
    """A line for each image that failed or will be retried (INFO) and, at DEBUG, each
    that succeeded; the check first, so the hot path pays nothing for skipped lines."""
    if not log.isEnabledFor(logging.INFO):
        return
    debug = log.isEnabledFor(logging.DEBUG)
    for outcome in outcomes:
        if outcome.error_code is not None:
            log.info(
                "image %s %s: %s: %s",
                outcome.unit.image_id,
                "waits for a retry" if outcome.retry_later else "failed",
                outcome.error_code,
                outcome.error_message,
                extra=outcome.unit.log_fields,
            )
        elif debug:
            state = "cancelled" if outcome.cancelled else "succeeded"
            log.debug("image %s %s", outcome.unit.image_id, state, extra=outcome.unit.log_fields)


def _claims(units: Sequence[WorkUnit]) -> list[tuple[int, int]]:
    return [(unit.image_id, unit.attempt) for unit in units]


@dataclass(frozen=True)
class Claim:
    """What claim_next took: the units, the last request served (pass it back next time),
    and whether images were passed over for their host's limit or backoff (more may be
    claimable as soon as the host's images in flight finish)."""

    units: list[WorkUnit]
    last_request_served: int
    passed_over_hosts: bool = False


@dataclass(frozen=True)
class Cancellation:
    """What a cancel did: the request's status after it, how many images it cancelled, and
    the webhook event it created when it finished the request."""

    status: str
    cancelled_images: int
    event_id: int | None = None
    finished_before: bool = False  # the request had already finished (not by a cancel)
    last_image_id: int = 0  # of a batch (cancel with a limit): where the next one starts


@dataclass(frozen=True)
class FailedImagesRetry:
    """What a retry did: the request's status before it, and how many images (copies
    included) went back to pending; none when the request was not retryable or had no
    failed image with the codes asked for."""

    status_before: str
    retried_images: int

    @property
    def retryable(self) -> bool:
        return self.status_before in RETRYABLE_REQUEST_STATUSES


# A cancelled request is not run again: its cancel would end it again at once.
RETRYABLE_REQUEST_STATUSES = (
    RequestStatus.COMPLETED,
    RequestStatus.COMPLETED_WITH_ERRORS,
    RequestStatus.FAILED,
)

# What an image's earlier try left behind; a retried image starts clean but keeps its
# attempts, the token that makes an outcome of an earlier claim stale.
_CLEARED_BY_RETRY = {
    name: None
    for name in (*RESULT_COLUMNS, "fetch_ms", "compress_ms", "claimed_at", "retry_at", "waiting_since")
    if name != "status"
}


# Built once, as the statements of turns.py: the runners make these calls for every
# claim and every recording, and building a statement costs more Python than running it.
_CLAIM = (
    update(Image.__table__)
    .where(
        Image.id.in_(bindparam("image_ids", expanding=True)),
        # Claimable: pending and not waiting for a retry, or with an expired lease.
        or_(
            and_(Image.status == ImageStatus.PENDING, not_waiting_for_retry(bindparam("now"))),
            and_(Image.status == ImageStatus.PROCESSING, Image.claimed_at < bindparam("cutoff")),
        ),
    )
    .values(status=ImageStatus.PROCESSING, claimed_at=bindparam("now"), attempts=Image.attempts + 1)
    .returning(
        Image.id,
        Image.attempts,
        Image.request_pk,
        Image.input_url,
        Image.crash_count,
        Image.copies,
        Image.host,
    )
)
_START_REQUESTS = (
    update(ProcessingRequest.__table__)
    .where(
        ProcessingRequest.id.in_(bindparam("request_pks", expanding=True)),
        ProcessingRequest.status == RequestStatus.PENDING,
    )
    .values(status=RequestStatus.PROCESSING, started_at=bindparam("now"))
)
_CLAIMED_REQUESTS = select(
    ProcessingRequest.id, ProcessingRequest.request_id, ProcessingRequest.options
).where(ProcessingRequest.id.in_(bindparam("request_pks", expanding=True)))
_STILL_CLAIMED = (
    select(Image.id, Image.attempts, Image.transient_failures, Image.waiting_since)
    .where(Image.id.in_(bindparam("image_ids", expanding=True)), Image.status == ImageStatus.PROCESSING)
    .with_for_update()
)
_RECORD_FINAL = (
    update(Image.__table__)
    .where(Image.id == bindparam("image_id"), Image.attempts == bindparam("attempt"))
    .values(
        status=bindparam("new_status"),
        output_key=bindparam("new_output_key"),
        error_code=bindparam("new_error_code"),
        error_message=bindparam("new_error_message"),
        input_bytes=bindparam("new_input_bytes"),
        output_bytes=bindparam("new_output_bytes"),
        width=bindparam("new_width"),
        height=bindparam("new_height"),
        source_format=bindparam("new_source_format"),
        fetch_ms=bindparam("new_fetch_ms"),
        compress_ms=bindparam("new_compress_ms"),
        kept_original=bindparam("new_kept_original"),
        reused=bindparam("new_reused"),
        finished_at=bindparam("new_finished_at"),
    )
)
_EXISTING_REQUEST_IDS = select(ProcessingRequest.request_id).where(
    ProcessingRequest.request_id.in_(bindparam("request_ids", expanding=True))
)
_ADD_TO_COUNTERS = (
    update(ProcessingRequest.__table__)
    .where(ProcessingRequest.id == bindparam("request_pk"))
    .values(
        {
            ProcessingRequest.succeeded_images: ProcessingRequest.succeeded_images + bindparam("succeeded"),
            ProcessingRequest.failed_images: ProcessingRequest.failed_images + bindparam("failed"),
            ProcessingRequest.cancelled_images: ProcessingRequest.cancelled_images + bindparam("cancelled"),
            ProcessingRequest.reused_images: ProcessingRequest.reused_images + bindparam("reused"),
        }
    )
    .returning(
        ProcessingRequest.succeeded_images.label("succeeded_images"),
        ProcessingRequest.failed_images,
        ProcessingRequest.cancelled_images,
        ProcessingRequest.total_images,
    )
)


class ImageLedger:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        reader_sessions: sessionmaker[Session],
        lease_seconds: float,
        public_base_url: str,
        retry_base_seconds: float,
        retry_max_seconds: float,
        politeness: HostPoliteness | None = None,
        on_recorded: Callable[[Sequence[ImageOutcome]], None] | None = None,
        on_requests_gone: Callable[[set[str]], None] | None = None,
        on_host_backoffs: Callable[[int], None] | None = None,
        encodings: EncodingKeys | None = None,
    ):
        """`sessions` write (they take SQLite's write lock at BEGIN), `reader_sessions`
        only read. `on_recorded` is told, after each commit, the outcomes that commit
        recorded (never one ignored as stale), e.g. to count them (app/metrics.py), and
        `on_host_backoffs` how many hosts it put in backoff. `on_requests_gone` is told
        the request ids (uuids) of outcomes whose request no longer exists, to remove
        what their stages stored (app/composition.py). `encodings` names the encoding
        each output is made with (the options a request was uploaded with, or the
        settings'; and the output policy): re-imports reuse an output only for the same
        encoding (without default options, never for a request uploaded without any)."""
        self.encodings = encodings or EncodingKeys()
        self.on_recorded = on_recorded
        self.on_requests_gone = on_requests_gone
        self.on_host_backoffs = on_host_backoffs
        self.politeness = politeness or HostPoliteness()
        self.sessions = sessions
        self.reader_sessions = reader_sessions
        self.lease = timedelta(seconds=lease_seconds)
        self.public_base_url = public_base_url
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds

    # -- database ends -------------------------------------------------------------

    def claim_next(self, limit: int, after_request_pk: int = 0, *, expired_too: bool = False) -> Claim:
        """Claim up to `limit` images, requests taking turns from after `after_request_pk`
        and hosts kept within their room (plus, with expired_too, images whose claim
        expired because their process died: they hold their host's place already)."""
        with self.reader_sessions() as session:
            expired = expired_claim_ids(session, self.lease, limit) if expired_too else []
            room = HostRoom.read(session.connection(), self.politeness, utcnow())
            pending, last_served = next_claimable(session, limit, after_request_pk, room)
        return Claim(self._claim(pending, expired), last_served, room.passed_over > 0)

    def seconds_until_next_retry(self) -> float | None:
        """How long until the earliest image waiting for a retry, or the first host in
        backoff, may be claimed; None when nothing waits."""
        with self.reader_sessions() as session:
            image_due = seconds_until_next_retry(session)
            now = utcnow()
            host_back = next_host_back(session.connection(), now)
        host_due = None if host_back is None else max(0.0, (host_back - now).total_seconds())
        return min((due for due in (image_due, host_due) if due is not None), default=None)

    def has_claimable_work(self) -> bool:
        """Whether some image could be claimed now (pending and due, or claimed by a
        process that stopped renewing its lease)."""
        # The claim queries themselves, through their indexes: a plain EXISTS over the
        # condition has no index that leads with the status and would scan finished images.
        with self.reader_sessions() as session:
            if expired_claim_ids(session, self.lease, 1):
                return True
            room = HostRoom.read(session.connection(), self.politeness, utcnow())
            return bool(next_claimable(session, 1, 0, room)[0])

    def claim_images(self, image_ids: Sequence[int]) -> list[WorkUnit]:
        """Claim these images, if claimable and their host has room."""
        if not image_ids:
            return []
        with self.reader_sessions() as session:
            pending = session.execute(select(Image.id, Image.host).where(Image.id.in_(image_ids))).all()
        return self._claim([(image_id, host) for image_id, host in pending], [])

    def _claim(self, pending: Sequence[tuple[int, str | None]], expired: Sequence[int]) -> list[WorkUnit]:
        if not pending and not expired:
            return []
        now = utcnow()
        # Core statements on the tables: the ORM's bulk-update bookkeeping cost more than
        # the statements themselves, and the feeder runs this for every claim batch.
        with self.sessions.begin() as session:
            connection = session.connection()
            hosts = {host for _, host in pending if host is not None}
            # The hosts' room again, in the write transaction: what the reader saw may
            # have been taken by another claim since (their rows locked on PostgreSQL).
            room = HostRoom.read(connection, self.politeness, now, hosts, lock=True) if hosts else None
            image_ids = list(expired) + [
                image_id for image_id, host in pending if room is None or room.take(host)
            ]
            if not image_ids:
                return []
            claimed = connection.execute(
                _CLAIM, {"image_ids": image_ids, "now": now, "cutoff": now - self.lease}
            ).all()
            if not claimed:
                return []
            request_pks = sorted({row.request_pk for row in claimed})
            connection.execute(_START_REQUESTS, {"request_pks": request_pks, "now": now})
            requests = {
                pk: (request_id, options_from_json(options))
                for pk, request_id, options in connection.execute(
                    _CLAIMED_REQUESTS, {"request_pks": request_pks}
                )
            }
        units = [
            WorkUnit(
                row.id,
                row.attempts,
                row.request_pk,
                requests[row.request_pk][0],
                row.input_url,
                row.crash_count,
                options=requests[row.request_pk][1],
                copies=row.copies,
                host=row.host,
            )
            for row in claimed
        ]
        units.sort(key=lambda unit: unit.image_id)
        return units

    def with_revalidation(self, units: Sequence[WorkUnit]) -> list[WorkUnit]:
        """The claimed units, each with what its owner's earlier imports of its URL left
        (app/ledger/revalidation.py): one read, beside the claim, not inside it."""
        if not units:
            return list(units)
        with self.reader_sessions() as session:
            return attach_revalidation(session, units, self.encodings)

    def release(self, units: Sequence[WorkUnit]) -> None:
        """Hand claimed but unprocessed units back (graceful shutdown, a lost worker)."""
        self._update_still_claimed(_claims(units), status=ImageStatus.PENDING, claimed_at=None)

    def charge_crashes(self, claims: Sequence[tuple[int, int]]) -> None:
        """Hand back units, given as (image id, attempt), that were being decoded when
        their process died, with one more crash charged to each; the next claim of an
        image at MAX_WORKER_CRASHES fails it (app/tasks.py)."""
        self._update_still_claimed(
            claims, status=ImageStatus.PENDING, claimed_at=None, crash_count=Image.crash_count + 1
        )

    def renew_leases(self, units: Sequence[WorkUnit]) -> None:
        self._update_still_claimed(_claims(units), claimed_at=utcnow())

    def _update_still_claimed(self, claims: Sequence[tuple[int, int]], **values) -> None:
        """Change the rows of claims, (image id, attempt), that are still current."""
        if not claims:
            return
        with self.sessions.begin() as session:
            session.connection().execute(
                update(Image.__table__)
                .where(
                    Image.id == bindparam("image_id"),
                    Image.status == ImageStatus.PROCESSING,
                    Image.attempts == bindparam("attempt"),
                )
                .values(**values),
                [{"image_id": image_id, "attempt": attempt} for image_id, attempt in claims],
            )

    def record_outcomes(self, outcomes: Sequence[ImageOutcome]) -> list[int]:
        """Store results in one transaction; return ids of webhook events it created."""
        if not outcomes:
            return []
        now = utcnow()
        succeeded: dict[int, int] = {}
        failed: dict[int, int] = {}
        cancelled: dict[int, int] = {}
        reused: dict[int, int] = {}
        with self.sessions.begin() as session:
            # Hosts first, in the order claims lock them: what an origin answered is true
            # even of an outcome whose claim went stale.
            host_backoffs, backoff_rounds = record_host_answers(
                session.connection(), self.politeness, outcomes, now
            )
            # One guarded read picks the outcomes whose claim is still current (rows
            # locked on PostgreSQL; SQLite's write lock is already held), then one
            # executemany writes them all.
            waiting = {
                (row.id, row.attempts): (row.transient_failures, row.waiting_since)
                for row in session.connection().execute(
                    _STILL_CLAIMED, {"image_ids": [o.unit.image_id for o in outcomes]}
                )
            }
            current = list(
                {
                    o.unit.image_id: o for o in outcomes if (o.unit.image_id, o.unit.attempt) in waiting
                }.values()
            )
            current = [self._past_its_window(o, waiting, now) for o in current]
            fresh = [o for o in current if not o.retry_later]
            retry_later = [o for o in current if o.retry_later]
            if retry_later:
                self._put_back_to_wait(session, retry_later, waiting, host_backoffs, now)
            if fresh:
                session.connection().execute(
                    _RECORD_FINAL, [{**_outcome_params(o), "new_finished_at": now} for o in fresh]
                )
            for outcome in fresh:
                tally = cancelled if outcome.cancelled else succeeded if outcome.succeeded else failed
                tally[outcome.unit.request_pk] = tally.get(outcome.unit.request_pk, 0) + 1
                if outcome.succeeded and outcome.reused:
                    reused[outcome.unit.request_pk] = reused.get(outcome.unit.request_pk, 0) + 1
            # Rows naming the same URL take the result with it, and count as rows.
            record_copies(
                session, [o for o in fresh if o.unit.copies and not o.cancelled], succeeded, failed, reused
            )
            remember_sources(session, fresh, self.encodings)
            events = []
            for request_pk in sorted(succeeded.keys() | failed.keys() | cancelled.keys()):
                event_id = self._count_and_maybe_finish(
                    session,
                    request_pk,
                    now,
                    succeeded=succeeded.get(request_pk, 0),
                    failed=failed.get(request_pk, 0),
                    cancelled=cancelled.get(request_pk, 0),
                    reused=reused.get(request_pk, 0),
                )
                if event_id is not None:
                    events.append(event_id)
            # After the store, so either a DELETE that removed the request's outputs
            # before its rows sees this output (it removes them once more after the rows:
            # app/services/lifecycle.py), or this read sees the rows gone.
            unit_request_ids = {o.unit.request_id for o in outcomes}
            requests_gone = unit_request_ids - set(
                session.connection().scalars(_EXISTING_REQUEST_IDS, {"request_ids": sorted(unit_request_ids)})
            )
        if self.on_recorded is not None and current:
            self.on_recorded(current)
        if self.on_host_backoffs is not None and backoff_rounds:
            self.on_host_backoffs(backoff_rounds)
        _log_recorded(current)
        if requests_gone and self.on_requests_gone is not None:
            self._remove_stored_for(requests_gone)
        return events

    def _remove_stored_for(self, request_ids: set[str]) -> None:
        """What a stage stored for requests deleted meanwhile (a stale claim's output,
        its thumbnail) must not stay public; the outcomes are recorded already."""
        log.info("removing what was stored for %d deleted requests", len(request_ids))
        try:
            self.on_requests_gone(request_ids)  # type: ignore[misc]
        except Exception:
            log.exception("could not remove the outputs stored for deleted requests %s", sorted(request_ids))

    def cancel(self, request_pk: int, limit: int | None = None, after_image_id: int = 0) -> Cancellation:
        """Cancel a request: its pending images (waiting for a retry too) become cancelled,
        guarded like a claim, so none is claimed afterwards; images in flight finish. The
        request finishes `cancelled` here if nothing of it is in flight, else when the last
        outcome is recorded (_count_and_maybe_finish decides, in both cases). Cancelling a
        cancelled request changes nothing.

        With `limit`, at most that many images are cancelled, so the transaction holds
        its locks briefly however large the request: the request is `cancelling`
        meanwhile, a status no claim serves (app/ledger/turns.py takes unfinished requests
        only), and calling again with the batch's last_image_id cancels the next ones; a
        batch that finds none was the last."""
        now = utcnow()
        with self.sessions.begin() as session:
            connection = session.connection()
            # Images first, then the request row: the order claims and recording lock them in.
            # Copies too: their source may be cancelled with them, and a copy of a
            # source in flight takes nothing from it once cancelled (record_copies).
            waiting = (
                Image.request_pk == request_pk,
                Image.status.in_((ImageStatus.PENDING, ImageStatus.COPY)),
            )
            chosen = ()
            if limit is not None:
                # The ids first, then an UPDATE by primary key: as one statement with a
                # subquery, PostgreSQL hashes the ids and scans every image of the table.
                # SKIP LOCKED (PostgreSQL): a batch never waits for the images a claim is
                # taking (the claim gets them, and they run as images in flight), so a
                # claim and a batch never lock the same images in opposite orders.
                # In id order from where the last batch ended: the primary key is the
                # index PostgreSQL takes for this request's images when they are most of
                # the table, and a scan from the start would pass the images cancelled
                # by every batch before.
                next_ids = (
                    select(Image.id)
                    .where(*waiting, Image.id > after_image_id)
                    .order_by(Image.id)
                    .limit(limit)
                )
                if connection.dialect.name == "postgresql":
                    batch = connection.scalars(next_ids.with_for_update(skip_locked=True)).all()
                    # One array parameter: 5,000 bound parameters cost more Python than the UPDATE.
                    chosen = (Image.id == any_(bindparam("batch", batch, type_=ARRAY(Integer))),)
                    last_image_id = batch[-1] if batch else after_image_id
                else:
                    # No row locks to skip (SQLite): the batch is every waiting image up to
                    # its last id, which is all that needs reading.
                    last_image_id = connection.scalar(select(func.max(next_ids.subquery().c.id)))
                    last_image_id = last_image_id or after_image_id
                    chosen = (Image.id > after_image_id, Image.id <= last_image_id)
                after_image_id = last_image_id
            cancelled = connection.execute(
                update(Image.__table__)
                .where(*waiting, *chosen)
                .values(status=ImageStatus.CANCELLED, retry_at=None, finished_at=now)
            ).rowcount
            marked = connection.execute(
                update(ProcessingRequest.__table__)
                .where(
                    ProcessingRequest.id == request_pk,
                    ProcessingRequest.status.not_in((*FINISHED_REQUEST_STATUSES, RequestStatus.DELETING)),
                )
                .values(
                    cancelled_at=func.coalesce(ProcessingRequest.cancelled_at, now),
                    status=RequestStatus.CANCELLING,
                )
            ).rowcount
            if not marked:  # finished already: then no image was pending either
                status = connection.scalar(
                    select(ProcessingRequest.status).where(ProcessingRequest.id == request_pk)
                )
                return Cancellation(status, 0, finished_before=status != RequestStatus.CANCELLED)
            event_id = self._count_and_maybe_finish(session, request_pk, now, cancelled=cancelled)
            status = connection.scalar(
                select(ProcessingRequest.status).where(ProcessingRequest.id == request_pk)
            )
        return Cancellation(status, cancelled, event_id, last_image_id=after_image_id)

    def retry_failed(
        self, session: Session, request_pk: int, error_codes: Collection[str] | None = None
    ) -> FailedImagesRetry:
        """Put the failed images of a finished request (those with one of `error_codes`,
        or all) back to pending, in the caller's transaction; their copies become copies
        again and take the new result. The request is `processing` again, its
        failed_images less those images, so _count_and_maybe_finish finishes it once more,
        with a new webhook event, when they are recorded. Changes nothing on a request
        that is not retryable or has no such image."""
        connection = session.connection()
        # The request row first, unlike cancel: a finished request has no image in flight,
        # so no claim or recording holds one of its images while waiting for this row;
        # two retries at once queue here and the second finds it running.
        status_before = connection.scalar(
            select(ProcessingRequest.status).where(ProcessingRequest.id == request_pk).with_for_update()
        )
        if status_before not in RETRYABLE_REQUEST_STATUSES:
            return FailedImagesRetry(status_before, 0)
        chosen = [Image.error_code.in_(sorted(error_codes))] if error_codes else []
        sources = connection.execute(
            update(Image.__table__)
            .where(
                Image.request_pk == request_pk,
                Image.status == ImageStatus.FAILED,
                Image.source_image_id.is_(None),
                *chosen,
            )
            .values(status=ImageStatus.PENDING, transient_failures=0, crash_count=0, **_CLEARED_BY_RETRY)
        ).rowcount
        if not sources:
            return FailedImagesRetry(status_before, 0)
        # A subquery, not a list of ids: a request may have more failed images than a
        # statement may have parameters. Only the sources just retried are pending.
        source = Image.__table__.alias("source")
        retried_sources = (
            select(source.c.id)
            .where(source.c.request_pk == request_pk, source.c.status == ImageStatus.PENDING)
            .scalar_subquery()
        )
        copies = connection.execute(
            update(Image.__table__)
            .where(
                Image.request_pk == request_pk,
                Image.status == ImageStatus.FAILED,
                Image.source_image_id.in_(retried_sources),
            )
            .values(status=ImageStatus.COPY, **_CLEARED_BY_RETRY)
        ).rowcount
        connection.execute(
            update(ProcessingRequest.__table__)
            .where(ProcessingRequest.id == request_pk)
            .values(
                status=RequestStatus.PROCESSING,
                completed_at=None,
                failed_images=ProcessingRequest.failed_images - (sources + copies),
            )
        )
        return FailedImagesRetry(status_before, sources + copies)

    def _past_its_window(
        self,
        outcome: ImageOutcome,
        waiting: dict[tuple[int, int], tuple[int, datetime | None]],
        now: datetime,
    ) -> ImageOutcome:
        """The outcome as final when its origin has failed it for FETCH_RETRY_WINDOW_SECONDS
        since the first time: it fails with the last error."""
        if not (outcome.retry_later and outcome.origin_failure):
            return outcome
        window = self.politeness.retry_window_seconds
        since = waiting[outcome.unit.image_id, outcome.unit.attempt][1]
        if window <= 0 or (since is not None and (now - since).total_seconds() >= window):
            return replace(outcome, retry_later=False)
        return outcome

    def _put_back_to_wait(
        self,
        session: Session,
        outcomes: list[ImageOutcome],
        waiting: dict[tuple[int, int], tuple[int, datetime | None]],
        host_backoffs: dict[str, datetime],
        now: datetime,
    ) -> None:
        """Pending again, not claimable before its backoff runs out (its host's, when the
        origin failed it); the request's counters are untouched, so it stays unfinished.
        The error stays visible while it waits."""
        parameters = []
        for outcome in outcomes:
            failures, since = waiting[outcome.unit.image_id, outcome.unit.attempt]
            retry_at = host_backoffs.get(outcome.unit.host or "") if outcome.origin_failure else None
            if retry_at is None:
                delay = retry_delay_seconds(failures, self.retry_base_seconds, self.retry_max_seconds)
                retry_at = now + timedelta(seconds=delay)
            parameters.append(
                {
                    "image_id": outcome.unit.image_id,
                    "attempt": outcome.unit.attempt,
                    "new_error_code": outcome.error_code,
                    "new_error_message": outcome.error_message,
                    "new_transient_failures": failures + 1,
                    "new_retry_at": retry_at,
                    "new_waiting_since": (since or now) if outcome.origin_failure else since,
                }
            )
        session.connection().execute(
            update(Image.__table__)
            .where(Image.id == bindparam("image_id"), Image.attempts == bindparam("attempt"))
            .values(
                status=ImageStatus.PENDING,
                claimed_at=None,
                error_code=bindparam("new_error_code"),
                error_message=bindparam("new_error_message"),
                transient_failures=bindparam("new_transient_failures"),
                retry_at=bindparam("new_retry_at"),
                waiting_since=bindparam("new_waiting_since"),
            ),
            parameters,
        )

    def _count_and_maybe_finish(
        self,
        session: Session,
        request_pk: int,
        now,
        *,
        succeeded: int = 0,
        failed: int = 0,
        cancelled: int = 0,
        reused: int = 0,
    ) -> int | None:
        """Add to the request's counters; the transaction that brings them to the total
        finishes the request and creates its webhook event. The one place that decides
        a request's final status, for outcomes and cancels alike."""
        # The counter update locks the request row (PostgreSQL) or the database (SQLite),
        # so whichever transaction brings the count to the total sees it, exactly once.
        row = (
            session.connection()
            .execute(
                _ADD_TO_COUNTERS,
                {
                    "request_pk": request_pk,
                    "succeeded": succeeded,
                    "failed": failed,
                    "cancelled": cancelled,
                    "reused": reused,
                },
            )
            .one()
        )
        if row.succeeded_images + row.failed_images + row.cancelled_images < row.total_images:
            return None
        final_status = case(
            (ProcessingRequest.cancelled_at.is_not(None), RequestStatus.CANCELLED),
            (ProcessingRequest.failed_images == 0, RequestStatus.COMPLETED),
            (ProcessingRequest.succeeded_images == 0, RequestStatus.FAILED),
            else_=RequestStatus.COMPLETED_WITH_ERRORS,
        )
        finished = session.execute(
            update(ProcessingRequest)
            .where(
                ProcessingRequest.id == request_pk,
                ProcessingRequest.status.not_in(FINISHED_REQUEST_STATUSES),
            )
            .values(status=final_status, completed_at=now)
        ).rowcount
        if not finished:
            return None
        request = session.get(ProcessingRequest, request_pk)
        assert request is not None
        return create_finished_event(session, request, self.public_base_url)
