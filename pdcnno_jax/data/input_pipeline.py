"""Input pipeline: TFDS -> per-process rows -> global, sharded `jax.Array`s.

The public entry of the data layer. `load_dataset` reads `config.data` into a `Dataset`;
`train_batches` / `eval_batches` yield global batches, dispatching on the data set:

* in memory (`in_memory.py`: mnist, fashion_mnist, emnist/digits, svhn_cropped): the
  training order is a pure function of (seed, epoch, step), identical for any number of
  processes, and `start_step` resumes it exactly;
* streaming (`streaming.py`: imagenet2012, or `config.data.in_memory=False`): a tf.data
  pipeline per process over its own share of the files.

Batches travel as uint8 (`normalize` runs inside the jitted step) and are assembled with
`jax.make_array_from_process_local_data` (`layout.py`); a background thread (`prefetch.py`)
prepares them `prefetch` batches ahead so host work overlaps device compute. TFDS access
and the errors for missing or corrupt data live in `sources.py`.

References:
  DESIGN.md, "Data flow". PDCNNO holds out 6,000 SVHN training images for validation
  (`config.data.validation_holdout`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections

from pdcnno_jax.data import datasets
from pdcnno_jax.data import in_memory
from pdcnno_jax.data import prefetch as prefetch_lib
from pdcnno_jax.data import sources
from pdcnno_jax.data import streaming
from pdcnno_jax.data.layout import BatchLayout
from pdcnno_jax.data.types import Batch, Dataset, HostBatch, HostSplit, StreamSource

epoch_permutation = in_memory.epoch_permutation

__all__ = [
    'Batch', 'Dataset', 'HostBatch', 'HostSplit', 'StreamSource', 'epoch_permutation',
    'eval_batches', 'load_dataset', 'normalize', 'steps_per_epoch', 'train_batches',
]


def load_dataset(
    data_config: ml_collections.ConfigDict, *, seed: int
) -> Dataset:
  """Loads `data_config.name` from TFDS `data_config.data_dir`.

  Args:
    data_config: the `config.data` section (name, data_dir, download,
      validation_holdout, image_size, imagenet_num_classes, in_memory; a
      negative validation_holdout selects the papers' holdout for the data
      set, e.g. 6000 for svhn_cropped).
    seed: selects which training examples form the validation holdout.

  Returns:
    A `Dataset` with splits 'train', 'validation' (if held out) and 'test'.
    In memory if `data_config.in_memory` and the data set allows it
    (imagenet2012 always streams).

  Raises:
    ValueError: unknown data set or inconsistent settings.
    datasets.DatasetNotFoundError: the data set is not prepared in data_dir
      (and `data_config.download` is False); the message gives the command that
      prepares it.
    datasets.DatasetCorruptError: a record file is truncated or corrupt; the
      message names it and the command that rebuilds the data set.
  """
  if seed < 0:
    raise ValueError(f'seed must be >= 0, got {seed}.')
  spec = datasets.get_spec(data_config.name)
  data_dir = str(data_config.data_dir)
  holdout = int(data_config.validation_holdout)
  if holdout < 0:
    holdout = spec.paper_validation_holdout
  image_size = int(data_config.image_size)
  if image_size < 0:
    raise ValueError(f'config.data.image_size must be >= 0, got {image_size}.')
  if spec.image_shape is None and image_size == 0:
    raise ValueError(
        f'{spec.name} images vary in size: set config.data.image_size > 0 '
        '(e.g. 224).'
    )
  num_classes = spec.num_classes
  if spec.name == 'imagenet2012':
    num_classes = int(data_config.imagenet_num_classes)
    if not 1 <= num_classes <= spec.num_classes:
      raise ValueError(
          'config.data.imagenet_num_classes must be in [1, '
          f'{spec.num_classes}], got {num_classes}.'
      )
  sources.hide_accelerators_from_tf()
  builder = sources.get_builder(spec, data_dir, download=bool(data_config.download))
  if data_config.in_memory and spec.in_memory:
    return in_memory.load(
        spec, builder, data_dir, holdout=holdout, image_size=image_size,
        seed=seed,
    )
  return streaming.load(
      spec, builder, data_dir, holdout=holdout, image_size=image_size,
      num_classes=num_classes,
  )


def normalize(images: jax.Array, dataset: Dataset) -> jax.Array:
  """Maps uint8 images to standardised float32: (x / 255 - mean) / std.

  Pure jnp; meant to run inside the jitted train/eval steps.

  Args:
    images: uint8 (or any real) array (..., C).
    dataset: supplies the per-channel mean and std.

  Returns:
    float32 array of the same shape.
  """
  mean = jnp.asarray(dataset.mean, jnp.float32)
  std = jnp.asarray(dataset.std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def steps_per_epoch(
    dataset: Dataset, split: str, global_batch_size: int
) -> int:
  """Number of global batches per pass over `split`.

  Args:
    dataset: the loaded data set.
    split: 'train' (drops the last partial batch) or an evaluation split
      (counts the padded last batch).
    global_batch_size: examples per global batch.

  Returns:
    The number of batches.

  Raises:
    ValueError: unknown split, non-positive batch, or a train batch larger
      than the training set.
  """
  n = _num_examples(dataset, split)
  if global_batch_size <= 0:
    raise ValueError(f'global_batch_size must be > 0, got {global_batch_size}.')
  if split == 'train':
    if n < global_batch_size:
      raise ValueError(
          f'The global batch ({global_batch_size}) is larger than the '
          f'{n} training examples of {dataset.name}.'
      )
    return n // global_batch_size
  return math.ceil(n / global_batch_size)


def _num_examples(dataset: Dataset, split: str) -> int:
  if split not in dataset.num_examples:
    raise ValueError(
        f'{dataset.name} has no split {split!r}; it has '
        f'{", ".join(dataset.num_examples)} (set config.data.'
        'validation_holdout > 0 for a validation split).'
    )
  return dataset.num_examples[split]


def train_batches(
    dataset: Dataset,
    *,
    global_batch_size: int,
    epoch: int,
    seed: int,
    sharding: jax.sharding.Sharding,
    start_step: int = 0,
    prefetch: int = 2,
) -> Iterator[Batch]:
  """Yields the training batches of one epoch as global sharded arrays.

  Args:
    dataset: from `load_dataset`.
    global_batch_size: examples per step over all processes and devices.
    epoch: epoch index; with `seed` it fixes the order.
    seed: run seed.
    sharding: a `NamedSharding` whose spec shards dim 0 over the data axis
      (e.g. `NamedSharding(mesh, P('data'))`); other dims are replicated.
    start_step: first step to yield (resume inside an epoch).
    prefetch: batches prepared ahead in a background thread (0: none).

  Yields:
    {'image': uint8 (B, H, W, C), 'label': int32 (B,)}, B = global_batch_size,
    `steps_per_epoch(dataset, 'train', B) - start_step` times.

  Raises:
    ValueError: bad batch size, step or sharding.
  """
  steps = steps_per_epoch(dataset, 'train', global_batch_size)
  if not 0 <= start_step <= steps:
    raise ValueError(f'start_step={start_step} is outside [0, {steps}].')
  layout = BatchLayout.create(sharding, global_batch_size)
  if dataset.in_memory:
    host = in_memory.train_host_batches(
        dataset.host_splits['train'], layout, seed, epoch, start_step, steps
    )
  else:
    host = streaming.train_host_batches(
        dataset, layout.local_batch_size(), seed, epoch, start_step, steps
    )
  return prefetch_lib.maybe_prefetch(map(layout.to_global, host), prefetch)


def eval_batches(
    dataset: Dataset,
    split: str,
    *,
    global_batch_size: int,
    sharding: jax.sharding.Sharding,
    prefetch: int = 2,
) -> Iterator[Batch]:
  """Yields every example of `split` exactly once, in padded global batches.

  Args:
    dataset: from `load_dataset`.
    split: 'validation' or 'test' (or 'train').
    global_batch_size: examples per global batch.
    sharding: as in `train_batches`.
    prefetch: batches prepared ahead in a background thread (0: none).

  Yields:
    {'image': uint8 (B, H, W, C), 'label': int32 (B,), 'mask': float32 (B,)};
    mask is 1 for real examples and 0 for padding (image and label 0), so
    sum(mask * metric) / sum(mask) is exact.

  Raises:
    ValueError: unknown split or bad batch size / sharding.
  """
  num_batches = steps_per_epoch(dataset, split, global_batch_size)
  layout = BatchLayout.create(sharding, global_batch_size)
  if dataset.in_memory:
    host = in_memory.eval_host_batches(dataset.host_splits[split], layout, num_batches)
  else:
    host = streaming.eval_host_batches(dataset, split, layout.local_batch_size())
    if jax.process_count() > 1:
      # The end-of-data agreement is a collective: keep it on the caller's
      # thread, ordered with the caller's own collectives (tf.data prefetches).
      prefetch = 0
  return prefetch_lib.maybe_prefetch(map(layout.to_global, host), prefetch)
