"""results.csv: one row per cell of the grids (measured runs and simulations alike).

Times are wall seconds by phase of the experiment's report (`time_s` = total - data_load, the
pipeline's own running time; `cell_wall_s` = the cell as the runner saw it, start-up included).
Memory: `peak_rss_mb` is the peak of the summed host RSS of the cell's training processes
(driver or launched processes and Ray actors, sampled by the runner, at least the driver's own
peak), `peak_rss_driver_mb` the peak RSS of process 0 alone (its report), `peak_rss_all_mb`
the sampled sum including Ray's daemons. MACs are
multiply-accumulates per example of the final (compacted) model; `source` is measured (a run),
simulation (balancer makespans) or model (cluster-model predictions).
"""

from __future__ import annotations

import csv
import json
from typing import Any, Sequence

from pdcnno_jax.reproduce import grids

SOURCES = {'train': 'measured', 'balancer': 'simulation', 'model': 'model'}
PHASES = ('data_load', 'compile', 'init', 'prune', 'train', 'eval')
COLUMNS = ('paper', 'claim', 'method', 'kind', 'source', 'seed', 'nodes', 'dataset', 'status',
           'accuracy', 'loss', 'time_s', 'time_total_s') + tuple(
               f'time_{p}_s' for p in PHASES) + (
           'cell_wall_s', 'peak_rss_mb', 'peak_rss_driver_mb', 'peak_rss_all_mb', 'params',
           'macs', 'mac_reduction', 'speedup', 'extra', 'error', 'cell')


def row(cell: grids.Cell, report: dict[str, Any] | None, error: str = '') -> dict[str, Any]:
  """The results.csv row of `cell` (report None: a failed cell, with its error)."""
  r = {c: '' for c in COLUMNS}
  r.update(paper=cell.paper, claim=';'.join(cell.claims), method=cell.method, kind=cell.kind,
           seed=cell.seed, cell=cell.key(), source=SOURCES[cell.kind],
           status='failed' if report is None else 'ok', error=error)
  if report is None:
    return r
  if cell.kind == 'train':
    _train_fields(r, cell, report)
  elif cell.kind == 'balancer':
    r['nodes'] = len(report['speed'])
    r['extra'] = json.dumps({n: round(b['makespan'], 6)
                             for n, b in report['balancers'].items()})
  else:
    nodes = report['nodes']
    r['nodes'] = max(n for n in nodes if n <= 8)
    r['speedup'] = report['speedup'][nodes.index(r['nodes'])]
    r['extra'] = json.dumps({'speedup': dict(zip(nodes, report['speedup'])),
                             **({'per_example_s': report['per_example_s']}
                                if 'per_example_s' in report else {})})
  return r


def _train_fields(r: dict[str, Any], cell: grids.Cell, report: dict[str, Any]) -> None:
  config, wall = report['config'], report['wall_time_s']
  r.update(nodes=cell.processes, dataset=config['data']['name'],
           accuracy=report['test']['accuracy'], loss=report['test']['loss'],
           time_total_s=wall['total'], time_s=wall['total'] - wall.get('data_load', 0.0),
           peak_rss_driver_mb=(report['peak_host_rss_bytes'] or 0) / 2**20,
           params=report['model']['params'], macs=report['model']['macs'])
  r['peak_rss_mb'] = r['peak_rss_driver_mb']
  if 'cell' in report:  # The runner's measurements: start-up included, every process.
    measured = report['cell']
    r.update(cell_wall_s=measured['wall_s'],
             peak_rss_mb=max(measured['peak_rss_bytes'] / 2**20, r['peak_rss_driver_mb']),
             peak_rss_all_mb=max(measured['peak_rss_all_bytes'] / 2**20, r['peak_rss_mb']))
  for phase in PHASES:
    r[f'time_{phase}_s'] = wall.get(phase, 0.0)
  if 'prune' in report:
    r['mac_reduction'] = report['prune']['mac_reduction']
  if 'mapreduce' in report:
    r['speedup'] = report['mapreduce']['speedup']['speedup']
  if 'ssp' in report:
    r['extra'] = json.dumps({
        'wait_s': report['ssp']['wait_s'],
        'throughput': report['ssp']['throughput_examples_per_s'],
        'accuracy_vs_time': [[p['wall_s'], p['accuracy']]
                             for p in report['ssp']['accuracy_vs_time']]})


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


def read_csv(path: str) -> list[dict[str, str]]:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))
