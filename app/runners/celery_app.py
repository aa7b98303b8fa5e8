"""The Celery side every process shares: the app's configuration, the task names, and the
publisher the API uses (CeleryDispatcher).

A message is a hint that work exists, never the work itself: `process_images` means
"claim the next images fairly and process them", so a 200,000-row CSV costs a handful of
messages, batches still take turns, and a lost or duplicated message loses or repeats
nothing (the ledger in the database decides who does what). No result backend: the
database is the truth.
"""

import logging
import time

from celery import Celery

from app.config import Settings

log = logging.getLogger(__name__)

PROCESS_IMAGES = "image_service.process_images"
DELIVER_WEBHOOKS = "image_service.deliver_webhooks"
# Longer than any task can run (one claim batch, bounded by the download and decode time
# limits): Redis re-delivers an unacknowledged message only after this long.
REDIS_VISIBILITY_TIMEOUT_SECONDS = 3600
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}
STORAGE_CHECK_SECONDS = 5.0


def worker_settings_problem(settings: Settings) -> str | None:
    """Why a Celery worker must not start with these settings, if it must not: the API
    would never publish to it (TASK_BACKEND=inprocess does the work in the web process).
    SQLite with celery is refused by the settings themselves."""
    if settings.task_backend != "celery":
        return (
            f"a Celery worker needs TASK_BACKEND=celery (it is {settings.task_backend}: the web "
            "process does the work itself), with a database every worker reaches, such as "
            "PostgreSQL (DATABASE_URL=postgresql+psycopg2://...)"
        )
    return None


def make_celery(settings: Settings) -> Celery:
    celery = Celery("image_service", broker=settings.celery_broker_url, set_as_current=False)
    celery.conf.update(
        task_default_queue=settings.celery_queue,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        # A message is acknowledged only once its task has run, and handed to another
        # worker if the one running it dies; each worker takes one message at a time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_SECONDS},
        broker_connection_retry_on_startup=True,
        # Threads, not forked processes: decoding already runs in the image worker
        # processes (app/pipeline/processes.py), which survive a decoder crash. One task
        # at a time: a task keeps its images flowing by claiming again as they finish
        # (app/tasks.py), and two such loops in one worker only split its claims and its
        # transactions (tiny images: 0.87 of the in-process rate with two, 0.95 with one).
        worker_pool="threads",
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return celery


class CeleryDispatcher:
    """The runner of an API process when TASK_BACKEND=celery: it processes nothing and
    publishes hints."""

    def __init__(self, parts) -> None:
        self.celery = make_celery(parts.settings)
        self.storage = parts.storage
        self._storage_problem: str | None = None
        self._storage_checked_at = 0.0

    def start(self) -> None:
        pass

    def dispatch(self, request_pk: int) -> None:
        self._publish(PROCESS_IMAGES)

    def notify_webhooks(self) -> None:
        self._publish(DELIVER_WEBHOOKS)

    def cancel(self, request_id: str) -> None:
        """Nothing to tell: the workers claim batches of at most twice their concurrency
        and run what they claimed; the ledger gives them no more of a cancelled request."""

    def transient_failure(self) -> str | None:
        """The workers report nothing to the API, so the API asks the storage itself."""
        if time.monotonic() - self._storage_checked_at > STORAGE_CHECK_SECONDS:
            self._storage_problem = self.storage.check()
            self._storage_checked_at = time.monotonic()
        return f"storage_error: {self._storage_problem}" if self._storage_problem else None

    def stop(self) -> None:
        self.celery.close()

    def _publish(self, task_name: str) -> None:
        publish(self.celery, task_name)


def publish(celery: Celery, task_name: str) -> None:
    """Send a hint; one that cannot be sent is logged, not raised: the workers' sweep
    finds work no message announced."""
    try:
        celery.send_task(task_name, retry=True, retry_policy=PUBLISH_RETRY_POLICY)
    except Exception as exc:
        log.warning("could not publish %s (%s); the workers' sweep will find the work", task_name, exc)
