"""The end of a request's life: cancelling it, deleting it, and retention.

    cancel_request   its images not yet started never will be (the ledger decides)
    retry_failed_images  the failed images of a finished request are tried again
    delete_request   outputs, rows (products, images, webhook events and deliveries,
                     idempotency key) of a finished request; a large one is marked
                     `deleting` and finish_deleting removes it in the background
    cancel_the_rest  the pending images of a `cancelling` request, a batch at a time
    purge_expired    what RETENTION_DAYS no longer keeps, deleted as delete_request
                     does, plus expired idempotency keys and what re-imports remember
                     of sources not downloaded since; a bounded amount per call; and
                     what a restart left `deleting` or `cancelling`, and imports
                     whose file is lost

Outputs are never shared between requests (a re-import copies the output it reuses under
its own keys), so deleting a request's prefix never takes another request's outputs.

Deleting works in short transactions of at most DELETE_CHUNK_ROWS rows each, and
cancelling in transactions of at most CANCEL_BATCH_IMAGES images, so a 3,000,000-image
request never holds SQLite's write lock (or many PostgreSQL row locks) for long: uploads
and image work go on between the chunks, and the API answers before the rest is done.
Outputs go first; a delete that stops half-way leaves a finished (or `deleting`) request
with fewer rows or files, which the next DELETE (or sweep) finishes.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.base import utcnow
from app.db.models import (
    FINISHED_REQUEST_STATUSES,
    IdempotencyKey,
    Image,
    ProcessingRequest,
    Product,
    RequestStatus,
    SourceValidators,
)
from app.errors import Conflict, ServiceUnavailable
from app.ledger.image_ledger import Cancellation, FailedImagesRetry, ImageLedger
from app.storage import ImageStorage, StoreFailure, request_prefix

log = logging.getLogger(__name__)

DELETE_CHUNK_ROWS = 5000
CANCEL_BATCH_IMAGES = 5000
PURGE_REQUESTS_PER_SWEEP = 50
PURGE_KEYS_PER_SWEEP = 5000
# An import that stored nothing for this long has lost its file (app/services/imports.py:
# a server that stopped and did not come back); it is cancelled.
STALLED_IMPORT_SECONDS = 900.0


def cancel_request(ledger: ImageLedger, request: ProcessingRequest) -> Cancellation:
    """Cancel a request that has not finished, its first CANCEL_BATCH_IMAGES images at
    once (cancel_the_rest takes the others, when more_to_cancel says there are);
    cancelling a cancelled request again is a no-op, one that finished otherwise (or is
    being deleted) is a Conflict."""
    cancellation = ledger.cancel(request.id, limit=CANCEL_BATCH_IMAGES)
    if cancellation.finished_before:
        raise Conflict(
            f"request {request.request_id} has already finished ({cancellation.status})",
            request_status=cancellation.status,
        )
    return cancellation


def more_to_cancel(cancellation: Cancellation) -> bool:
    """Whether the request may have images left to cancel: it is still `cancelling`."""
    return cancellation.status == RequestStatus.CANCELLING


def cancel_the_rest(ledger: ImageLedger, request_pk: int, after_image_id: int = 0) -> list[int]:
    """The pending images of a cancelling request after `after_image_id` (where the
    first batch ended), CANCEL_BATCH_IMAGES a transaction (each holds its locks for a
    fraction of a second), then once more from the start (an image in flight may have
    gone back to pending behind the batches, e.g. after a transient failure), until a
    batch from the start finds none; returns the webhook event the last one created, if
    it finished the request."""
    events = []
    while True:
        cancellation = ledger.cancel(request_pk, limit=CANCEL_BATCH_IMAGES, after_image_id=after_image_id)
        if cancellation.event_id is not None:
            events.append(cancellation.event_id)
        if cancellation.finished_before or not more_to_cancel(cancellation):
            return events
        if cancellation.last_image_id != after_image_id:
            after_image_id = cancellation.last_image_id
        elif after_image_id:
            after_image_id = 0
        else:
            return events


def retry_failed_images(
    session: Session,
    ledger: ImageLedger,
    request: ProcessingRequest,
    error_codes: frozenset[str] | None = None,
) -> FailedImagesRetry:
    """Put a finished request's failed images (with one of `error_codes`, or all) back to
    pending in the caller's transaction; the caller dispatches the work after the commit.
    A request with no such image is left as it is; one still running, or cancelled, is
    a Conflict."""
    retry = ledger.retry_failed(session, request.id, error_codes)
    if not retry.retryable:
        advice = (
            "a cancelled request is not run again: upload its CSV again"
            if retry.status_before == RequestStatus.CANCELLED
            else "retry its failed images once it has finished"
        )
        raise Conflict(
            f"request {request.request_id} is {retry.status_before}; {advice}",
            request_status=retry.status_before,
        )
    return retry


def delete_request(
    sessions: sessionmaker[Session], storage: ImageStorage, request: ProcessingRequest
) -> bool:
    """Delete a finished request: its outputs, then its rows. A request still running is
    a Conflict (cancel it first). A small request (at most DELETE_CHUNK_ROWS rows) is
    deleted here, and True is returned; storage failures raise (StoreFailure) before any
    row is deleted, so the request stays visible and the delete can be repeated. A larger
    one is marked `deleting` and False is returned: the caller runs finish_deleting in
    the background (and a retention sweep finishes what a restart interrupted)."""
    if request.status == RequestStatus.DELETING:
        return False
    if request.completed_at is None:
        raise Conflict(
            f"request {request.request_id} is {request.status}; cancel it first "
            f"(POST /requests/{request.request_id}/cancel), then delete it",
            request_status=request.status,
        )
    if request.total_images + request.total_products <= DELETE_CHUNK_ROWS:
        try:
            _delete(sessions, storage, request.id, request.request_id)
        except StoreFailure as failure:
            raise ServiceUnavailable(f"the outputs could not be deleted: {failure.message}") from failure
        return True
    with sessions.begin() as session:
        session.execute(
            update(ProcessingRequest)
            .where(
                ProcessingRequest.id == request.id,
                ProcessingRequest.status.in_(FINISHED_REQUEST_STATUSES),
            )
            .values(status=RequestStatus.DELETING)
            .execution_options(synchronize_session=False)
        )
    return False


def finish_deleting(
    sessions: sessionmaker[Session], storage: ImageStorage, request_pk: int, request_id: str
) -> None:
    """The rest of a DELETE of a large request, in the background: what fails is logged,
    and the next retention sweep tries again (the request stays `deleting`)."""
    try:
        _delete(sessions, storage, request_pk, request_id)
    except Exception:
        log.exception("request %s: deleting failed; the retention sweep tries again", request_id)


def _delete(sessions: sessionmaker[Session], storage: ImageStorage, request_pk: int, request_id: str) -> None:
    removed = storage.delete_prefix(request_prefix(request_id))
    delete_rows(sessions, request_pk)
    # The rest is small; the foreign keys' ON DELETE CASCADE takes the webhook events,
    # their deliveries and the idempotency key with the request row.
    with sessions.begin() as session:
        session.execute(
            delete(ProcessingRequest)
            .where(ProcessingRequest.id == request_pk)
            .execution_options(synchronize_session=False)
        )
    # Once more now the rows are gone: an output a stale claim stored since the first
    # pass goes here; one stored after this, its recording finds the request gone and
    # removes (ImageLedger.record_outcomes).
    try:
        removed += storage.delete_prefix(request_prefix(request_id))
    except StoreFailure as failure:  # the rows are gone: the request is deleted all the same
        log.warning("request %s: a late output may be left: %s", request_id, failure.message)
    log.info("deleted request %s and %d outputs", request_id, removed, extra={"request_id": request_id})


def delete_rows(sessions: sessionmaker[Session], request_pk: int) -> None:
    """A request's images and products, DELETE_CHUNK_ROWS a transaction."""
    for table in (Image, Product):
        # In id order from where the last chunk ended, so no chunk passes the rows of
        # the chunks before it (dead until vacuumed) again.
        after_id = 0
        # Until a chunk finds nothing: two deletes of one request at once (a DELETE and a
        # sweep) take chunks from each other, so a short chunk does not mean the end.
        while True:
            with sessions.begin() as session:
                # The ids first, then a DELETE by primary key: as one statement with a
                # subquery, PostgreSQL hashes the ids and scans every row of the table.
                chunk = session.scalars(
                    select(table.id)
                    .where(table.request_pk == request_pk, table.id > after_id)
                    .order_by(table.id)
                    .limit(DELETE_CHUNK_ROWS)
                ).all()
                after_id = chunk[-1] if chunk else after_id
                deleted = (
                    session.execute(
                        delete(table).where(table.id.in_(chunk)).execution_options(synchronize_session=False)
                    ).rowcount
                    if chunk
                    else 0
                )
            if not deleted:
                break


