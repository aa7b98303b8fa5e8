"""The tables. Alembic migrations in alembic/versions are the only source of the schema."""

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, UTCDateTime, utcnow


class RequestStatus(StrEnum):
    # A large upload, checked and answered: its rows are being stored in the background
    # (app/services/imports.py); no claim serves it until it is `pending`.
    IMPORTING = "importing"
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"
    CANCELLED = "cancelled"  # POST /requests/{id}/cancel: what was not started never will be
    # A cancel came: no claim serves it any more; its pending images are being cancelled
    # in batches and those in flight finish, then it ends `cancelled`.
    CANCELLING = "cancelling"
    # DELETE of a large finished request: its outputs and rows are being removed in
    # batches in the background; it is gone once done.
    DELETING = "deleting"


UNFINISHED_REQUEST_STATUSES = (RequestStatus.PENDING, RequestStatus.PROCESSING)
FINISHED_REQUEST_STATUSES = (
    RequestStatus.COMPLETED,
    RequestStatus.COMPLETED_WITH_ERRORS,
    RequestStatus.FAILED,
    RequestStatus.CANCELLED,
)


class ImageStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # its request was cancelled before it started; never fetched
    # Another row of the same request names the same URL and is processed instead; this
    # one takes that one's result in the same transaction (shown as pending until then).
    COPY = "copy"


