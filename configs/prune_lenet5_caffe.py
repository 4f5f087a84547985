"""FMP pruning of LeNet-5 (Caffe variant, conv widths 20-50) on Fashion-MNIST to 4x fewer MACs.

PDCNNO's compression stage: pre-train the dense model on a random 10% of the training set for
five epochs, score every feature map by its mean L1 norm (FMP), remove the lowest-scoring maps
until the network needs 4x fewer multiply-accumulates (global budget, every layer keeps at
least two maps, the classifier is never pruned), compact it into a narrower dense network and
train that for ``num_epochs`` epochs.

  python -m pdcnno_jax.main --config=configs/prune_lenet5_caffe.py --workdir=workdirs/prune_fmp

FMPTL (MR-FPDCNN's Taylor-loss scores) instead of FMP, or the l1 / random baselines:

  python -m pdcnno_jax.main --config=configs/prune_lenet5_caffe.py --workdir=workdirs/prune_fmptl \
      --config.prune.method=fmptl

Recipe: lr 0.02 with a 1-epoch warm-up (pre-training: 1 epoch of the subset, 47 steps). With
default.py's lr 0.05 and no warm-up the pre-training left 43 of conv2's 50 maps dead, so FMP
removed only dead maps and pruning changed no prediction. Measured with
``benchmarks/sweep_recipes.py --table=caffe_pretrain`` (the pre-training alone): seeds 0-2
reach 86.02 / 86.18 / 86.31% test accuracy (seed 0: 82.68% before) with no dead map in conv1
or conv2 on 1000 test examples. The dense model under this recipe (``--config.prune.method=none``,
10 epochs): seeds 0-2 reach 91.73 / 91.87 / 91.48% test accuracy (median 91.73%), with no dead map
in conv1 or conv2. The pruning comparison under this recipe
(``benchmarks/bench_pruning_accuracy.py --seeds=0,1,2``: fmp, fmptl, l1, random, and a dense
reference trained for the same 10.5 epochs of data) is not measured yet; the figures
measured before it (FMP 90.77% after fine-tuning) came from a pre-trained model whose pruned
maps were dead and no longer stand. The compacted model's inference is 1.6x-2.5x faster than
the masked one depending on batch size and load: XLA's CPU convolutions do not scale with
channel count for these tiny layers (``benchmarks/bench_conv_widths.py``).
"""

from pdcnno_jax import config_lib


def get_config():
  """FMP / LeNet-5 Caffe / Fashion-MNIST config."""
  config = config_lib.sibling_config(__file__, 'default')
  config.model.name = 'lenet5_caffe'
  # The 20-50 conv widths and 500 hidden units need a smaller step than default.py's 0.05:
  # lr 0.05 left 43 of conv2's 50 maps dead after the pre-training.
  config.optimizer.learning_rate = 0.02
  config.optimizer.warmup_epochs = 1.0
  config.prune.method = 'fmp'
  config.prune.pretrain_fraction = 0.1
  config.prune.pretrain_epochs = 5
  config.prune.selection = 'global_macs'
  config.prune.target_mac_reduction = 4.0
  config.prune.min_channels = 2
  config.prune.compact = True
  config.num_epochs = 10
  return config
