"""Input pipelines: TFDS loading, IDX import, sharding onto the mesh."""
