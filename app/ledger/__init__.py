"""The ledger of image work: who may process which image, and what became of it.

units.py         WorkUnit and ImageOutcome (a leaf: no database, Pillow or network)
image_ledger.py  claims, leases, outcomes, cancellation, finishing a request exactly once
turns.py         the order requests take turns in (fairness)
copies.py        the rows naming the same URL, recorded with the one processed
"""
