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

Expected result (issue #3 bar): >= 4x fewer MACs, >= 2.5x faster inference of the compacted
model, test accuracy within 1 percentage point of the dense LeNet-5 Caffe trained for the same
10 epochs. ``benchmarks/bench_pruning_accuracy.py`` runs the dense baseline and fmp / fmptl /
random side by side and prints the measured figures. Measured so far only with 2 epochs
(``--epochs=2``, 2 CPU cores at load 12-20): fmp 88.1% and fmptl 87.2% test accuracy vs 86.7%
for the dense model, 4.22x fewer MACs (conv2 keeps 7 of 50 maps), inference speed-up at batch
128 between 1.8x and 2.7x (too noisy at that load to settle the 2.5x bar).
"""

from pdcnno_jax import config_lib


def get_config():
  """FMP / LeNet-5 Caffe / Fashion-MNIST config."""
  config = config_lib.sibling_config(__file__, 'default')
  config.model.name = 'lenet5_caffe'
  config.prune.method = 'fmp'
  config.prune.pretrain_fraction = 0.1
  config.prune.pretrain_epochs = 5
  config.prune.selection = 'global_macs'
  config.prune.target_mac_reduction = 4.0
  config.prune.min_channels = 2
  config.prune.compact = True
  config.num_epochs = 10
  return config
