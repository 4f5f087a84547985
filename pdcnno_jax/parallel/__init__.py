"""Training modes (sync, MapReduce, SSP) and their parallel machinery (balancers, collectives)."""
