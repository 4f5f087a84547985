"""Ray as the engine of the MapReduce and SSP modes (``config.parallel.engine = 'ray'``).

Modules: ``runtime`` (start or join the cluster), ``transport`` (bytes and seconds moved),
``ps`` (an SSP parameter-server shard actor), ``ps_client`` (a worker's push-and-read),
``ssp_worker`` (an SSP worker actor with its own JAX), ``ssp_driver`` (the SSP job),
``map_worker`` (a MapReduce Map actor) and ``mapreduce`` (the MapReduce rounds: Map on the
actors, a sample-weighted Reduce by leaf groups on the driver).
"""
