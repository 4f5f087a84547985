"""pdcnno_jax: compressed, parallel CNN training in JAX."""
