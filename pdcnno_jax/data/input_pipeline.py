"""Input pipeline: TFDS -> per-process rows -> global, sharded `jax.Array`s.

Two modes, chosen by `config.data.in_memory` and the data set:

* In memory (mnist, fashion_mnist, emnist/digits, svhn_cropped): each split is
  read once with TFDS into uint8 numpy arrays. The training order is a pure
  function of (seed, epoch, step): every process computes the same global
  permutation of the epoch, and each global batch is the next
  `global_batch_size` indices of it; a process gathers only the rows its
  devices hold. So 1 process and N processes see identical global batches,
  and `start_step` resumes the exact sequence.
* Streaming (imagenet2012, or `in_memory=False`): a tf.data pipeline per
  process over its own share of the files (`tfds.split_for_jax_process`):
  deterministic file shuffle and example shuffle seeded by (seed, epoch),
  class-subset filter, decode, resize, batch to the per-process batch.
  Resume is exact for the same process count: the skipped examples of an
  interrupted epoch are re-read but not decoded. The global batches depend on
  the process count (each process reads different files). Each epoch yields
  exactly `steps_per_epoch` batches from a repeated stream, so every process
  runs the same number of steps; for a class subset the epoch length is
  estimated from the TFDS metadata (see `Dataset.num_examples`).

Batches travel as uint8 (`normalize` runs inside the jitted step) and are
assembled with `jax.make_array_from_process_local_data`; a background thread
prepares them `prefetch` batches ahead so host work overlaps device compute.

References:
  DESIGN.md, "Data flow"; issue #2, part 3 ("Data"). PDCNNO holds out 6,000
  SVHN training images for validation (`config.data.validation_holdout`).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Optional, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pdcnno_jax.data import datasets

Batch = dict[str, jax.Array]
HostBatch = dict[str, np.ndarray]
_T = TypeVar('_T')

# Independent random streams derived from the user's seed (SeedSequence keys).
_TRAIN_ORDER_STREAM = 0x7472616E  # 'tran'
_HOLDOUT_STREAM = 0x686F6C64  # 'hold'
_STREAM_SHUFFLE_BUFFER = 8192  # Encoded examples held by the streaming shuffle.
_STATS_CHUNK = 8192  # Images per chunk when computing mean/std.
_RESIZE_CHUNK = 2048  # Images per chunk when resizing in-memory splits.
_READ_CHUNK = 8192  # Examples per chunk when reading a split into memory.


@dataclasses.dataclass(frozen=True)
class HostSplit:
  """One split held in host memory.

  Attributes:
    images: uint8 array (N, H, W, C).
    labels: int32 array (N,).
  """

  images: np.ndarray
  labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class StreamSource:
  """What the streaming mode needs to build its tf.data pipelines.

  Attributes:
    builder: the `tfds.core.DatasetBuilder` to read.
    tfds_splits: our split name -> TFDS split string (e.g. 'train[:-6000]').
    image_size: output side length; 0 keeps the native size.
    num_classes: labels >= num_classes are dropped (class subset).
    filter_classes: whether the class filter is needed at all.
  """

  builder: Any
  tfds_splits: Mapping[str, str]
  image_size: int
  num_classes: int
  filter_classes: bool


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A loaded data set: metadata plus host data (arrays or a stream source).

  Attributes:
    name: data set name (`config.data.name`).
    num_classes: classes the model predicts (the subset size for ImageNet).
    image_shape: (H, W, C) of the batches, after any resize.
    num_examples: split -> global number of examples. Exact in memory; in
      streaming mode with a class subset, an estimate proportional to the
      classes kept (exact for ImageNet's evaluation split, 50 per class).
    mean: per-channel mean of [0, 1]-scaled training pixels.
    std: per-channel standard deviation of [0, 1]-scaled training pixels.
    host_splits: split -> `HostSplit` in memory mode, else None.
    stream: the `StreamSource` in streaming mode, else None.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  num_examples: Mapping[str, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  host_splits: Optional[Mapping[str, HostSplit]] = None
  stream: Optional[StreamSource] = None

  @property
  def in_memory(self) -> bool:
    return self.host_splits is not None

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.num_examples)


# ----------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------


def _hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow (used only for reading data) off GPUs/TPUs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  for device_type in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError):
      pass  # TF devices already initialised, or no such device type.


def _as_dataset(builder: Any, data_dir: str, **kwargs: Any) -> Any:
  """`builder.as_dataset(**kwargs)`, with a missing data set made explicit.

  Raises:
    datasets.DatasetNotFoundError: the data set is not prepared in data_dir.
  """
  try:
    return builder.as_dataset(**kwargs)
  except AssertionError as e:
    if 'could not find data' not in str(e):
      raise
    name = builder.name
    if builder.builder_config is not None:
      name = f'{name}/{builder.builder_config.name}'
    raise datasets.DatasetNotFoundError(
        f'Data set {name!r} (version {builder.version}) is not prepared in '
        f'data_dir={data_dir!r} (looked for {builder.data_path}).\n'
        f'{datasets.fix_command(name, data_dir)}'
    ) from None


def _tfds_split_names(
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


def _read_split(builder: Any, data_dir: str, tfds_split: str) -> HostSplit:
  """Reads a whole TFDS split into host memory (stored order)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  ds = _as_dataset(
      builder,
      data_dir,
      split=tfds_split,
      read_config=tfds.ReadConfig(try_autocache=False),
  )
  ds = ds.batch(_READ_CHUNK).prefetch(tf.data.AUTOTUNE)
  images, labels = [], []
  for chunk in tfds.as_numpy(ds):
    images.append(np.asarray(chunk['image'], dtype=np.uint8))
    labels.append(np.asarray(chunk['label'], dtype=np.int32))
  if not images:
    raise ValueError(f'TFDS split {tfds_split!r} of {builder.name} is empty.')
  return HostSplit(np.concatenate(images), np.concatenate(labels))


