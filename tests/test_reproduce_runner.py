"""How pdcnno_jax.reproduce runs cells: engines, shared cells, selection, estimates, memory."""

import json
import os
import subprocess
import sys

import pytest

from pdcnno_jax.reproduce import cells
from pdcnno_jax.reproduce import grids
from pdcnno_jax.reproduce import results
from pdcnno_jax.reproduce import runner


@pytest.mark.parametrize('scale', grids.SCALES)
def test_parallel_cells_run_on_ray_and_only_sync_cells_on_the_launcher(scale, tmp_path):
  train = [c for c in grids.grid('all', scale, str(tmp_path)) if c.kind == 'train']
  assert {c.config().parallel.mode for c in train} == {'sync', 'mapreduce', 'ssp'}
  for cell in train:
    config = cell.config()
    if config.parallel.mode in grids.RAY_MODES:
      assert config.parallel.engine == 'ray' and not cell.launched(), cell.method
      assert config.parallel.num_workers == cell.processes
      assert config.parallel.ray_worker_cpu_devices == 1
    else:
      assert cell.launched() == (cell.processes > 1), cell.method
      if cell.processes > 1:
        assert config.parallel.engine == 'jax'
  assert any(c.launched() for c in train)
  assert any(c.processes > 1 and not c.launched() for c in train)


def test_smoke_runs_the_dense_sgd_model_once_for_three_papers(tmp_path):
  cells_ = grids.grid('all', 'smoke', str(tmp_path))
  shared = [c for c in cells_ if c.method in ('dense_sgd', 'sync_1proc')]
  assert {c.paper for c in shared} == set(grids.PAPERS)
  assert len({c.key() for c in shared}) == 1
  full = [c for c in grids.grid('all', 'full', str(tmp_path))
          if c.method in ('dense_sgd', 'sync_1proc') and c.seed == 0]
  assert len({c.key() for c in full}) == 2  # Full scale: a cosine schedule for dense SGD.


def test_only_claims_brings_the_train_cells_a_model_cell_reads(tmp_path):
  cells_ = grids.grid('all', 'full', str(tmp_path))
  chosen = runner.select(cells_, claims=['D1'])
  methods = {c.method for c in chosen}
  assert 'model_ssp_vs_sync' in methods and 'sync_1proc' in methods  # The model reads it.
  assert {'ssp_s0_hetero', 'ssp_s3_hetero'} <= methods
  assert all('D1' in c.claims or c.method == 'sync_1proc' for c in chosen)
  assert len(runner.select(cells_, claims=['D1'], max_seeds=1)) < len(chosen)
  assert len(runner.select(cells_)) == len(cells_)
  with pytest.raises(ValueError, match='--only_claims.*Q9'):
    runner.select(cells_, claims=['Q9'])


def _complete(workdir, cell, wall_s):
  directory = cells.cell_dir(workdir, cell)
  os.makedirs(directory)
  for name, obj in (('report.json', {}), ('cell.json', {'wall_s': wall_s})):
    with open(os.path.join(directory, name), 'w') as f:
      json.dump(obj, f)


def test_plan_counts_complete_cells_and_estimates_from_measured_ones(tmp_path):
  cells_ = runner.select(grids.grid('pdcnno', 'full', str(tmp_path)), max_seeds=1)
  table = runner.ESTIMATES_S['full']
  before = runner.plan(cells_, 'full', str(tmp_path))
  assert before['complete'] == 0 and before['cells'] == len(cells_)
  assert before['eta_s'] == pytest.approx(sum(runner.estimate_s(c, 'full', {}) for c in cells_))
  sgd = next(c for c in cells_ if c.method == 'dense_sgd')
  adam = next(c for c in cells_ if c.method == 'dense_adam')
  assert runner.cost_class(sgd) == runner.cost_class(adam) == 'sync'
  _complete(str(tmp_path), sgd, 10 * table['sync'])
  after = runner.plan(cells_, 'full', str(tmp_path))
  assert after['complete'] == 1
  # dense_sgd is done; dense_adam, of the same class, now counts what dense_sgd took.
  assert after['eta_s'] == pytest.approx(before['eta_s'] + 9 * table['sync'] - table['sync'])
  four = grids.Cell('pdcnno', ('P4',), 'x', 0, overrides={'parallel.mode': 'ssp'}, processes=4)
  assert runner.estimate_s(four, 'full', {}) == 2 * table['ssp']


