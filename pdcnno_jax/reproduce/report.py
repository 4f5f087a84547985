"""REPORT.md: per claim the paper's statement, our numbers, the figure and the verdict.

Verdicts come from `claims.Claim.verdict` on the rows of results.csv (`stats.RULE`); nothing
in the report is written by hand.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any, Sequence

from pdcnno_jax.reproduce import claims as claims_lib
from pdcnno_jax.reproduce import stats



def _commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                          text=True, check=False, cwd=os.path.dirname(__file__)).stdout.strip()
  except OSError:
    return 'unknown'


def verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """[{id, paper, verdict, parts}] of every claim, evaluated on `rows`."""
  out = []
  for claim in claims_lib.CLAIMS:
    parts = claim.evaluate(rows)
    out.append({'id': claim.id, 'paper': claim.paper, 'verdict': claim.verdict(parts),
                'parts': parts, 'claim': claim})
  return out


def _reason(entry: dict[str, Any]) -> str:
  missing = [p.name for p in entry['parts'] if p.verdict == stats.NOT_TESTABLE]
  if not missing:
    return ''
  return (f' (no numbers for: {"; ".join(missing)}; their cells are not in the grid at this '
          'scale, were left out by --methods / --max_seeds, or failed)')


def write(path: str, rows: Sequence[dict[str, Any]], *, scale: str, papers: Sequence[str],
          summary: dict[str, Any], figures: Sequence[str],
          covered: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Writes REPORT.md; returns the verdicts.

  Args:
    path: where REPORT.md goes.
    rows: the rows of results.csv.
    scale: 'smoke' or 'full'.
    papers: the papers reported on.
    summary: the runner's cell counts and wall time.
    figures: names of the PNGs drawn.
    covered: ids of the claims whose every cell this run selected (None: all); the others
      of `papers` are listed as not run (a piece of a longer run) and get no verdict.
  """
  entries = verdicts(rows)
  if covered is not None:
    left_out = [e['id'] for e in entries if e['paper'] in papers and e['id'] not in covered]
    entries = [e for e in entries if e['id'] in covered]
  else:
    left_out = []
  load = '/'.join(f'{v:.2f}' for v in os.getloadavg())
  lines = [
      '# Reproduction report', '',
      f'Scale `{scale}`, papers {", ".join(papers)}; commit {_commit()}, '
      f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, '
      f'{platform.node()} ({os.cpu_count()} CPUs), load average at the end {load}.',
      f'Cells: {summary["run"]} run, {summary["skipped"]} complete before, '
      f'{summary["shared"]} shared with another paper, {summary["failed"]} failed; '
      f'wall time {summary["wall_s"]:.0f} s.', '',
  ]
  if left_out:
    lines += [f'**Partial report**: the cells of {", ".join(left_out)} were not all selected '
              '(`--only_claims` / `--methods`), so those claims are listed as not run and have '
              'no verdict here.', '']
  if scale == 'smoke':
    lines += ['**Smoke scale**: generated data, one epoch, one seed. The verdicts test the '
              'pipeline, not the papers.', '']
  lines += ['## Verdict rule', '', stats.RULE, '', '## Verdicts', '',
            '| claim | paper | verdict |', '|---|---|---|']
  lines += [f'| {e["id"]} | {e["paper"]} | {e["verdict"]} |' for e in entries]
  lines += [f'| {i} | {claims_lib.BY_ID[i].paper} | not run in this report |' for i in left_out]
  lines += ['']
  for e in entries:
    claim = e['claim']
    lines += [f'## {claim.id}: {claim.statement}', '',
              f'Paper: {claim.where}.' + (f' {claim.note}' if claim.note else ''), '',
              '| metric | source | ours | target | weak | part verdict |',
              '|---|---|---|---|---|---|']
    lines += [f'| {p.name} | {p.source} | {p.estimate} | {p.target} | {p.weak} | '
              f'{p.verdict} |' for p in e['parts']]
    lines += ['']
    lines += [f'![{name}]({name})' for name in claim.figures if name in figures]
    lines += ['']
    lines += [f'Verdict {claim.id}: **{e["verdict"]}**{_reason(e)}', '']
  failed = [r for r in rows if r['status'] == 'failed']
  if failed:
    lines += ['## Failed cells', '']
    lines += [f'- {r["paper"]}/{r["method"]} seed {r["seed"]} ({r["cell"]}): {r["error"]}'
              for r in failed]
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return entries
