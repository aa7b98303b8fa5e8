"""The task bodies, one per job, that every runner drives: plain functions and small
objects over the ledger, the stages and the webhook deliverer, taking ids and claims,
never ORM objects, each change in its own transaction, and safe to run twice (every
ledger change is guarded by its claim).

    process_next_images(...)  claim the next images fairly, run them, record their
                              outcomes in batches, and claim again as they finish
    WebhookSender             start one attempt for each due webhook event, without
                              waiting for it: a slow receiver holds up only its own
    RetentionSweep            delete what RETENTION_DAYS no longer keeps, when due
    process_image(id)         claim, run and record one image by id

Runners only decide where and when these run: app/runners/inprocess.py (threads in the
web process) and app/runners/celery_worker.py (Celery workers on a broker).
"""

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from app.ledger.held import HeldClaims
from app.ledger.image_ledger import ImageLedger
from app.ledger.units import ImageOutcome, WorkUnit
from app.pipeline.processes import ImageProcessCrashed, ImageProcessLost
from app.pipeline.stages import StageRunner
from app.webhooks.delivery import PARALLEL_DELIVERIES, WebhookDeliverer, log_attempt_failure

log = logging.getLogger(__name__)

MAX_WORKER_CRASHES = 3
DB_RETRY_SECONDS = 1.0
# Outcomes wait at most this long for others to share their transaction; each commit costs
# a couple of milliseconds of Python, which would otherwise be paid once per image.
RECORD_LINGER_SECONDS = 0.05


def claim_batch_size(concurrency: int) -> int:
    """Images one claim takes: enough to keep `concurrency` busy while the next is made."""
    return max(8, concurrency * 2)


