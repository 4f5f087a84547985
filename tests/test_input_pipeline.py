"""Tests for pdcnno_jax.data.input_pipeline (in-memory and streaming modes).

Runs on the 8 fake CPU devices tests/conftest.py sets up; tests that need them
skip when fewer exist. TFDS data comes from `tfds.testing.mock_data`, except
for the pipeline-mechanics tests, which use a small in-memory `Dataset` whose
labels are example ids, so coverage and order can be checked exactly.
"""

import gc
import threading
import time
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from pdcnno_jax import testing
from pdcnno_jax.data import datasets
from pdcnno_jax.data import in_memory
from pdcnno_jax.data import input_pipeline as ip
from pdcnno_jax.data import prefetch
from pdcnno_jax.data.layout import BatchLayout

P = jax.sharding.PartitionSpec


def _data_config(**overrides) -> ml_collections.ConfigDict:
  return testing.section('data', **{
      'data_dir': '/nonexistent/tfds', 'batch_size': 16, 'eval_batch_size': 16,
      **overrides})


def _sharding(num_devices: int = 8) -> jax.sharding.NamedSharding:
  if jax.device_count() < num_devices:
    pytest.skip(f'needs {num_devices} devices (tests/conftest.py sets 8)')
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ('data',))
  return jax.sharding.NamedSharding(mesh, P('data'))


def _id_dataset(num_train: int = 100, num_test: int = 37) -> ip.Dataset:
  """A tiny in-memory data set whose labels are example ids."""
  rng = np.random.default_rng(0)

  def split(n, offset):
    ids = np.arange(offset, offset + n, dtype=np.int32)
    images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = ids % 256  # Pixels follow their label.
    return ip.HostSplit(images, ids)

  return ip.Dataset(
      name='ids', num_classes=1000, image_shape=(4, 4, 1),
      num_examples={'train': num_train, 'test': num_test},
      mean=(0.5,), std=(0.25,),
      host_splits={'train': split(num_train, 0), 'test': split(num_test, 1000)},
  )


def _read_all(name: str, split: str, **kwargs) -> dict[str, np.ndarray]:
  """A whole (mock) TFDS split as numpy. (batch_size=-1 aborts on mocks.)"""
  ds = tfds.builder(name).as_dataset(split=split, **kwargs).batch(10**4)
  return next(iter(tfds.as_numpy(ds)))


def _labels(batches) -> list[np.ndarray]:
  return [np.asarray(b['label']) for b in batches]


# --- Pipeline mechanics ---------------------------------------------------


def test_train_batches_are_global_sharded_arrays():
  sharding = _sharding()
  dataset = _id_dataset()
  batch = next(ip.train_batches(
      dataset, global_batch_size=16, epoch=0, seed=0, sharding=sharding))
  assert batch['image'].shape == (16, 4, 4, 1)
  assert batch['image'].dtype == jnp.uint8
  assert batch['label'].dtype == jnp.int32
  for array in batch.values():
    assert array.sharding.is_equivalent_to(sharding, array.ndim)
    assert {s.data.shape[0] for s in array.addressable_shards} == {2}
  # Every row is the example its label names.
  images = np.asarray(batch['image'])
  labels = np.asarray(batch['label'])
  np.testing.assert_array_equal(
      images, dataset.host_splits['train'].images[labels])


def test_epoch_is_a_permutation_and_order_is_a_function_of_seed_and_epoch():
  sharding = _sharding()
  dataset = _id_dataset()
  run = lambda **kw: np.concatenate(_labels(ip.train_batches(
      dataset, global_batch_size=16, sharding=sharding, **kw)))
  epoch0 = run(epoch=0, seed=3)
  assert len(epoch0) == ip.steps_per_epoch(dataset, 'train', 16) * 16 == 96
  assert len(np.unique(epoch0)) == 96  # No example twice in an epoch.
  np.testing.assert_array_equal(epoch0, run(epoch=0, seed=3))
  np.testing.assert_array_equal(
      epoch0, ip.epoch_permutation(100, seed=3, epoch=0)[:96])
  assert not np.array_equal(epoch0, run(epoch=1, seed=3))
  assert not np.array_equal(epoch0, run(epoch=0, seed=4))


def test_start_step_resumes_the_exact_sequence():
  sharding = _sharding()
  dataset = _id_dataset()
  full = _labels(ip.train_batches(
      dataset, global_batch_size=16, epoch=2, seed=1, sharding=sharding))
  resumed = _labels(ip.train_batches(
      dataset, global_batch_size=16, epoch=2, seed=1, sharding=sharding,
      start_step=4))
  assert len(resumed) == len(full) - 4
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a, b)


def test_process_shares_assemble_the_same_global_batch():
  """Two 'processes' holding halves of the rows see the 1-process batch."""
  split = _id_dataset().host_splits['train']
  full_layout = BatchLayout(16, np.arange(16), None)
  halves = [BatchLayout(16, rows, None)
            for rows in (np.arange(8), np.arange(8, 16))]
  full = list(in_memory.train_host_batches(split, full_layout, 5, 1, 0, 6))
  parts = [list(in_memory.train_host_batches(split, h, 5, 1, 0, 6)) for h in halves]
  for step, batch in enumerate(full):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          batch[key], np.concatenate([p[step][key] for p in parts]))


