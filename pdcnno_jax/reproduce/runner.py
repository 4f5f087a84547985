"""Runs a paper's grid cell by cell, then writes results.csv, the figures and REPORT.md.

Cells run in grid order, train cells first (the model cells read their step costs); a cell
whose report.json exists is skipped, so an interrupted run resumes where it stopped. A failed
cell is recorded with its one-line error and the others go on. Before it starts, the run says
how many cells it has and how long the rest should take (`plan`: per-cell estimates by cost
class, from `ESTIMATES_S` or from the cells of that class already complete in the workdir).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import tqdm

from pdcnno_jax.reproduce import cells as cells_lib
from pdcnno_jax.reproduce import claims as claims_lib
from pdcnno_jax.reproduce import figures
from pdcnno_jax.reproduce import grids
from pdcnno_jax.reproduce import report
from pdcnno_jax.reproduce import results


# Wall seconds of one cell by `cost_class`, start-up included, on this 2-core CPU. smoke: the
# quiet smoke run. full: the mean over the cells of each class in the quiet reference run of
# 2026-12-02 (docs/reproduction: 117 cells in 149 min).
ESTIMATES_S = {
    'smoke': {'simulation': 0.1, 'sync': 12.0, 'sync_prune': 14.0, 'sync_prune_latency': 30.0,
              'sync_ifas': 16.0, 'sync_cgmse': 11.0, 'sync_launched': 23.0, 'ssp': 22.0,
              'mapreduce_cgmse': 18.0, 'mapreduce_cgmse_prune': 30.0},
    'full': {'simulation': 0.1, 'sync': 65.0, 'sync_prune': 82.0, 'sync_prune_latency': 86.0,
             'sync_ifas': 142.0, 'sync_cgmse': 92.0, 'sync_launched': 133.0, 'ssp': 85.0,
             'mapreduce_cgmse': 124.0, 'mapreduce_cgmse_prune': 165.0},
}


def prepare_data(scale: str, workdir: str, data_dir: str) -> str:
  """The TFDS data_dir of `scale`: generated Fashion-MNIST-shaped data for smoke."""
  if scale != 'smoke':
    return data_dir
  from pdcnno_jax import testing  # pylint: disable=g-import-not-at-top
  smoke_dir = os.path.join(workdir, 'data', 'tfds')
  if not os.path.isdir(os.path.join(smoke_dir, 'fashion_mnist')):
    testing.make_idx_dataset(smoke_dir, name='fashion_mnist', num_train=512, num_test=256)
  return smoke_dir


def select(cells: Sequence[grids.Cell], methods: Sequence[str] = (), max_seeds: int = 0,
           claims: Sequence[str] = ()) -> list[grids.Cell]:
  """The cells of `methods` and `claims` (all when empty) with seed < `max_seeds` (all: 0).

  A model cell brings the train cells it reads its step costs from (`serial_from`,
  `parallel_from`), so that a selection runs on its own.
  """
  unknown = sorted(set(claims) - set(claims_lib.CLAIM_IDS))
  if unknown:
    raise ValueError(f'--only_claims: unknown claim ids {unknown}; use some of '
                     f'{",".join(claims_lib.CLAIM_IDS)}.')
  chosen = [c for c in cells if (not methods or c.method in methods)
            and (not claims or set(c.claims) & set(claims))]
  needed = {(c.paper, c.params[k]) for c in chosen if c.kind == 'model'
            for k in ('serial_from', 'parallel_from')}
  return [c for c in cells if (c in chosen or (c.paper, c.method) in needed)
          and (not max_seeds or c.seed < max_seeds)]


def cost_class(cell: grids.Cell) -> str:
  """What a cell's running time depends on: mode, optimizer, pruning, initialisation."""
  if cell.kind != 'train':
    return 'simulation'
  config = cell.config()
  name = config.parallel.mode + ('_launched' if cell.launched() else '')
  if config.optimizer.name == 'cgmse':
    name += '_cgmse'
  if config.prune.method != 'none':
    name += '_prune_latency' if config.prune.selection == 'latency' else '_prune'
  return name + ('' if config.init.method == 'he' else f'_{config.init.method}')


