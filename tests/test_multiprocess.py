"""Two local processes joined by jax.distributed reach the parameters of one process.

Both runs use the same global batch; the batch order is a pure function of (seed, epoch,
step), so the only difference is where the per-example gradients are summed (across a gloo
all-reduce instead of inside one device): equal to float tolerance.
"""

import io
import os

import jax
import numpy as np

from pdcnno_jax import launch_local, testing
from pdcnno_jax.train import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(workdir, data_dir):
  return [f'--config={REPO}/configs/default.py', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', '--config.data.batch_size=32',
          '--config.data.eval_batch_size=128', '--config.num_epochs=1',
          '--config.log_every_steps=8', '--config.checkpoint_every_steps=1000']


def _final(workdir):
  ckpt = os.path.join(workdir, 'checkpoints')
  last = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  return last, checkpointing.load_arrays(os.path.join(ckpt, str(last), 'state'))


def test_two_processes_match_one_process(tmp_path):
  data_dir = testing.make_idx_dataset(str(tmp_path / 'tfds'), num_train=256, num_test=64)
  logs = {}
  for n in (1, 2):
    out = io.StringIO()
    code = launch_local.launch(n, _args(str(tmp_path / f'p{n}'), data_dir),
                               devices_per_process=1, timeout_s=500, stdout=out)
    logs[n] = out.getvalue()
    assert code == 0, logs[n][-4000:]
  assert 'Joined job as process 1 of 2' in logs[2] or 'process 1 of 2' in logs[2]
  step_1, one = _final(str(tmp_path / 'p1'))
  step_2, two = _final(str(tmp_path / 'p2'))
  assert step_1 == step_2 == 256 // 32
  for a, b in zip(jax.tree.leaves(one['params']), jax.tree.leaves(two['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  # The runs are not trivially equal to the initial parameters.
  assert any(np.abs(np.asarray(x)).sum() > 0 for x in jax.tree.leaves(one['opt_state']))
