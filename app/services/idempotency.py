"""Idempotency-Key for uploads (IETF draft-ietf-httpapi-idempotency-key-header).

The same key with the same file and webhook URL returns the original request and creates
nothing; the same key with a different payload is refused with 422; a key whose first
request is still being created answers 409. Keys are remembered for a set time.
"""

import hashlib
from datetime import timedelta
from typing import BinaryIO

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import IdempotencyKey, ProcessingRequest
from app.errors import Conflict, InvalidInput

MAX_KEY_LENGTH = 255
HASH_BLOCK_BYTES = 1024 * 1024


def payload_fingerprint(csv_file: BinaryIO, webhook_url: str | None, options: str | None = None) -> str:
    """options: the output options as given (None when none were), so that a key reused
    with other options is a different payload."""
    digest = hashlib.sha256()
    while block := csv_file.read(HASH_BLOCK_BYTES):
        digest.update(block)
    csv_file.seek(0)
    digest.update(b"\0webhook_url\0" + (webhook_url or "").encode())
    if options is not None:
        digest.update(b"\0options\0" + options.encode())
    return digest.hexdigest()


def check_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidInput(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters")
    return key


def find_original(
    session: Session, owner: str | None, key: str, fingerprint: str
) -> ProcessingRequest | None:
    """The request created first with this key, or None if the key is new or expired.

    Only reads: it runs before the upload is parsed, outside any write transaction."""
    remembered = session.scalars(
        select(IdempotencyKey).where(IdempotencyKey.owner_scope == (owner or ""), IdempotencyKey.key == key)
    ).one_or_none()
    if remembered is None or remembered.expires_at <= utcnow():
        return None
    if remembered.fingerprint != fingerprint:
        raise InvalidInput(
            "this Idempotency-Key was used for a different upload; use a new key for new content"
        )
    return session.get(ProcessingRequest, remembered.request_pk)


def _forget_expired_keys(session: Session, owner: str | None, key: str, batch: int = 100) -> None:
    """This key if it has expired, and a bounded number of others, so the table does not
    grow with keys that are never reused."""
    now = utcnow()
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.owner_scope == (owner or ""),
            IdempotencyKey.key == key,
            IdempotencyKey.expires_at <= now,
        )
    )
    expired = select(IdempotencyKey.id).where(IdempotencyKey.expires_at <= now).limit(batch)
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.id.in_(expired.scalar_subquery())))


def remember(
    session: Session, owner: str | None, key: str, fingerprint: str, request_pk: int, ttl_seconds: float
) -> None:
    _forget_expired_keys(session, owner, key)
    now = utcnow()
    try:
        with session.begin_nested():
            session.add(
                IdempotencyKey(
                    owner_scope=owner or "",
                    key=key,
                    fingerprint=fingerprint,
                    request_pk=request_pk,
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl_seconds),
                )
            )
    except IntegrityError:
        raise Conflict(
            "an upload with this Idempotency-Key is being processed; retry in a moment",
            headers={"Retry-After": "1"},
        ) from None
