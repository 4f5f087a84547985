"""Stale synchronous parallel training over a key-value store."""