def test_layout_rows_follow_the_mesh_devices():
  sharding = _sharding()
  layout = BatchLayout.create(sharding, 32)
  np.testing.assert_array_equal(layout.local_rows, np.arange(32))
  # A 2-D mesh whose batch dim is sharded over ('replica', 'data').
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4),
                           ('replica', 'data'))
  layout = BatchLayout.create(
      jax.sharding.NamedSharding(mesh, P(('replica', 'data'), None)), 16)
  assert layout.sharding.spec == P(('replica', 'data'))
  with pytest.raises(ValueError, match='divisible by the 8 devices'):
    BatchLayout.create(sharding, 12)


def test_eval_covers_every_example_exactly_once():
  sharding = _sharding()
  dataset = _id_dataset(num_test=37)
  batches = list(ip.eval_batches(
      dataset, 'test', global_batch_size=16, sharding=sharding))
  assert len(batches) == ip.steps_per_epoch(dataset, 'test', 16) == 3
  masks = np.concatenate([np.asarray(b['mask']) for b in batches])
  labels = np.concatenate(_labels(batches))
  assert masks.dtype == np.float32 and masks.sum() == 37
  np.testing.assert_array_equal(np.sort(labels[masks == 1]),
                                np.arange(1000, 1037))
  last = batches[-1]
  assert not np.asarray(last['image'])[5:].any()  # Padding is zeros.
  assert batches[0]['mask'].sharding.is_equivalent_to(sharding, 1)


def test_steps_per_epoch_and_split_errors():
  dataset = _id_dataset(num_train=100, num_test=37)
  assert ip.steps_per_epoch(dataset, 'train', 32) == 3
  assert ip.steps_per_epoch(dataset, 'test', 32) == 2
  with pytest.raises(ValueError, match="no split 'validation'"):
    ip.steps_per_epoch(dataset, 'validation', 32)
  with pytest.raises(ValueError, match='larger than the 100 training'):
    ip.steps_per_epoch(dataset, 'train', 128)


