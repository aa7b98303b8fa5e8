"""The event a finished request owes its webhook URL."""

import json
import uuid

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ProcessingRequest, WebhookEvent, WebhookState

EVENT_TYPE = "batch.finished"


def finished_payload(request: ProcessingRequest, public_base_url: str) -> dict:
    return {
        "type": EVENT_TYPE,
        "request_id": request.request_id,
        "status": request.status,
        "completed_at": request.completed_at.isoformat() if request.completed_at else None,
        "total_images": request.total_images,
        "succeeded_images": request.succeeded_images,
        "failed_images": request.failed_images,
        "cancelled_images": request.cancelled_images,
        "reused_images": request.reused_images,
        # succeeded_images under its earlier name, for receivers written against it.
        "processed_images": request.succeeded_images,
        "download_url": f"{public_base_url}/download/{request.request_id}",
        # None for a request stored before options existed (it used the settings).
        "options": json.loads(request.options) if request.options else None,
    }


def create_finished_event(session: Session, request: ProcessingRequest, public_base_url: str) -> int | None:
    """Add the event in the caller's transaction, so it exists iff the request finished."""
    if not request.callback_url:
        return None
    event = WebhookEvent(
        request_pk=request.id,
        webhook_id=f"msg_{uuid.uuid4().hex}",
        url=request.callback_url,
        payload=json.dumps(finished_payload(request, public_base_url), separators=(",", ":")),
        state=WebhookState.PENDING,
        next_attempt_at=utcnow(),
    )
    session.add(event)
    session.flush()
    return event.id


def latest_event(session: Session, request_pk: int) -> WebhookEvent | None:
    return session.scalars(
        select(WebhookEvent)
        .where(WebhookEvent.request_pk == request_pk)
        .order_by(WebhookEvent.id.desc())
        .limit(1)
    ).first()


def redeliver(session: Session, request_pk: int) -> int | None:
    """Queue the latest event again with a fresh attempt budget, keeping its webhook-id so
    receivers can de-duplicate; the id of the event, or None if there is none.

    One UPDATE: a delivery attempt finishing meanwhile cannot interleave with it."""
    latest_id = (
        select(func.max(WebhookEvent.id)).where(WebhookEvent.request_pk == request_pk).scalar_subquery()
    )
    return session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == latest_id)
        .values(
            state=WebhookState.PENDING,
            next_attempt_at=utcnow(),
            claimed_at=None,
            attempts_before_redelivery=WebhookEvent.attempts,
        )
        .returning(WebhookEvent.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
