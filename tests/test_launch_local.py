"""The local launcher: core pinning places each process on cores of its own."""

import ast
import io
import os
import re

import pytest

from pdcnno_jax import launch_local

_PROBE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'launch_probe')


def test_core_sets_are_disjoint_blocks_round_robin():
  assert launch_local.core_sets(2, 1, available=[0, 1]) == [[0], [1]]
  assert launch_local.core_sets(4, 1, available=[0, 1]) == [[0], [1], [0], [1]]
  assert launch_local.core_sets(2, 2, available=[4, 5, 6, 7]) == [[4, 5], [6, 7]]
  with pytest.raises(ValueError, match='between 1 and the 2 available cores'):
    launch_local.core_sets(2, 3, available=[0, 1])


@pytest.mark.parametrize('cores_per_process', [0, 1])
def test_launched_processes_run_pinned_with_their_arguments(monkeypatch, cores_per_process):
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      p for p in (_PROBE_DIR, os.environ.get('PYTHONPATH')) if p))
  out = io.StringIO()
  code = launch_local.launch(2, ['--flag=1'], module='affinity_probe', timeout_s=60, stdout=out,
                             cores_per_process=cores_per_process)
  assert code == 0, out.getvalue()
  lines = {int(m.group(1)): (ast.literal_eval(m.group(2)), ast.literal_eval(m.group(3)))
           for m in re.finditer(r'\[p(\d)\] affinity=(\[.*?\]) argv=(\[.*?\])', out.getvalue())}
  assert sorted(lines) == [0, 1], out.getvalue()
  for i, (cores, argv) in lines.items():
    assert argv[0] == '--flag=1' and f'--process_id={i}' in argv
    if cores_per_process:
      assert cores == launch_local.core_sets(2, 1)[i]
    else:
      assert cores == sorted(os.sched_getaffinity(0))
