"""Streaming mode: a tf.data pipeline per process over its own share of the record files.

Used for imagenet2012 and whenever `config.data.in_memory=False`. Each process reads
`tfds.split_for_jax_process` of a split: deterministic file shuffle and example shuffle
seeded by (seed, epoch), class-subset filter, decode, resize, batch to the per-process
batch. Resume is exact for the same process count: the skipped examples of an interrupted
epoch are re-read but not decoded. The global batches depend on the process count (each
process reads different files). Each epoch yields exactly `steps_per_epoch` batches from a
repeated stream, so every process runs the same number of steps; for a class subset the
epoch length is estimated from the TFDS metadata (see `Dataset.num_examples`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Optional

import jax
import numpy as np

from pdcnno_jax.data import datasets
from pdcnno_jax.data import sources
from pdcnno_jax.data.in_memory import TRAIN_ORDER_STREAM
from pdcnno_jax.data.types import Dataset, HostBatch, StreamSource

_STREAM_SHUFFLE_BUFFER = 8192  # Encoded examples held by the streaming shuffle.


def load(
    spec: datasets.DatasetSpec,
    builder: Any,
    data_dir: str,
    *,
    holdout: int,
    image_size: int,
    num_classes: int,
) -> Dataset:
  """Describes the streaming source; counts come from the TFDS metadata."""
  if spec.mean is None:
    raise ValueError(
        f'{spec.name} has no published mean/std for streaming mode; set '
        'config.data.in_memory=True.'
    )
  fraction = num_classes / spec.num_classes
  full_train = sources.split_size(builder, data_dir, spec.train_split)
  tfds_splits = sources.tfds_split_names(spec, holdout, full_train)
  num_examples = {
      split: sources.estimated_split_size(
          builder, data_dir, tfds_split, num_classes, fraction
      )
      for split, tfds_split in tfds_splits.items()
  }
  channels = builder.info.features['image'].shape[-1]
  height, width = (
      (image_size, image_size) if image_size > 0 else spec.image_shape[:2]
  )
  return Dataset(
      name=spec.name,
      num_classes=num_classes,
      image_shape=(height, width, channels),
      num_examples=num_examples,
      mean=tuple(spec.mean),
      std=tuple(spec.std),
      stream=StreamSource(
          builder=builder,
          data_dir=data_dir,
          tfds_splits=tfds_splits,
          image_size=image_size,
          num_classes=num_classes,
          filter_classes=num_classes < spec.num_classes,
      ),
  )


def _derive_seed(*keys: int) -> int:
  """A 31-bit seed for tf.data / TFDS derived from integer keys."""
  return int(np.random.SeedSequence(list(keys)).generate_state(1)[0] >> 1)


def _deterministic_options() -> Any:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  options = tf.data.Options()
  options.deterministic = True
  return options


def _stream_examples(
    dataset: Dataset, split: str, *, shuffle_seed: Optional[int]
) -> Any:
  """tf.data of this process's share of `split`, images still encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  src = dataset.stream
  read_config = tfds.ReadConfig(
      shuffle_seed=shuffle_seed,
      options=_deterministic_options(),
      try_autocache=False,
  )
  ds = sources.as_dataset(
      src.builder,
      src.data_dir,
      split=tfds.split_for_jax_process(src.tfds_splits[split]),
      shuffle_files=shuffle_seed is not None,
      read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()},
  )
  if src.filter_classes:
    ds = ds.filter(lambda ex: ex['label'] < src.num_classes)
  return ds


def _checked(dataset: Dataset, split: str, iterator: Iterator[Any]) -> Iterator[Any]:
  """`sources.checked` for this data set's stream of `split`."""
  src = dataset.stream
  return sources.checked(iterator, src.builder, src.data_dir, src.tfds_splits[split])


def _decode_fn(dataset: Dataset) -> Callable[[Any], Any]:
  """tf: encoded example -> {'image': uint8 (H, W, C), 'label': int32}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  src = dataset.stream
  image_feature = src.builder.info.features['image']

  def decode(example):
    image = image_feature.decode_example(example['image'])
    if src.image_size > 0:
      image = sources.resize_square(image, src.image_size)
    image = tf.ensure_shape(image, dataset.image_shape)
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  return decode


def train_host_batches(
    dataset: Dataset,
    local_batch: int,
    seed: int,
    epoch: int,
    start_step: int,
    steps: int,
) -> Iterator[HostBatch]:
  """This process's training batches `start_step` .. `steps - 1` of `epoch`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  epoch_seed = _derive_seed(seed, epoch, TRAIN_ORDER_STREAM)
  ds = _stream_examples(dataset, 'train', shuffle_seed=epoch_seed)
  # A buffer beyond this process's share only delays the first batch.
  share = dataset.num_examples['train'] // jax.process_count()
  buffer_size = max(1, min(_STREAM_SHUFFLE_BUFFER, share))
  ds = ds.repeat().shuffle(buffer_size, seed=epoch_seed)
  ds = ds.skip(start_step * local_batch)  # Before decoding: cheap resume.
  ds = ds.map(_decode_fn(dataset), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).take(steps - start_step)
  yield from _checked(dataset, 'train', ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator())


def _pad_batch(batch: Optional[HostBatch], size: int, image_shape) -> HostBatch:
  """Pads a (possibly absent) partial local batch to `size` rows with mask 0."""
  if batch is None:
    return {
        'image': np.zeros((size,) + tuple(image_shape), np.uint8),
        'label': np.zeros((size,), np.int32),
        'mask': np.zeros((size,), np.float32),
    }
  n = len(batch['label'])
  pad = size - n
  return {
      'image': np.pad(batch['image'], [(0, pad)] + [(0, 0)] * 3),
      'label': np.pad(batch['label'].astype(np.int32), (0, pad)),
      'mask': np.pad(np.ones((n,), np.float32), (0, pad)),
  }


def _any_process(flag: bool) -> bool:
  """True if `flag` is set on any process (a tiny collective if > 1 process)."""
  if jax.process_count() == 1:
    return flag
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def eval_host_batches(
    dataset: Dataset, split: str, local_batch: int
) -> Iterator[HostBatch]:
  """Per-process eval stream; all processes yield the same number of batches.

  Each process's share differs in size (and is unknown for a class subset),
  so after each batch the processes agree whether any still has data.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  ds = _stream_examples(dataset, split, shuffle_seed=None)
  ds = ds.map(_decode_fn(dataset), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  local = _checked(dataset, split, ds.as_numpy_iterator())
  while True:
    batch = next(local, None)
    if not _any_process(batch is not None):
      return
    yield _pad_batch(batch, local_batch, dataset.image_shape)
