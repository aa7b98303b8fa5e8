"""Runners: what takes committed work units and drives them through the pipeline."""

from collections.abc import Sequence
from typing import Protocol


class Runner(Protocol):
    """The seam between the API and whatever executes work (threads here, a broker later)."""

    def start(self) -> None: ...

    def dispatch(self, image_ids: Sequence[int]) -> None:
        """Hand over ids of images whose rows are committed and pending."""

    def notify_webhooks(self) -> None: ...

    def stop(self) -> None: ...
