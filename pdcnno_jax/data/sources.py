"""TFDS sources: builders, split reading, and clear errors for missing or corrupt data.

Everything the input pipeline reads goes through `as_dataset` and `checked`, so a data set
that is not prepared raises `datasets.DatasetNotFoundError` and a truncated or bit-flipped
record file raises `datasets.DatasetCorruptError`; both name the path and the command that
fixes it (`datasets.fix_command`, `datasets.rebuild_command`). With `download=True` TFDS
downloads and prepares a missing data set first (Colab, or any host with a network).

Split strings follow TFDS (`'train[:-6000]'`); `tfds_split_names` maps the trainer's split
names ('train', 'validation', 'test') onto them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from pdcnno_jax.data import datasets
from pdcnno_jax.data.types import HostSplit

_T = TypeVar('_T')
_READ_CHUNK = 8192  # Examples per chunk when reading a split into memory.


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow (used only for reading data) off GPUs/TPUs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError):
      pass  # TF devices already initialised, or no such device type.


def get_builder(spec: datasets.DatasetSpec, data_dir: str, *, download: bool) -> Any:
  """The TFDS builder of `spec` in `data_dir`, downloaded and prepared if `download`.

  Args:
    spec: the data set.
    data_dir: the TFDS data directory.
    download: let TFDS download and prepare the data set when it is missing (a no-op
      when it is prepared); False never touches the network, and a missing data set
      fails later with `datasets.DatasetNotFoundError`.

  Returns:
    A `tfds.core.DatasetBuilder`.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(spec.name, data_dir=data_dir)
  if download:
    builder.download_and_prepare()
  return builder


def _full_name(builder: Any) -> str:
  name = builder.name
  if builder.builder_config is not None:
    name = f'{name}/{builder.builder_config.name}'
  return name


def as_dataset(builder: Any, data_dir: str, **kwargs: Any) -> Any:
  """`builder.as_dataset(**kwargs)`, with a missing data set made explicit.

  Raises:
    datasets.DatasetNotFoundError: the data set is not prepared in data_dir.
  """
  try:
    return builder.as_dataset(**kwargs)
  except AssertionError as e:
    if 'could not find data' not in str(e):
      raise
    name = _full_name(builder)
    raise datasets.DatasetNotFoundError(
        f'Data set {name!r} (version {builder.version}) is not prepared in '
        f'data_dir={data_dir!r} (looked for {builder.data_path}).\n'
        f'{datasets.fix_command(name, data_dir)}'
    ) from None


def _split_info(builder: Any, tfds_split: str) -> Any:
  """TFDS's SplitInfo of a split string ('train[:-6000]' -> 'train'), or None."""
  base = re.split(r'[\[+(]', str(tfds_split), maxsplit=1)[0].strip()
  try:
    return builder.info.splits[base]
  except (KeyError, ValueError):
    return None


def _count_records(path: str) -> int | None:
  """Records in a TFRecord / ArrayRecord file; None if one of them is corrupt."""
  try:
    if '.array_record' in os.path.basename(path):
      # pylint: disable-next=g-import-not-at-top
      from array_record.python import array_record_module

      reader = array_record_module.ArrayRecordReader(path)
      count = reader.num_records()
      for start in range(0, count, 1024):
        reader.read(list(range(start, min(start + 1024, count))))
      reader.close()
      return count
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    return sum(1 for _ in tf.data.TFRecordDataset(path))
  except Exception:  # pylint: disable=broad-exception-caught
    return None


def _damaged_files(builder: Any, tfds_split: str) -> list[str]:
  """The split's files that fail to read or hold fewer records than TFDS wrote."""
  info = _split_info(builder, tfds_split)
  if info is None:
    data_dir = os.fspath(builder.data_dir)
    return sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir)
                  if '.tfrecord' in f or '.array_record' in f)
  files = [os.fspath(p) for p in info.filepaths]
  lengths = list(info.shard_lengths) or [None] * len(files)
  bad = []
  for path, expected in zip(files, lengths):
    count = _count_records(path)
    if count is None or (expected is not None and count != expected):
      bad.append(path)
  return bad or files


