"""The ledger of image work (ledger.py) and the order it is handed out in (turns.py)."""

from app.queue.ledger import ImageLedger

__all__ = ["ImageLedger"]
