"""Flax NNX models with feature-map masks."""
