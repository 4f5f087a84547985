"""LeNet-5 on Fashion-MNIST with stale synchronous parallel (SSP) training over 4 workers.

Four workers, each with its own replica, read disjoint quarters of every global batch of 128.
Every step of every worker is independently stretched to 4x its compute time with probability
0.1 (the delay-synchronization paper's transient "unrelated load"); with staleness s = 3 a
worker runs up to 3 clocks ahead of the slowest instead of waiting at every step. SSP runs on
Ray: one driver process starts 4 worker actors and a parameter-server shard
(parallel/ray_engine); no launcher:

  python -m pdcnno_jax.main --config=configs/ssp_lenet.py --workdir=workdirs/ssp_lenet

Variants: `--config.parallel.staleness=0` (BSP; the same parameters as synchronous training for
SGD/momentum), `=-1` (ASP); a persistent straggler: `--config.parallel.slowdown=1,1,1,4
--config.parallel.straggler_probability=0`, with batches sized to measured speed:
`--config.parallel.ssp_batch_balancer=proportional`. Ray restarts a killed worker (it resumes
from workdirs/ssp_lenet/ssp_worker_<k>/) or server shard (from its snapshot), and rerunning the
command after the driver died resumes the job.

Expected: about 85% test accuracy after one epoch (`--config.num_epochs=1`: 85.8% on Ray, 4
worker actors on a 2-core CPU, seed 0), the default 3 epochs not measured. The 'ssp' section of report.json gives per-worker clocks and waits, the
staleness histograms, the transport (bytes, transfer seconds, per-clock waits) and test
accuracy against wall time (benchmarks/bench_ssp_training.py compares s = 3 with s = 0).
"""

from pdcnno_jax import config_lib


def get_config():
  """SSP LeNet-5 / Fashion-MNIST config (4 worker actors)."""
  config = config_lib.sibling_config(__file__, 'default')
  config.num_epochs = 3
  config.data.batch_size = 128  # Per worker: 128 // 4 = 32 (equal batches).
  config.optimizer.schedule = 'constant'
  config.parallel.mode = 'ssp'
  config.parallel.num_workers = 4  # Worker actors.
  config.parallel.staleness = 3
  config.parallel.straggler_probability = 0.1
  config.parallel.straggler_factor = 4.0
  config.parallel.ssp_eval_every_steps = 50  # Worker 0's accuracy-vs-time snapshots.
  config.checkpoint_every_steps = 100  # Each worker's own checkpoint (a restart resumes there).
  config.log_every_steps = 100
  return config
