"""Cluster performance model: predicted training time and speed-up on N nodes.

`engine` (discrete events, processor sharing) and `model` (sync, MapReduce, SSP) are pure
Python/NumPy; `calibration` measures their inputs on this machine and validates them against
real local runs (`runs`, the only module that imports JAX); `predict` draws the papers'
speed-up curves; `cli` is `python -m pdcnno_jax.perfmodel`.
"""
