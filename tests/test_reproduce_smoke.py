"""A reduced smoke reproduction end to end: real cells, results.csv, PNGs, REPORT.md, resume.

Runs one cheap train cell (dense SGD, which is also delay sync's 1-process synchronous
training at smoke scale, so three papers share it), the balancer simulations and the SSP
cluster-model cell that reads its step cost from it; every other cell of the grids is filtered
out, so only M3 (balancer simulations alone) and D3 (at smoke scale the cluster model alone)
are covered and the other claims are listed as not run, with no verdict.
"""

import os

import pytest

from pdcnno_jax.reproduce import claims
from pdcnno_jax.reproduce import figures
from pdcnno_jax.reproduce import grids
from pdcnno_jax.reproduce import results
from pdcnno_jax.reproduce import runner
from pdcnno_jax.reproduce import stats

_METHODS = ('dense_sgd', 'sync_1proc', 'balancers', 'model_ssp_vs_sync')


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reproduce'))
  out = runner.run('all', 'smoke', workdir, methods=_METHODS, max_seeds=1, timeout_s=600,
                   progress=False)
  return workdir, out


def test_smoke_writes_results_figures_and_a_verdict_per_claim(smoke):
  workdir, out = smoke
  assert out['failed'] == 0, open(os.path.join(workdir, 'REPORT.md')).read()
  rows = results.read_csv(os.path.join(workdir, 'results.csv'))
  assert rows and tuple(rows[0]) == results.COLUMNS
  by_kind = {r['kind'] for r in rows}
  assert by_kind == {'train', 'balancer', 'model'}
  train = [r for r in rows if r['kind'] == 'train']
  assert {r['paper'] for r in train} == {'pdcnno', 'mr_fpdcnn', 'delay_sync'}
  for r in train:
    assert 0.0 <= float(r['accuracy']) <= 1.0 and float(r['time_train_s']) > 0
    assert float(r['peak_rss_mb']) >= float(r['peak_rss_driver_mb']) > 0
    assert float(r['peak_rss_all_mb']) >= float(r['peak_rss_mb'])
    assert float(r['cell_wall_s']) > float(r['time_total_s'])  # Start-up included.
    assert int(r['params']) > 0 and r['source'] == 'measured'
  assert os.listdir(os.path.join(workdir, 'jax_cache'))  # Smoke cells share compilations.
  assert [r['source'] for r in rows if r['kind'] == 'model'] == ['model']
  for paper in grids.PAPERS:
    assert any(name.startswith(paper) for name in out['figures'])
  for name in figures.FIGURES:
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
  text = open(os.path.join(workdir, 'REPORT.md')).read()
  assert list(out['verdicts']) == ['M3', 'D3']  # Every other claim lacks some of its cells.
  assert out['verdicts']['M3'] != stats.NOT_TESTABLE  # Simulated here.
  for claim_id in out['verdicts']:
    assert f'Verdict {claim_id}: **{out["verdicts"][claim_id]}**' in text
  for claim_id in claims.CLAIM_IDS:
    if claim_id not in out['verdicts']:
      assert f'| {claim_id} | {claims.BY_ID[claim_id].paper} | not run in this report |' in text
      assert f'Verdict {claim_id}:' not in text
  assert '**Partial report**' in text


def test_identical_cells_of_two_papers_run_once_and_a_rerun_skips_everything(smoke):
  workdir, out = smoke
  train_dirs = [d for d in os.listdir(os.path.join(workdir, 'cells')) if d.startswith('train')]
  assert len(train_dirs) == 1  # dense_sgd (pdcnno, mr_fpdcnn) is sync_1proc (delay_sync).
  again = runner.run('all', 'smoke', workdir, methods=_METHODS, max_seeds=1, progress=False)
  assert again['run'] == 0 and again['failed'] == 0
  assert again['skipped'] == out['run'] + out['skipped']
  assert again['verdicts'] == out['verdicts']
