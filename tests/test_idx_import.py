"""Tests for pdcnno_jax.data.idx_import on small generated IDX files."""

import glob
import gzip
import os
import shutil
import subprocess
import sys

import ml_collections
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from pdcnno_jax import testing
from pdcnno_jax.data import datasets
from pdcnno_jax.data import idx_import
from pdcnno_jax.data import input_pipeline

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file (gzipped if path ends in .gz)."""
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(
      array.shape, '>u4'
  ).tobytes()
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def _make_split(rng, n: int, num_classes: int = 10):
  images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, num_classes, size=(n,), dtype=np.uint8)
  return images, labels


def _write_dataset(src, stems, sizes, *, gz: bool, sep: str = '-', seed=0):
  """Writes train/test IDX files; returns {split: (images, labels)}."""
  rng = np.random.default_rng(seed)
  ext = '.gz' if gz else ''
  data = {}
  for split, stem in stems.items():
    images, labels = _make_split(rng, sizes[split])
    _write_idx(os.path.join(src, f'{stem}-images{sep}idx3-ubyte{ext}'), images)
    _write_idx(os.path.join(src, f'{stem}-labels{sep}idx1-ubyte{ext}'), labels)
    data[split] = (images, labels)
  return data


def _canonical(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Sorted rows of (pixels, label): compares example multisets exactly."""
  flat = np.concatenate(
      [images.reshape(len(images), -1), labels.reshape(-1, 1).astype(np.uint8)],
      axis=1,
  )
  return np.sort(flat.view(np.dtype((np.void, flat.shape[1]))).ravel())


def _data_config(name: str, data_dir: str, **overrides) -> ml_collections.ConfigDict:
  return testing.section('data', name=name, data_dir=data_dir, batch_size=8,
                         eval_batch_size=8, **overrides)


@pytest.mark.parametrize('gz', [False, True])
def test_read_idx_round_trip(tmp_path, gz):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  path = str(tmp_path / ('a-idx3-ubyte' + ('.gz' if gz else '')))
  _write_idx(path, array)
  np.testing.assert_array_equal(idx_import.read_idx(path), array)


