"""Verified checkpoints: corruption falls back to the newest intact step, unhealthy states
are never saved, the last good step is pinned, and write errors are one clear line."""

import errno
import glob
import logging
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pdcnno_jax import config_lib
from pdcnno_jax.train import checkpointing
from pdcnno_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(scale=1.0, width=6, step=0):
  rng = np.random.default_rng(step)
  params = {'conv': {'kernel': jnp.asarray(scale * rng.normal(size=(3, 3, 1, width)),
                                           jnp.float32),
                     'bias': jnp.zeros(width, jnp.float32)},
            'dense': {'kernel': jnp.asarray(scale * rng.normal(size=(width, 4000)),
                                            jnp.float32)}}
  return state_lib.TrainState(
      step=jnp.int32(step), params=params,
      model_state={'mask': jnp.ones(width, jnp.float32), 'key': jax.random.key(step)},
      opt_state=jax.tree.map(jnp.zeros_like, params))


def _write_steps(directory, steps, **kwargs):
  checkpointer = checkpointing.Checkpointer(directory, **kwargs)
  for step in steps:
    checkpointer.save(step, _state(step=step), {'epoch': step})
  checkpointer.close()


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _biggest_data_file(directory, step):
  files = glob.glob(os.path.join(directory, str(step), 'state', '**', 'd', '*'), recursive=True)
  return max(files, key=os.path.getsize)


def _xor(path):
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    for i in range(middle, middle + 256):
      data[i] ^= 0x5A
    f.seek(0)
    f.write(data)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _incomplete(directory, step):
  """A copy of ``step`` renamed as the tmp dir of a later save that never finished."""
  shutil.copytree(os.path.join(directory, str(step)),
                  os.path.join(directory, f'{step + 1}.orbax-checkpoint-tmp'))


_DAMAGE = {
    'xor_array_data': lambda d: _xor(_biggest_data_file(d, 2)),
    'truncated_data_file': lambda d: _truncate(_biggest_data_file(d, 2)),
    'deleted_data_file': lambda d: os.remove(_biggest_data_file(d, 2)),
    'deleted_meta': lambda d: os.remove(os.path.join(d, '2', 'meta', 'metadata')),
    'deleted_array_metadata': lambda d: os.remove(os.path.join(d, '2', 'state', '_METADATA')),
    'deleted_checksums': lambda d: shutil.rmtree(os.path.join(d, '2', 'checksums')),
    'tmp_dir_left_behind': lambda d: _incomplete(d, 2),
}


@pytest.mark.parametrize('damage', sorted(_DAMAGE))
def test_damaged_newest_step_falls_back_to_older_intact_one(tmp_path, damage, caplog):
  directory = str(tmp_path / 'ckpt')
  _write_steps(directory, [1, 2])
  _DAMAGE[damage](directory)
  expected = 2 if damage == 'tmp_dir_left_behind' else 1
  with caplog.at_level(logging.WARNING):
    checkpointer = checkpointing.Checkpointer(directory)
    assert checkpointer.latest_step() == expected
    assert checkpointer.read_meta() == {'epoch': expected}
    restored, meta = checkpointer.restore(_state())
  assert meta == {'epoch': expected}
  _assert_same(restored, _state(step=expected))
  named = '3.orbax-checkpoint-tmp' if expected == 2 else 'step 2'
  assert any(named in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  if damage == 'xor_array_data':  # Only the checksum can notice flipped bytes.
    assert any('checksum mismatch' in r.getMessage() for r in caplog.records)
  checkpointer.close()


def test_every_step_corrupt_is_a_clear_error_listing_them(tmp_path):
  directory = str(tmp_path / 'ckpt')
  _write_steps(directory, [1, 2])
  _xor(_biggest_data_file(directory, 1))
  os.remove(os.path.join(directory, '2', 'meta', 'metadata'))
  checkpointer = checkpointing.Checkpointer(directory)
  with pytest.raises(checkpointing.NoIntactCheckpointError,
                     match=r'step 1: checksum mismatch.*step 2: its meta .* unreadable'):
    checkpointer.latest_step()
  with pytest.raises(FileNotFoundError, match='No intact checkpoint'):
    checkpointer.restore(_state())
  checkpointer.close()


def test_restore_into_another_architecture_names_both_shapes(tmp_path):
  directory = str(tmp_path / 'ckpt')
  _write_steps(directory, [1])
  checkpointer = checkpointing.Checkpointer(directory)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'params\.conv\.kernel: saved \(3, 3, 1, 6\) float32 vs current '
                     r'\(3, 3, 1, 3\) float32'):
    checkpointer.restore(_state(width=3))
  other = _state()
  other = other.replace(opt_state=(other.opt_state, jnp.zeros(2)))
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r'not in the checkpoint'):
    checkpointer.restore(other)
  checkpointer.close()


