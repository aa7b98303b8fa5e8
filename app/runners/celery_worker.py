"""The Celery worker: `make worker` runs `celery --app app.runners.celery_worker worker`.

Each worker process builds the same parts as the web process (app/composition.py), with
its own image worker processes, and runs the same task bodies (app/tasks.py):

    process_images    claim the next images fairly, run them, record them; a worker that
                      claimed a full batch first publishes another hint, so idle workers
                      join in and a big batch spreads over every worker
    deliver_webhooks  one attempt for each due webhook event

Alongside, threads of its own: a heartbeat renews the leases of the images it holds, and
a sweep (one worker at a time, under a database lock) publishes a hint when claimable
work exists and no hint waits in the queue (a lost message, a flushed or restarted
broker, expired claims of a dead worker, images whose retry time came) and when webhook
events are due, and runs the retention sweep when due. A deployment runs the API and
any number of workers; nothing else.
"""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from amqp.exceptions import ChannelError
from celery import signals
from celery.apps.worker import install_worker_int_handler
from celery.platforms import EX_OK
from prometheus_client import start_http_server
from sqlalchemy import text

from app.composition import Parts, build_parts
from app.config import settings_or_exit
from app.db.migrate import database_or_exit
from app.ledger.held import HeldClaims, renew_leases_until
from app.logs import configure_logging, secrets_of
from app.runners.celery_app import DELIVER_WEBHOOKS, PROCESS_IMAGES, make_celery, worker_settings_problem
from app.runners.celery_app import publish as publish_hint
from app.services.lifecycle import purge_expired
from app.tasks import RetentionSweep, WebhookSender, claim_batch_size, process_next_images

log = logging.getLogger(__name__)

# A task claims again as its images finish, for up to this long, then hands the rest on
# with a message: a message per claim batch cost tiny images a fifth of their rate, and
# bigger claims would let a big batch hold every worker while a small one waits.
TASK_SECONDS = 10.0
# Any constant will do: it names the sweep's lock among PostgreSQL advisory locks.
SWEEP_LOCK_KEY = 0x1A6E5E3B

settings = settings_or_exit()
app = make_celery(settings)


class WorkerRuntime:
    """What one Celery worker process holds between tasks."""

    def __init__(self, parts: Parts):
        self.parts = parts
        self.settings = parts.settings
        self.held = HeldClaims()
        self.image_pool = ThreadPoolExecutor(self.settings.image_concurrency, thread_name_prefix="image")
        self.webhooks = WebhookSender(parts.deliverer)
        self.claim_batch = claim_batch_size(self.settings.image_concurrency)
        self.last_request_served = 0  # this worker's place in the requests' turns
        self.retention = RetentionSweep(
            lambda: purge_expired(
                parts.writer_sessions,
                parts.storage,
                retention_days=self.settings.retention_days,
                ledger=parts.ledger,
            ),
            self.settings.retention_interval_seconds,
        )
        # Set when the worker starts its warm shutdown: running tasks stop waiting for an
        # unreachable database then (their claims expire and are processed again).
        self.shutting_down = threading.Event()
        self.stopping = threading.Event()
        self.metrics_server = None  # METRICS_PORT's server, when set
        self._threads = [
            threading.Thread(target=self._heartbeat_loop, name="lease-heartbeat", daemon=True),
            threading.Thread(target=self._sweep_loop, name="sweep", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.image_pool.shutdown(wait=True, cancel_futures=True)
        self.webhooks.close()
        self.held.hand_back(self.parts.ledger, self.held.units())
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.parts.close()

    # -- tasks --------------------------------------------------------------------------

    def process_images(self) -> None:
        def on_claimed(count: int) -> None:
            if count >= self.claim_batch:  # there may be more: let another worker join in
                publish(PROCESS_IMAGES)

        assert self.parts.stages is not None
        result = process_next_images(
            self.parts.ledger,
            self.parts.stages,
            self.held,
            self.image_pool,
            limit=self.claim_batch,
            after_request_pk=self.last_request_served,
            stopping=self.shutting_down,
            on_claimed=on_claimed,
            on_events=self.webhooks.send,
            max_seconds=TASK_SECONDS,
        )
        self.last_request_served = result.last_request_served
        if result.transient_failure:
            log.warning("images wait to be retried after a transient failure: %s", result.transient_failure)
        if result.more_waiting:  # stopped for time: the next message carries on
            publish(PROCESS_IMAGES)

    def deliver_webhooks(self) -> None:
        self.webhooks.send_due()

    # -- threads ------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        renew_leases_until(self.stopping, self.held, self.parts.ledger, self.settings.lease_seconds / 3)

    def _sweep_loop(self) -> None:
        while not self.stopping.wait(self.settings.recovery_interval_seconds):
            try:
                self.sweep()
            except Exception:
                log.exception("the sweep failed; trying again")

    def sweep(self) -> None:
        # A session-level lock, not a transaction's: the sweep talks to the broker and
        # deletes in short transactions of its own while it holds it.
        with self.parts.engine.connect() as connection:
            if not connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": SWEEP_LOCK_KEY}):
                return  # another worker sweeps now
            connection.commit()
            try:
                self._sweep_holding_the_lock()
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SWEEP_LOCK_KEY})
                connection.commit()

    def _sweep_holding_the_lock(self) -> None:
        work_waiting = self.parts.ledger.has_claimable_work()
        webhooks_due = bool(self.parts.deliverer.due_event_ids(limit=1))
        if work_waiting and waiting_hints() == 0:
            log.info("claimable images and no message announcing them: publishing one")
            publish(PROCESS_IMAGES)
        if webhooks_due:
            publish(DELIVER_WEBHOOKS)
        # Under the lock, so one worker at a time deletes.
        self.retention.run_if_due()