@dataclass
class Purged:
    requests: int = 0
    idempotency_keys: int = 0
    sources: int = 0  # source validators (and their outputs' rows) not refreshed in time


def purge_expired(
    sessions: sessionmaker[Session],
    storage: ImageStorage,
    *,
    retention_days: float,
    max_requests: int = PURGE_REQUESTS_PER_SWEEP,
    ledger: ImageLedger | None = None,
) -> Purged:
    """One sweep: what a restart interrupted (requests left `deleting`, and with `ledger`
    those left `cancelling` with images still pending), up to max_requests requests
    finished more than retention_days ago (none when it is 0), and expired idempotency
    keys. Requests still running are never touched, however old."""
    purged = Purged()
    _finish_interrupted(sessions, storage, ledger, max_requests, purged)
    with sessions.begin() as session:
        purged.idempotency_keys = session.execute(
            delete(IdempotencyKey)
            .where(
                IdempotencyKey.id.in_(
                    select(IdempotencyKey.id)
                    .where(IdempotencyKey.expires_at <= utcnow())
                    .limit(PURGE_KEYS_PER_SWEEP)
                    .scalar_subquery()
                )
            )
            .execution_options(synchronize_session=False)
        ).rowcount
    if retention_days > 0:
        _delete_expired_requests(sessions, storage, retention_days, max_requests, purged)
        # A source not downloaded for the retention period names an output whose request
        # retention removes now or soon: keeping the row would only cost a conditional
        # request before encoding anyway.
        with sessions.begin() as session:
            purged.sources = session.execute(
                delete(SourceValidators)
                .where(
                    SourceValidators.id.in_(
                        select(SourceValidators.id)
                        .where(SourceValidators.updated_at < utcnow() - timedelta(days=retention_days))
                        .limit(PURGE_KEYS_PER_SWEEP)
                        .scalar_subquery()
                    )
                )
                .execution_options(synchronize_session=False)
            ).rowcount
    if purged.requests or purged.idempotency_keys or purged.sources:
        log.info(
            "retention: deleted %d requests, %d expired idempotency keys and %d sources not seen since",
            purged.requests,
            purged.idempotency_keys,
            purged.sources,
        )
    return purged