def test_resume_is_bit_identical_and_keeps_the_health_references(tmp_path):
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpointing.Checkpointer(directory, max_loss_ratio=10, max_norm_ratio=10)
  checkpointer.save(1, _state(step=1), {}, loss=0.5)
  checkpointer.save(2, _state(step=2), {}, loss=0.2)
  checkpointer.close()
  resumed = checkpointing.Checkpointer(directory, max_loss_ratio=10, max_norm_ratio=10)
  restored, _ = resumed.restore(_state())
  _assert_same(restored, _state(step=2))
  with pytest.raises(checkpointing.UnhealthyStateError, match=r'best loss seen \(0.2\)'):
    resumed.save(3, _state(step=3), {}, loss=2.5)
  with pytest.raises(checkpointing.UnhealthyStateError, match='parameter norm'):
    resumed.save(3, _state(scale=20, step=3), {}, loss=0.3)
  resumed.save(3, _state(scale=2, step=3), {}, loss=1.9)
  resumed.close()


def test_unhealthy_state_is_never_saved_and_error_names_committed_step(tmp_path):
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpointing.Checkpointer(directory, keep=1, max_loss_ratio=100,
                                            max_norm_ratio=100)
  checkpointer.set_norm_reference(_state().params)
  with pytest.raises(checkpointing.UnhealthyStateError, match='no checkpoint yet'):
    checkpointer.save(1, _state(scale=1e4, step=1), {})
  nan = _state(step=1)
  nan = nan.replace(params={**nan.params, 'conv': {**nan.params['conv'],
                                                   'bias': jnp.full(6, jnp.nan)}})
  with pytest.raises(checkpointing.NonFiniteStateError, match='no checkpoint yet'):
    checkpointer.save(1, nan, {})
  assert isinstance(checkpointing.NonFiniteStateError('x'), FloatingPointError)
  checkpointer.save(1, _state(step=1), {}, loss=0.3)
  # Asynchronous: step 2 may still be in flight, the error must name step 1 or 2 as
  # committed, never a tmp step.
  checkpointer.save(2, _state(step=2), {}, loss=0.3)
  with pytest.raises(checkpointing.UnhealthyStateError) as info:
    checkpointer.save(3, _state(step=3), {}, loss=1e3)
  assert checkpointer.last_good_step() == 2
  assert 'the last good checkpoint is step 2 in' in str(info.value)
  checkpointer.close()
  # keep=1: step 1 was the last good one when step 2 started; it goes at the next save.
  assert sorted(os.listdir(directory)) == ['1', '2']


def test_last_good_step_is_pinned_while_corrupt_steps_rotate_out(tmp_path):
  directory = str(tmp_path / 'ckpt')
  _write_steps(directory, [1, 2], keep=2)
  _xor(_biggest_data_file(directory, 2))
  checkpointer = checkpointing.Checkpointer(directory, keep=1)
  restored, _ = checkpointer.restore(_state())
  _assert_same(restored, _state(step=1))
  checkpointer.save(2, _state(step=2), {})  # Replaces the corrupt step 2.
  checkpointer.wait()
  # keep=1, but step 1 was the last good one when step 2 started: both are on disk.
  assert sorted(os.listdir(directory)) == ['1', '2']
  checkpointer.save(3, _state(step=3), {})
  checkpointer.close()
  assert sorted(os.listdir(directory)) == ['2', '3']
  fresh = checkpointing.Checkpointer(directory, keep=1)
  _assert_same(fresh.restore(_state())[0], _state(step=3))
  fresh.close()


def _no_space(*args, **kwargs):
  del args, kwargs
  try:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  except OSError as e:
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database') from e


