"""Bad configs and workdirs fail before any data loads, in one line naming the key or path.

The in-process cases make loading data fail the test; the command-line cases point the data
directory at nothing, so reaching the data loader would end in a data error (exit 3), not
the config error (exit 2) they expect.
"""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from pdcnno_jax import config_lib, config_validation
from pdcnno_jax.data import input_pipeline
from pdcnno_jax.models import factory
from pdcnno_jax.optim import factory as optim_factory
from pdcnno_jax.pruning import masking, selection
from pdcnno_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _default(**overrides):
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py'))
  for dotted, value in overrides.items():
    section, _, key = dotted.rpartition('__')
    (config[section] if section else config)[key] = value
  return config


@pytest.fixture
def no_data(monkeypatch):
  def fail(*args, **kwargs):
    pytest.fail('data was loaded before the config was checked')
  for name in ('load_dataset', 'train_batches', 'eval_batches'):
    monkeypatch.setattr(input_pipeline, name, fail)


_BAD = [
    (dict(num_epochs=0), 'config.num_epochs=0 must be a number in (0, inf]'),
    (dict(parallel__staleness=-2), 'config.parallel.staleness=-2 must be an integer >= 0, or -1'),
    (dict(optimizer__name='adamm'), "config.optimizer.name='adamm': Unknown optimizer"),
    (dict(optimizer__schedule='linear'), "config.optimizer.schedule='linear' is not one of"),
    (dict(model__name='vgg99'), "config.model.name='vgg99' is not one of"),
    (dict(prune__selection='best'), "config.prune.selection='best' is not one of"),
    (dict(parallel__balancer='fair'), "config.parallel.balancer='fair' is not one of"),
    (dict(init__method='lsuv2'), "config.init.method='lsuv2' is not one of"),
    (dict(prune__pretrain_fraction=0.0), 'config.prune.pretrain_fraction=0.0 must be'),
    (dict(model__dropout_rate=1.0), 'config.model.dropout_rate=1.0 must be a number in [0, 1)'),
    (dict(parallel__slowdown='1,x'), "config.parallel.slowdown='1,x' must be comma-separated"),
    (dict(parallel__lbrla_weights='load=x'), "config.parallel.lbrla_weights='load=x'"),
    (dict(data__name='imagenet2012'), 'config.data.image_size=0: imagenet2012 images vary'),
    (dict(data__image_size=2), "config.model.name='lenet5' does not fit"),
    (dict(prune__method='fmp', prune__selection='global_macs', prune__target_mac_reduction=100.0),
     'config.prune.target_mac_reduction=100.0 is out of reach: with prune.min_channels=2, '
     'lenet5 can shrink at most'),
]


@pytest.mark.parametrize('overrides, message', _BAD, ids=[str(o) for o, _ in _BAD])
def test_bad_config_is_one_line_naming_the_key(no_data, tmp_path, overrides, message):
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.preflight(_default(**overrides), str(tmp_path / 'workdir'))
  assert len(info.value.problems) == 1 and '\n' not in info.value.problems[0]
  assert info.value.problems[0].startswith(message), info.value.problems[0]
  assert not (tmp_path / 'workdir').exists()


def test_every_invalid_key_is_reported_at_once():
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.validate(_default(parallel__staleness=-2, optimizer__name='adamm',
                                        num_epochs=0))
  assert len(info.value.problems) == 3, info.value.problems


def test_rules_and_choices_name_keys_of_the_default_config():
  config = _default()
  for key in list(config_validation.RULES) + list(config_validation.choices()):
    node = config
    for part in key.split('.'):
      assert part in node, f'{key} is not in configs/default.py'
      node = node[part]


def test_choices_come_from_the_registries():
  found = config_validation.choices()
  assert found['model.name'] == tuple(factory.MODEL_NAMES)
  assert found['prune.selection'] == tuple(selection.SELECTIONS)


@pytest.fixture(scope='module')
def lenet():
  """The default model with every variable set to ones (no initialiser runs: fast)."""
  config = _default()
  graphdef, state = nnx.split(config_validation.abstract_model(config))
  return config, nnx.merge(graphdef, jax.tree.map(lambda x: np.ones(x.shape, x.dtype), state))


