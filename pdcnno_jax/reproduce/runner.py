"""Runs a paper's grid cell by cell, then writes results.csv, the figures and REPORT.md.

Cells run in grid order, train cells first (the model cells read their step costs); a cell
whose report.json exists is skipped, so an interrupted run resumes where it stopped. A failed
cell is recorded with its one-line error and the others go on.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import tqdm

from pdcnno_jax.reproduce import cells as cells_lib
from pdcnno_jax.reproduce import figures
from pdcnno_jax.reproduce import grids
from pdcnno_jax.reproduce import report
from pdcnno_jax.reproduce import results


def prepare_data(scale: str, workdir: str, data_dir: str) -> str:
  """The TFDS data_dir of `scale`: generated Fashion-MNIST-shaped data for smoke."""
  if scale != 'smoke':
    return data_dir
  from pdcnno_jax import testing  # pylint: disable=g-import-not-at-top
  smoke_dir = os.path.join(workdir, 'data', 'tfds')
  if not os.path.isdir(os.path.join(smoke_dir, 'fashion_mnist')):
    testing.make_idx_dataset(smoke_dir, name='fashion_mnist', num_train=512, num_test=256)
  return smoke_dir


def select(cells: Sequence[grids.Cell], methods: Sequence[str],
           max_seeds: int) -> list[grids.Cell]:
  """The cells of `methods` (all when empty) with seed < `max_seeds` (all when 0)."""
  return [c for c in cells if (not methods or c.method in methods)
          and (not max_seeds or c.seed < max_seeds)]


def run(paper: str, scale: str, workdir: str, *, data_dir: str = 'data/tfds',
        methods: Sequence[str] = (), max_seeds: int = 0, timeout_s: float = 3600.0,
        progress: bool = True) -> dict[str, Any]:
  """Runs the grid and writes results.csv, the PNGs and REPORT.md into `workdir`.

  Returns:
    {'run', 'skipped', 'failed', 'wall_s', 'verdicts': {claim id: verdict}, 'figures'}.
  """
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  data_dir = prepare_data(scale, workdir, data_dir)
  cells = select(grids.grid(paper, scale, data_dir), methods, max_seeds)
  cells.sort(key=lambda c: grids.KINDS.index(c.kind))
  rows, measured = [], {}
  summary = {'run': 0, 'skipped': 0, 'failed': 0}
  bar = tqdm.tqdm(cells, desc=f'reproduce {paper} ({scale})', unit='cell', disable=not progress)
  for cell in bar:
    bar.set_postfix_str(f'{cell.paper}/{cell.method} seed {cell.seed}')
    done = cells_lib.read_report(workdir, cell) is not None
    try:
      rep = cells_lib.run_cell(cell, workdir, timeout_s=timeout_s,
                               measured=measured.get(cell.paper, {}))
      summary['skipped' if done else 'run'] += 1
      rows.append(results.row(cell, rep))
      if cell.kind == 'train':
        measured.setdefault(cell.paper, {}).setdefault(cell.method, []).append(rep)
    except Exception as e:  # pylint: disable=broad-except
      summary['failed'] += 1
      rows.append(results.row(cell, None, error=f'{type(e).__name__}: {e}'.splitlines()[0]))
      tqdm.tqdm.write(f'cell {cell.paper}/{cell.method} seed {cell.seed} failed: {e}')
  results.write_csv(os.path.join(workdir, 'results.csv'), rows)
  papers = grids.PAPERS if paper == 'all' else (paper,)
  pngs = figures.draw(rows, workdir, papers)
  summary['wall_s'] = time.perf_counter() - start
  entries = report.write(os.path.join(workdir, 'REPORT.md'), rows, scale=scale, papers=papers,
                         summary=summary, figures=pngs)
  return {**summary, 'figures': pngs,
          'verdicts': {e['id']: e['verdict'] for e in entries if e['paper'] in papers}}
