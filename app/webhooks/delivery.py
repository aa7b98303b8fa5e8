"""Delivery of webhook events: signed POSTs, retried with backoff, each attempt recorded.

State lives in the webhook_events row (attempts, next_attempt_at, a claim with a lease),
so retries survive a restart and two delivery loops never send the same attempt twice.
"""

import email.utils
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta

import requests
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.base import utcnow
from app.db.models import WebhookDelivery, WebhookEvent, WebhookState
from app.net.failures import BlockedAddress, InvalidUrl, NetworkFailure
from app.net.guard import wall_clock_deadline
from app.net.urls import check_url
from app.webhooks.signing import signature_headers

log = logging.getLogger(__name__)

# Attempts in flight at once in one process (and the guarded HTTP pool's size).
PARALLEL_DELIVERIES = 4

RESPONSE_EXCERPT_CHARS = 500
MAX_RETRY_AFTER = timedelta(hours=24)
CLAIM_LEASE = timedelta(minutes=5)
# The receiver's address is refused by the guard: asking again later gets the same answer.
PERMANENT_FAILURES = (BlockedAddress, InvalidUrl)


def parse_retry_after(value: str | None, now: datetime) -> timedelta | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(timedelta(seconds=int(value)), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(when - now, timedelta(0)), MAX_RETRY_AFTER)


