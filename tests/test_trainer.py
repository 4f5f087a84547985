"""End to end: training on tiny synthetic data, report, NaN stop, resume after a real kill."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from pdcnno_jax import config_lib, testing
from pdcnno_jax import experiment
from pdcnno_jax.diagnostics import collapse
from pdcnno_jax.loop import checks
from pdcnno_jax.train import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return testing.make_idx_dataset(str(tmp_path_factory.mktemp('tfds')), num_train=512,
                                  num_test=256)


def tiny_config(data_dir, **overrides):
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py'))
  config.data.data_dir = data_dir
  config.data.batch_size = 32
  config.data.eval_batch_size = 128
  config.num_epochs = 2
  config.log_every_steps = 4
  config.checkpoint_every_steps = 6
  config.optimizer.learning_rate = 0.05
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def test_one_run_end_to_end(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  report = experiment.train_and_evaluate(tiny_config(data_dir, num_epochs=3), workdir)
  # Synthetic classes are separable: far above chance (10%) after three short epochs.
  assert report['test']['accuracy'] > 0.6
  assert report['steps'] == 3 * (512 // 32)
  with open(os.path.join(workdir, 'report.json')) as f:
    on_disk = json.load(f)
  assert on_disk['test'] == report['test']
  for phase in ('compile', 'train', 'eval', 'data_load'):
    assert on_disk['wall_time_s'][phase] > 0
  assert on_disk['model']['params'] == 61706 and on_disk['model']['macs'] == 416520
  assert on_disk['peak_host_rss_bytes'] > 0
  dead = on_disk['diagnostics']['dead_maps']
  assert dead['examples'] == 256  # The whole (small) test split, fewer than dead_map_examples.
  assert sorted(dead['layers']) == ['conv1', 'conv2']
  for layer in dead['layers'].values():
    assert 0 <= layer['dead'] == len(layer['dead_indices']) <= layer['kept']
  lines = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
  assert any('train/images_per_s' in json.loads(l) for l in lines)
  assert os.listdir(os.path.join(workdir, 'tensorboard'))


def test_collapsed_run_stops_with_clear_error_and_keeps_its_checkpoints(data_dir, tmp_path):
  # SGD at a step size of 10 kills every ReLU: the network then predicts the class prior.
  workdir = str(tmp_path / 'collapse')
  config = tiny_config(data_dir, num_epochs=3)
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 10.0
  config.checkpoint_max_loss_ratio = 0.0  # Leave the stop to the collapse detector.
  config.checkpoint_max_norm_ratio = 0.0
  with pytest.raises(collapse.TrainingCollapseError, match='warmup_epochs'):
    experiment.train_and_evaluate(config, workdir)
  assert any(d.isdigit() for d in os.listdir(os.path.join(workdir, 'checkpoints')))


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path / 'nan')
  config = tiny_config(data_dir, num_epochs=2, log_every_steps=1, checkpoint_every_steps=1)
  config.optimizer.learning_rate = 1e9
  config.optimizer.schedule = 'constant'
  with pytest.raises(checks.DivergedError, match="learning_rate"):
    experiment.train_and_evaluate(config, workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(
      ckpt_dir) else []
  for step in steps:  # Whatever was saved is finite.
    restored = checkpointing.load_arrays(os.path.join(ckpt_dir, str(step), 'state'))
    leaves = jax.tree.leaves(restored['params'])
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def _run_main(workdir, data_dir, env_extra=None):
  env = dict(os.environ, **(env_extra or {}))
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
  cmd = [sys.executable, '-m', 'pdcnno_jax.main', f'--config={REPO}/configs/default.py',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
         '--config.data.batch_size=32', '--config.data.eval_batch_size=128',
         '--config.num_epochs=2', '--config.checkpoint_every_steps=5',
         '--config.log_every_steps=4']
  return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _final_params(workdir):
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  last = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  restored = checkpointing.load_arrays(os.path.join(ckpt_dir, str(last), 'state'))
  return last, restored['params']


def test_resume_after_kill_matches_uninterrupted_run(data_dir, tmp_path):
  straight = str(tmp_path / 'straight')
  killed = str(tmp_path / 'killed')
  result = _run_main(straight, data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  # SIGKILL right after the step-10 save was issued (mid-epoch, async write in flight).
  result = _run_main(killed, data_dir, {'PDCNNO_FAULT_KILL_AT_STEP': '10'})
  assert result.returncode == -9, result.stderr[-3000:]
  result = _run_main(killed, data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(killed, 'report.json')) as f:
    assert json.load(f)['resumed_from_step'] in (5, 10)
  step_a, params_a = _final_params(straight)
  step_b, params_b = _final_params(killed)
  assert step_a == step_b == 32
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_config_key_is_a_clear_error(tmp_path):
  cmd = [sys.executable, '-m', 'pdcnno_jax.main', f'--config={REPO}/configs/default.py',
         f'--workdir={tmp_path}', '--config.optimizer.learning_rat=0.1']
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert 'learning_rat' in result.stderr and 'Did you mean' in result.stderr
  assert 'Traceback' not in result.stderr


def test_missing_dataset_names_the_fix(tmp_path):
  cmd = [sys.executable, '-m', 'pdcnno_jax.main', f'--config={REPO}/configs/default.py',
         f'--workdir={tmp_path}/w', f'--config.data.data_dir={tmp_path}/empty']
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 3
  assert 'pdcnno_jax.data.idx_import' in result.stderr
  assert 'Traceback' not in result.stderr


def test_init_and_pruning_stages_then_resume_rebuilds_compacted_model(data_dir, tmp_path):
  workdir = str(tmp_path / 'stages')
  config = tiny_config(data_dir, num_epochs=1)
  config.model.name = 'lenet5_caffe'
  config.init.method = 'ifas'
  config.init.swarm_size = 4
  config.init.generations = 2
  config.init.sgd_steps = 2
  config.prune.method = 'fmp'
  config.prune.pretrain_fraction = 0.5
  config.prune.selection = 'global_macs'
  config.prune.target_mac_reduction = 4.0
  report = experiment.train_and_evaluate(config, workdir)
  prune = report['prune']
  assert prune['compacted'] and prune['mac_reduction'] >= 4.0
  assert report['model']['macs'] == prune['macs_after'] < prune['macs_before']
  assert min(prune['channels_after'].values()) >= config.prune.min_channels
  assert report['init']['gradient_steps'] == 4 * 2 * 2
  assert report['wall_time_s']['init'] > 0 and report['wall_time_s']['prune'] > 0
  # A second run in the same workdir resumes: it must rebuild the narrower architecture
  # from the checkpoint metadata (not re-run the stages) and evaluate to the same result.
  again = experiment.train_and_evaluate(config, workdir)
  assert again['resumed_from_step'] == report['steps']
  assert again['test'] == report['test']
  assert again['model']['macs'] == report['model']['macs']


def test_cgmse_trains_through_the_pruning_stage(data_dir, tmp_path):
  """PDCNNO's pipeline: FMP pre-training, compaction and fine-tuning, all with CGMSE.

  CGMSE's state starts as the parameters themselves; each fresh optimizer state the stages
  build must own its buffers, or the donating training step fails.
  """
  config = tiny_config(data_dir, num_epochs=1)
  config.model.name = 'lenet5_caffe'
  config.optimizer.name = 'cgmse'
  config.optimizer.mode = 'minibatch'
  config.prune.method = 'fmp'
  config.prune.pretrain_fraction = 0.5
  config.prune.pretrain_epochs = 1
  config.prune.selection = 'global_macs'
  config.prune.target_mac_reduction = 2.0
  report = experiment.train_and_evaluate(config, str(tmp_path / 'cgmse_fmp'))
  assert report['prune']['compacted'] and report['prune']['mac_reduction'] >= 2.0
  assert math.isfinite(report['test']['loss'])
