"""In-memory mode: whole splits in host memory, batch order a pure function of (seed, epoch, step).

Each split is read once into uint8 numpy arrays (holdout, resize and normalisation
statistics computed here). Every process computes the same global permutation of an epoch
(`epoch_permutation`); global batch `step` is the next `global_batch_size` indices of it,
and a process gathers only the rows its devices hold (`BatchLayout.local_rows`). So 1 and
N processes see identical global batches, and `start_step` resumes the exact sequence.

References:
  PDCNNO holds out 6,000 SVHN training images for validation
  (`config.data.validation_holdout`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pdcnno_jax.data import datasets
from pdcnno_jax.data import sources
from pdcnno_jax.data.layout import BatchLayout
from pdcnno_jax.data.types import Dataset, HostBatch, HostSplit

# Independent random streams derived from the user's seed (SeedSequence keys).
TRAIN_ORDER_STREAM = 0x7472616E  # 'tran'
_HOLDOUT_STREAM = 0x686F6C64  # 'hold'
_STATS_CHUNK = 8192  # Images per chunk when computing mean/std.
_RESIZE_CHUNK = 2048  # Images per chunk when resizing in-memory splits.


def resize_host(images: np.ndarray, size: int) -> np.ndarray:
  """Resizes an in-memory uint8 split to size x size, chunk by chunk."""
  if size <= 0 or images.shape[1:3] == (size, size):
    return images
  return np.concatenate([
      sources.resize_square(images[i:i + _RESIZE_CHUNK], size).numpy()
      for i in range(0, len(images), _RESIZE_CHUNK)
  ]) if len(images) else np.zeros((0, size, size, images.shape[-1]), np.uint8)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], ...]:
  """Per-channel mean and std of [0, 1]-scaled uint8 images (chunked, exact)."""
  channels = images.shape[-1]
  total = np.zeros(channels)
  total_sq = np.zeros(channels)
  for i in range(0, len(images), _STATS_CHUNK):
    chunk = images[i:i + _STATS_CHUNK].reshape(-1, channels).astype(np.float64)
    total += chunk.sum(axis=0)
    total_sq += np.square(chunk).sum(axis=0)
  count = max(1, images.size // channels)
  mean = total / count / 255.0
  var = np.maximum(total_sq / count / 255.0**2 - mean**2, 0.0)
  return tuple(float(m) for m in mean), tuple(float(s) for s in np.sqrt(var))


def holdout_split(
    train: HostSplit, holdout: int, seed: int
) -> tuple[HostSplit, HostSplit]:
  """Splits `holdout` random examples (seeded) off `train`, keeping order."""
  n = len(train.labels)
  if holdout >= n:
    raise ValueError(
        f'config.data.validation_holdout={holdout} must be smaller than the '
        f'{n} training examples.'
    )
  order = np.random.default_rng([seed, _HOLDOUT_STREAM]).permutation(n)
  val_idx = np.sort(order[:holdout])
  train_idx = np.sort(order[holdout:])
  take = lambda idx: HostSplit(train.images[idx], train.labels[idx])
  return take(train_idx), take(val_idx)


def load(
    spec: datasets.DatasetSpec,
    builder: Any,
    data_dir: str,
    *,
    holdout: int,
    image_size: int,
    seed: int,
) -> Dataset:
  """Reads every split into host memory (holdout, resize, statistics)."""
  train = sources.read_split(builder, data_dir, spec.train_split)
  host_splits = {'train': train}
  if holdout > 0:
    host_splits['train'], host_splits['validation'] = holdout_split(
        train, holdout, seed
    )
  host_splits['test'] = sources.read_split(builder, data_dir, spec.test_split)
  host_splits = {
      split: HostSplit(resize_host(s.images, image_size), s.labels)
      for split, s in host_splits.items()
  }
  if spec.mean is not None:
    mean, std = spec.mean, spec.std
  else:
    mean, std = channel_stats(host_splits['train'].images)
  return Dataset(
      name=spec.name,
      num_classes=spec.num_classes,
      image_shape=tuple(host_splits['train'].images.shape[1:]),
      num_examples={k: len(v.labels) for k, v in host_splits.items()},
      mean=tuple(mean),
      std=tuple(std),
      host_splits=host_splits,
  )


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The global training order of `epoch`: a pure function of (seed, epoch).

  Args:
    num_examples: size of the training split.
    seed: run seed (>= 0).
    epoch: epoch index (>= 0).

  Returns:
    A permutation of range(num_examples), identical on every process.
  """
  if seed < 0 or epoch < 0:
    raise ValueError(f'seed and epoch must be >= 0, got {seed}, {epoch}.')
  rng = np.random.default_rng([seed, epoch, TRAIN_ORDER_STREAM])
  return rng.permutation(num_examples)


def train_host_batches(
    split: HostSplit,
    layout: BatchLayout,
    seed: int,
    epoch: int,
    start_step: int,
    steps: int,
) -> Iterator[HostBatch]:
  """This process's rows of training batches `start_step` .. `steps - 1` of `epoch`."""
  order = epoch_permutation(len(split.labels), seed, epoch)
  for step in range(start_step, steps):
    rows = order[step * layout.global_batch_size + layout.local_rows]
    yield {'image': split.images[rows], 'label': split.labels[rows]}


def eval_host_batches(
    split: HostSplit, layout: BatchLayout, num_batches: int
) -> Iterator[HostBatch]:
  """This process's rows of every evaluation batch, in order, padded with mask 0."""
  n = len(split.labels)
  for b in range(num_batches):
    rows = b * layout.global_batch_size + layout.local_rows
    valid = rows < n
    rows = np.where(valid, rows, 0)
    images = split.images[rows]
    images[~valid] = 0
    labels = np.where(valid, split.labels[rows], 0).astype(np.int32)
    yield {'image': images, 'label': labels, 'mask': valid.astype(np.float32)}
