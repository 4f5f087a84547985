"""Optimizers: optax factory and CGMSE."""