@pytest.mark.parametrize('async_save', [False, True])
def test_write_error_is_one_line_naming_path_and_last_good(tmp_path, async_save, monkeypatch):
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpointing.Checkpointer(directory, async_save=async_save)
  checkpointer.save(1, _state(step=1), {})
  checkpointer.wait()
  monkeypatch.setattr(checkpointer._manager, 'save', _no_space)  # pylint: disable=protected-access
  with pytest.raises(checkpointing.CheckpointWriteError) as info:
    checkpointer.save(2, _state(step=2), {})
  message = str(info.value)
  assert '\n' not in message and info.value.__suppress_context__
  assert f'{directory}/2: No space left on device (errno 28)' in message
  assert 'the last good checkpoint is step 1' in message
  monkeypatch.undo()
  checkpointer.close()


def _mount_tiny_tmpfs(path):
  os.makedirs(path)
  try:
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', path], check=True,
                   capture_output=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    pytest.skip('cannot mount a tmpfs here (needs root)')


# A failed asynchronous write leaves orbax's event-loop callbacks to a closed loop.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('async_save', [False, True])
def test_full_disk_is_one_clear_line(tmp_path, async_save):
  mount = str(tmp_path / 'tiny')
  _mount_tiny_tmpfs(mount)
  try:
    directory = os.path.join(mount, 'ckpt')
    checkpointer = checkpointing.Checkpointer(directory, async_save=async_save)
    checkpointer.save(1, _state(step=1), {})
    checkpointer.wait()
    stat = os.statvfs(mount)
    with open(os.path.join(mount, 'filler'), 'wb') as f:  # Leaves half a state free.
      f.write(b'\0' * (stat.f_bavail * stat.f_frsize - 100 * 1024))
    with pytest.raises(checkpointing.CheckpointWriteError) as info:
      checkpointer.save(2, _state(step=2), {})
      checkpointer.wait()
    message = str(info.value)
    assert '\n' not in message and 'No space left on device' in message
    assert f'{directory}/2' in message and 'the last good checkpoint is step 1' in message
    checkpointer.close()
    assert os.path.isdir(os.path.join(directory, '1'))
  finally:
    subprocess.run(['umount', mount], check=False, capture_output=True, timeout=10)


def test_health_problem_thresholds_and_zero_disables():
  common = dict(finite=True, best_loss=0.2, reference_norm=3.0)
  assert checkpointing.health_problem(param_norm=29.0, loss=1.9, max_loss_ratio=10,
                                      max_norm_ratio=10, **common) is None
  assert 'loss' in checkpointing.health_problem(param_norm=1.0, loss=2.1, max_loss_ratio=10,
                                                max_norm_ratio=10, **common)
  assert 'norm' in checkpointing.health_problem(param_norm=31.0, loss=0.1, max_loss_ratio=10,
                                                max_norm_ratio=10, **common)
  assert checkpointing.health_problem(param_norm=1e9, loss=1e9, max_loss_ratio=0,
                                      max_norm_ratio=0, **common) is None
  assert 'loss is inf' in checkpointing.health_problem(param_norm=1.0, loss=float('inf'),
                                                       max_loss_ratio=0, max_norm_ratio=0,
                                                       **common)


def test_from_config_reads_the_default_keys(tmp_path):
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py'))
  checkpointer = checkpointing.Checkpointer.from_config(str(tmp_path / 'ckpt'), config)
  checkpointer.save(1, _state(step=1), {}, loss=0.3)
  with pytest.raises(checkpointing.UnhealthyStateError,
                     match='checkpoint_max_norm_ratio=100 x'):
    checkpointer.save(2, _state(scale=101, step=2), {}, loss=0.3)
  with pytest.raises(checkpointing.UnhealthyStateError,
                     match='checkpoint_max_loss_ratio=100 x'):
    checkpointer.save(2, _state(step=2), {}, loss=31.0)
  checkpointer.save(2, _state(scale=99, step=2), {}, loss=29.0)
  checkpointer.close()


def test_resume_reads_the_arrays_once(tmp_path, monkeypatch):
  directory = str(tmp_path / 'ckpt')
  _write_steps(directory, [1, 2])
  state_reads = []
  original = ocp.CheckpointManager.restore

  def counting_restore(self, step, *args, **kwargs):
    composite = kwargs.get('args', args[0] if args else None)
    if composite is not None and 'state' in composite.keys():
      state_reads.append(step)
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', counting_restore)
  checkpointer = checkpointing.Checkpointer(directory)
  assert checkpointer.latest_step() == 2
  restored, meta = checkpointer.restore(_state())
  assert meta == {'epoch': 2} and state_reads == [2]
  _assert_same(restored, _state(step=2))
  checkpointer.close()
