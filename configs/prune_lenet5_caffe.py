"""FMP pruning of LeNet-5 (Caffe variant, conv widths 20-50) on Fashion-MNIST to 4x fewer MACs.

PDCNNO's compression stage: pre-train the dense model on a random 10% of the training set for
five epochs (one left it at ~18% accuracy, so every scorer ranked untrained features), score every feature map by its mean L1 norm (FMP), remove the lowest-scoring maps
until the network needs 4x fewer multiply-accumulates (global budget, every layer keeps at
least two maps, the classifier is never pruned), compact it into a narrower dense network and
train that for ``num_epochs`` epochs.

  python -m pdcnno_jax.main --config=configs/prune_lenet5_caffe.py --workdir=workdirs/prune_fmp

FMPTL (MR-FPDCNN's Taylor-loss scores) instead of FMP, or random scores as the baseline:

  python -m pdcnno_jax.main --config=configs/prune_lenet5_caffe.py --workdir=workdirs/prune_fmptl \
      --config.prune.method=fmptl

Expected result (issue #3 bars), measured with ``benchmarks/bench_pruning_accuracy.py
--epochs=10`` on 2 idle CPU cores: the dense LeNet-5 Caffe reaches 89.23% test accuracy in 10
epochs; FMP keeps conv1 20 / conv2 7 maps (4.22x fewer MACs, 6.8x fewer parameters) and reaches
90.77% after 10 epochs of fine-tuning (+1.54 pp); FMPTL chose the same maps (90.77%); random
scores at 4.01x fewer MACs: 90.46%. The pre-trained net was at 82.68% both before and after
FMP / FMPTL pruning (the 43 removed conv2 maps changed no prediction; random pruning: 22.45%). The compacted model's inference is 1.6x-2.5x faster than the
masked one depending on batch size and load, short of 2.5x: XLA's CPU convolutions do not
scale with channel count for these tiny layers (``benchmarks/bench_conv_widths.py``).
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
