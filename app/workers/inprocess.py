"""The in-process runner: threads in the web process, the database as the queue.

    feeder  --claims batches of image ids-->  units queue  -->  N workers
    workers --stages.run(unit)-->  fetch/compress/store, on the worker thread itself or in
                                   an image worker process (app/workers/processes.py)
    workers --outcomes-->  recorder (one transaction per batch)  -->  webhook loop

Claimed units are kept alive by a heartbeat; a unit whose lease runs out (its process
died) is claimed again by whichever runner scans next, so work survives a crash. A unit
that failed transiently waits in the database until its retry time; the feeder sleeps
until the earliest one is due rather than polling.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from app.composition import PARALLEL_DELIVERIES, Services
from app.pipeline.stages import ImageOutcome, StageRunner, WorkUnit
from app.queue import ImageLedger
from app.services.lifecycle import Purged, purge_expired
from app.tasks import (
    DB_RETRY_SECONDS,
    RECORD_BATCH_MAX,
    RECORD_LINGER_SECONDS,
    HeldClaims,
    claim_batch_size,
    idle_wait_seconds,
    process_claimed,
    record_outcomes,
    renew_leases_until,
)
from app.webhooks.delivery import WebhookDeliverer, log_attempt_failure

log = logging.getLogger(__name__)

WEBHOOK_IDLE_POLL_SECONDS = 5.0
WEBHOOK_MIN_POLL_SECONDS = 0.02


class InProcessRunner:
    def __init__(
        self,
        ledger: ImageLedger,
        stages: StageRunner,
        deliverer: WebhookDeliverer,
        *,
        concurrency: int,
        lease_seconds: float,
        recovery_interval_seconds: float,
        shutdown_grace_seconds: float,
        purge: Callable[[], Purged] | None = None,
        retention_interval_seconds: float = 3600.0,
    ):
        self.ledger = ledger
        self.stages = stages
        self.deliverer = deliverer
        self.concurrency = concurrency
        self.claim_batch = claim_batch_size(concurrency)
        self.heartbeat_seconds = lease_seconds / 3
        self.recovery_interval_seconds = recovery_interval_seconds
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.purge = purge
        self.retention_interval_seconds = retention_interval_seconds
        # Requests cancelled while this runner held claimed, unstarted images of theirs.
        # By public id: an integer key can be reused by SQLite after a DELETE.
        self._cancelled_requests: set[str] = set()

        self._units: queue.Queue[WorkUnit | None] = queue.Queue(maxsize=self.claim_batch)
        self._outcomes: queue.Queue[ImageOutcome | None] = queue.Queue()
        self._held = HeldClaims()
        # "code: message" of the latest transient failure, until an image succeeds again.
        self._transient_failure: str | None = None
        self._wake_feeder = threading.Event()
        self._wake_webhooks = threading.Event()
        self._stopping = threading.Event()
        self._workers: list[threading.Thread] = []
        self._feeder: threading.Thread | None = None
        self._recorder: threading.Thread | None = None
        self._webhooks: threading.Thread | None = None

    @classmethod
    def from_services(cls, services: Services) -> "InProcessRunner":
        assert services.stages is not None, "the in-process runner needs the stages"
        settings = services.settings
        return cls(
            services.ledger,
            services.stages,
            services.deliverer,
            concurrency=settings.worker_concurrency,
            lease_seconds=settings.lease_seconds,
            recovery_interval_seconds=settings.recovery_interval_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            purge=lambda: purge_expired(
                services.writer_sessions, services.storage, retention_days=settings.retention_days
            ),
            retention_interval_seconds=settings.retention_interval_seconds,
        )

    # -- the runner interface ---------------------------------------------------------

    def start(self) -> None:
        self._feeder = self._thread(self._feed_loop, "image-feeder")
        self._recorder = self._thread(self._record_loop, "image-recorder")
        self._webhooks = self._thread(self._webhook_loop, "webhook-delivery")
        self._thread(self._heartbeat_loop, "lease-heartbeat")
        if self.purge is not None:
            self._thread(self._retention_loop, "retention")
        self._workers = [self._thread(self._work_loop, f"image-worker-{n}") for n in range(self.concurrency)]

    def dispatch(self, request_pk: int) -> None:
        """New committed work exists; the feeder reads it from the database."""
        self._wake_feeder.set()

    def notify_webhooks(self) -> None:
        self._wake_webhooks.set()

    def cancel(self, request_id: str) -> None:
        self._cancelled_requests.add(request_id)

    def transient_failure(self) -> str | None:
        """What made the latest image wait for a retry (e.g. a full disk), while no image
        has succeeded since; None when the stages work."""
        return self._transient_failure

    def stop(self) -> None:
        """Stop taking work, let in-flight images finish within the grace period, and
        hand back whatever was claimed but not finished."""
        self._stopping.set()
        self._wake_feeder.set()
        self._wake_webhooks.set()
        if self._feeder:
            self._feeder.join(timeout=5)
        unstarted = []
        while True:
            try:
                unit = self._units.get_nowait()
            except queue.Empty:
                break
            if unit is not None:
                unstarted.append(unit)
        self._held.hand_back(self.ledger, unstarted)
        for _ in self._workers:
            self._units.put(None)
        deadline = time.monotonic() + self.shutdown_grace_seconds
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        self._outcomes.put(None)
        if self._recorder:
            self._recorder.join(timeout=max(5.0, deadline - time.monotonic()))
        self._held.hand_back(self.ledger, self._held.units())
        if self._webhooks:
            self._webhooks.join(timeout=5)

    # -- threads ----------------------------------------------------------------------

    def _thread(self, target, name: str) -> threading.Thread:
        thread = threading.Thread(target=self._guarded(target), name=name, daemon=True)
        thread.start()
        return thread

    def _guarded(self, loop):
        def run():
            while not self._stopping.is_set():
                try:
                    loop()
                    return
                except Exception:
                    log.exception("%s failed; restarting it", threading.current_thread().name)
                    time.sleep(DB_RETRY_SECONDS)

        return run

    def _feed_loop(self) -> None:
        next_expiry_scan = 0.0  # at once: work a crashed process left behind
        last_request_served = 0  # the feeder's place in the requests' turns
        while not self._stopping.is_set():
            expired_too = time.monotonic() >= next_expiry_scan
            if expired_too:
                next_expiry_scan = time.monotonic() + self.recovery_interval_seconds
            units, last_request_served = self.ledger.claim_next(
                self.claim_batch, last_request_served, expired_too=expired_too
            )
            if not units:
                idle = min(self.recovery_interval_seconds, self.heartbeat_seconds)
                self._wake_feeder.wait(idle_wait_seconds(self.ledger, idle))
                self._wake_feeder.clear()
                continue
            self._held.add(units)
            for index, unit in enumerate(units):
                if not self._put_unit(unit):
                    self._held.hand_back(self.ledger, units[index:])
                    return

    def _put_unit(self, unit: WorkUnit) -> bool:
        while not self._stopping.is_set():
            try:
                self._units.put(unit, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _work_loop(self) -> None:
        while True:
            unit = self._units.get()
            if unit is None:
                return
            if unit.request_id in self._cancelled_requests:
                outcome = ImageOutcome(unit, cancelled=True)
            else:
                outcome = process_claimed(self.ledger, self.stages, self._held, unit)
            if outcome is None:  # handed back: another claim may take it
                self._wake_feeder.set()
                continue
            if outcome.retry_later:
                self._transient_failure = f"{outcome.error_code}: {outcome.error_message}"
            elif outcome.succeeded:
                self._transient_failure = None
            self._outcomes.put(outcome)

    def _record_loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._outcomes.get()
            if first is None:
                return
            batch = [first]
            linger_until = time.monotonic() + RECORD_LINGER_SECONDS
            while len(batch) < RECORD_BATCH_MAX:
                try:
                    outcome = self._outcomes.get_nowait()
                except queue.Empty:
                    # Wait for more only while other claimed images are still on their
                    # way: the last image of a batch is recorded (and announced) at once.
                    remaining = linger_until - time.monotonic()
                    if remaining <= 0 or not self._others_in_flight(len(batch)):
                        break
                    try:
                        outcome = self._outcomes.get(timeout=remaining)
                    except queue.Empty:
                        break
                if outcome is None:
                    stopping = True
                    break
                batch.append(outcome)
            events = record_outcomes(self.ledger, self._held, batch, self._stopping)
            if events:
                self._wake_webhooks.set()
            if any(outcome.retry_later for outcome in batch):
                self._wake_feeder.set()  # to sleep until the new retry times, not longer

    def _others_in_flight(self, waiting_outcomes: int) -> bool:
        return len(self._held) > waiting_outcomes

    def _webhook_loop(self) -> None:
        """Start an attempt for each due event without waiting for earlier ones, so a slow
        receiver holds up only its own notifications."""
        pool = ThreadPoolExecutor(PARALLEL_DELIVERIES, thread_name_prefix="webhook")
        in_flight: set[int] = set()
        lock = threading.Lock()

        def finished(event_id: int) -> None:
            with lock:
                in_flight.discard(event_id)
            self._wake_webhooks.set()

        try:
            while not self._stopping.is_set():
                try:
                    for event_id in self.deliverer.due_event_ids():
                        with lock:
                            if event_id in in_flight or len(in_flight) >= PARALLEL_DELIVERIES:
                                continue
                            in_flight.add(event_id)
                        future = pool.submit(self.deliverer.attempt, event_id)
                        future.add_done_callback(log_attempt_failure)
                        future.add_done_callback(lambda _, event_id=event_id: finished(event_id))
                    wait = self.deliverer.seconds_until_next_due()
                except Exception:
                    log.exception("webhook delivery loop failed")
                    wait = DB_RETRY_SECONDS
                if wait is None:
                    wait = WEBHOOK_IDLE_POLL_SECONDS
                # An event just handed to the pool is due until its attempt claims it.
                self._wake_webhooks.wait(min(max(wait, WEBHOOK_MIN_POLL_SECONDS), WEBHOOK_IDLE_POLL_SECONDS))
                self._wake_webhooks.clear()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- retention ----------------------------------------------------------------------

    def _retention_loop(self) -> None:
        """Delete what RETENTION_DAYS no longer keeps, a bounded amount per round, in
        short transactions of its own: uploads and image work go on meanwhile."""
        assert self.purge is not None
        while not self._stopping.wait(self.retention_interval_seconds):
            try:
                self.purge()
            except Exception:
                log.exception("the retention sweep failed; trying again next round")

    # -- leases -----------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        renew_leases_until(self._stopping, self._held, self.ledger, self.heartbeat_seconds)
