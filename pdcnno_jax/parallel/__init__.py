"""Parallel training: MapReduce with load balancers and stale synchronous parallel."""
