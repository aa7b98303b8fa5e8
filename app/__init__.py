"""Batch image service: CSV of products in, 50%-quality JPEGs and a result CSV out."""
