"""The end of a request's life: cancelling it, deleting it, and retention.

    cancel_request   its images not yet started never will be (the ledger decides)
    retry_failed_images  the failed images of a finished request are tried again
    delete_request   outputs, rows (products, images, webhook events and deliveries,
                     idempotency key) of a finished request
    purge_expired    what RETENTION_DAYS no longer keeps, deleted as delete_request
                     does, plus expired idempotency keys and what re-imports remember
                     of sources not downloaded since; a bounded amount per call

Outputs are never shared between requests (a re-import copies the output it reuses under
its own keys), so deleting a request's prefix never takes another request's outputs.

Deleting works in short transactions of at most DELETE_CHUNK_ROWS rows each, so a
200,000-image request never holds SQLite's write lock (or many PostgreSQL row locks) for
long: uploads and image work go on between the chunks. Outputs go first; a delete that
stops half-way leaves a finished request with fewer rows or files, which the next DELETE
(or sweep) finishes.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
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
PURGE_REQUESTS_PER_SWEEP = 50
PURGE_KEYS_PER_SWEEP = 5000


def cancel_request(ledger: ImageLedger, request: ProcessingRequest) -> Cancellation:
    """Cancel a request that has not finished; cancelling a cancelled one again is a no-op,
    one that finished otherwise is a Conflict."""
    cancellation = ledger.cancel(request.id)
    if cancellation.finished_before:
        raise Conflict(
            f"request {request.request_id} has already finished ({cancellation.status})",
            request_status=cancellation.status,
        )
    return cancellation


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
) -> None:
    """Delete a finished request: its outputs, then its rows. A request still running is
    a Conflict (cancel it first). Storage failures raise (StoreFailure) before any row
    is deleted, so the request stays visible and the delete can be repeated."""
    if request.completed_at is None:
        raise Conflict(
            f"request {request.request_id} is {request.status}; cancel it first "
            f"(POST /requests/{request.request_id}/cancel), then delete it",
            request_status=request.status,
        )
    try:
        _delete(sessions, storage, request.id, request.request_id)
    except StoreFailure as failure:
        raise ServiceUnavailable(f"the outputs could not be deleted: {failure.message}") from failure


def _delete(sessions: sessionmaker[Session], storage: ImageStorage, request_pk: int, request_id: str) -> None:
    removed = storage.delete_prefix(request_prefix(request_id))
    for table in (Image, Product):
        while True:
            with sessions.begin() as session:
                chunk = select(table.id).where(table.request_pk == request_pk).limit(DELETE_CHUNK_ROWS)
                deleted = session.execute(
                    delete(table)
                    .where(table.id.in_(chunk.scalar_subquery()))
                    .execution_options(synchronize_session=False)
                ).rowcount
            if deleted < DELETE_CHUNK_ROWS:
                break
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
) -> Purged:
    """One sweep: up to max_requests requests finished more than retention_days ago
    (none when it is 0), and expired idempotency keys. Requests still running are never
    touched, however old."""
    purged = Purged()
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