def _resize_square(images: Any, size: int) -> Any:
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


def _resize_host(images: np.ndarray, size: int) -> np.ndarray:
  """Resizes an in-memory uint8 split to size x size, chunk by chunk."""
  if size <= 0 or images.shape[1:3] == (size, size):
    return images
  return np.concatenate([
      _resize_square(images[i:i + _RESIZE_CHUNK], size).numpy()
      for i in range(0, len(images), _RESIZE_CHUNK)
  ]) if len(images) else np.zeros((0, size, size, images.shape[-1]), np.uint8)


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], ...]:
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


def _holdout_split(
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


def load_dataset(
    data_config: ml_collections.ConfigDict, *, seed: int
) -> Dataset:
  """Loads `data_config.name` from TFDS `data_config.data_dir`.

  Args:
    data_config: the `config.data` section (name, data_dir,
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
    datasets.DatasetNotFoundError: the data set is not prepared in data_dir;
      the message gives the command that prepares it.

  References:
    Issue #2, part 3; PDCNNO: 6,000 SVHN training images held out.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

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
  _hide_accelerators_from_tf()
  builder = tfds.builder(spec.name, data_dir=data_dir)
  if data_config.in_memory and spec.in_memory:
    return _load_in_memory(
        spec, builder, data_dir, holdout=holdout, image_size=image_size,
        seed=seed,
    )
  return _load_streaming(
      spec, builder, data_dir, holdout=holdout, image_size=image_size,
      num_classes=num_classes,
  )


def _load_in_memory(
    spec: datasets.DatasetSpec,
    builder: Any,
    data_dir: str,
    *,
    holdout: int,
    image_size: int,
    seed: int,
) -> Dataset:
  """Reads every split into host memory (holdout, resize, statistics)."""
  train = _read_split(builder, data_dir, spec.train_split)
  host_splits = {'train': train}
  if holdout > 0:
    host_splits['train'], host_splits['validation'] = _holdout_split(
        train, holdout, seed
    )
  host_splits['test'] = _read_split(builder, data_dir, spec.test_split)
  host_splits = {
      split: HostSplit(_resize_host(s.images, image_size), s.labels)
      for split, s in host_splits.items()
  }
  if spec.mean is not None:
    mean, std = spec.mean, spec.std
  else:
    mean, std = _channel_stats(host_splits['train'].images)
  return Dataset(
      name=spec.name,
      num_classes=spec.num_classes,
      image_shape=tuple(host_splits['train'].images.shape[1:]),
      num_examples={k: len(v.labels) for k, v in host_splits.items()},
      mean=tuple(mean),
      std=tuple(std),
      host_splits=host_splits,
  )


def _load_streaming(
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
  full_train = _split_size(builder, data_dir, spec.train_split)
  tfds_splits = _tfds_split_names(spec, holdout, full_train)
  num_examples = {
      split: _estimated_split_size(
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
          tfds_splits=tfds_splits,
          image_size=image_size,
          num_classes=num_classes,
          filter_classes=num_classes < spec.num_classes,
      ),
  )


def _split_size(builder: Any, data_dir: str, tfds_split: str) -> int:
  """Examples in a TFDS split: metadata, or a counting pass if it is absent."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return int(builder.info.splits[tfds_split].num_examples)
  except (KeyError, ValueError):
    pass
  ds = _as_dataset(
      builder,
      data_dir,
      split=tfds_split,
      decoders={'image': tfds.decode.SkipDecoding()},
  )
  return int(ds.reduce(np.int64(0), lambda count, _: count + 1).numpy())


def _estimated_split_size(
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
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return int(round(builder.info.splits[tfds_split].num_examples * fraction))
  except (KeyError, ValueError):
    pass
  ds = _as_dataset(
      builder,
      data_dir,
      split=tfds_split,
      decoders={'image': tfds.decode.SkipDecoding()},
  )
  ds = ds.filter(lambda ex: ex['label'] < num_classes)
  return int(ds.reduce(np.int64(0), lambda count, _: count + 1).numpy())


# ----------------------------------------------------------------------------
# Normalisation and step counts.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Layout: which rows of a global batch this process materialises.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BatchLayout:
  """Maps a global batch onto this process's devices.

  Attributes:
    global_batch_size: rows per global batch.
    local_rows: sorted global row indices this process's devices hold.
    sharding: the sharding of every batch array (batch dim only).
  """

  global_batch_size: int
  local_rows: np.ndarray
  sharding: jax.sharding.Sharding

  @classmethod
  def create(
      cls, sharding: jax.sharding.Sharding, global_batch_size: int
  ) -> '_BatchLayout':
    """Derives the layout; checks the batch splits evenly over the devices."""
    if global_batch_size <= 0:
      raise ValueError(
          f'global_batch_size must be > 0, got {global_batch_size}.'
      )
    if isinstance(sharding, jax.sharding.NamedSharding):
      spec = sharding.spec
      batch_axes = spec[0] if len(spec) else None
      # Rank-agnostic: shard dim 0 only, so images and labels share it.
      sharding = jax.sharding.NamedSharding(
          sharding.mesh, jax.sharding.PartitionSpec(batch_axes)
      )
      axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes or ()
      shards = math.prod(sharding.mesh.shape[a] for a in axes)
      if global_batch_size % shards:
        raise ValueError(
            f'The global batch ({global_batch_size}) must be divisible by the '
            f'{shards} devices of mesh axes {axes}.'
        )
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    rows = set()
    for index in index_map.values():
      start, stop, _ = index[0].indices(global_batch_size)
      rows.update(range(start, stop))
    return cls(global_batch_size, np.array(sorted(rows), np.int64), sharding)

  def to_global(self, local: HostBatch) -> Batch:
    """Assembles this process's rows into global arrays."""
    return {
        key: jax.make_array_from_process_local_data(
            self.sharding, value, (self.global_batch_size,) + value.shape[1:]
        )
        for key, value in local.items()
    }


# ----------------------------------------------------------------------------
# Prefetching.
# ----------------------------------------------------------------------------


_END = object()


@dataclasses.dataclass(frozen=True)
class _Failure:
  error: BaseException


def _put(out: queue.Queue, stop: threading.Event, item: Any) -> bool:
  """Puts `item` unless `stop` is set first; returns whether it was put."""
  while not stop.is_set():
    try:
      out.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _produce(source: Iterator[Any], out: queue.Queue, stop: threading.Event):
  """Thread body: moves `source` into `out` until exhausted or stopped."""
  try:
    for item in source:
      if not _put(out, stop, item):
        return
    _put(out, stop, _END)
  except BaseException as e:  # pylint: disable=broad-exception-caught
    _put(out, stop, _Failure(e))


class _Prefetcher(Iterator[_T]):
  """Runs an iterator in a daemon thread, `size` items ahead of the consumer.

  Exceptions raised by the source are re-raised in the consumer. `close()`,
  also called when the consumer drops the iterator (the thread holds no
  reference to it), stops the thread.
  """

  def __init__(self, source: Iterable[_T], size: int):
    self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(
        target=_produce,
        args=(iter(source), self._queue, self._stop),
        daemon=True,
    )
    self._thread.start()

  def __next__(self) -> _T:
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self.close()
      raise item.error
    return item

  def close(self) -> None:
    """Stops the background thread (it exits within ~0.1 s)."""
    self._stop.set()
    self._done = True

  def __del__(self):
    self.close()


def _maybe_prefetch(source: Iterable[_T], size: int) -> Iterator[_T]:
  return _Prefetcher(source, size) if size > 0 else iter(source)


# ----------------------------------------------------------------------------
# Training batches.
# ----------------------------------------------------------------------------


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
  rng = np.random.default_rng([seed, epoch, _TRAIN_ORDER_STREAM])
  return rng.permutation(num_examples)


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
  layout = _BatchLayout.create(sharding, global_batch_size)
  if dataset.in_memory:
    host = _in_memory_train(
        dataset.host_splits['train'], layout, seed, epoch, start_step, steps
    )
  else:
    local_batch = _local_batch_size(layout)
    host = _stream_train(
        dataset, local_batch, seed, epoch, start_step, steps
    )
  return _maybe_prefetch(map(layout.to_global, host), prefetch)


def _in_memory_train(
    split: HostSplit,
    layout: _BatchLayout,
    seed: int,
    epoch: int,
    start_step: int,
    steps: int,
) -> Iterator[HostBatch]:
  order = epoch_permutation(len(split.labels), seed, epoch)
  for step in range(start_step, steps):
    rows = order[step * layout.global_batch_size + layout.local_rows]
    yield {'image': split.images[rows], 'label': split.labels[rows]}


def _local_batch_size(layout: _BatchLayout) -> int:
  """Per-process rows; streaming needs every process to own an equal share."""
  local = len(layout.local_rows)
  if local * jax.process_count() != layout.global_batch_size:
    raise ValueError(
        'Streaming mode needs a sharding in which every process holds an '
        f'equal, disjoint share of the batch; this process holds {local} of '
        f'{layout.global_batch_size} rows over {jax.process_count()} processes.'
    )
  return local


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
  ds = _as_dataset(
      src.builder,
      str(src.builder.data_dir),
      split=tfds.split_for_jax_process(src.tfds_splits[split]),
      shuffle_files=shuffle_seed is not None,
      read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()},
  )
  if src.filter_classes:
    ds = ds.filter(lambda ex: ex['label'] < src.num_classes)
  return ds


def _decode_fn(dataset: Dataset) -> Callable[[Any], Any]:
  """tf: encoded example -> {'image': uint8 (H, W, C), 'label': int32}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  src = dataset.stream
  image_feature = src.builder.info.features['image']

  def decode(example):
    image = image_feature.decode_example(example['image'])
    if src.image_size > 0:
      image = _resize_square(image, src.image_size)
    image = tf.ensure_shape(image, dataset.image_shape)
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  return decode


def _stream_train(
    dataset: Dataset,
    local_batch: int,
    seed: int,
    epoch: int,
    start_step: int,
    steps: int,
) -> Iterator[HostBatch]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  epoch_seed = _derive_seed(seed, epoch, _TRAIN_ORDER_STREAM)
  ds = _stream_examples(dataset, 'train', shuffle_seed=epoch_seed)
  # A buffer beyond this process's share only delays the first batch.
  share = dataset.num_examples['train'] // jax.process_count()
  buffer_size = max(1, min(_STREAM_SHUFFLE_BUFFER, share))
  ds = ds.repeat().shuffle(buffer_size, seed=epoch_seed)
  ds = ds.skip(start_step * local_batch)  # Before decoding: cheap resume.
  ds = ds.map(_decode_fn(dataset), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True).take(steps - start_step)
  yield from ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


# ----------------------------------------------------------------------------
# Evaluation batches.
# ----------------------------------------------------------------------------


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
  layout = _BatchLayout.create(sharding, global_batch_size)
  if dataset.in_memory:
    host = _in_memory_eval(dataset.host_splits[split], layout, num_batches)
  else:
    host = _stream_eval(dataset, split, _local_batch_size(layout))
    if jax.process_count() > 1:
      # The end-of-data agreement is a collective: keep it on the caller's
      # thread, ordered with the caller's own collectives (tf.data prefetches).
      prefetch = 0
  return _maybe_prefetch(map(layout.to_global, host), prefetch)


def _in_memory_eval(
    split: HostSplit, layout: _BatchLayout, num_batches: int
) -> Iterator[HostBatch]:
  n = len(split.labels)
  for b in range(num_batches):
    rows = b * layout.global_batch_size + layout.local_rows
    valid = rows < n
    rows = np.where(valid, rows, 0)
    images = split.images[rows]
    images[~valid] = 0
    labels = np.where(valid, split.labels[rows], 0).astype(np.int32)
    yield {'image': images, 'label': labels, 'mask': valid.astype(np.float32)}


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


def _stream_eval(
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
  local = ds.as_numpy_iterator()
  while True:
    batch = next(local, None)
    if not _any_process(batch is not None):
      return
    yield _pad_batch(batch, local_batch, dataset.image_shape)
