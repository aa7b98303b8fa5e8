"""Outbound HTTP to addresses the caller does not control.

urls.py      the URL grammar (CSV cells, image sources, webhook targets)
guard.py     the address policy, guarded connections and the wall-clock deadline
failures.py  what can go wrong before or while connecting
"""
