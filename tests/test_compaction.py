"""Tests for pdcnno_jax.pruning.compaction and the pruning stage (stage.run_pruning)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from pdcnno_jax import config_lib
from pdcnno_jax.models import counting
from pdcnno_jax.pruning import compaction, masking, scorers, selection, stage
from pdcnno_jax.testing import random_model as build_model
from pdcnno_jax.train import sharding, steps
from pdcnno_jax.train import state as state_lib


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preprocess(images):
  return images.astype(jnp.float32) / 255.0


def _np(x):
  return np.asarray(jax.device_get(x))


def _config(name, **kwargs):
  return ml_collections.ConfigDict({'name': name, **kwargs})


def _tx():
  return optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, momentum=0.9))


def _pruned(config, input_shape, seed=0, ratio=0.5):
  graphdef, state = state_lib.create_train_state(build_model(config, input_shape, seed), _tx())
  masks = selection.select_by_layer_ratio(
      scorers.random(graphdef, state, seed=seed),
      masking.read_state_masks(graphdef, state), ratio=ratio, min_channels=1)
  return graphdef, masking.apply_masks(graphdef, state, masks)


def _images(input_shape, size=4, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(size=(size,) + input_shape), jnp.float32)


CASES = {
    'lenet5_caffe_28': (_config('lenet5_caffe', width_multiplier=0.1), (28, 28, 1)),
    'lenet5_32': (_config('lenet5', width_multiplier=0.5), (32, 32, 1)),
    'vgg11_32': (_config('vgg11', width_multiplier=0.0625), (32, 32, 3)),
    'vgg11_bn_32': (_config('vgg11', width_multiplier=0.0625, batch_norm=True), (32, 32, 3)),
    'vgg11_bn_28': (_config('vgg11', width_multiplier=0.0625, batch_norm=True), (28, 28, 1)),
    'resnet20': (_config('resnet20', width_multiplier=0.25), (32, 32, 3)),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_compacted_model_has_the_masked_logits_and_counts(case):
  config, input_shape = CASES[case]
  graphdef, state = _pruned(config, input_shape)
  masked = nnx.merge(graphdef, state.params, state.model_state, copy=True)
  compacted = compaction.compact_model(masked, config, 10, input_shape)

  images = _images(input_shape)
  np.testing.assert_allclose(_np(compacted(images)), _np(masked(images)), rtol=0, atol=1e-5)
  if config.get('batch_norm') or config.name.startswith('resnet'):
    # Training mode normalises with batch statistics; over 4 samples of 1x1 maps these
    # amplify float32 rounding (the conv sums run over different channel counts).
    np.testing.assert_allclose(_np(compacted(images, train=True)),
                               _np(masked(images, train=True)), rtol=0, atol=1e-4)

  kept = masking.read_masks(masked)
  for spec in masking.prunable_specs(compacted):
    assert spec.out_channels == int(kept[spec.name].sum()) >= 1
  assert all(mask.all() for mask in masking.read_masks(compacted).values())
  assert counting.totals(compacted) == counting.totals(masked)
  assert counting.totals(compacted)['macs'] < selection.dense_macs(masked)


def test_compacting_a_train_state_continues_training_identically():
  """Momentum is sliced with the parameters: one more step gives the same model."""
  config, input_shape = CASES['lenet5_caffe_28']
  graphdef, state = _pruned(config, input_shape, seed=1)
  mesh = sharding.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(0)
  batches = [{'image': rng.integers(0, 256, (8,) + input_shape, dtype=np.uint8),
              'label': rng.integers(0, 10, 8).astype(np.int32)} for _ in range(2)]
  masked_step = steps.make_train_step(graphdef, _tx(), preprocess, mesh, donate=False)
  state, _ = masked_step(state, batches[0])  # Nonzero momentum before compaction.

  new_graphdef, new_state = compaction.compact(graphdef, state, config, 10, input_shape)
  assert int(new_state.step) == int(state.step)
  compact_step = steps.make_train_step(new_graphdef, _tx(), preprocess, mesh, donate=False)
  state, masked_metrics = masked_step(state, batches[1])
  new_state, compact_metrics = compact_step(new_state, batches[1])
  np.testing.assert_allclose(float(compact_metrics['loss']), float(masked_metrics['loss']),
                             rtol=1e-6)
  images = preprocess(jnp.asarray(batches[0]['image']))
  np.testing.assert_allclose(_np(state_lib.merge_model(new_graphdef, new_state)(images)),
                             _np(state_lib.merge_model(graphdef, state)(images)),
                             rtol=0, atol=1e-5)


def test_save_and_load_without_the_config(tmp_path):
  config, input_shape = CASES['lenet5_caffe_28']
  graphdef, state = _pruned(config, input_shape, seed=2)
  compacted = compaction.compact_model(state_lib.merge_model(graphdef, state), config, 10,
                                       input_shape)
  compaction.save_compacted(tmp_path / 'model', compacted,
                            {'model_name': config.name, 'num_classes': 10,
                             'input_shape': input_shape, 'mac_reduction': 2.5})
  architecture = json.loads((tmp_path / 'model' / compaction.ARCHITECTURE_FILE).read_text())
  assert architecture['model_name'] == 'lenet5_caffe'
  assert architecture['constructor_kwargs'] == {
      'variant': 'lenet5_caffe', 'width_multiplier': 0.1,
      'conv_widths': [int(m.sum()) for m in masking.read_state_masks(graphdef, state).values()]}
  assert architecture['metadata'] == {'mac_reduction': 2.5}

  loaded = compaction.load_compacted(tmp_path / 'model')
  images = _images(input_shape, seed=3)
  np.testing.assert_allclose(_np(loaded(images)), _np(compacted(images)), rtol=0, atol=1e-6)
  assert loaded.constructor_kwargs() == compacted.constructor_kwargs()

  with pytest.raises(ValueError, match='model_name'):
    compaction.save_compacted(tmp_path / 'other', compacted, {'num_classes': 10})
  with pytest.raises(FileNotFoundError, match='save_compacted'):
    compaction.load_compacted(tmp_path / 'missing')


def test_residual_stream_channels_cannot_be_compacted():
  config, input_shape = CASES['resnet20']
  model = build_model(config, input_shape)
  model.blocks[0].mask.set_value(model.blocks[0].mask[...].at[0].set(0.0))
  with pytest.raises(ValueError, match='residual-stream'):
    compaction.compact_model(model, config, 10, input_shape)


# ----------------------------------------------------------------------------------------
# The stage.


def _prune_config(**overrides):
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py')).prune
  config.update(method='fmp', score_examples=16, selection='global_macs', min_channels=1,
                latency_repeats=0)
  config.update(overrides)
  return config


def _scoring_batches(input_shape, count, size=8):
  rng = np.random.default_rng(5)
  for _ in range(count):
    yield {'image': rng.integers(0, 256, (size,) + input_shape, dtype=np.uint8),
           'label': rng.integers(0, 10, size).astype(np.int32)}


@pytest.mark.parametrize('method', ['fmp', 'fmptl'])
def test_run_pruning_iterative_with_compaction(method):
  model_config, input_shape = CASES['lenet5_caffe_28']
  model = build_model(model_config, input_shape)
  graphdef, state = state_lib.create_train_state(model, _tx())
  calls = []

  def finetune_fn(graphdef, state, epochs):
    calls.append((epochs, masking.read_state_masks(graphdef, state)))
    return state

  consumed = []

  def batches():
    for batch in _scoring_batches(input_shape, 10):
      consumed.append(1)
      yield batch

  timed = method == 'fmp'  # Latency of masked vs compacted: once is enough.
  target = stage.PruningTarget(graphdef, state, model_config, 10, input_shape, preprocess,
                               sharding.make_mesh(jax.devices()[:1]),
                               tx=_tx() if timed else None)
  new_graphdef, new_state, report = stage.run_pruning(
      target, _prune_config(method=method, iterations=3, finetune_epochs=2,
                            target_mac_reduction=2.0, latency_repeats=2 if timed else 0),
      scoring_batches=batches, finetune_fn=finetune_fn)

  assert len(consumed) == 2  # 16 examples = two batches of 8, reused by every round.
  assert report['scored_examples'] == 16
  assert [epochs for epochs, _ in calls] == [2, 2]  # Between rounds, not after the last.
  macs = [r['macs'] for r in report['rounds']]
  dense = report['macs_before']
  for i, value in enumerate(macs, start=1):
    assert value <= dense / 2.0 ** (i / 3) + 1e-9
  assert macs == sorted(macs, reverse=True)
  # Iterative: a channel pruned in round 1 is still pruned at the next fine-tuning call.
  for name, mask in calls[0][1].items():
    assert np.all(calls[1][1][name] <= mask)
  assert report['compacted'] and report['mac_reduction'] >= 2.0
  compacted = state_lib.merge_model(new_graphdef, new_state)
  assert counting.totals(compacted) == {'params': report['params_after'],
                                        'macs': report['macs_after']}
  assert counting.kept_channels(compacted) == report['channels_after']
  assert all(v >= 1 for v in report['channels_after'].values())
  rebuilt = compaction.build_architecture(**report['architecture'], num_classes=10,
                                          input_shape=input_shape)
  assert counting.totals(rebuilt) == counting.totals(compacted)
  if timed:
    latency = report['latency']
    assert latency['batch_size'] == 8
    for kind in ('inference_ms', 'train_step_ms'):
      assert set(latency[kind]) == {'masked', 'compacted'}
      assert all(ms > 0 for ms in latency[kind].values())
    assert latency['inference_speedup'] > 0 and latency['train_step_speedup'] > 0
  else:
    assert 'latency' not in report
  json.dumps(report)  # The report is JSON-serialisable.


def test_run_pruning_none_and_bad_config():
  model_config, input_shape = CASES['lenet5_caffe_28']
  model = build_model(model_config, input_shape)
  graphdef, state = state_lib.create_train_state(model, _tx())
  target = stage.PruningTarget(graphdef, state, model_config, 10, input_shape, preprocess)
  _, same_state, report = stage.run_pruning(target, _prune_config(method='none'))
  assert same_state is state and report['mac_reduction'] == 1.0
  with pytest.raises(ValueError, match='prune.method'):
    stage.run_pruning(target, _prune_config(method='taylor'))
  with pytest.raises(ValueError, match='prune.latency_target'):
    stage.run_pruning(target, _prune_config(selection='latency', latency_target='train'))
  with pytest.raises(ValueError, match='scoring set is empty'):
    stage.run_pruning(target, _prune_config())
  # Data-free baselines need no batches; threshold selection without compaction.
  _, masked, report = stage.run_pruning(
      target, _prune_config(method='l1', selection='threshold', threshold=1.0, compact=False))
  assert 'latency' not in report
  assert not report['compacted'] and report['macs_after'] < report['macs_before']
  assert masking.read_state_masks(graphdef, masked) != {}
