"""Ray as the engine of the MapReduce and SSP modes (``config.parallel.engine = 'ray'``)."""
