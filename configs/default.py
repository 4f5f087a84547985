"""Default experiment: LeNet-5 on Fashion-MNIST, synchronous data parallel.

Command (after `bash scripts/quickstart.sh` has set up `.venv` and imported the data):

  python -m pdcnno_jax.main --config=configs/default.py --workdir=workdirs/default

Expected result: ~90.7% test accuracy after 10 epochs (2-12 min on 2 CPU cores, by load).
Recipe: SGD, Nesterov momentum 0.9, lr 0.05 with a 1-epoch linear warm-up, then cosine decay.
Measured by `python benchmarks/sweep_recipes.py --table=default` (seeds 0-4, 10 epochs):
test accuracy 90.57 / 90.60 / 90.90 / 90.75 / 90.79% (median 90.75%, worst 90.57%, spread
0.33 pp), no dead conv map on 1000 test examples; `--table=default_screen` (seeds 5-9, 2 epochs):
88.99 / 88.76 / 88.87 / 89.06 / 88.70%, none collapsed, no dead map.
Without the warm-up (lr 0.05 from step 0) seed 0 reaches 90.03% with 4 of conv2's 16 maps
dead, and on MNIST seed 0 collapses to chance (loss ln 10) from the first epoch.

Every other config in configs/ starts from this one and overrides what differs, so the keys
below are the complete reference; an unknown `--config.key=value` is an error.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default LeNet-5 / Fashion-MNIST config."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_epochs = 10
  config.max_steps = 0  # >0: stop every training phase after this many steps (smoke runs).
  config.log_every_steps = 100
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  # A checkpoint is refused (the run stops, naming the last good one) when the loss of the last
  # log window is above this x the best seen, or the global parameter norm above this x that
  # of the last good checkpoint: far beyond a healthy run (this config: windows at most 1.05x
  # the best loss before them, final norm 1.42x the initial one), met at once by a diverging
  # one. 0 disables either check (finite parameters are always required). The last good
  # checkpoint is never rotated out.
  config.checkpoint_max_loss_ratio = 100.0
  config.checkpoint_max_norm_ratio = 100.0

  # --- data (pdcnno_jax/data) ---
  config.data = ml_collections.ConfigDict()
  config.data.name = 'fashion_mnist'  # mnist | fashion_mnist | emnist/digits | svhn_cropped | imagenet2012
  config.data.data_dir = 'data/tfds'  # TFDS data_dir; `python -m pdcnno_jax.data.idx_import` fills it offline.
  config.data.download = False  # True: TFDS downloads and prepares a missing data set (Colab).
  config.data.batch_size = 128  # Global batch, split over every device of every process.
  config.data.eval_batch_size = 1000
  config.data.validation_holdout = 0  # Training images held out for validation (svhn: 6000).
  config.data.image_size = 0  # 0: native size; >0: resize (imagenet2012: 224).
  config.data.imagenet_num_classes = 10  # imagenet2012: use the first N classes.
  config.data.in_memory = True  # Small data sets live in host memory (exact, resumable order).

  # --- model (pdcnno_jax/models) ---
  config.model = ml_collections.ConfigDict()
  # lenet5 | lenet5_caffe | vgg11 | vgg13 | vgg16 | vgg19 | resnet20 | resnet32 | resnet44 |
  # resnet56 | resnet110
  config.model.name = 'lenet5'
  config.model.width_multiplier = 1.0
  config.model.batch_norm = False  # VGG only (ResNet always uses BatchNorm).
  config.model.dropout_rate = 0.0
  # Convolution gradients: 'lax' (JAX's rules), 'loop_friendly' (models/conv.py: 2.5-8x faster
  # inside while/cond on XLA:CPU, 13-22% slower outside), 'auto' (loop_friendly for cgmse/lbfgs).
  config.model.conv_gradients = 'auto'  # auto | lax | loop_friendly

  # --- optimizer (pdcnno_jax/optim) ---
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'momentum'  # Any optax alias (sgd, momentum, adam, adamw, ...) or cgmse.
  config.optimizer.learning_rate = 0.05
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 0.0
  config.optimizer.schedule = 'cosine'  # constant | cosine
  # Linear warm-up from 0: without it lr 0.05 kills every ReLU in the first steps for some
  # seeds (loss stuck at ln 10); measured by benchmarks/sweep_recipes.py (module docstring).
  config.optimizer.warmup_epochs = 1.0
  config.optimizer.grad_clip_norm = 0.0  # 0 disables clipping.
  # CGMSE (PDCNNO), used when name == 'cgmse'.
  config.optimizer.mode = 'minibatch'  # full_batch | minibatch
  config.optimizer.cg_t = 0.1
  config.optimizer.max_linesearch_steps = 20
  config.optimizer.full_batch_iterations = 50  # CG iterations per data shard in full_batch mode.
  # full_batch mode evaluates the loss in chunks of at most this many examples (rematerialised,
  # so memory holds one chunk's activations); 0: the whole split in one piece.
  config.optimizer.full_batch_chunk_size = 4096

  # --- init (pdcnno_jax/init) ---
  config.init = ml_collections.ConfigDict()
  config.init.method = 'he'  # he | ifas | gso | lsuv
  config.init.swarm_size = 16
  config.init.generations = 10
  config.init.sgd_steps = 5  # k SGD steps per fitness evaluation.
  config.init.sgd_learning_rate = 0.05
  config.init.search_space = 'layer_scales'  # layer_scales | subspace
  config.init.subspace_dim = 16
  config.init.log_scale_range = 1.0  # Box [-r, r] on per-layer log-scales.
  config.init.swarm_chunk_size = 0  # Candidates evaluated at once (vmapped); 0: whole swarm.

  # --- prune (pdcnno_jax/pruning) ---
  config.prune = ml_collections.ConfigDict()
  config.prune.method = 'none'  # none | fmp | fmptl | random | l1
  config.prune.pretrain_fraction = 0.1
  config.prune.pretrain_epochs = 5
  config.prune.score_examples = 1024
  config.prune.norm_order = 1.0
  config.prune.selection = 'threshold'  # threshold | layer_ratio | global_macs | latency
  config.prune.threshold = 0.5  # Prune maps scoring below threshold * layer mean.
  config.prune.ratio = 0.5  # layer_ratio: fraction removed per layer.
  config.prune.target_mac_reduction = 4.0  # global_macs: dense MACs / pruned MACs.
  config.prune.min_channels = 2
  config.prune.iterations = 1  # >1: prune, fine-tune, repeat.
  config.prune.finetune_epochs = 0  # Between iterative rounds (the last round trains num_epochs).
  config.prune.compact = True  # Rebuild a narrower dense model after pruning.
  # latency: greedy removal on candidate networks measured end to end, until the speed-up.
  config.prune.target_speedup = 2.0  # latency: dense / compacted latency.
  config.prune.latency_target = 'inference'  # latency: inference | train_step
  # Measurement cache ('' = $XDG_CACHE_HOME or ~/.cache, then pdcnno_jax/latency).
  config.prune.latency_cache_dir = ''
  # Timed calls per median (end to end); 0 skips the masked vs compacted timing.
  config.prune.latency_repeats = 10
  # latency: candidate networks measured at most (cached ones are free); each search step
  # measures one candidate per prunable layer.
  config.prune.latency_measurements = 64
  config.prune.latency_step = 0.125  # latency: fraction of a layer's width cut per candidate.
  # latency: fresh measurements of the chosen network that replace its (best-of-many, so
  # optimistic) search measurement; the choice is made again on the confirmed figures.
  config.prune.latency_confirmations = 2

  # --- diagnostics (pdcnno_jax/diagnostics) ---
  config.diagnostics = ml_collections.ConfigDict()
  # Stop with TrainingCollapseError when one whole epoch after the warm-up keeps the training
  # loss within collapse_tolerance * ln(C) of ln(C) at accuracy <= collapse_chance_factor / C.
  config.diagnostics.collapse_check = True
  config.diagnostics.collapse_tolerance = 0.02
  config.diagnostics.collapse_chance_factor = 1.5
  # Dead maps (zero on every example) and near-dead maps (mean activation < near_dead_ratio x
  # the layer's mean) of every conv layer, on the first dead_map_examples held-out examples
  # at the end of training and before pruning scores them; 0 disables.
  config.diagnostics.dead_map_examples = 1000
  config.diagnostics.near_dead_ratio = 1e-6

  # --- parallel (pdcnno_jax/parallel) ---
  config.parallel = ml_collections.ConfigDict()
  config.parallel.mode = 'sync'  # sync | mapreduce | ssp
  # How MapReduce runs: ray (worker actors started by the one driver process) | jax (one
  # process per worker joined by jax.distributed, started by launch/local.py). SSP: ray only.
  config.parallel.engine = 'ray'  # ray | jax
  config.parallel.num_workers = 2  # engine=ray: worker actors the driver starts.
  config.parallel.ps_shards = 1  # engine=ray: SSP server shards; MapReduce Reduce leaf groups (split by bytes).
  config.parallel.ps_snapshot_every_clocks = 10  # engine=ray, SSP: PS snapshot every N clocks; 0: never.
  config.parallel.ray_worker_cpu_devices = 1  # engine=ray: CPU devices of each worker's JAX.
  config.parallel.ray_address = ''  # '' = embedded local cluster on 127.0.0.1; 'auto' or host:port.
  config.parallel.gpus_per_worker = 0.0  # engine=ray: GPUs per worker actor on GPU hosts.
  config.parallel.slowdown = ''  # Per-process slowdown factors, e.g. '1,1,2,4' (heterogeneous workers).
  config.parallel.straggler_probability = 0.0  # Transient 'unrelated load': per-step chance of slowdown.
  config.parallel.straggler_factor = 4.0
  # MapReduce (PDCNNO / MR-FPDCNN).
  config.parallel.balancer = 'dlbpce'  # equal | proportional | lbrla | dlbpce
  config.parallel.num_blocks = 64
  config.parallel.rounds_per_epoch = 1
  config.parallel.lbrla_ceiling = 0.97
  config.parallel.lbrla_weights = ''  # 'load=0.5,disk=0.1,accelerator=0.1,memory=0.1,network=0.1,node=0.1' ('' = these).
  config.parallel.dlbpce_entropy_target = 0.999  # H_b (0.99 costs ~18% makespan: bench_balancers).
  # SSP (delay synchronization).
  config.parallel.staleness = 2  # -1: infinite (ASP); 0: BSP.
  config.parallel.ssp_timeout_s = 120.0  # A PS read or push waiting longer is an error.
  # s >= 1 and ASP, where a worker reads through calls (ssp_shared_memory off, or shards on
  # another node): read clock c+1's parameters while clock c trains. It hides the Ray round
  # trip but the view lacks the other workers' clock-c updates (bench_ssp_training
  # --read_paths=shared,call,prefetch compares the three).
  config.parallel.ssp_prefetch = False
  # Workers on the node of every shard push through shared-memory outboxes and read the
  # shards' shared-memory publications: no Ray call in a clock (README, "SSP on Ray").
  config.parallel.ssp_shared_memory = True
  # JAX's coordination service (jax.distributed jobs): a process without heartbeats this long
  # is dead to the runtime (generous, so that a busy host is not declared dead).
  config.parallel.runtime_heartbeat_timeout_s = 100.0
  config.parallel.ssp_batch_balancer = 'equal'  # equal | proportional (batch ~ speed after warm-up).
  config.parallel.ssp_warmup_steps = 20  # Clocks over which each worker's speed is measured.
  config.parallel.ssp_eval_every_steps = 0  # Worker 0 snapshot for accuracy vs time; 0: per eval epoch.
  return config
