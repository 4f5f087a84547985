"""Test helpers: synthetic learnable data sets and quickly initialised models.

``random_model`` builds any model of ``models/factory.py`` with random numpy weights (fast:
no eager initialisers), from a model config that may name only what differs from
``configs/default.py``.

``make_idx_dataset`` writes IDX files shaped like MNIST / Fashion-MNIST whose classes are
easy to tell apart (each class lights a different patch, plus noise), then imports them
with the real offline importer, so the code under test reads them through the same TFDS
path as the real data.
"""

from __future__ import annotations

import gzip
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from pdcnno_jax.models import factory
from pdcnno_jax.testing import config as default_configs
from pdcnno_jax.train import sharding as sharding_lib


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


def random_model(config: ml_collections.ConfigDict, input_shape: tuple[int, int, int],
                 seed: int = 0, num_classes: int = 10) -> nnx.Module:
  """``factory.build_model`` with random numpy weights, skipping its (slow, eager) initialisers.

  ``config`` holds the ``config.model`` keys that differ from ``configs/default.py``.
  Kernels ~ N(0, 2 / fan_in), biases ~ N(0, 0.1^2), BatchNorm scales ~ U(0.5, 1.5), running
  means ~ N(0, 1) and variances ~ U(0.5, 2) (so inference mode uses non-trivial statistics).
  """
  config = default_configs.section('model', **config)
  abstract = nnx.eval_shape(lambda: factory.build_model(
      config, num_classes=num_classes, input_shape=input_shape, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    shape, name = leaf.shape, path[-1]
    if name == 'kernel':
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5 if name == 'scale' else 2.0, size=shape)
    elif name == 'mask':
      value = np.ones(shape)
    elif name == 'mean':
      value = rng.normal(size=shape)
    elif name == 'bias':
      value = rng.normal(scale=0.1, size=shape)
    else:
      raise ValueError(f'unexpected variable {path}')
    return jnp.asarray(value, leaf.dtype)

  from pdcnno_jax.pruning import masking  # pylint: disable=g-import-not-at-top
  return nnx.merge(graphdef, masking.map_with_paths(init, params),
                   masking.map_with_paths(init, rest))


def random_batch(image_shape: tuple[int, int, int], num: int, mesh: jax.sharding.Mesh,
                 seed: int = 0, num_classes: int = 10) -> dict[str, jax.Array]:
  """A random uint8 image batch with int32 labels, sharded over ``mesh``'s data axis."""
  rng = np.random.default_rng(seed)
  batch = {'image': rng.integers(0, 256, (num,) + tuple(image_shape), dtype=np.uint8),
           'label': rng.integers(0, num_classes, (num,), dtype=np.int32)}
  return jax.device_put(batch, sharding_lib.batch_sharded(mesh))
