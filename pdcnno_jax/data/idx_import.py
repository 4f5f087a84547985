r"""Offline import of IDX files (MNIST, Fashion-MNIST, EMNIST) into TFDS format.

MNIST, Fashion-MNIST and EMNIST are distributed as IDX files. This command turns
a local copy of them into a TFDS data set in `--data_dir` that
`tfds.builder(name, data_dir=...)` (and so `input_pipeline.load_dataset`) reads
exactly like one TFDS prepared itself: same builder name, version, features,
class names and splits. It never touches the network.

Usage:

  python -m pdcnno_jax.data.idx_import --dataset=fashion_mnist \
      --src=/usr/share/datasets/fashion-mnist --data_dir=data/tfds

Expected files in `--src` (each optionally gzipped, `.gz`; `-idx` or `.idx`):

* mnist, fashion_mnist: train-images-idx3-ubyte, train-labels-idx1-ubyte,
  t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte.
* emnist/<config> (e.g. emnist/digits): emnist-<config>-train-images-idx3-ubyte,
  emnist-<config>-train-labels-idx1-ubyte, emnist-<config>-test-images-...,
  emnist-<config>-test-labels-...

Each builder subclasses TFDS's own (MNIST / FashionMNIST / EMNIST) unregistered and
replaces only `_split_generators`; EMNIST images stay as stored (as TFDS keeps them).

References:
  IDX format: http://yann.lecun.com/exdb/mnist/ ("FILE FORMATS"): big-endian
  magic 0x0000 | dtype code (0x08 = unsigned byte) | number of dimensions, then
  one big-endian uint32 per dimension, then the data.
"""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from absl import app
from absl import flags
from absl import logging
import numpy as np

_UBYTE_DTYPE_CODE = 0x08
_IMAGE_SIDE = 28


class IdxFormatError(ValueError):
  """An IDX file is missing, malformed, or inconsistent with its partner."""


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file of unsigned bytes (gzipped or not) into a numpy array.

  Args:
    path: path of the file; a name ending in `.gz` is decompressed.

  Returns:
    A uint8 array whose shape is the dimensions in the IDX header.

  Raises:
    IdxFormatError: bad magic number, unsupported dtype, or a data size that
      does not match the header.
  """
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
    raise IdxFormatError(f'Cannot read IDX file {path}: {e}') from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise IdxFormatError(
        f'{path} is not an IDX file: its magic number must start with two '
        f'zero bytes, got {raw[:4].hex() or "an empty file"}.'
    )
  dtype_code, ndim = raw[2], raw[3]
  if dtype_code != _UBYTE_DTYPE_CODE:
    raise IdxFormatError(
        f'{path}: IDX dtype code 0x{dtype_code:02x} is not supported; MNIST-'
        'style image and label files use unsigned bytes (0x08).'
    )
  header_size = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header_size:
    raise IdxFormatError(f'{path}: truncated IDX header ({ndim} dimensions).')
  dims = tuple(
      int(d) for d in np.frombuffer(raw, dtype='>u4', count=ndim, offset=4)
  )
  expected = int(np.prod(dims))
  actual = len(raw) - header_size
  if actual != expected:
    raise IdxFormatError(
        f'{path}: the header announces shape {dims} ({expected} bytes of data) '
        f'but the file holds {actual} bytes after the header; the file is '
        'truncated or corrupt.'
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def _file_stems(dataset: str) -> dict[str, str]:
  """Returns split -> file name stem, e.g. 't10k' or 'emnist-digits-test'."""
  if dataset in ('mnist', 'fashion_mnist'):
    return {'train': 'train', 'test': 't10k'}
  if dataset.startswith('emnist/'):
    config = dataset.split('/', 1)[1]
    return {'train': f'emnist-{config}-train', 'test': f'emnist-{config}-test'}
  raise ValueError(f'No IDX file layout known for {dataset!r}.')


def find_idx_files(dataset: str, src: str) -> dict[str, dict[str, str]]:
  """Locates the IDX files of `dataset` in directory `src`.

  Args:
    dataset: 'mnist', 'fashion_mnist' or 'emnist/<config>'.
    src: directory holding the files.

  Returns:
    {split: {'images': path, 'labels': path}} for splits 'train' and 'test'.

  Raises:
    IdxFormatError: a file is missing (the message lists the names tried).
  """
  found = {}
  for split, stem in _file_stems(dataset).items():
    found[split] = {}
    for kind, idx in (('images', 'idx3'), ('labels', 'idx1')):
      candidates = [
          f'{stem}-{kind}{sep}{idx}-ubyte{ext}'
          for sep in ('-', '.')
          for ext in ('.gz', '')
      ]
      paths = [os.path.join(src, c) for c in candidates]
      existing = [p for p in paths if os.path.isfile(p)]
      if not existing:
        raise IdxFormatError(
            f'No {split} {kind} file for {dataset} in {src}: tried '
            f'{", ".join(candidates)}.'
        )
      found[split][kind] = existing[0]
  return found


def load_idx_split(
    images_path: str, labels_path: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
  """Reads and cross-checks one split's image and label files.

  Args:
    images_path: IDX file of shape (N, 28, 28).
    labels_path: IDX file of shape (N,).
    num_classes: labels must lie in [0, num_classes).

  Returns:
    images uint8 (N, 28, 28, 1) and labels int64 (N,).

  Raises:
    IdxFormatError: wrong ranks or sizes, mismatched counts, or labels out
      of range.
  """
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  if images.ndim != 3 or images.shape[1:] != (_IMAGE_SIDE, _IMAGE_SIDE):
    raise IdxFormatError(
        f'{images_path}: expected images of shape (N, {_IMAGE_SIDE}, '
        f'{_IMAGE_SIDE}), got {images.shape}. Is this a labels file?'
    )
  if labels.ndim != 1:
    raise IdxFormatError(
        f'{labels_path}: expected labels of shape (N,), got {labels.shape}. '
        'Is this an images file?'
    )
  if len(images) != len(labels):
    raise IdxFormatError(
        f'{images_path} holds {len(images)} images but {labels_path} holds '
        f'{len(labels)} labels.'
    )
  if len(labels) and labels.max() >= num_classes:
    raise IdxFormatError(
        f'{labels_path}: label {labels.max()} is out of range for '
        f'{num_classes} classes; is --dataset right?'
    )
  return images[..., None], labels.astype(np.int64)


def _examples(
    images: np.ndarray, labels: np.ndarray
) -> Iterator[tuple[int, Mapping[str, Any]]]:
  """Yields (key, example) like TFDS's MNIST `_generate_examples`."""
  for index, (image, label) in enumerate(zip(images, labels)):
    yield index, {'image': image, 'label': label}


