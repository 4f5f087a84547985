"""State, steps, sharding, checkpoints, metrics and reports: what every training loop is built on."""