def _finish_interrupted(
    sessions: sessionmaker[Session],
    storage: ImageStorage,
    ledger: ImageLedger | None,
    max_requests: int,
    purged: Purged,
) -> None:
    with sessions() as session:
        left = session.execute(
            select(ProcessingRequest.id, ProcessingRequest.request_id, ProcessingRequest.status)
            .where(ProcessingRequest.status.in_((RequestStatus.DELETING, RequestStatus.CANCELLING)))
            .order_by(ProcessingRequest.id)
            .limit(max_requests)
        ).all()
    for request_pk, request_id, status in left:
        if status == RequestStatus.DELETING:
            _delete(sessions, storage, request_pk, request_id)
            purged.requests += 1
        elif ledger is not None:
            cancel_the_rest(ledger, request_pk)
    if ledger is None:
        return
    with sessions() as session:
        stalled = session.execute(
            select(ProcessingRequest.id, ProcessingRequest.request_id)
            .where(
                ProcessingRequest.status == RequestStatus.IMPORTING,
                ProcessingRequest.import_progress_at < utcnow() - timedelta(seconds=STALLED_IMPORT_SECONDS),
            )
            .order_by(ProcessingRequest.id)
            .limit(max_requests)
        ).all()
    for request_pk, request_id in stalled:
        log.warning(
            "request %s: its import stored nothing for %.0f s (its file is on a server that stopped); "
            "cancelling it with what was stored",
            request_id,
            STALLED_IMPORT_SECONDS,
            extra={"request_id": request_id},
        )
        cancel_the_rest(ledger, request_pk)


def _delete_expired_requests(
    sessions: sessionmaker[Session],
    storage: ImageStorage,
    retention_days: float,
    max_requests: int,
    purged: Purged,
) -> None:
    cutoff = utcnow() - timedelta(days=retention_days)
    with sessions() as session:
        expired = session.execute(
            select(ProcessingRequest.id, ProcessingRequest.request_id)
            .where(
                ProcessingRequest.completed_at < cutoff,
                ProcessingRequest.status.in_(FINISHED_REQUEST_STATUSES),
            )
            .order_by(ProcessingRequest.completed_at)
            .limit(max_requests)
        ).all()
    for request_pk, request_id in expired:
        _delete(sessions, storage, request_pk, request_id)
        purged.requests += 1
