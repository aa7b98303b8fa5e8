"""Outgoing webhooks: an event row per finished request, a delivery row per attempt."""
