"""Each paper's experiments as a declared grid of cells.

A cell is one ordinary experiment (`kind='train'`: a config file of configs/ plus overrides,
run by `pdcnno_jax.main`; MapReduce and SSP cells as one driver with `processes` Ray worker
actors, synchronous cells with `processes` > 1 through the local launcher) or one simulation
(`kind='balancer'`: makespans of parallel/balancers.py on a drawn set of node speeds;
`kind='model'`: cluster-model predictions of pdcnno_jax.perfmodel from step costs measured by
the paper's train cells). Seeds are a grid axis. A cell's key is a hash of what it runs, so
identical cells of two papers are run once.

Scales:
  smoke  generated Fashion-MNIST-shaped data (512 training, 256 test images), 1 epoch at batch
         64 and a constant learning rate (a warm-up would take the whole epoch), one seed (so
         no measured verdict is better than `partly`), SSP s = 0, 1, 3, 5 balancer draws, one
         compilation cache for all cells: the whole pipeline in minutes, numbers that test the
         code, not the papers.
  full   Fashion-MNIST (60k / 10k), 3 epochs (pruning: 1 pre-training epoch on 10% of the
         data), 3 seeds, 1-4 processes: 117 cells, 149 min on a quiet 2-core CPU (the
         reference run of docs/reproduction). Mean wall time of a cell: dense SGD 65 s,
         pruning 82 s (86 s with latency selection), IFAS 142 s (its swarm search),
         synchronous on 2-4 launched processes 133 s, SSP on 1-4 Ray workers 85 s, CGMSE
         MapReduce 124 s (165 s pruned) (`runner.ESTIMATES_S`); the runner prints its
         estimate before it starts.
The papers' SVHN / EMNIST / ILSVRC settings scale down to Fashion-MNIST and LeNet-5; node
counts beyond this machine come from the cluster model and are marked `source=model`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import ml_collections

from pdcnno_jax import config_lib

PAPERS = ('pdcnno', 'mr_fpdcnn', 'delay_sync')
SCALES = ('smoke', 'full')
KINDS = ('train', 'balancer', 'model')
RAY_MODES = ('mapreduce', 'ssp')  # Modes whose cells run one driver with Ray worker actors.
_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs')


@dataclasses.dataclass
class Cell:
  """One experiment or simulation of a paper's grid.

  Attributes:
    paper: one of PAPERS.
    claims: claim ids the cell feeds (P1..P6, M1..M4, D1..D4).
    method: label of what the cell runs (the claims compare methods by it).
    seed: seed (train cells: config.seed; simulations: the draw).
    kind: one of KINDS.
    config_file: train cells: file name in configs/.
    overrides: train cells: dotted config keys -> values, applied after the scale's.
    processes: train cells: workers (MapReduce and SSP: Ray worker actors of one driver;
      synchronous: jax.distributed processes, 1 is one plain process).
    params: simulations: what to simulate (cells.run_balancer / cells.run_model).
  """
  paper: str
  claims: tuple[str, ...]
  method: str
  seed: int
  kind: str = 'train'
  config_file: str = 'default.py'
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  processes: int = 1
  params: dict[str, Any] = dataclasses.field(default_factory=dict)

  def config(self) -> ml_collections.ConfigDict:
    """The complete config of a train cell (its file, then its overrides, then the seed)."""
    config = config_lib.load_config(os.path.join(_CONFIGS, self.config_file))
    for key, value in self.overrides.items():
      *path, leaf = key.split('.')
      target = config
      for part in path:
        target = target[part]
      if leaf not in target:
        raise KeyError(f'reproduce grid {self.paper}/{self.method}: config key {key!r} does not '
                       'exist in configs/default.py; fix the grid override.')
      target[leaf] = value
    config.seed = self.seed
    if config.parallel.mode in RAY_MODES:  # One driver and `processes` Ray worker actors.
      config.parallel.engine = 'ray'
      config.parallel.num_workers = self.processes
      config.parallel.ray_worker_cpu_devices = 1
    elif self.processes > 1:  # Processes joined by jax.distributed through the local launcher.
      config.parallel.engine = 'jax'
    return config

  def launched(self) -> bool:
    """Whether the cell runs as `processes` jax.distributed processes (synchronous only)."""
    return (self.kind == 'train' and self.processes > 1
            and self.config().parallel.mode not in RAY_MODES)

  def key(self) -> str:
    """Hash of what the cell runs: its workdir name."""
    if self.kind == 'train':
      what = {'config': self.config().to_dict(), 'processes': self.processes}
    else:
      what = {'kind': self.kind, 'params': self.params, 'seed': self.seed}
    blob = json.dumps(what, sort_keys=True, default=str).encode()
    return f'{self.kind}_{hashlib.sha1(blob).hexdigest()[:12]}'


@dataclasses.dataclass(frozen=True)
class Scale:
  """What a scale changes in every grid."""
  seeds: tuple[int, ...]
  multi_seeds: tuple[int, ...]  # Seeds of multi-process cells.
  processes: tuple[int, ...]  # Process counts of the scaling cells.
  overrides: dict[str, Any]
  pretrain_epochs: float
  mac_reduction: float
  latency_cells: bool
  profiles: int  # Balancer speed draws.
  staleness: tuple[int, ...]  # SSP s of the heterogeneous-node cells (D1, D4).
  compile_cache: bool  # Cells share JAX's persistent compilation cache (workdir/jax_cache).
  nodes: tuple[int, ...] = (1, 2, 4, 8, 16)


def scale_settings(scale: str, data_dir: str) -> Scale:
  """The settings of `scale` ('smoke' or 'full') reading TFDS data from `data_dir`."""
  common = {'data.data_dir': os.path.abspath(data_dir), 'checkpoint_every_steps': 100000,
            'log_every_steps': 100000}
  if scale == 'smoke':
    return Scale(seeds=(0,), multi_seeds=(0,), processes=(1, 2), pretrain_epochs=1,
                 mac_reduction=2.0, latency_cells=False, profiles=5, staleness=(0, 1, 3),
                 compile_cache=True, overrides={
                     **common, 'num_epochs': 1, 'data.batch_size': 64,
                     'optimizer.schedule': 'constant',
                     'data.eval_batch_size': 256, 'diagnostics.dead_map_examples': 128,
                     'prune.score_examples': 128, 'prune.latency_repeats': 0,
                     'init.swarm_size': 4, 'init.generations': 2, 'parallel.num_blocks': 8,
                     'parallel.ssp_warmup_steps': 2, 'parallel.ssp_eval_every_steps': 0})
  if scale == 'full':
    return Scale(seeds=(0, 1, 2), multi_seeds=(0, 1, 2), processes=(1, 2, 4),
                 pretrain_epochs=1, mac_reduction=4.0, latency_cells=True, profiles=20,
                 staleness=(0, 1, 2, 3), compile_cache=False,
                 overrides={**common, 'num_epochs': 3, 'data.batch_size': 128,
                            'parallel.num_blocks': 64, 'parallel.ssp_eval_every_steps': 0})
  raise ValueError(f'--scale={scale!r}; use one of {SCALES}.')


def _train(paper, claims, method, s: Scale, config_file='default.py', processes=1, **over):
  seeds = s.multi_seeds if processes > 1 else s.seeds
  overrides = {**s.overrides, **{k.replace('__', '.'): v for k, v in over.items()}}
  return [Cell(paper, tuple(claims), method, seed, 'train', config_file, dict(overrides),
               processes) for seed in seeds]


def _model(paper, claims, method, s: Scale, **params):
  return [Cell(paper, tuple(claims), method, 0, 'model', params=dict(nodes=list(s.nodes),
                                                                       **params))]


def pdcnno_grid(s: Scale) -> list[Cell]:
  """PDCNNO: FMP + CGMSE + LBRLA MapReduce against its parts and dense baselines."""
  mr = dict(parallel__mode='mapreduce', parallel__balancer='lbrla')
  fmp = dict(prune__method='fmp', prune__pretrain_epochs=s.pretrain_epochs)
  cells = (
      _train('pdcnno', ('P1', 'P2', 'P3'), 'pdcnno', s, 'cgmse_lenet5.py', **mr, **fmp)
      + _train('pdcnno', ('P1', 'P2'), 'pdcnn', s, 'cgmse_lenet5.py', **mr)
      + _train('pdcnno', ('P3', 'P5', 'P6'), 'dense_sgd', s)
      + _train('pdcnno', ('P3',), 'dense_adam', s, optimizer__name='adam',
               optimizer__learning_rate=1e-3)
      + _train('pdcnno', ('P5',), 'cgmse', s, 'cgmse_lenet5.py')
      + _train('pdcnno', ('P6',), 'fmp_sgd', s, **fmp))
  for p in s.processes[1:]:
    cells += _train('pdcnno', ('P4',), f'pdcnno_{p}proc', s, 'cgmse_lenet5.py', processes=p,
                    **mr, **fmp)
  cells += _model('pdcnno', ('P4',), 'model_speedup', s, setting='pdcnno', mode='mapreduce',
                  serial_from='pdcnno', parallel_from='pdcnno')
  return cells


def mr_fpdcnn_grid(s: Scale) -> list[Cell]:
  """MR-FPDCNN: FMPTL against FMP / L1 / random at equal MACs (and latency), IFAS, DLBPCE."""
  cells = _train('mr_fpdcnn', ('M1',), 'dense_caffe', s, 'prune_lenet5_caffe.py',
                 prune__method='none')
  for method in ('fmptl', 'fmp', 'l1', 'random'):
    cells += _train('mr_fpdcnn', ('M1',), f'{method}_macs', s, 'prune_lenet5_caffe.py',
                    prune__method=method, prune__pretrain_epochs=s.pretrain_epochs,
                    prune__target_mac_reduction=s.mac_reduction)
    if s.latency_cells:
      cells += _train('mr_fpdcnn', ('M1',), f'{method}_latency', s, 'prune_lenet5_caffe.py',
                      prune__method=method, prune__pretrain_epochs=s.pretrain_epochs,
                      prune__selection='latency', prune__target_speedup=2.0)
  cells += _train('mr_fpdcnn', ('M2',), 'dense_sgd', s)
  cells += _train('mr_fpdcnn', ('M2',), 'ifas', s, init__method='ifas')
  cells += [Cell('mr_fpdcnn', ('M3',), 'balancers', seed, 'balancer',
                 params={'workers': 4, 'num_blocks': 64, 'speed_range': [1.0, 4.0]})
            for seed in range(s.profiles)]
  for pruning in ('pruned', 'dense_serial_vs_pruned_parallel'):
    cells += _model('mr_fpdcnn', ('M4',), f'model_{pruning}', s, setting='mr_fpdcnn',
                    mode='mapreduce', parallel_from='fmptl_macs',
                    serial_from='fmptl_macs' if pruning == 'pruned' else 'dense_caffe')
  return cells


def delay_sync_grid(s: Scale) -> list[Cell]:
  """Delay synchronization: SSP s = 0..3 on heterogeneous nodes, processes, unrelated load."""
  ssp = dict(parallel__mode='ssp', optimizer__schedule='constant')
  p = s.processes[1]
  cells = []
  for staleness in s.staleness:
    cells += _train('delay_sync', ('D1', 'D4'), f'ssp_s{staleness}_hetero', s, processes=p,
                    parallel__staleness=staleness, parallel__slowdown='1,2', **ssp)
  for procs in s.processes:
    cells += _train('delay_sync', ('D2',), f'sync_{procs}proc', s, processes=procs,
                    optimizer__schedule='constant')
    cells += _train('delay_sync', ('D2',), f'ssp_s3_{procs}proc', s, processes=procs,
                    parallel__staleness=3, **ssp)
  if s.latency_cells:  # Full scale: measured unrelated load (a straggler per step).
    for staleness in (0, 3):
      cells += _train('delay_sync', ('D3',), f'ssp_s{staleness}_load', s, processes=p,
                      parallel__staleness=staleness, parallel__straggler_probability=0.3,
                      **ssp)
      cells += _train('delay_sync', ('D3',), f'ssp_s{staleness}_noload', s, processes=p,
                      parallel__staleness=staleness, parallel__straggler_probability=0.0,
                      **ssp)
  cells += _model('delay_sync', ('D1', 'D3'), 'model_ssp_vs_sync', s, setting='delay_sync',
                  mode='ssp', serial_from='sync_1proc', parallel_from='sync_1proc',
                  straggler_probability=0.3, straggler_factor=4.0, staleness=3)
  return cells


GRIDS = {'pdcnno': pdcnno_grid, 'mr_fpdcnn': mr_fpdcnn_grid, 'delay_sync': delay_sync_grid}


def grid(paper: str, scale: str, data_dir: str) -> list[Cell]:
  """The cells of `paper` ('all': every paper) at `scale`."""
  papers = PAPERS if paper == 'all' else (paper,)
  unknown = [p for p in papers if p not in GRIDS]
  if unknown:
    raise ValueError(f'--paper={paper!r}; use one of {PAPERS + ("all",)}.')
  settings = scale_settings(scale, data_dir)
  return [cell for p in papers for cell in GRIDS[p](settings)]
