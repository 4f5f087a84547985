"""Stale synchronous parallel (SSP) training: the mode and what its Ray engine shares.

Modules: ``training`` (the SSP training mode: validation, then the job on Ray through
``parallel/ray_engine/ssp_driver``), ``protocol`` (the staleness bound), ``steps`` (the worker
step and the accuracy-vs-time evaluation), ``serialization`` (pytrees <-> bytes without
pickle), ``worker_checkpoints`` (each worker's own snapshots) and ``report`` (report.json's
``ssp`` figures).

References:
  DESIGN.md, "SSP"; papers/delay_sync_parallel.txt; Ho et al., NIPS 2013.
"""
