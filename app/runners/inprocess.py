"""The in-process runner: threads in the web process that drive the task bodies of
app/tasks.py until stopped, the database as the queue.

    images     process_next_images, again and again: claim fairly, run on a pool of
               IMAGE_CONCURRENCY threads (the stages run there or in the image
               processes, app/pipeline/processes.py), record, claim again
    webhooks   WebhookSender.send_due whenever an event is created or comes due
    heartbeat  renews the leases of the claims it holds
    sweep      RetentionSweep, when due

Claimed units are kept alive by the heartbeat; a unit whose lease runs out (its process
died) is claimed again by whichever runner claims next, so work survives a crash. A unit
that failed transiently waits in the database until its retry time; the image thread
sleeps until the earliest one is due rather than polling.
"""

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from app.composition import Parts
from app.ledger.held import HeldClaims, renew_leases_until
from app.ledger.image_ledger import ImageLedger
from app.ledger.units import WorkUnit
from app.pipeline.stages import StageRunner
from app.services.lifecycle import purge_expired
from app.tasks import (
    DB_RETRY_SECONDS,
    RetentionSweep,
    StageHealth,
    WebhookSender,
    claim_batch_size,
    idle_wait_seconds,
    process_next_images,
)
from app.webhooks.delivery import WebhookDeliverer

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
        purge: Callable[[], object] | None = None,
        retention_interval_seconds: float = 3600.0,
    ):
        self.ledger = ledger
        self.stages = stages
        self.concurrency = concurrency
        self.claim_batch = claim_batch_size(concurrency)
        self.heartbeat_seconds = lease_seconds / 3
        self.recovery_interval_seconds = recovery_interval_seconds
        self.shutdown_grace_seconds = shutdown_grace_seconds
        self.retention = RetentionSweep(purge, retention_interval_seconds) if purge is not None else None
        # Requests cancelled while this runner held claimed, unstarted images of theirs.
        # By public id: an integer key can be reused by SQLite after a DELETE.
        self._cancelled_requests: set[str] = set()
        self._held = HeldClaims()
        self._health = StageHealth()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="image")
        self._wake_images = threading.Event()
        self._wake_webhooks = threading.Event()
        self._stopping = threading.Event()
        self._abandon = threading.Event()  # the grace ran out: record nothing more
        self._webhooks = WebhookSender(deliverer, on_finished=self._wake_webhooks.set)
        self._image_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_parts(cls, parts: Parts) -> "InProcessRunner":
        assert parts.stages is not None, "the in-process runner needs the stages"
        settings = parts.settings
        return cls(
            parts.ledger,
            parts.stages,
            parts.deliverer,
            concurrency=settings.image_concurrency,
            lease_seconds=settings.lease_seconds,
            recovery_interval_seconds=settings.recovery_interval_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            purge=lambda: purge_expired(
                parts.writer_sessions,
                parts.storage,
                retention_days=settings.retention_days,
                ledger=parts.ledger,
            ),
            retention_interval_seconds=settings.retention_interval_seconds,
        )

    # -- the runner interface ---------------------------------------------------------

    def start(self) -> None:
        self._image_thread = self._thread(self._images_loop, "images")
        self._threads = [
            self._image_thread,
            self._thread(self._webhooks_loop, "webhooks"),
            self._thread(self._heartbeat_loop, "lease-heartbeat"),
        ]
        if self.retention is not None:
            self._threads.append(self._thread(self._sweep_loop, "sweep"))

    def dispatch(self, request_pk: int) -> None:
        """New committed work exists; the image thread reads it from the database."""
        self._wake_images.set()

    def notify_webhooks(self) -> None:
        self._wake_webhooks.set()

    def cancel(self, request_id: str) -> None:
        self._cancelled_requests.add(request_id)

    def transient_failure(self) -> str | None:
        """What made the latest image wait for a retry (e.g. a full disk), while no image
        has succeeded since; None when the stages work."""
        return self._health.transient_failure

    def stop(self) -> None:
        """Stop taking work, let in-flight images finish within the grace period, and
        hand back whatever was claimed but not finished."""
        self._stopping.set()
        self._wake_images.set()
        self._wake_webhooks.set()
        if self._image_thread is not None:
            self._image_thread.join(timeout=self.shutdown_grace_seconds)
            # Images still running past the grace are handed back below, and nothing of
            # theirs is recorded once stop() has returned.
            self._abandon.set()
            self._image_thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._held.hand_back(self.ledger, self._held.units())
        for thread in self._threads:
            if thread is not self._image_thread:
                thread.join(timeout=5)
        self._webhooks.close()

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

    def _images_loop(self) -> None:
        idle_seconds = min(self.recovery_interval_seconds, self.heartbeat_seconds)
        last_request_served = 0  # this runner's place in the requests' turns
        while not self._stopping.is_set():
            self._wake_images.clear()
            result = process_next_images(
                self.ledger,
                self.stages,
                self._held,
                self._pool,
                limit=self.claim_batch,
                after_request_pk=last_request_served,
                stopping=self._stopping,
                on_events=lambda _: self._wake_webhooks.set(),
                max_seconds=float("inf"),
                wake=self._wake_images,
                claim_every_seconds=idle_seconds,
                cancelled=self._was_cancelled,
                health=self._health,
                abandon=self._abandon,
            )
            last_request_served = result.last_request_served
            if result.claimed == 0:
                self._wake_images.wait(idle_wait_seconds(self.ledger, idle_seconds))

    def _was_cancelled(self, unit: WorkUnit) -> bool:
        return unit.request_id in self._cancelled_requests

    def _webhooks_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                wait = self._webhooks.send_due()
            except Exception:
                log.exception("sending due webhooks failed")
                wait = DB_RETRY_SECONDS
            if wait is None:
                wait = WEBHOOK_IDLE_POLL_SECONDS
            # An event just handed to the pool is due until its attempt claims it.
            self._wake_webhooks.wait(min(max(wait, WEBHOOK_MIN_POLL_SECONDS), WEBHOOK_IDLE_POLL_SECONDS))
            self._wake_webhooks.clear()

    def _heartbeat_loop(self) -> None:
        renew_leases_until(self._stopping, self._held, self.ledger, self.heartbeat_seconds)

    def _sweep_loop(self) -> None:
        assert self.retention is not None
        while not self._stopping.wait(min(self.recovery_interval_seconds, self.retention.interval_seconds)):
            self.retention.run_if_due()
