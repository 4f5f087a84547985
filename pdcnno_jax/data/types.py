"""The data types the input pipeline passes around: splits, stream sources, data sets.

A `Dataset` carries its metadata (classes, image shape, example counts, normalisation
constants) and either its splits in host memory (`HostSplit`, in-memory mode) or what the
streaming mode needs to read them (`StreamSource`). Batches are dicts of arrays: `HostBatch`
on the host (numpy), `Batch` once assembled into global, sharded `jax.Array`s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import jax
import numpy as np

Batch = dict[str, jax.Array]
HostBatch = dict[str, np.ndarray]


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
    data_dir: the TFDS data directory it was found in (`config.data.data_dir`).
    tfds_splits: our split name -> TFDS split string (e.g. 'train[:-6000]').
    image_size: output side length; 0 keeps the native size.
    num_classes: labels >= num_classes are dropped (class subset).
    filter_classes: whether the class filter is needed at all.
  """

  builder: Any
  data_dir: str
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
