"""The event a finished request owes its webhook URL."""

import json
import uuid

from sqlalchemy import select
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
        "processed_images": request.processed_images,
        "failed_images": request.failed_images,
        "download_url": f"{public_base_url}/download/{request.request_id}",
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


def redeliver(session: Session, request_pk: int) -> WebhookEvent | None:
    """Queue the latest event again, keeping its webhook-id so receivers can de-duplicate."""
    event = latest_event(session, request_pk)
    if event is None:
        return None
    event.state = WebhookState.PENDING
    event.next_attempt_at = utcnow()
    event.claimed_at = None
    session.flush()
    return event