def with_revalidation(ledger: ImageLedger, units: list[WorkUnit]) -> list[WorkUnit]:
    """The claimed units with what earlier imports of their URLs left. A failed read costs
    only the reuse: the units run as they are, downloaded and encoded in full."""
    try:
        return ledger.with_revalidation(units)
    except Exception:
        log.exception("reading the validators of %d claimed images failed; fetching them in full", len(units))
        return units


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
    """Run one claimed unit. None when it never got an outcome: its image process died
    (charged a crash if it was decoding it) or running it raised; it is handed back then,
    never kept, so its lease is not renewed for an outcome that will not come."""
    try:
        return process_unit(stages, unit)
    except ImageProcessCrashed:
        log.warning(
            "image %s was being decoded when its image process died", unit.image_id, extra=unit.log_fields
        )
        held.charge_crash(ledger, unit)
    except ImageProcessLost:
        log.warning(
            "image %s lost with its image process; handing it back", unit.image_id, extra=unit.log_fields
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


class StageHealth:
    """What made the latest image wait for a retry (e.g. a full disk), until an image
    succeeds again; None while the stages work."""

    def __init__(self) -> None:
        self.transient_failure: str | None = None

    def observe(self, outcomes: Iterable[ImageOutcome]) -> None:
        for outcome in outcomes:
            if outcome.retry_later:
                self.transient_failure = f"{outcome.error_code}: {outcome.error_message}"
            elif outcome.succeeded:
                self.transient_failure = None


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
    wake: threading.Event | None = None,
    claim_every_seconds: float = 0.0,
    cancelled: Callable[[WorkUnit], bool] | None = None,
    health: StageHealth | None = None,
    abandon: threading.Event | None = None,
) -> ClaimRound:
    """Claim up to `limit` images fairly (requests take turns; expired claims too), run
    them on `pool`, and record their outcomes in batches as they finish, on a thread of
    their own: the next claim is made while the last outcomes are recorded (the
    database's own work releases the GIL), and outcomes that finish meanwhile share the
    next recording.

    For up to `max_seconds`, claim again while fewer than `limit` run: at once when the
    last claim was full (more may wait), and with `claim_every_seconds`, also when `wake`
    is set (new work was committed) and every so many seconds (claims expire, retries come
    due). Each claim takes turns again, so a new small batch gets in at once. Returns when
    nothing runs any more and no claim is due, or when `stopping` is set and what runs is
    done; units not started by then are handed back, not run. When `abandon` is set (a
    stop whose grace ran out), it returns at once and records nothing more: the caller
    hands back what is still held.

    `on_claimed` is told how many the first claim took, before any is run (a Celery
    worker publishes the next message then, so other workers join in); `on_events` is
    given the webhook events each recording created; `cancelled(unit)` says a claimed unit
    belongs to a request cancelled since (recorded as cancelled, never run); `health`
    observes every outcome. The result's `more_waiting` says whether the last claim was
    full: work may be left."""
    deadline = time.monotonic() + max_seconds
    result = ClaimRound(last_request_served=after_request_pk)
    running: dict[Future, WorkUnit] = {}
    # Set when an image finishes or new work is committed: the loop's one thing to wait on.
    signal = wake or threading.Event()
    next_timed_claim = time.monotonic() + claim_every_seconds

    def run(unit: WorkUnit) -> ImageOutcome | None:
        if stopping.is_set():
            held.hand_back(ledger, [unit])
            return None
        if cancelled is not None and cancelled(unit):
            return ImageOutcome(unit, cancelled=True)
        return process_claimed(ledger, stages, held, unit)

    def finished(_: Future) -> None:
        signal.set()

    def claim() -> int:
        nonlocal next_timed_claim
        next_timed_claim = time.monotonic() + claim_every_seconds
        taken = ledger.claim_next(limit, result.last_request_served, expired_too=True)
        units, result.last_request_served = taken.units, taken.last_request_served
        units = with_revalidation(ledger, units)
        held.add(units)
        for unit in units:
            future = pool.submit(run, unit)
            future.add_done_callback(finished)
            running[future] = unit
        result.claimed += len(units)
        # Images passed over for their host's limit may be claimed as soon as this
        # process's images of it finish: claim again then, as after a full claim.
        result.more_waiting = len(units) >= limit or (taken.passed_over_hosts and bool(running))
        return len(units)

    def claim_if_due(woken: bool) -> None:
        if stopping.is_set() or len(running) > limit or time.monotonic() >= deadline:
            return
        timed = claim_every_seconds > 0 and (woken or time.monotonic() >= next_timed_claim)
        if result.more_waiting or timed:
            claim()

    def wait_for_signal(timeout: float) -> bool:
        woken = signal.wait(timeout)
        signal.clear()
        return woken

    def abandoned() -> bool:
        return abandon is not None and abandon.is_set()

    recorder = ThreadPoolExecutor(1, thread_name_prefix="record")
    to_record: list[ImageOutcome] = []
    recording: Future | None = None

    def record(outcomes: list[ImageOutcome]) -> None:
        if abandoned():  # a stop whose grace ran out: the caller hands these back
            return
        events = record_outcomes(ledger, held, outcomes, stopping)
        if events and on_events is not None:
            on_events(events)

    def recording_busy() -> bool:
        return recording is not None and not recording.done()

    def start_recording() -> None:
        nonlocal recording, to_record
        if recording_busy():
            return
        if recording is not None and (failure := recording.exception()) is not None:
            log.error("recording outcomes failed", exc_info=failure)
        recording = None
        if to_record:
            batch, to_record = to_record, []
            recording = recorder.submit(record, batch)
            recording.add_done_callback(finished)

    first = claim()
    if on_claimed is not None:
        on_claimed(first)

    try:
        while (running or to_record or recording_busy()) and not abandoned():
            idle = max(0.0, next_timed_claim - time.monotonic()) if claim_every_seconds > 0 else None
            woken = wait_for_signal(idle if idle is not None else 3600.0)
            done = {future for future in running if future.done()}
            claim_if_due(woken=woken and not done)
            if not done:
                start_recording()
                continue
            # Let others finish within the linger and share the transaction, and keep the
            # pool fed meanwhile.
            linger_until = time.monotonic() + RECORD_LINGER_SECONDS
            while len(done) < len(running) and (remaining := linger_until - time.monotonic()) > 0:
                wait_for_signal(remaining)
                done = {future for future in running if future.done()}
                claim_if_due(woken=False)
            if abandoned():
                break
            for future in done:
                del running[future]
            outcomes = [outcome for future in done if (outcome := future.result()) is not None]
            for outcome in outcomes:
                if outcome.retry_later:
                    result.transient_failure = f"{outcome.error_code}: {outcome.error_message}"
            if health is not None:
                health.observe(outcomes)
            to_record += outcomes
            start_recording()
            claim_if_due(woken=False)
    except BaseException:
        # The loop failed (say, a claim while the database was away): nothing it still
        # holds will be recorded by it. Hand each back (or, without a database, let its
        # lease expire) as it finishes, rather than renewing its lease for ever.
        held.hand_back(ledger, [outcome.unit for outcome in to_record])
        for future, unit in running.items():
            future.add_done_callback(lambda _, unit=unit: held.hand_back(ledger, [unit]))
        raise
    finally:
        # A recording under way ends first (a stop makes its retries give up), so nothing
        # is recorded after this returns.
        if recording is not None:
            wait((recording,))
        recorder.shutdown(wait=True)
    return result


