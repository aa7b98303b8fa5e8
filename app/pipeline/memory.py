"""Admission of image decodes against a memory budget per worker process.

Each decode reserves its estimated peak (app.pipeline.compress.peak_memory_bytes) before
any pixel is decoded and releases it when its pixels are gone, so concurrent large images
wait for each other instead of adding up past the budget.
"""

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from app.pipeline.failures import OverMemoryBudget

MIB = 1024 * 1024


class MemoryBudget:
    """A weighted semaphore in bytes, admitting in arrival order."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.reserved_bytes = 0
        self.peak_reserved_bytes = 0  # the most reserved at once, for tests and logs
        self._changed = threading.Condition()
        # First come, first admitted: a large image at the head is not overtaken by a
        # stream of small ones that would each fit, so it cannot starve.
        self._queue: deque[object] = deque()

    @contextmanager
    def reserve(self, cost_bytes: int) -> Iterator[None]:
        if cost_bytes > self.limit_bytes:
            raise OverMemoryBudget(
                f"decoding this image needs about {cost_bytes / MIB:,.0f} MB; an image process's "
                f"memory budget (IMAGE_MEMORY_MB, once WORKER_MEMORY_MB) is {self.limit_bytes / MIB:,.0f} MB"
            )
        with self._changed:
            if self._queue or self.reserved_bytes + cost_bytes > self.limit_bytes:
                self._wait_for_turn(cost_bytes)
            self.reserved_bytes += cost_bytes
            self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        try:
            yield
        finally:
            with self._changed:
                self.reserved_bytes -= cost_bytes
                self._changed.notify_all()

    def _wait_for_turn(self, cost_bytes: int) -> None:
        ticket = object()
        self._queue.append(ticket)
        try:
            self._changed.wait_for(
                lambda: self._queue[0] is ticket and self.reserved_bytes + cost_bytes <= self.limit_bytes
            )
        finally:
            self._queue.remove(ticket)
            self._changed.notify_all()  # the next in line may fit as well