_runtime: WorkerRuntime | None = None


def runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("the worker runtime starts with the Celery worker (worker_init)")
    return _runtime


def publish(task_name: str) -> None:
    publish_hint(app, task_name)


def waiting_hints() -> int:
    """Messages waiting in the queue. Declaring first also re-creates a queue the broker
    lost (a flushed Redis loses the queue's binding, and messages published without it
    would go nowhere)."""
    with app.connection_for_write() as connection:
        queue = app.amqp.queues[settings.celery_queue].bind(connection.default_channel)
        queue.declare()
        try:
            return queue.queue_declare(passive=True).message_count
        except ChannelError:  # Redis keeps no empty queue: nothing waits
            return 0


@signals.worker_init.connect
def _start_runtime(**_) -> None:
    global _runtime
    problem = worker_settings_problem(settings)
    if problem:
        raise SystemExit(f"the worker cannot start: {problem}")
    database_or_exit(settings.database_url)
    configure_logging(settings.log_format, settings.log_level, secrets=secrets_of(settings))
    parts = build_parts(settings, runs_images=True)
    storage_problem = parts.storage.check()
    if storage_problem:  # images wait until it is fixed; say so now, not at the first image
        log.error("storage check at start-up: %s", storage_problem)
    _runtime = WorkerRuntime(parts)
    if settings.metrics_port:
        # Each worker its own port: scrape every worker (docs/operations.md, Metrics).
        _runtime.metrics_server, _ = start_http_server(
            settings.metrics_port, addr=settings.host, registry=parts.metrics.registry
        )
        log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
    _runtime.start()


@signals.worker_ready.connect
def _ctrl_c_is_a_requested_stop(sender, **_) -> None:
    """Celery ends the warm shutdown of a first Ctrl-C with exit status 1, as for a
    failure (`make worker` then reports an error); it is a stop asked for, as SIGTERM
    is, so it exits 0. A second Ctrl-C still forces a cold shutdown. Installed once the
    worker is ready: Celery installs its own handlers as it starts."""
    install_worker_int_handler(sender.controller, exitcode=EX_OK)


@signals.worker_shutting_down.connect
def _stop_waiting(**_) -> None:
    if _runtime is not None:
        _runtime.shutting_down.set()


@signals.worker_shutdown.connect
def _stop_runtime(**_) -> None:
    if _runtime is not None:
        _runtime.close()


@app.task(name=PROCESS_IMAGES)
def process_images() -> None:
    runtime().process_images()


@app.task(name=DELIVER_WEBHOOKS)
def deliver_webhooks() -> None:
    runtime().deliver_webhooks()
