"""The task bodies every runner calls: plain functions over the ledger, the stages and the
webhook deliverer, taking ids and claims, never ORM objects, each change in its own
transaction, and safe to run twice (every ledger change is guarded by its claim).

    process_claimed(unit)     -> ImageOutcome, or None when the unit was handed back
    record_outcomes(batch)    -> webhook event ids; retried until the database takes it
    process_next_images(...)  claim the next N fairly, run them, record them: the Celery
                              task; the in-process runner streams the same steps through
                              its feeder, worker threads and recorder
    deliver_due_webhooks()    one attempt for each webhook event that is due (Celery; the
                              in-process runner keeps a loop that starts each due attempt
                              as it comes due, so a slow receiver delays only its own)

Runners decide only where and when these run: app/runners/inprocess.py (threads in the
web process) and app/runners/celery_worker.py (Celery workers on a broker).
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from app.ledger.image_ledger import ImageLedger
from app.ledger.units import ImageOutcome, WorkUnit
from app.pipeline.processes import ImageProcessCrashed, ImageProcessLost
from app.pipeline.stages import StageRunner
from app.webhooks.delivery import WebhookDeliverer

log = logging.getLogger(__name__)

MAX_WORKER_CRASHES = 3
DB_RETRY_SECONDS = 1.0
RECORD_BATCH_MAX = 500
# Outcomes wait at most this long for others to share their transaction; each commit costs
# a couple of milliseconds of Python, which would otherwise be paid once per image.
RECORD_LINGER_SECONDS = 0.05


class HeldClaims:
    """Units claimed by this process and not yet recorded, by (image id, attempt): after a
    lost lease the same image may be held under an old claim and a new one at once. The
    heartbeat renews their leases; whatever leaves the process leaves this set."""

    def __init__(self) -> None:
        self._units: dict[tuple[int, int], WorkUnit] = {}
        self._lock = threading.Lock()

    def add(self, units: Sequence[WorkUnit]) -> None:
        with self._lock:
            self._units.update(((unit.image_id, unit.attempt), unit) for unit in units)

    def forget(self, units: Sequence[WorkUnit]) -> None:
        with self._lock:
            for unit in units:
                self._units.pop((unit.image_id, unit.attempt), None)

    def units(self) -> list[WorkUnit]:
        with self._lock:
            return list(self._units.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._units)

    def renew(self, ledger: ImageLedger) -> None:
        ledger.renew_leases(self.units())

    def hand_back(self, ledger: ImageLedger, units: Sequence[WorkUnit]) -> None:
        """Give units back to the ledger uncharged (shutdown, a lost worker process)."""
        if not units:
            return
        try:
            ledger.release(units)
        except Exception:
            log.exception("could not release %d units; their leases will expire", len(units))
        self.forget(units)

    def charge_crash(self, ledger: ImageLedger, unit: WorkUnit) -> None:
        try:
            ledger.charge_crashes([(unit.image_id, unit.attempt)])
        except Exception:
            log.exception(
                "could not charge image %s a crash; its lease will expire",
                unit.image_id,
                extra=unit.log_fields,
            )
        self.forget([unit])


def claim_batch_size(concurrency: int) -> int:
    """Images one claim takes: enough to keep `concurrency` busy while the next is made."""
    return max(8, concurrency * 2)


def renew_leases_until(
    stopping: threading.Event, held: HeldClaims, ledger: ImageLedger, every: float
) -> None:
    """The heartbeat: renew the leases of the held claims every `every` seconds."""
    while not stopping.wait(every):
        try:
            held.renew(ledger)
        except Exception:
            log.exception("renewing leases failed; trying again")


def process_unit(stages: StageRunner, unit: WorkUnit) -> ImageOutcome:
    """The unit's outcome: its stages' result, or `worker_crashed` without running them
    for an image that has taken down MAX_WORKER_CRASHES processes while being decoded."""
    if unit.crashes >= MAX_WORKER_CRASHES:
        return ImageOutcome(
            unit,
            error_code="worker_crashed",
            error_message=f"the process decoding this image stopped unexpectedly, {unit.crashes} times",
        )
    return stages.run(unit)


def process_claimed(
    ledger: ImageLedger, stages: StageRunner, held: HeldClaims, unit: WorkUnit
) -> ImageOutcome | None:
    """Run one claimed unit. None when it never got an outcome: its worker process died
    (charged a crash if it was decoding it) or running it raised; it is handed back then,
    never kept, so its lease is not renewed for an outcome that will not come."""
    try:
        return process_unit(stages, unit)
    except ImageProcessCrashed:
        log.warning(
            "image %s was being decoded when its worker process died", unit.image_id, extra=unit.log_fields
        )
        held.charge_crash(ledger, unit)
    except ImageProcessLost:
        log.warning(
            "image %s lost with its worker process; handing it back", unit.image_id, extra=unit.log_fields
        )
        held.hand_back(ledger, [unit])
    except Exception:
        log.exception("running image %s failed; handing it back", unit.image_id, extra=unit.log_fields)
        held.hand_back(ledger, [unit])
    return None


def record_outcomes(
    ledger: ImageLedger, held: HeldClaims, outcomes: Sequence[ImageOutcome], stopping: threading.Event
) -> list[int]:
    """Record outcomes in one transaction; returns the webhook events created. Outcomes are
    never dropped: while the database is away, wait and try again (until stopping, when
    the claims are left to expire and be processed again)."""
    while True:
        try:
            events = ledger.record_outcomes(outcomes)
            break
        except Exception:
            log.exception("recording %d outcomes failed; retrying", len(outcomes))
            if stopping.wait(DB_RETRY_SECONDS):
                return []
    held.forget([outcome.unit for outcome in outcomes])
    return events


@dataclass
class ClaimRound:
    """What one process_next_images call did."""

    claimed: int = 0
    last_request_served: int = 0
    more_waiting: bool = False
    transient_failure: str | None = None


def process_next_images(
    ledger: ImageLedger,
    stages: StageRunner,
    held: HeldClaims,
    pool: ThreadPoolExecutor,
    *,
    limit: int,
    after_request_pk: int,
    stopping: threading.Event,
    on_claimed: Callable[[int], None] | None = None,
    on_events: Callable[[list[int]], None] | None = None,
    max_seconds: float = 0.0,
) -> ClaimRound:
    """Claim up to `limit` images fairly (requests take turns; expired claims too), run
    them on `pool`, and record their outcomes in batches as they finish. For up to
    `max_seconds`, claim again whenever half of them are done, so the pool never drains
    between claims (each claim takes turns again, so a new small batch still gets in at
    once). `on_claimed` is told how many the first claim took, before any is run (a Celery
    worker publishes the next message then, so other workers join in); `on_events` is
    given the webhook events each recording created. The result's `more_waiting` says
    whether the last claim was full: work may be left."""
    deadline = time.monotonic() + max_seconds
    result = ClaimRound(last_request_served=after_request_pk)
    running: set[Future] = set()

    def claim() -> int:
        units, result.last_request_served = ledger.claim_next(
            limit, result.last_request_served, expired_too=True
        )
        held.add(units)
        running.update(pool.submit(process_claimed, ledger, stages, held, unit) for unit in units)
        result.claimed += len(units)
        result.more_waiting = len(units) >= limit
        return len(units)

    def claim_more_if_running_low() -> None:
        if (
            result.more_waiting
            and len(running) <= limit
            and time.monotonic() < deadline
            and not stopping.is_set()
        ):
            claim()

    first = claim()
    if on_claimed is not None:
        on_claimed(first)
    while running:
        done, running = wait(running, return_when=FIRST_COMPLETED)
        # Let others finish within the linger and share the transaction, and keep the
        # pool fed meanwhile.
        linger_until = time.monotonic() + RECORD_LINGER_SECONDS
        while running and (remaining := linger_until - time.monotonic()) > 0:
            claim_more_if_running_low()
            more, running = wait(running, timeout=remaining, return_when=FIRST_COMPLETED)
            done |= more
        claim_more_if_running_low()
        outcomes = [outcome for future in done if (outcome := future.result()) is not None]
        for outcome in outcomes:
            if outcome.retry_later:
                result.transient_failure = f"{outcome.error_code}: {outcome.error_message}"
        if outcomes:
            events = record_outcomes(ledger, held, outcomes, stopping)
            if events and on_events is not None:
                on_events(events)
    return result


def deliver_due_webhooks(deliverer: WebhookDeliverer, pool: ThreadPoolExecutor) -> None:
    """One attempt for each due webhook event, in parallel (a slow receiver holds up only
    its own), waiting for them on `pool`, so never call it from one of pool's threads. Two
    callers never send the same attempt: each attempt first claims its event."""
    for _ in pool.map(deliverer.attempt, deliverer.due_event_ids()):
        pass


def idle_wait_seconds(ledger: ImageLedger, default: float) -> float:
    """How long an idle runner may sleep before work can appear by itself: the default,
    or less when an image waiting for a retry becomes due sooner."""
    next_retry = ledger.seconds_until_next_retry()
    return default if next_retry is None else min(default, next_retry)


def process_image(ledger: ImageLedger, stages: StageRunner, image_id: int) -> list[int]:
    """Claim, run and record one image by id; returns the webhook events to deliver. Run
    twice, the second run finds nothing to claim and changes nothing."""
    events: list[int] = []
    for unit in ledger.claim_images([image_id]):
        events += ledger.record_outcomes([process_unit(stages, unit)])
    return events