def estimate_s(cell: grids.Cell, scale: str, measured: dict[str, list[float]]) -> float:
  """Expected wall seconds of `cell`: the mean of its cost class in this workdir, else the
  table `ESTIMATES_S` (2 workers on 2 cores; more share the cores, so time grows with them)."""
  name = cost_class(cell)
  if measured.get(name):
    return sum(measured[name]) / len(measured[name])
  table = ESTIMATES_S[scale]
  seconds = table.get(name, max(table.values()))
  return seconds * max(1.0, cell.processes / 2) if cell.kind == 'train' else seconds


def covered_claims(grid: Sequence[grids.Cell], chosen: Sequence[grids.Cell]) -> list[str]:
  """Ids of the claims of `grid` all of whose cells are among `chosen` (in report order).

  `grid` is the paper's grid at the run's seed limit (`--max_seeds`), so fewer seeds chosen
  on purpose still cover a claim; leaving out methods or claims does not.
  """
  chosen_keys = {c.key() for c in chosen}
  missing = {claim for cell in grid if cell.key() not in chosen_keys for claim in cell.claims}
  ids = {claim for cell in grid for claim in cell.claims}
  return [i for i in claims_lib.CLAIM_IDS if i in ids and i not in missing]


def plan(cells: Sequence[grids.Cell], scale: str, workdir: str) -> dict[str, Any]:
  """{'cells', 'complete', 'eta_s'}: what a run of `cells` has left, from per-cell estimates."""
  measured, todo = {}, []
  for cell in cells:
    rep = cells_lib.read_report(workdir, cell)
    if rep is None:
      todo.append(cell)
    elif 'cell' in rep:
      measured.setdefault(cost_class(cell), []).append(rep['cell']['wall_s'])
  unique = {c.key(): c for c in todo}
  return {'cells': len({c.key() for c in cells}), 'complete': len({c.key() for c in cells})
          - len(unique), 'eta_s': sum(estimate_s(c, scale, measured) for c in unique.values())}


def run(paper: str, scale: str, workdir: str, *, data_dir: str = 'data/tfds',
        methods: Sequence[str] = (), max_seeds: int = 0, claims: Sequence[str] = (),
        timeout_s: float = 3600.0, progress: bool = True) -> dict[str, Any]:
  """Runs the grid and writes results.csv, the PNGs and REPORT.md into `workdir`.

  Returns:
    {'run', 'skipped' (complete before), 'shared' (a cell of another paper run once),
    'failed', 'wall_s', 'verdicts': {claim id: verdict}, 'figures', 'plan': `plan` before}.
  """
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  data_dir = prepare_data(scale, workdir, data_dir)
  cells = select(grids.grid(paper, scale, data_dir), methods, max_seeds, claims)
  cells.sort(key=lambda c: grids.KINDS.index(c.kind))
  before = plan(cells, scale, workdir)
  if progress:
    print(f'reproduce {paper} ({scale}): {before["cells"]} cells, {before["complete"]} '
          f'complete; estimated {before["eta_s"] / 60:.0f} min for the rest', flush=True)
  cache_dir = (os.path.join(os.path.abspath(workdir), 'jax_cache')
               if grids.scale_settings(scale, data_dir).compile_cache else None)
  rows, measured, ran = [], {}, set()
  summary = {'run': 0, 'skipped': 0, 'shared': 0, 'failed': 0}
  bar = tqdm.tqdm(cells, desc=f'reproduce {paper} ({scale})', unit='cell', disable=not progress)
  for cell in bar:
    bar.set_postfix_str(f'{cell.paper}/{cell.method} seed {cell.seed}')
    done = cells_lib.read_report(workdir, cell) is not None
    try:
      rep = cells_lib.run_cell(cell, workdir, timeout_s=timeout_s,
                               measured=measured.get(cell.paper, {}), cache_dir=cache_dir)
      summary['shared' if cell.key() in ran else 'skipped' if done else 'run'] += 1
      ran.add(cell.key())
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
                         summary=summary, figures=pngs,
                         covered=covered_claims(
                             select(grids.grid(paper, scale, data_dir), max_seeds=max_seeds),
                             cells))
  return {**summary, 'figures': pngs, 'plan': before,
          'verdicts': {e['id']: e['verdict'] for e in entries if e['paper'] in papers}}