def idle_wait_seconds(ledger: ImageLedger, default: float) -> float:
    """How long an idle runner may sleep before work can appear by itself: the default,
    or less when an image waiting for a retry becomes due sooner."""
    next_retry = ledger.seconds_until_next_retry()
    return default if next_retry is None else min(default, next_retry)


def process_image(ledger: ImageLedger, stages: StageRunner, image_id: int) -> list[int]:
    """Claim, run and record one image by id; returns the webhook events to deliver. Run
    twice, the second run finds nothing to claim and changes nothing."""
    events: list[int] = []
    for unit in with_revalidation(ledger, ledger.claim_images([image_id])):
        events += ledger.record_outcomes([process_unit(stages, unit)])
    return events


class WebhookSender:
    """Starts webhook attempts on a pool of its own and never waits for them, so a slow
    receiver holds up only its own notifications. One attempt per event at a time, at
    most `parallel` at once; events left out for lack of room are sent as soon as an
    attempt finishes. Two senders never send the same attempt: each attempt first claims
    its event."""

    def __init__(
        self,
        deliverer: WebhookDeliverer,
        *,
        parallel: int = PARALLEL_DELIVERIES,
        on_finished: Callable[[], None] | None = None,
    ):
        self.deliverer = deliverer
        self.parallel = parallel
        self.on_finished = on_finished
        self._pool = ThreadPoolExecutor(parallel, thread_name_prefix="webhook")
        self._in_flight: set[int] = set()
        self._left_out = False
        self._lock = threading.Lock()

    def send(self, event_ids: Iterable[int]) -> None:
        for event_id in event_ids:
            with self._lock:
                if event_id in self._in_flight:
                    continue
                if len(self._in_flight) >= self.parallel:
                    self._left_out = True
                    return
                self._in_flight.add(event_id)
            future = self._pool.submit(self.deliverer.attempt, event_id)
            future.add_done_callback(lambda future, event_id=event_id: self._finished(event_id, future))

    def send_due(self) -> float | None:
        """Start an attempt for each due event; the seconds until the next one is due
        (None: none waits)."""
        self.send(self.deliverer.due_event_ids())
        return self.deliverer.seconds_until_next_due()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _finished(self, event_id: int, future: Future) -> None:
        with self._lock:
            self._in_flight.discard(event_id)
            send_left_out, self._left_out = self._left_out, False
        log_attempt_failure(future)
        try:
            if send_left_out:
                self.send_due()
        except Exception:
            log.exception("sending the webhook events left out failed; they are sent when due again")
        if self.on_finished is not None:
            self.on_finished()


class RetentionSweep:
    """Deletes what RETENTION_DAYS no longer keeps, a bounded amount per round, in short
    transactions of its own (uploads and image work go on meanwhile), at most once per
    `interval_seconds`."""

    def __init__(self, purge: Callable[[], object], interval_seconds: float):
        self.purge = purge
        self.interval_seconds = interval_seconds
        self._next_at = time.monotonic() + interval_seconds

    def run_if_due(self) -> None:
        if time.monotonic() < self._next_at:
            return
        self._next_at = time.monotonic() + self.interval_seconds
        try:
            self.purge()
        except Exception:
            log.exception("the retention sweep failed; trying again next round")