def _is_corruption(error: BaseException) -> bool:
  """A corrupt record (DataLossError) or a file shorter than TFDS's metadata says."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return isinstance(error, tf.errors.DataLossError) or (
      isinstance(error, tf.errors.FailedPreconditionError)
      and 'expected to contain' in str(error))


def corrupt_error(builder: Any, data_dir: str, tfds_split: str,
                  error: BaseException) -> datasets.DatasetCorruptError:
  """The error for a record file of `tfds_split` that failed to read.

  Reads each of the split's files again to name the damaged one (only after a failure).
  """
  bad = _damaged_files(builder, tfds_split)
  reason = str(getattr(error, 'message', error)).split('[Op:')[0].split('}}')[-1].strip()
  name = _full_name(builder)
  return datasets.DatasetCorruptError(
      f'Data set file {", ".join(bad)} of {name!r} is corrupt ({reason}). Rebuild the '
      f'data set:\n{datasets.rebuild_command(name, data_dir, os.fspath(builder.data_dir))}'
  )


def checked(iterable: Iterable[_T], builder: Any, data_dir: str,
            tfds_split: str) -> Iterator[_T]:
  """Iterates `iterable` (read from `tfds_split`); a corrupt or truncated record file
  raises `datasets.DatasetCorruptError`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    yield from iterable
  except (tf.errors.DataLossError, tf.errors.FailedPreconditionError) as e:
    if not _is_corruption(e):
      raise
    raise corrupt_error(builder, data_dir, tfds_split, e) from None


def tfds_split_names(
    spec: datasets.DatasetSpec, holdout: int, num_train: int
) -> dict[str, str]:
  """Our split names -> TFDS split strings (streaming mode)."""
  if holdout >= num_train:
    raise ValueError(
        f'config.data.validation_holdout={holdout} must be smaller than the '
        f'{num_train} training examples of {spec.name}.'
    )
  names = {'train': spec.train_split}
  if holdout > 0:
    names['train'] = f'{spec.train_split}[:-{holdout}]'
    names['validation'] = f'{spec.train_split}[-{holdout}:]'
  names['test'] = spec.test_split
  return names


def read_split(builder: Any, data_dir: str, tfds_split: str) -> HostSplit:
  """Reads a whole TFDS split into host memory (stored order)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  ds = as_dataset(
      builder,
      data_dir,
      split=tfds_split,
      read_config=tfds.ReadConfig(try_autocache=False),
  )
  ds = ds.batch(_READ_CHUNK).prefetch(tf.data.AUTOTUNE)
  images, labels = [], []
  for chunk in checked(tfds.as_numpy(ds), builder, data_dir, tfds_split):
    images.append(np.asarray(chunk['image'], dtype=np.uint8))
    labels.append(np.asarray(chunk['label'], dtype=np.int32))
  if not images:
    raise ValueError(f'TFDS split {tfds_split!r} of {builder.name} is empty.')
  return HostSplit(np.concatenate(images), np.concatenate(labels))


def count_examples(builder: Any, data_dir: str, tfds_split: str,
                   num_classes: int | None = None) -> int:
  """Counts the examples of a TFDS split (labels < `num_classes` if given) by reading it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  ds = as_dataset(
      builder,
      data_dir,
      split=tfds_split,
      decoders={'image': tfds.decode.SkipDecoding()},
  )
  if num_classes is not None:
    ds = ds.filter(lambda ex: ex['label'] < num_classes)
  try:
    return int(ds.reduce(np.int64(0), lambda count, _: count + 1).numpy())
  except (tf.errors.DataLossError, tf.errors.FailedPreconditionError) as e:
    if not _is_corruption(e):
      raise
    raise corrupt_error(builder, data_dir, tfds_split, e) from None


def split_size(builder: Any, data_dir: str, tfds_split: str) -> int:
  """Examples in a TFDS split: metadata, or a counting pass if it is absent."""
  try:
    return int(builder.info.splits[tfds_split].num_examples)
  except (KeyError, ValueError):
    pass
  return count_examples(builder, data_dir, tfds_split)


def estimated_split_size(
    builder: Any,
    data_dir: str,
    tfds_split: str,
    num_classes: int,
    fraction: float,
) -> int:
  """Examples of the first `num_classes` classes in a TFDS split.

  Uses the metadata times `fraction` when TFDS has the split's size (ImageNet:
  avoids reading 1.3M records), else counts the matching labels.
  """
  try:
    return int(round(builder.info.splits[tfds_split].num_examples * fraction))
  except (KeyError, ValueError):
    pass
  return count_examples(builder, data_dir, tfds_split, num_classes)


def resize_square(images: Any, size: int) -> Any:
  """tf: resizes the shorter side to `size` and crops the centre to size^2."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  shape = tf.shape(images)
  height = tf.cast(shape[-3], tf.float32)
  width = tf.cast(shape[-2], tf.float32)
  scale = size / tf.minimum(height, width)
  new_h = tf.maximum(size, tf.cast(tf.round(height * scale), tf.int32))
  new_w = tf.maximum(size, tf.cast(tf.round(width * scale), tf.int32))
  resized = tf.image.resize(images, (new_h, new_w), antialias=True)
  top = (new_h - size) // 2
  left = (new_w - size) // 2
  cropped = resized[..., top:top + size, left:left + size, :]
  return tf.cast(tf.clip_by_value(tf.round(cropped), 0, 255), tf.uint8)