@pytest.mark.parametrize(
    'payload, message',
    [
        (b'\x01\x00\x08\x01\x00\x00\x00\x02ab', 'magic number'),
        (b'\x00\x00\x0d\x01\x00\x00\x00\x02ab', 'dtype code'),
        (b'\x00\x00\x08\x01\x00\x00\x00\x05ab', 'truncated or corrupt'),
        (b'\x00\x00\x08\x02\x00\x00', 'truncated IDX header'),
        (b'', 'empty file'),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, payload, message):
  path = tmp_path / 'bad-idx1-ubyte'
  path.write_bytes(payload)
  with pytest.raises(idx_import.IdxFormatError, match=message):
    idx_import.read_idx(str(path))


def test_mismatched_counts_and_labels_out_of_range(tmp_path):
  rng = np.random.default_rng(0)
  images, labels = _make_split(rng, 5)
  _write_idx(str(tmp_path / 'i'), images)
  _write_idx(str(tmp_path / 'l'), labels[:4])
  with pytest.raises(idx_import.IdxFormatError, match='5 images but'):
    idx_import.load_idx_split(str(tmp_path / 'i'), str(tmp_path / 'l'), 10)
  _write_idx(str(tmp_path / 'l'), np.full(5, 12, np.uint8))
  with pytest.raises(idx_import.IdxFormatError, match='out of range'):
    idx_import.load_idx_split(str(tmp_path / 'i'), str(tmp_path / 'l'), 10)
  with pytest.raises(idx_import.IdxFormatError, match='Is this a labels file'):
    idx_import.load_idx_split(str(tmp_path / 'l'), str(tmp_path / 'i'), 10)


def test_missing_file_lists_the_names_tried(tmp_path):
  with pytest.raises(idx_import.IdxFormatError,
                     match='train-images-idx3-ubyte'):
    idx_import.find_idx_files('mnist', str(tmp_path))


def test_unsupported_dataset(tmp_path):
  with pytest.raises(ValueError, match='not importable'):
    idx_import.import_idx('svhn_cropped', str(tmp_path), str(tmp_path / 'o'))


def test_emnist_import_reads_back_exactly_like_tfds(tmp_path):
  """EMNIST files keep TFDS's orientation (stored as in the IDX file)."""
  src = tmp_path / 'src'
  src.mkdir()
  data = _write_dataset(
      str(src),
      {'train': 'emnist-digits-train', 'test': 'emnist-digits-test'},
      {'train': 23, 'test': 9},
      gz=False,
      sep='.',
  )
  data_dir = str(tmp_path / 'tfds')
  idx_import.import_idx('emnist/digits', str(src), data_dir)

  builder = tfds.builder('emnist/digits', data_dir=data_dir)
  assert builder.version == tfds.image_classification.EMNIST.VERSION
  assert builder.info.splits['train'].num_examples == 23
  dataset = input_pipeline.load_dataset(
      _data_config('emnist/digits', data_dir), seed=0
  )
  assert dataset.num_examples == {'train': 23, 'test': 9}
  for split in ('train', 'test'):
    host = dataset.host_splits[split]
    assert host.images.shape[1:] == (28, 28, 1)
    np.testing.assert_array_equal(
        _canonical(host.images[..., 0], host.labels), _canonical(*data[split])
    )
  # No published constants: mean/std come from the training pixels.
  train = dataset.host_splits['train'].images / 255.0
  np.testing.assert_allclose(dataset.mean, [train.mean()], rtol=1e-6)
  np.testing.assert_allclose(dataset.std, [train.std()], rtol=1e-6)


def test_command_line_import_fashion_mnist_gz(tmp_path):
  """The documented command, on gzipped files, read back through the loader."""
  src = tmp_path / 'src'
  src.mkdir()
  data = _write_dataset(
      str(src), {'train': 'train', 'test': 't10k'},
      {'train': 31, 'test': 11}, gz=True, seed=1,
  )
  data_dir = str(tmp_path / 'tfds')
  result = subprocess.run(
      [sys.executable, '-m', 'pdcnno_jax.data.idx_import',
       '--dataset=fashion_mnist', f'--src={src}', f'--data_dir={data_dir}'],
      cwd=_REPO_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "'train': 31" in result.stdout

  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  reference = tfds.builder_cls('fashion_mnist')
  assert type(builder) is reference  # Read by TFDS's own builder class.
  assert builder.version == reference.VERSION
  assert builder.info.features['label'].names[0] == 'T-shirt/top'
  assert builder.info.features['image'].shape == (28, 28, 1)

  dataset = input_pipeline.load_dataset(
      _data_config('fashion_mnist', data_dir), seed=0
  )
  for split in ('train', 'test'):
    host = dataset.host_splits[split]
    np.testing.assert_array_equal(
        _canonical(host.images[..., 0], host.labels), _canonical(*data[split])
    )

  # Files missing for the requested data set: a usage error, no traceback.
  bad = subprocess.run(
      [sys.executable, '-m', 'pdcnno_jax.data.idx_import',
       '--dataset=emnist/digits', f'--src={src}', f'--data_dir={data_dir}'],
      cwd=_REPO_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert bad.returncode != 0
  assert 'emnist-digits-train-images-idx3-ubyte' in bad.stderr
  assert 'Traceback' not in bad.stderr


@pytest.fixture(scope='module')
def imported_mnist(tmp_path_factory):
  """A tiny mnist imported from generated IDX files: (src dir, TFDS data_dir)."""
  root = tmp_path_factory.mktemp('corrupt')
  src = root / 'src'
  src.mkdir()
  _write_dataset(str(src), {'train': 'train', 'test': 't10k'},
                 {'train': 40, 'test': 12}, gz=False, seed=2)
  data_dir = str(root / 'tfds')
  idx_import.import_idx('mnist', str(src), data_dir)
  return str(src), data_dir


def _corrupt(path: str, how: str) -> None:
  raw = bytearray(open(path, 'rb').read())
  if how == 'truncate':
    raw = raw[:len(raw) // 2]
  else:  # Flip one byte in the middle of a record's payload.
    raw[len(raw) // 2] ^= 0x5A
  with open(path, 'wb') as f:
    f.write(bytes(raw))


@pytest.mark.parametrize('how', ['truncate', 'bit_flip'])
@pytest.mark.parametrize('in_memory', [True, False])
def test_corrupt_record_file_names_the_file_and_the_rebuild(
    imported_mnist, tmp_path, how, in_memory):
  src, clean = imported_mnist
  data_dir = str(tmp_path / 'tfds')
  shutil.copytree(clean, data_dir)
  files = sorted(glob.glob(os.path.join(data_dir, 'mnist', '*', 'mnist-train.tfrecord*')))
  assert len(files) == 1
  _corrupt(files[0], how)
  config = _data_config('mnist', data_dir, in_memory=in_memory)
  with pytest.raises(datasets.DatasetCorruptError) as info:
    dataset = input_pipeline.load_dataset(config, seed=0)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    for _ in input_pipeline.train_batches(dataset, global_batch_size=8, epoch=0, seed=0,
                                          sharding=sharding):
      pass
  message = str(info.value)
  assert files[0] in message
  assert 't10k' not in message.split(' of ')[0]  # Only the damaged file is named.
  assert ('python -m pdcnno_jax.data.idx_import --dataset=mnist '
          f'--src=<directory with the IDX files> --data_dir={data_dir} --overwrite') in message
  assert info.value.__suppress_context__

  # The command it names repairs the data set.
  idx_import.import_idx('mnist', src, data_dir, overwrite=True)
  dataset = input_pipeline.load_dataset(config, seed=0)
  assert dataset.num_examples['train'] == 40
