"""Runners: what takes committed work units and drives them through the pipeline."""

from typing import Protocol


class Runner(Protocol):
    """The seam between the API and whatever executes work (threads here, a broker later)."""

    def start(self) -> None: ...

    def dispatch(self, request_pk: int) -> None:
        """The request's images are committed and pending: see that they get processed.
        A broker-based runner sends one message per image id (each message is one
        pipeline.process_image call); the in-process runner reads them from the database."""

    def notify_webhooks(self) -> None: ...

    def transient_failure(self) -> str | None:
        """What made the latest image wait for a retry (storage full or away), until an
        image succeeds again; None when the stages work."""

    def stop(self) -> None: ...
