"""Runners: where the task bodies (app/tasks.py) run.

inprocess.py       threads in the web process, the database as the queue (default)
celery_worker.py   Celery workers on RabbitMQ or Redis; the API only publishes hints
processes.py       the image worker processes either runner hands stages to
"""

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from app.composition import Parts


class Runner(Protocol):
    """The seam between the API and whatever executes work."""

    def start(self) -> None: ...

    def dispatch(self, request_pk: int) -> None:
        """The request's images are committed and pending: see that they get processed.
        A message is only a hint that work exists; the ledger decides who does what."""

    def notify_webhooks(self) -> None: ...

    def cancel(self, request_id: str) -> None:
        """The request was cancelled: images of it this runner has claimed but not
        started are recorded as cancelled instead of being run (the ledger already
        cancelled those it had not handed out)."""

    def transient_failure(self) -> str | None:
        """What made the latest image wait for a retry (storage full or away), until an
        image succeeds again; None when the stages work."""

    def stop(self) -> None: ...


def build_runner(parts: "Parts") -> Runner:
    if parts.settings.task_backend == "celery":
        from app.runners.celery_app import CeleryDispatcher

        return CeleryDispatcher(parts)
    from app.runners.inprocess import InProcessRunner

    return InProcessRunner.from_parts(parts)