class WebhookState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class ProcessingRequest(Base):
    """One uploaded CSV. The counters are kept by the workers so status is cheap to read."""

    __tablename__ = "processing_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    status: Mapped[str] = mapped_column(String(32), default=RequestStatus.PENDING, index=True)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)
    callback_url: Mapped[str | None] = mapped_column(Text)
    total_products: Mapped[int] = mapped_column(Integer, default=0)
    total_images: Mapped[int] = mapped_column(Integer, default=0)
    # The column keeps the name it had before failures were counted apart; it counts the
    # images that succeeded.
    succeeded_images: Mapped[int] = mapped_column("processed_images", Integer, default=0)
    failed_images: Mapped[int] = mapped_column(Integer, default=0)
    cancelled_images: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Of the succeeded images, those whose earlier output was reused (nothing encoded).
    reused_images: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Set by a cancel: the request ends `cancelled` once its images in flight are recorded.
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)  # retention
    # app.ledger.units.OutputOptions as JSON; NULL (requests from before) means the settings.
    options: Mapped[str | None] = mapped_column(Text)
    # Origin hosts its images name: with more than one, a claim looks past the images of a
    # host at its limit (app/ledger/turns.py). NULL before 0012.
    host_count: Mapped[int | None] = mapped_column(Integer)
    # A background import (status `importing`): what the checked CSV holds, while the
    # totals above count what is stored so far; NULL for uploads stored before the answer.
    expected_products: Mapped[int | None] = mapped_column(Integer)
    expected_images: Mapped[int | None] = mapped_column(Integer)
    import_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Product(Base):
    """One CSV row. Products are ordered by id, which follows CSV order."""

    __tablename__ = "products"
    __table_args__ = (
        UniqueConstraint("request_pk", "serial_number"),
        Index("ix_products_request_pk_id", "request_pk", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # No foreign keys on products and images: uploads insert them in bulk, where a key
    # costs a lookup and a row lock per row (migration 0011); lifecycle.py deletes them.
    request_pk: Mapped[int] = mapped_column(Integer)
    serial_number: Mapped[int] = mapped_column(Integer)
    product_name: Mapped[str] = mapped_column(Text)


class Image(Base):
    """One input URL of one product: the unit of work."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("product_id", "position"),
        # Expired claims. Partial: uploads insert no entries into it.
        Index(
            "ix_images_processing_id",
            "id",
            sqlite_where=text("status = 'processing'"),
            postgresql_where=text("status = 'processing'"),
        ),
        # Fair claiming; retry_at last so skipping images that wait for a retry needs no row reads.
        Index("ix_images_request_pk_status_id_retry_at", "request_pk", "status", "id", "retry_at"),
        # When the next waiting image is due. Partial: uploads insert no entries into it.
        Index(
            "ix_images_retry_at",
            "retry_at",
            sqlite_where=text("retry_at IS NOT NULL"),
            postgresql_where=text("retry_at IS NOT NULL"),
        ),
        # Images of a host being processed, counted by each claim (the per-host limit).
        Index(
            "ix_images_processing_host",
            "host",
            sqlite_where=text("status = 'processing'"),
            postgresql_where=text("status = 'processing'"),
        ),
        # The copies of a source image, found when its outcome is recorded.
        Index(
            "ix_images_source_image_id",
            "source_image_id",
            sqlite_where=text("source_image_id IS NOT NULL"),
            postgresql_where=text("source_image_id IS NOT NULL"),
        ),
        # A claim names an image by id: an id must never come back for a new row after a
        # DELETE, as SQLite's default (largest + 1) would (migration 0012).
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_pk: Mapped[int] = mapped_column(Integer)
    product_id: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    input_url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=ImageStatus.PENDING)
    output_key: Mapped[str | None] = mapped_column(Text)  # URLs are built on read
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    input_bytes: Mapped[int | None] = mapped_column(Integer)
    output_bytes: Mapped[int | None] = mapped_column(Integer)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    source_format: Mapped[str | None] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far; guards every update
    # Worker crashes this image was being decoded in; at MAX_WORKER_CRASHES it fails.
    crash_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # After a transient failure: not claimable before retry_at; the count sets the backoff.
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    transient_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    fetch_ms: Mapped[int | None] = mapped_column(Integer)
    compress_ms: Mapped[int | None] = mapped_column(Integer)
    kept_original: Mapped[bool | None] = mapped_column(Boolean)  # keep_smaller kept the input
    # Same URL, same request: a COPY row names the image processed for it (no foreign key:
    # both rows go with their request), and that image counts its copies.
    source_image_id: Mapped[int | None] = mapped_column(Integer)
    copies: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The URL's host (with its port when it names one), lower-cased: the claim keeps at
    # most FETCH_PER_HOST_CONCURRENCY of a host's images in flight. NULL before 0012.
    host: Mapped[str | None] = mapped_column(Text)
    # The first transient failure of its origin in a row: the image waits for the origin
    # until FETCH_RETRY_WINDOW_SECONDS after it, then fails with its last error.
    waiting_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reused: Mapped[bool | None] = mapped_column(Boolean)  # an earlier output copied, nothing encoded


class SourceValidators(Base):
    """What the latest download of a URL, for one owner, told about it: the origin's
    validators and the hash of the bytes, so a re-import asks "changed?" instead of
    downloading again (app/ledger/revalidation.py). Never shared between owners."""

    __tablename__ = "source_validators"
    # The URL's hash is the key: URLs may be longer than a PostgreSQL index entry allows.
    __table_args__ = (UniqueConstraint("owner_scope", "url_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_scope: Mapped[str] = mapped_column(String(64))  # "" when the API is open
    url_sha256: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    etag: Mapped[str | None] = mapped_column(Text)
    last_modified: Mapped[str | None] = mapped_column(Text)
    content_sha256: Mapped[str] = mapped_column(String(64))
    no_store: Mapped[bool] = mapped_column(Boolean, default=False)  # Cache-Control: no-store
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class SourceOutput(Base):
    """The output stored last for a source and one encoding (every output option, as
    JSON). The keys belong to the request that stored them; a reuse copies them under the
    new request's keys, and this row then names the copy."""

    __tablename__ = "source_outputs"
    __table_args__ = (UniqueConstraint("source_id", "encoding"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("source_validators.id", ondelete="CASCADE"))
    encoding: Mapped[str] = mapped_column(String(255))
    output_key: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(String(32))
    thumbnail_key: Mapped[str | None] = mapped_column(Text)
    input_bytes: Mapped[int | None] = mapped_column(Integer)
    output_bytes: Mapped[int | None] = mapped_column(Integer)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    source_format: Mapped[str | None] = mapped_column(String(16))
    kept_original: Mapped[bool | None] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookEvent(Base):
    """A notification owed to a request's webhook URL; its webhook_id is stable across retries."""

    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_pk: Mapped[int] = mapped_column(
        ForeignKey("processing_requests.id", ondelete="CASCADE"), index=True
    )
    webhook_id: Mapped[str] = mapped_column(String(64), unique=True)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=WebhookState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts made before the latest redelivery: the attempt budget (WEBHOOK_MAX_ATTEMPTS)
    # counts from here, while attempt numbers keep growing so the delivery log stays unambiguous.
    attempts_before_redelivery: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookDelivery(Base):
    """One attempt to deliver a webhook event."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)


class Host(Base):
    """An origin host images are downloaded from, as the politeness of the claim sees it."""

    __tablename__ = "hosts"
    __table_args__ = (
        # Hosts in backoff: the claim skips them, the idle runner wakes when the first ends.
        Index(
            "ix_hosts_backoff_until",
            "backoff_until",
            sqlite_where=text("backoff_until IS NOT NULL"),
            postgresql_where=text("backoff_until IS NOT NULL"),
        ),
    )

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    # No image of the host is claimed before this (429/503, Retry-After, a breaker's pause).
    backoff_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Transient failures in a row; from FETCH_BREAKER_FAILURES on, one image at a time.
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error_code: Mapped[str | None] = mapped_column(String(64))


class IdempotencyKey(Base):
    """An upload's Idempotency-Key, remembered so a retried upload returns the first answer."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("owner_scope", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_scope: Mapped[str] = mapped_column(String(64))  # "" when the API is open
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    request_pk: Mapped[int] = mapped_column(ForeignKey("processing_requests.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