def _import_split_generators(builder, dataset: str, src: str):
  """Shared `_split_generators`: read the local IDX files instead of URLs."""
  num_classes = builder.info.features['label'].num_classes
  files = find_idx_files(dataset, src)
  generators = {}
  for split, paths in files.items():
    images, labels = load_idx_split(
        paths['images'], paths['labels'], num_classes
    )
    logging.info('%s %s: %d examples from %s', dataset, split, len(images),
                 paths['images'])
    generators[split] = _examples(images, labels)
  return generators


def _make_builder_cls(base: type[Any], name: str) -> type[Any]:
  """Subclasses TFDS builder `base` (unregistered) to read local IDX files."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class IdxBuilder(base, skip_registration=True):
    """TFDS builder `base` with `_split_generators` reading local IDX files."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
      # Nothing is downloaded, so there is no checksums file to locate (and
      # locating it needs the optional `importlib_resources` package).
      return None

    def __init__(self, *, src: str, dataset: str, **kwargs):
      self._idx_src = src
      self._idx_dataset = dataset
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager  # Offline: the files are already local.
      return _import_split_generators(self, self._idx_dataset, self._idx_src)

  # Same name and module as TFDS's own builder => same data_dir layout and the
  # same dataset_info.json as a copy TFDS prepared itself.
  IdxBuilder.name = name
  IdxBuilder.__module__ = base.__module__
  IdxBuilder.__name__ = f'{base.__name__}FromIdx'
  IdxBuilder.__qualname__ = IdxBuilder.__name__
  return IdxBuilder


def _builder_cls(dataset: str) -> type[Any]:
  """Returns the TFDS builder class that `dataset` mirrors."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  bases = {
      'mnist': tfds.image_classification.MNIST,
      'fashion_mnist': tfds.image_classification.FashionMNIST,
      'emnist': tfds.image_classification.EMNIST,
  }
  base_name = dataset.split('/', 1)[0]
  if base_name not in bases or (base_name == 'emnist') != ('/' in dataset):
    raise ValueError(
        f'--dataset={dataset!r} is not importable from IDX files; use mnist, '
        'fashion_mnist or emnist/<config> (e.g. emnist/digits).'
    )
  return _make_builder_cls(bases[base_name], base_name)


def import_idx(
    dataset: str, src: str, data_dir: str, *, overwrite: bool = False
) -> Any:
  """Imports the IDX files of `dataset` from `src` into TFDS `data_dir`.

  Args:
    dataset: 'mnist', 'fashion_mnist' or 'emnist/<config>'.
    src: directory holding the IDX files (see the module docstring).
    data_dir: TFDS data directory to write (created if needed).
    overwrite: replace an existing prepared copy; otherwise an existing copy
      is kept and the call returns at once.

  Returns:
    The prepared `tfds.core.DatasetBuilder` (readable with `as_dataset`).

  Raises:
    ValueError: unsupported `dataset`.
    IdxFormatError: missing or malformed files.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(src):
    raise IdxFormatError(f'--src={src} is not a directory.')
  cls = _builder_cls(dataset)
  find_idx_files(dataset, src)  # Fail fast, before TFDS creates anything.
  kwargs = {'src': src, 'dataset': dataset, 'data_dir': data_dir}
  if '/' in dataset:
    kwargs['config'] = dataset.split('/', 1)[1]
  builder = cls(**kwargs)
  mode = (
      tfds.download.GenerateMode.FORCE_REDOWNLOAD
      if overwrite
      else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=mode, try_download_gcs=False
      )
  )
  return builder


_DATASET = flags.DEFINE_string(
    'dataset', None,
    'mnist | fashion_mnist | emnist/<config>, e.g. emnist/digits.',
)
_SRC = flags.DEFINE_string('src', None, 'Directory holding the IDX files.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', 'data/tfds', 'TFDS data directory to write.'
)
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace an existing prepared copy.'
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  start = time.perf_counter()
  try:
    builder = import_idx(
        _DATASET.value, _SRC.value, _DATA_DIR.value, overwrite=_OVERWRITE.value
    )
  except (IdxFormatError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  counts = {s: info.num_examples for s, info in builder.info.splits.items()}
  print(
      f'Imported {_DATASET.value} into {builder.data_dir}: {counts} '
      f'({time.perf_counter() - start:.1f} s).'
  )


if __name__ == '__main__':
  flags.mark_flags_as_required(['dataset', 'src'])
  app.run(main)
