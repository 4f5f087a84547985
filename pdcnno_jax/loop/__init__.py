"""The shared loop layer: what every training mode (sync, mapreduce, ssp) uses.

Layering (imports point down only)::

  experiment (stages, mode dispatch, report)
    -> modes: parallel/sync.py, parallel/mapreduce.py, parallel/ssp/training.py
      -> loop/ (this package): context, evaluation, checks, periodic, windows, placement,
         batching, faults, saving
        -> train/ (state, steps, sharding, checkpointing, metrics, report) -> data, models, optim

A mode never imports another mode or the experiment layer; nothing in this package imports a
mode.
"""
