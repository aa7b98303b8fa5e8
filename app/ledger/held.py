"""Claims a process holds: the units it claimed and has not recorded yet, and the heartbeat
that renews their leases while they run."""

import logging
import threading
from collections.abc import Sequence

from app.ledger.image_ledger import ImageLedger
from app.ledger.units import WorkUnit

log = logging.getLogger(__name__)


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


def renew_leases_until(
    stopping: threading.Event, held: HeldClaims, ledger: ImageLedger, every: float
) -> None:
    """The heartbeat: renew the leases of the held claims every `every` seconds."""
    while not stopping.wait(every):
        try:
            held.renew(ledger)
        except Exception:
            log.exception("renewing leases failed; trying again")