class WebhookDeliverer:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        http: requests.Session,
        secret: str,
        timeout_seconds: float,
        max_attempts: int,
        retry_base_seconds: float,
        on_attempt: Callable[[str], None] | None = None,
    ):
        """`on_attempt` is told how each attempt ended: delivered, failed (to be retried)
        or exhausted (it was the last of the budget)."""
        self.on_attempt = on_attempt
        self.sessions = sessions
        self.http = http
        self.secret = secret
        self.timeout_seconds = timeout_seconds
        self.max_attempts = max_attempts
        self.retry_base_seconds = retry_base_seconds

    def backoff(self, attempts: int) -> timedelta:
        """Exponential in the attempts made so far, jittered by +-25% so that receivers
        coming back from an outage are not hit by every sender at once; the gaps still grow."""
        jitter = 0.75 + 0.5 * random.random()
        return timedelta(seconds=self.retry_base_seconds * 2 ** (attempts - 1) * jitter)

    def due_event_ids(self, limit: int = 50) -> list[int]:
        now = utcnow()
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(WebhookEvent.id)
                    .where(
                        WebhookEvent.state == WebhookState.PENDING,
                        WebhookEvent.next_attempt_at <= now,
                        or_(
                            WebhookEvent.claimed_at.is_(None),
                            WebhookEvent.claimed_at < now - CLAIM_LEASE,
                        ),
                    )
                    .order_by(WebhookEvent.next_attempt_at)
                    .limit(limit)
                )
            )

    def seconds_until_next_due(self) -> float | None:
        with self.sessions() as session:
            next_at = session.scalar(
                select(func.min(WebhookEvent.next_attempt_at)).where(
                    WebhookEvent.state == WebhookState.PENDING,
                    or_(WebhookEvent.claimed_at.is_(None), WebhookEvent.claimed_at < utcnow() - CLAIM_LEASE),
                )
            )
        if next_at is None:
            return None
        if next_at.tzinfo is None:
            next_at = next_at.replace(tzinfo=UTC)
        return max(0.0, (next_at - utcnow()).total_seconds())

    def attempt(self, event_id: int) -> bool:
        """Make one delivery attempt if the event is due and unclaimed; True if one was made."""
        now = utcnow()
        with self.sessions.begin() as session:
            claimed = session.execute(
                update(WebhookEvent)
                .where(
                    WebhookEvent.id == event_id,
                    WebhookEvent.state == WebhookState.PENDING,
                    WebhookEvent.next_attempt_at <= now,
                    or_(
                        WebhookEvent.claimed_at.is_(None),
                        WebhookEvent.claimed_at < now - CLAIM_LEASE,
                    ),
                )
                .values(claimed_at=now, attempts=WebhookEvent.attempts + 1)
                .returning(
                    WebhookEvent.url,
                    WebhookEvent.payload,
                    WebhookEvent.webhook_id,
                    WebhookEvent.attempts,
                    WebhookEvent.attempts_before_redelivery,
                )
            ).one_or_none()
        if claimed is None:
            return False

        status_code, error, excerpt, retry_after, duration_ms, permanent = self._send(
            claimed.url, claimed.webhook_id, claimed.payload
        )
        finished_at = utcnow()
        delivered = status_code is not None and 200 <= status_code < 300
        attempts_in_budget = claimed.attempts - claimed.attempts_before_redelivery
        if delivered:
            values = {"state": WebhookState.DELIVERED, "delivered_at": finished_at}
            outcome = "delivered"
        elif permanent or attempts_in_budget >= self.max_attempts:
            values = {"state": WebhookState.FAILED}
            outcome = "exhausted"
        else:
            outcome = "failed"
            wait = max(self.backoff(attempts_in_budget), retry_after or timedelta(0))
            values = {"next_attempt_at": finished_at + wait}
        try:
            self._record_attempt(claimed, event_id, now, status_code, error, excerpt, duration_ms, values)
        except Exception:
            self._after_unrecorded_attempt(
                event_id,
                claimed.webhook_id,
                claimed.attempts,
                error,
                finished_at + self.backoff(attempts_in_budget),
            )
            return True
        if self.on_attempt is not None:
            self.on_attempt(outcome)
        if not delivered:
            log.info(
                "webhook %s attempt %d failed: %s",
                claimed.webhook_id,
                claimed.attempts,
                error,
            )
        return True

    def _record_attempt(
        self, claimed, event_id, now, status_code, error, excerpt, duration_ms, values
    ) -> None:
        with self.sessions.begin() as session:
            session.add(
                WebhookDelivery(
                    event_id=event_id,
                    attempt=claimed.attempts,
                    attempted_at=now,
                    status_code=status_code,
                    error=error,
                    response_excerpt=excerpt,
                    duration_ms=duration_ms,
                )
            )
            session.execute(
                update(WebhookEvent)
                .where(
                    WebhookEvent.id == event_id,
                    WebhookEvent.attempts == claimed.attempts,
                    # A redelivery during this attempt started a new budget: its outcome
                    # is recorded above but decides nothing.
                    WebhookEvent.attempts_before_redelivery == claimed.attempts_before_redelivery,
                )
                .values(
                    claimed_at=None,
                    last_status_code=status_code,
                    last_error=error,
                    **values,
                )
            )

    def _after_unrecorded_attempt(
        self, event_id: int, webhook_id: str, attempt: int, error: str | None, retry_at: datetime
    ) -> None:
        """The attempt was made but its delivery row could not be written. An event whose
        request was deleted meanwhile went with it: nothing is left to deliver. Any other
        event is released for a later attempt rather than staying claimed for CLAIM_LEASE;
        a delivery that succeeded may then be sent twice, as at-least-once allows."""
        what = f"webhook {webhook_id} attempt {attempt} ({error or 'delivered'})"
        try:
            with self.sessions.begin() as session:
                released = session.execute(
                    update(WebhookEvent)
                    .where(WebhookEvent.id == event_id, WebhookEvent.attempts == attempt)
                    .values(claimed_at=None, next_attempt_at=retry_at)
                ).rowcount
                exists = released or session.scalar(
                    select(WebhookEvent.id).where(WebhookEvent.id == event_id)
                )
        except Exception:
            log.exception(
                "%s could not be recorded, nor its claim released: it is attempted again once "
                "the claim expires",
                what,
            )
            return
        if released:
            log.exception("%s could not be recorded; the event is released for another attempt", what)
        elif exists:
            log.exception("%s could not be recorded; the event was attempted again meanwhile", what)
        else:
            log.warning("%s not recorded: its request was deleted meanwhile", what)

    def _send(self, url: str, webhook_id: str, payload: str):
        """Never raises: whatever goes wrong becomes the attempt's error, so the attempt is
        recorded and the event retried or failed instead of staying claimed."""
        start = time.perf_counter()
        permanent = False  # True when no later attempt can succeed either
        try:
            body = payload.encode()
            headers = {"content-type": "application/json"}
            headers.update(signature_headers(self.secret, webhook_id, int(time.time()), body))
            check_url(url)
            with wall_clock_deadline(time.monotonic() + self.timeout_seconds):
                return self._post(url, body, headers, start)
        except NetworkFailure as failure:
            error = f"{failure.code}: {failure.message}"
            permanent = isinstance(failure, PERMANENT_FAILURES)
        except requests.exceptions.RequestException as exc:
            # The deadline reaper's shutdown surfaces as a connection error: time decides.
            timed_out = isinstance(exc, requests.exceptions.Timeout) or (
                time.perf_counter() - start >= self.timeout_seconds
            )
            error = (
                f"timeout after {self.timeout_seconds:g} s"
                if timed_out
                else f"connection_error: {exc.__class__.__name__}"
            )
        except Exception as exc:
            # The receiver's owner reads this error; the details are for the operator's log.
            log.exception("webhook %s: the attempt could not be made", webhook_id)
            error = f"internal_error: the request could not be prepared or sent ({exc.__class__.__name__})"
        return None, error, None, None, _ms(start), permanent

    def _post(self, url: str, body: bytes, headers: dict, start: float):
        # Sent through the adapter, not Session.post: even with allow_redirects=False the
        # session reads a redirect's whole body, without the excerpt's cap. The adapter
        # never follows a redirect.
        request = self.http.prepare_request(requests.Request("POST", url, data=body, headers=headers))
        response = self.http.get_adapter(url).send(request, timeout=self.timeout_seconds)
        with response:
            try:
                head = response.raw.read(RESPONSE_EXCERPT_CHARS * 4, decode_content=True) or b""
            except Exception:  # the status code is what counts; the body is a courtesy
                head = b""
            excerpt = head.decode("utf-8", "replace")[:RESPONSE_EXCERPT_CHARS] or None
            error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
            retry_after = parse_retry_after(response.headers.get("retry-after"), utcnow())
            return response.status_code, error, excerpt, retry_after, _ms(start), False


def log_attempt_failure(future: Future) -> None:
    """A done-callback for a future running WebhookDeliverer.attempt: what it raised is
    logged, never dropped with the future."""
    if future.cancelled():
        return
    error = future.exception()
    if error is not None:
        log.error("a webhook attempt failed", exc_info=error)


def _ms(start: float) -> int:
    return round((time.perf_counter() - start) * 1000)
