"""Data in: a shop's files or the built-in demo shop as canonical tables.

Readers and format adapters, the demo shop, user shards, and the Prefect tasks that load,
validate and split a run's data.
"""
