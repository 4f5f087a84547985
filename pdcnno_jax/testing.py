"""Synthetic, learnable data sets for tests and examples (no download, seconds to build).

``make_idx_dataset`` writes IDX files shaped like MNIST / Fashion-MNIST whose classes are
easy to tell apart (each class lights a different patch, plus noise), then imports them
with the real offline importer, so the code under test reads them through the same TFDS
path as the real data.
"""

from __future__ import annotations

import gzip
import os

import numpy as np


def _write_idx(path: str, array: np.ndarray) -> None:
  """Writes ``array`` (uint8) in IDX format, gzipped."""
  magic = bytes([0, 0, 0x08, array.ndim])
  dims = b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(magic + dims + array.astype(np.uint8).tobytes())


def synthetic_images(num: int, *, num_classes: int = 10, size: int = 28,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Learnable images: class ``c`` brightens patch ``c`` of a 4x4 grid, plus noise.

  Returns:
    ``(images uint8 [num, size, size], labels uint8 [num])``.
  """
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num).astype(np.uint8)
  images = rng.integers(0, 60, (num, size, size)).astype(np.float32)
  cell = size // 4
  for c in range(num_classes):
    r, q = divmod(c % 16, 4)
    idx = labels == c
    images[idx, r * cell:(r + 1) * cell, q * cell:(q + 1) * cell] += 150.0
  return np.clip(images, 0, 255).astype(np.uint8), labels


def make_idx_dataset(data_dir: str, *, name: str = 'fashion_mnist', num_train: int = 512,
                     num_test: int = 256, seed: int = 0) -> str:
  """Writes a synthetic IDX data set and imports it into the TFDS ``data_dir``.

  Args:
    data_dir: TFDS data directory to fill.
    name: 'mnist' or 'fashion_mnist' (the TFDS name the files are imported as).
    num_train: training examples.
    num_test: test examples.
    seed: random seed of the images.

  Returns:
    ``data_dir``.
  """
  from pdcnno_jax.data import idx_import  # pylint: disable=g-import-not-at-top
  src = os.path.join(data_dir, f'_idx_src_{name}')
  os.makedirs(src, exist_ok=True)
  for prefix, num, split_seed in (('train', num_train, seed), ('t10k', num_test, seed + 1)):
    images, labels = synthetic_images(num, seed=split_seed)
    _write_idx(os.path.join(src, f'{prefix}-images-idx3-ubyte.gz'), images)
    _write_idx(os.path.join(src, f'{prefix}-labels-idx1-ubyte.gz'), labels)
  idx_import.import_idx(name, src, data_dir)
  return data_dir