def test_row_takes_the_memory_of_every_training_process_and_the_cell_wall_time():
  cell = grids.Cell('pdcnno', ('P2',), 'pdcnno', 0)
  report = {'config': {'data': {'name': 'fashion_mnist'}}, 'test': {'accuracy': 0.5, 'loss': 1.},
            'wall_time_s': {'total': 3.0}, 'peak_host_rss_bytes': 100 * 2**20,
            'model': {'params': 10, 'macs': 20},
            'cell': {'wall_s': 9.0, 'peak_rss_bytes': 300 * 2**20,
                     'peak_rss_all_bytes': 500 * 2**20}}
  row = results.row(cell, report)
  assert (row['peak_rss_mb'], row['peak_rss_driver_mb'], row['peak_rss_all_mb']) == (300, 100,
                                                                                     500)
  assert row['cell_wall_s'] == 9.0
  del report['cell']
  assert results.row(cell, report)['peak_rss_mb'] == 100  # No runner sample: the driver's.


@pytest.mark.parametrize('cmdline, training', [
    (['python', '-m', 'pdcnno_jax.main', '--workdir=x'], True),
    (['python', '-c', 'import runpy ...', '0,1', 'pdcnno_jax.main', '--config=c'], True),
    (['ray::SSPWorkerActor.run'], True),
    (['ray::IDLE'], False),
    (['/venv/ray/core/src/ray/raylet/raylet', '--head'], False),
    ([], False)])
def test_training_processes_are_drivers_launched_processes_and_ray_actors(cmdline, training):
  assert cells.PeakMemory.is_training(cmdline) == training


def test_peak_memory_sums_the_training_processes_it_sees():
  hold = 'import time; x = b"\\1" * (64 << 20); time.sleep(1.5)'
  with cells.PeakMemory(every_s=0.05) as memory:
    procs = [subprocess.Popen([sys.executable, '-c', hold, *marker])
             for marker in (['pdcnno_jax.main'], ['pdcnno_jax.main'], [])]
    for proc in procs:
      proc.wait()
  assert memory.samples > 0
  assert memory.peak_bytes >= 2 * (64 << 20)  # Both training processes, summed.
  assert memory.peak_all_bytes >= memory.peak_bytes + (64 << 20)


def test_a_claim_is_covered_only_when_every_one_of_its_cells_is_chosen():
  cells_ = grids.grid('pdcnno', 'smoke', 'data/tfds')
  assert runner.covered_claims(cells_, cells_) == ['P1', 'P2', 'P3', 'P4', 'P5', 'P6']
  chosen = runner.select(cells_, methods=['dense_sgd', 'cgmse'])
  assert runner.covered_claims(cells_, chosen) == ['P5']  # P3 and P6 also need other methods.
  assert runner.covered_claims(cells_, runner.select(cells_, claims=['P4'])) == ['P4']
  assert runner.covered_claims(cells_, []) == []


def test_fewer_seeds_on_purpose_still_cover_a_claim(tmp_path):
  cells_ = grids.grid('pdcnno', 'full', str(tmp_path))
  one_seed = runner.select(cells_, methods=['dense_sgd', 'cgmse'], max_seeds=1)
  assert runner.covered_claims(runner.select(cells_, max_seeds=1), one_seed) == ['P5']
  assert runner.covered_claims(cells_, one_seed) == []  # Seeds 1 and 2 are missing.
