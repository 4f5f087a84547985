"""Training loop, state, checkpoints, metrics and reports."""