@pytest.mark.parametrize('min_channels', [1, 2, 4])
def test_reachable_mac_reduction_is_what_selection_can_reach(lenet, min_channels):
  config, model = lenet
  best = config_validation.max_mac_reduction(config_validation.abstract_model(config),
                                             min_channels)
  rng = np.random.default_rng(0)
  specs = masking.prunable_specs(model)
  scores = {s.name: rng.random(s.out_channels) for s in specs}
  masks = lambda: {s.name: np.ones(s.out_channels, np.float32) for s in specs}
  selection.select_by_macs(scores, masks(), model, target_reduction=best * 0.999,
                           min_channels=min_channels)
  with pytest.raises(ValueError, match=f'reduced is {best:.3g}x'):
    selection.select_by_macs(scores, masks(), model, target_reduction=best * 1.001,
                             min_channels=min_channels)


def test_checkpoint_bytes_match_a_real_train_state(lenet):
  config, model = lenet
  tx = optim_factory.build_optimizer(config.optimizer, total_steps=100, steps_per_epoch=10)
  _, state = state_lib.create_train_state(model, tx)
  real = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
  assert config_validation.checkpoint_bytes(config) == real


def test_workdir_checks(tmp_path):
  config_validation.check_workdir(str(tmp_path / 'new' / 'run'), 1)
  assert not (tmp_path / 'new').exists()  # Checked, not created.
  (tmp_path / 'file').write_text('x')
  with pytest.raises(config_validation.WorkdirError, match='is a file, not a directory'):
    config_validation.check_workdir(str(tmp_path / 'file'))
  with pytest.raises(config_validation.WorkdirError, match=r'cannot be created: .*file is a'):
    config_validation.check_workdir(str(tmp_path / 'file' / 'run'))
  with pytest.raises(config_validation.WorkdirError, match='MiB free'):
    config_validation.check_workdir(str(tmp_path / 'run'), 2**62)
  if os.path.isdir('/proc'):  # Read-only even for root.
    with pytest.raises(config_validation.WorkdirError, match='is not writable'):
      config_validation.check_workdir('/proc/pdcnno_workdir')


def test_batch_must_split_over_the_devices():
  config = _default(data__batch_size=100)
  with pytest.raises(config_validation.ConfigError, match='divisible by the 8 devices .*96 or '
                     '104'):
    config_validation.check_devices(config, 8, 2)
  config_validation.check_devices(_default(data__batch_size=96), 8, 2)


def _main(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
  cmd = [sys.executable, '-m', 'pdcnno_jax.main', f'--workdir={tmp_path}/workdir', *args,
         f'--config.data.data_dir={tmp_path}/no_data']
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if re.match(r'(Config|Workdir) error:|Error:', l)]


@pytest.mark.parametrize('args, message', [
    (['--config=configs/default.py', '--config.num_epochs=abc'],
     "Config error: --config.num_epochs=abc: invalid literal for int() with base 10: 'abc'"),
    (['--config=BROKEN'], 'Config error: config file BROKEN line 1: invalid syntax'),
    (['--config=configs/default.py', '--config.parallel.staleness=-2'],
     'Config error: config.parallel.staleness=-2 must be'),
])
def test_command_line_errors_are_one_line_before_data(tmp_path, args, message):
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n')
  args = [a.replace('BROKEN', str(broken)) for a in args]
  message = message.replace('BROKEN', str(broken))
  result = _main(tmp_path, *args)
  assert result.returncode == 2, result.stderr[-3000:]
  assert _error_lines(result.stderr) == [_error_lines(result.stderr)[0]], result.stderr
  assert _error_lines(result.stderr)[0].startswith(message), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'workdir').exists()


def test_debug_flag_shows_the_traceback(tmp_path):
  (tmp_path / 'workdir').write_text('not a directory')
  result = _main(tmp_path, '--config=configs/default.py', '--debug')
  assert result.returncode != 0
  assert 'Traceback' in result.stderr and 'is a file, not a directory' in result.stderr


def test_a_corrupt_data_set_is_a_data_error_with_every_line_of_its_fix():
  """The record file and the rebuild command both reach the user, with the data exit code."""
  from pdcnno_jax import main  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.data import datasets  # pylint: disable=g-import-not-at-top
  error = datasets.DatasetCorruptError('data/x-train.tfrecord is corrupt.\nRebuild: run y')
  code, lines = main.error_lines(error)
  assert code == main.EXIT_DATA
  assert lines == ['Data error: data/x-train.tfrecord is corrupt.\nRebuild: run y']
