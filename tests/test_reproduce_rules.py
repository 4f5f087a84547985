"""Verdict rules, t-intervals, claims and grids of pdcnno_jax.reproduce on made-up numbers."""

import math
import os

import pytest

from pdcnno_jax.reproduce import claims
from pdcnno_jax.reproduce import grids
from pdcnno_jax.reproduce import report
from pdcnno_jax.reproduce import results
from pdcnno_jax.reproduce import stats

R, N, P, T = stats.REPRODUCED, stats.NOT_REPRODUCED, stats.PARTLY, stats.NOT_TESTABLE


def test_mean_ci_matches_the_t_interval():
  est = stats.mean_ci([1.0, 2.0, 3.0])
  # s = 1, t_{0.975, 2} = 4.302653, half width = t s / sqrt(3).
  assert est.mean == pytest.approx(2.0)
  assert est.hi - est.mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
  assert est.mean - est.lo == pytest.approx(est.hi - est.mean)
  assert est.n == 3


def test_mean_ci_edge_cases():
  assert stats.mean_ci([]).n == 0
  assert stats.mean_ci([float('nan'), 2.0]).n == 1
  one = stats.mean_ci([0.5])
  assert (one.lo, one.hi) == (-math.inf, math.inf)
  exact = stats.mean_ci([0.7, 0.9, 0.8], deterministic=True)
  assert (exact.lo, exact.mean, exact.hi) == pytest.approx((0.7, 0.8, 0.9))
  assert stats.mean_ci([4.0, 4.0, 4.0]).lo == pytest.approx(4.0)  # Zero spread: zero width.


@pytest.mark.parametrize('values, expected', [
    ([0.18, 0.20, 0.19], R),  # Whole interval below the paper's 22%.
    ([0.40, 0.50, 0.45], P),  # Faster, not by the paper's factor.
    ([0.2, 0.9, 0.5], P),  # Wide interval.
    ([1.10, 1.20, 1.15], N),  # Slower on every point of the interval.
    ([0.2], P),  # One seed: no interval.
    ([], T),
])
def test_verdict_of_a_ratio_claim(values, expected):
  est = stats.mean_ci(values)
  assert stats.verdict(est, stats.Criterion('<=', 0.22), stats.Criterion('<', 1.0)) == expected


def test_verdict_of_a_deterministic_metric_needs_no_seeds():
  est = stats.mean_ci([0.8], deterministic=True)
  assert stats.verdict(est, stats.Criterion('<', 1.0), stats.Criterion('<', 1.0)) == R


@pytest.mark.parametrize('parts, model_only, expected', [
    ((R, R), False, R), ((N, N), False, N), ((R, N), False, P), ((R, P), False, P),
    ((R, T), False, P), ((N, T), False, N), ((T, T), False, T), ((R,), True, P),
    ((N,), True, N),
])
def test_combine(parts, model_only, expected):
  assert stats.combine(parts, model_only=model_only) == expected


def test_criterion_rejects_an_unknown_operator():
  with pytest.raises(ValueError, match='op'):
    stats.Criterion('==', 1.0)


def _row(paper, method, seed, **fields):
  row = {c: '' for c in results.COLUMNS}
  row.update(paper=paper, method=method, seed=seed, status='ok', **fields)
  return row


def _claim(claim_id):
  return next(c for c in claims.CLAIMS if c.id == claim_id)


@pytest.mark.parametrize('ratios, expected', [((0.19, 0.20, 0.195), R), ((0.5, 0.6, 0.55), P),
                                               ((1.3, 1.2, 1.25), N)])
def test_p1_verdict_follows_the_paired_time_ratio(ratios, expected):
  rows = []
  for seed, ratio in enumerate(ratios):
    rows += [_row('pdcnno', 'pdcnno', seed, time_s=100.0 * ratio),
             _row('pdcnno', 'pdcnn', seed, time_s=100.0)]
  rows.append(_row('pdcnno', 'pdcnno', 7, time_s=1.0))  # Unpaired seed: ignored.
  claim = _claim('P1')
  parts = claim.evaluate(rows)
  assert parts[0].estimate.n == 3
  assert claim.verdict(parts) == expected


def test_m3_reads_balancer_makespans():
  rows = [_row('mr_fpdcnn', 'balancers', s, kind='balancer', extra=(
      '{"equal": 4.0, "proportional": 2.0, "lbrla": 2.0, "dlbpce": 2.0}')) for s in range(3)]
  assert _claim('M3').verdict(_claim('M3').evaluate(rows)) == R


def test_model_only_claim_is_capped_at_partly():
  rows = [_row('mr_fpdcnn', 'model_pruned', 0, kind='model', source='model',
               extra='{"speedup": {"1": 1.0, "2": 1.9, "8": 9.5}}')]
  assert _claim('M4').verdict(_claim('M4').evaluate(rows)) == P


def test_every_claim_without_numbers_is_not_testable():
  assert len(claims.CLAIM_IDS) == 14 == len(set(claims.CLAIM_IDS))
  assert {c.id[0] for c in claims.CLAIMS} == {'P', 'M', 'D'}
  for claim in claims.CLAIMS:
    assert claim.verdict(claim.evaluate([])) == T, claim.id


def test_report_has_a_verdict_line_per_claim(tmp_path):
  path = os.path.join(tmp_path, 'REPORT.md')
  report.write(path, [], scale='smoke', papers=grids.PAPERS,
               summary={'run': 0, 'skipped': 0, 'shared': 0, 'failed': 0, 'wall_s': 0.0},
               figures=[])
  text = open(path).read()
  for claim_id in claims.CLAIM_IDS:
    assert f'Verdict {claim_id}: **not testable here**' in text
  assert stats.RULE in text


@pytest.mark.parametrize('scale', grids.SCALES)
def test_grids_resolve_to_valid_configs(scale, tmp_path):
  cells = grids.grid('all', scale, str(tmp_path))
  assert {c.paper for c in cells} == set(grids.PAPERS)
  covered = {claim for c in cells for claim in c.claims}
  assert covered == set(claims.CLAIM_IDS)
  for cell in cells:
    assert cell.kind in grids.KINDS
    if cell.kind == 'train':
      assert cell.config().data.data_dir == os.path.abspath(tmp_path)
  keys = {}
  for cell in cells:  # One key per distinct cell; identical cells of two papers share it.
    what = (cell.kind, cell.seed, cell.processes,
            str(cell.config().to_dict()) if cell.kind == 'train' else str(cell.params))
    assert keys.setdefault(cell.key(), what) == what


def test_cell_key_follows_the_seed_and_a_bad_override_is_named(tmp_path):
  a, b = grids.grid('pdcnno', 'full', str(tmp_path))[:2]
  assert a.method == b.method and a.seed != b.seed and a.key() != b.key()
  bad = grids.Cell('pdcnno', ('P1',), 'x', 0, overrides={'optimizer.no_such_key': 1})
  with pytest.raises(KeyError, match='optimizer.no_such_key'):
    bad.config()
  with pytest.raises(ValueError, match='--paper'):
    grids.grid('nope', 'smoke', str(tmp_path))


def test_failed_cell_row_keeps_its_error():
  cell = grids.Cell('pdcnno', ('P1',), 'pdcnno', 0)
  row = results.row(cell, None, error='RuntimeError: exit 1: boom')
  assert row['status'] == 'failed' and row['error'].endswith('boom')
  assert set(row) == set(results.COLUMNS)