def test_normalize_matches_the_formula_under_jit():
  dataset = _id_dataset()
  images = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
  out = jax.jit(lambda x: ip.normalize(x, dataset))(images)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(
      out, (images / 255.0 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


def test_prefetcher_propagates_errors_and_stops_when_dropped():
  def failing():
    yield 1
    raise RuntimeError('boom')

  it = prefetch.Prefetcher(failing(), 2)
  assert next(it) == 1
  with pytest.raises(RuntimeError, match='boom'):
    next(it)

  before = threading.active_count()
  it = prefetch.Prefetcher(iter(range(10**9)), 2)
  assert next(it) == 0
  del it
  gc.collect()
  for _ in range(50):  # The thread notices within ~0.1 s.
    if threading.active_count() <= before:
      break
    time.sleep(0.05)
  assert threading.active_count() <= before


def test_channel_stats_are_exact():
  images = np.random.default_rng(0).integers(
      0, 256, (20000, 3, 2, 3), dtype=np.uint8)
  mean, std = in_memory.channel_stats(images)
  scaled = images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, scaled.mean(0), rtol=1e-9)
  np.testing.assert_allclose(std, scaled.std(0), rtol=1e-9)


# --- TFDS: missing data and mock data -------------------------------------


@pytest.mark.parametrize('name, fix', [
    ('fashion_mnist', 'python -m pdcnno_jax.data.idx_import '
                      '--dataset=fashion_mnist '
                      '--src=/usr/share/datasets/fashion-mnist '
                      '--data_dir={data_dir}'),
    ('svhn_cropped', 'tfds build svhn_cropped --data_dir={data_dir}'),
    ('imagenet2012', '--manual_dir='),
])
def test_missing_dataset_names_the_fix(tmp_path, name, fix):
  data_dir = str(tmp_path / 'empty')
  config = _data_config(name=name, data_dir=data_dir, image_size=32)
  with pytest.raises(datasets.DatasetNotFoundError) as info:
    ip.load_dataset(config, seed=0)
  message = str(info.value)
  assert repr(name) in message and data_dir in message
  assert fix.format(data_dir=data_dir) in message
  assert info.value.__cause__ is None and info.value.__suppress_context__


def test_download_false_never_prepares_and_true_asks_tfds(tmp_path):
  data_dir = str(tmp_path / 'empty')
  real_builder = tfds.builder
  builders = []

  def spy(*args, **kwargs):
    builders.append(real_builder(*args, **kwargs))
    builders[-1].download_and_prepare = mock.Mock(
        side_effect=RuntimeError('no network in tests'))
    return builders[-1]

  with mock.patch.object(tfds, 'builder', spy):
    with pytest.raises(datasets.DatasetNotFoundError, match='idx_import'):
      ip.load_dataset(_data_config(data_dir=data_dir), seed=0)
    builders[-1].download_and_prepare.assert_not_called()
    with pytest.raises(RuntimeError, match='no network in tests'):
      ip.load_dataset(_data_config(data_dir=data_dir, download=True), seed=0)
    builders[-1].download_and_prepare.assert_called_once_with()
  assert len(builders) == 2
  assert all(str(b.data_dir).startswith(data_dir) for b in builders)


def test_bad_config_values():
  with pytest.raises(ValueError, match='must be one of'):
    ip.load_dataset(_data_config(name='cifar10'), seed=0)
  with pytest.raises(ValueError, match='image_size > 0'):
    ip.load_dataset(_data_config(name='imagenet2012'), seed=0)
  with pytest.raises(ValueError, match='imagenet_num_classes'):
    ip.load_dataset(_data_config(name='imagenet2012', image_size=32,
                                 imagenet_num_classes=1001), seed=0)


@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist'])
def test_mock_in_memory_mnist_like(name):
  sharding = _sharding()
  with tfds.testing.mock_data(num_examples=40):
    dataset = ip.load_dataset(_data_config(name=name), seed=0)
  assert dataset.in_memory and dataset.num_classes == 10
  assert dataset.image_shape == (28, 28, 1)
  assert dataset.num_examples == {'train': 40, 'test': 40}
  assert dataset.mean == datasets.get_spec(name).mean
  batch = next(ip.train_batches(
      dataset, global_batch_size=16, epoch=0, seed=0, sharding=sharding))
  assert batch['image'].shape == (16, 28, 28, 1)
  assert int(jnp.max(batch['label'])) < 10


def test_mock_svhn_validation_holdout_and_resize():
  sharding = _sharding()
  with tfds.testing.mock_data(num_examples=50):
    dataset = ip.load_dataset(
        _data_config(name='svhn_cropped', validation_holdout=12), seed=7)
    resized = ip.load_dataset(
        _data_config(name='svhn_cropped', validation_holdout=12,
                     image_size=16), seed=7)
    full = _read_all('svhn_cropped', 'train')
  assert dataset.num_examples == {'train': 38, 'validation': 12, 'test': 50}
  assert dataset.image_shape == (32, 32, 3)
  train, val = dataset.host_splits['train'], dataset.host_splits['validation']
  # Train and validation partition the original training images.
  merged = np.concatenate([train.images, val.images]).reshape(50, -1)
  original = full['image'].reshape(50, -1)
  assert sorted(map(bytes, merged)) == sorted(map(bytes, original))
  batches = list(ip.eval_batches(
      dataset, 'validation', global_batch_size=8, sharding=sharding))
  assert sum(float(b['mask'].sum()) for b in batches) == 12
  # Resizing keeps the split and the labels.
  assert resized.image_shape == (16, 16, 3)
  assert resized.host_splits['validation'].images.shape == (12, 16, 16, 3)
  np.testing.assert_array_equal(resized.host_splits['validation'].labels,
                                val.labels)


def test_mock_svhn_paper_holdout_too_large_for_mock():
  with tfds.testing.mock_data(num_examples=50):
    with pytest.raises(ValueError, match='validation_holdout=6000'):
      ip.load_dataset(_data_config(name='svhn_cropped', validation_holdout=-1),
                      seed=0)


def test_mock_imagenet_streaming_class_subset_and_resize():
  sharding = _sharding()
  config = _data_config(name='imagenet2012', image_size=24,
                        imagenet_num_classes=500)
  with tfds.testing.mock_data(num_examples=48):
    dataset = ip.load_dataset(config, seed=0)
    labels = _read_all('imagenet2012', 'validation', decoders={
        'image': tfds.decode.SkipDecoding()})['label']
    assert not dataset.in_memory and dataset.num_classes == 500
    assert dataset.image_shape == (24, 24, 3)
    kept = int(np.sum(labels < 500))
    assert 0 < kept < 48  # The mock has labels on both sides of the cut.
    assert dataset.num_examples['test'] == kept

    # Evaluation: every kept example once, padded to whole global batches.
    batches = list(ip.eval_batches(
        dataset, 'test', global_batch_size=8, sharding=sharding))
    assert sum(float(b['mask'].sum()) for b in batches) == kept
    assert len(batches) == -(-kept // 8)

    # Training: class subset, resize, determinism, exact resume.
    steps = ip.steps_per_epoch(dataset, 'train', 8)
    run = lambda **kw: list(ip.train_batches(
        dataset, global_batch_size=8, seed=0, sharding=sharding, **kw))
    epoch0 = run(epoch=0)
    assert len(epoch0) == steps
    for batch in epoch0:
      assert batch['image'].shape == (8, 24, 24, 3)
      assert batch['image'].dtype == jnp.uint8
      assert int(jnp.max(batch['label'])) < 500
    again = run(epoch=0)
    resumed = run(epoch=0, start_step=2)
    other = run(epoch=1)
  for a, b in zip(epoch0, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  for a, b in zip(epoch0[2:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not all(np.array_equal(a['image'], b['image'])
                 for a, b in zip(epoch0, other))
