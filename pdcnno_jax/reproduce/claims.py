"""The 14 claims of the three papers, each evaluated from results.csv rows by `stats.verdict`.

Every claim states the paper's sentence with its figure or section, the per-seed metrics that
test it (paired by seed: a ratio or a difference of two methods of the same grid), the target
and weak criteria of each metric, and the figure of REPORT.md that shows it. Competitor
algorithms the papers compare with (MR-DCNN, PP-CNN, CNN-ABC, MR-DLHR, ...) have no public
code: P3 compares with what a user would run instead, dense synchronous SGD and Adam.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Sequence

from pdcnno_jax.reproduce import stats

Rows = Sequence[dict[str, Any]]
_MAX_FALL = -0.01  # "Keeps accuracy": at most 1 percentage point below the reference.


def num(value: Any) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def by_seed(rows: Rows, paper: str, method: str, field: str) -> dict[int, float]:
  """{seed: value of `field`} of the completed cells of `paper`'s `method`."""
  return {int(r['seed']): num(r[field]) for r in rows
          if r['paper'] == paper and r['method'] == method and r['status'] == 'ok'}


def paired(rows: Rows, paper: str, a: str, b: str, field: str, how: str = 'ratio',
           field_b: str | None = None) -> list[float]:
  """a / b (or a - b) of `field` per seed both methods completed."""
  va, vb = by_seed(rows, paper, a, field), by_seed(rows, paper, b, field_b or field)
  seeds = sorted(set(va) & set(vb))
  if how == 'ratio':
    return [va[s] / vb[s] if vb[s] else math.nan for s in seeds]
  return [va[s] - vb[s] for s in seeds]


def extras(rows: Rows, paper: str, method: str) -> list[dict[str, Any]]:
  return [json.loads(r['extra']) for r in rows if r['paper'] == paper
          and r['method'] == method and r['status'] == 'ok' and r['extra']]


@dataclasses.dataclass
class Part:
  """One tested metric of a claim."""
  name: str
  estimate: stats.Estimate
  target: stats.Criterion
  weak: stats.Criterion
  source: str = 'measured'

  @property
  def verdict(self) -> str:
    return stats.verdict(self.estimate, self.target, self.weak)


def part(name, values, target, weak, *, source='measured', deterministic=False) -> Part:
  return Part(name, stats.mean_ci(values, deterministic=deterministic),
              stats.Criterion(*target), stats.Criterion(*weak), source)


@dataclasses.dataclass(frozen=True)
class Claim:
  """A claim of a paper and how the grids test it."""
  id: str
  paper: str
  statement: str
  where: str  # Figure / table / section of the paper.
  figures: tuple[str, ...]  # PNGs of REPORT.md.
  evaluate: Callable[[Rows], list[Part]]
  note: str = ''

  def verdict(self, parts: Sequence[Part]) -> str:
    tested = [p for p in parts if p.verdict != stats.NOT_TESTABLE]
    model_only = bool(tested) and all(p.source == 'model' for p in tested)
    return stats.combine([p.verdict for p in parts], model_only=model_only)


def _speedup_at(rows: Rows, paper: str, method: str, n: int) -> list[float]:
  return [e['speedup'][str(n)] for e in extras(rows, paper, method)
          if str(n) in e.get('speedup', {})]


def _max_procs(rows: Rows, paper: str, prefix: str) -> int:
  procs = [int(r['nodes']) for r in rows if r['paper'] == paper and r['status'] == 'ok'
           and r['method'].startswith(prefix) and r['method'].endswith('proc')]
  return max(procs, default=0)


def _best_other(rows: Rows, suffix: str) -> list[float]:
  """FMPTL accuracy minus the best of FMP / L1 / random, per seed, at one selection."""
  mine = by_seed(rows, 'mr_fpdcnn', f'fmptl_{suffix}', 'accuracy')
  others = [by_seed(rows, 'mr_fpdcnn', f'{m}_{suffix}', 'accuracy') for m in ('fmp', 'l1',
                                                                               'random')]
  seeds = sorted(set(mine).intersection(*others))
  return [mine[s] - max(o[s] for o in others) for s in seeds]


def _better_and_faster(rows, paper, a, b, accuracy_name, time_name):
  """Accuracy a - b at equal epochs (target > 0) and running time a / b (target < 1)."""
  return [part(f'accuracy {accuracy_name} at equal epochs',
               paired(rows, paper, a, b, 'accuracy', 'diff'), ('>', 0.0), ('>', 0.0)),
          part(f'time {time_name}', paired(rows, paper, a, b, 'time_s'), ('<', 1.0),
               ('<', 1.0))]


def _p4(rows):
  measured = paired(rows, 'pdcnno', 'pdcnno', 'pdcnno_2proc', 'time_train_s')
  s8 = _speedup_at(rows, 'pdcnno', 'model_speedup', 8)
  return [part('measured S(2) = T_train(1 process) / T_train(2 processes)', measured,
               ('>=', 1.6), ('>', 1.0)),
           part('model S(8) / 8 (efficiency)', [s / 8 for s in s8], ('>=', 0.8), ('>', 0.5),
                source='model', deterministic=True)]


def _m4(rows):
  return [part('model S(2), pruned serial and parallel',
               _speedup_at(rows, 'mr_fpdcnn', 'model_pruned', 2), ('>=', 1.28), ('>', 1.0),
               source='model', deterministic=True),
          part('model S(8), pruned serial and parallel (paper: 9.3)',
               _speedup_at(rows, 'mr_fpdcnn', 'model_pruned', 8), ('>=', 7.44), ('>', 4.0),
               source='model', deterministic=True)]


def _m3(rows):
  spans = extras(rows, 'mr_fpdcnn', 'balancers')
  ratio = lambda a, b: [s[a] / s[b] for s in spans]
  sim = dict(source='simulation', deterministic=True)
  return [part('makespan DLBPCE / equal split', ratio('dlbpce', 'equal'), ('<', 1.0),
               ('<', 1.0), **sim),
          part('makespan DLBPCE / proportional', ratio('dlbpce', 'proportional'),
               ('<=', 1.05), ('<=', 1.05), **sim),
          part('makespan DLBPCE / LBRLA', ratio('dlbpce', 'lbrla'), ('<=', 1.05),
               ('<=', 1.05), **sim)]


def _per_example(rows, key_a, key_b):
  return [e['per_example_s'][key_a] / e['per_example_s'][key_b]
          for e in extras(rows, 'delay_sync', 'model_ssp_vs_sync') if 'per_example_s' in e]


def _d2(rows):
  p = _max_procs(rows, 'delay_sync', 'ssp_s3_')
  ssp = paired(rows, 'delay_sync', f'ssp_s3_{p}proc', 'ssp_s3_1proc', 'accuracy', 'diff')
  sync = paired(rows, 'delay_sync', f'sync_{p}proc', 'sync_1proc', 'accuracy', 'diff')
  faster = [a - b for a, b in zip(ssp, sync)]
  return [part(f'SSP accuracy({p} processes) - accuracy(1)', ssp if p > 1 else [],
               ('<', 0.0), ('<', 0.0)),
          part(f'SSP fall - synchronous fall ({p} processes)', faster if p > 1 else [],
               ('<', 0.0), ('<', 0.0))]


def _d3(rows):
  slow = lambda m: paired(rows, 'delay_sync', f'{m}_load', f'{m}_noload', 'time_train_s')
  bsp, ssp = slow('ssp_s0'), slow('ssp_s3')
  return [part('measured BSP slowdown / SSP slowdown under load', [a / b for a, b in
                                                                    zip(bsp, ssp)],
               ('>=', 1.2), ('>', 1.0)),
          part('model BSP slowdown / SSP slowdown under load (4 nodes)',
               [a / b for a, b in zip(_per_example(rows, 'sync_load', 'sync_noload'),
                                      _per_example(rows, 'ssp_load', 'ssp_noload'))],
               ('>=', 1.2), ('>', 1.0), source='model', deterministic=True)]


CLAIMS: tuple[Claim, ...] = (
    Claim('P1', 'pdcnno', 'PDCNNO (FMP + CGMSE + LBRLA MapReduce) runs in 20.42% (SVHN) to '
          '21.96% (ILSVRC2012) of the time of the same pipeline without compression (PDCNN).',
          'Fig. 4(a), section 5.2', ('pdcnno_time_memory.png',),
          lambda rows: [part('time PDCNNO / PDCNN', paired(rows, 'pdcnno', 'pdcnno', 'pdcnn',
                                                           'time_s'), ('<=', 0.2196),
                             ('<', 1.0))]),
    Claim('P2', 'pdcnno', "PDCNNO's memory usage is 57.65% of PDCNN's (SVHN).",
          'Fig. 4(b), section 5.2', ('pdcnno_time_memory.png',),
          lambda rows: [part('peak RSS PDCNNO / PDCNN', paired(rows, 'pdcnno', 'pdcnno',
                                                               'pdcnn', 'peak_rss_mb'),
                             ('<=', 0.5765), ('<', 1.0))]),
    Claim('P3', 'pdcnno', "PDCNNO runs in 20-41% of its competitors' time (MR-DCNN, PP-CNN, "
          'CNN-ABC).', 'Fig. 4(a), section 5.2', ('pdcnno_time_memory.png',),
          lambda rows: [part(f'time PDCNNO / dense synchronous {o}', paired(
              rows, 'pdcnno', 'pdcnno', f'dense_{o}', 'time_s'), ('<=', 0.4147), ('<', 1.0))
                        for o in ('sgd', 'adam')],
          note='MR-DCNN, PP-CNN and CNN-ABC have no public code; the stand-ins are what a '
               'user would run instead: dense synchronous data-parallel SGD (momentum) and '
               'Adam on the same data.'),
    Claim('P4', 'pdcnno', 'The speed-up of PDCNNO grows near-linearly with the number of '
          'nodes, up to 8.', 'Fig. 5', ('pdcnno_speedup.png',), _p4,
          note='Beyond this machine the speed-up is a cluster-model prediction (7 x Ryzen 7 + '
               'RTX 2070, 1 Gb/s) from the measured per-example time.'),
    Claim('P5', 'pdcnno', 'CGMSE speeds up network convergence (faster than SGD).',
          'section 3.2 and the discussion of Fig. 4(a)', ('pdcnno_accuracy.png',),
          lambda rows: _better_and_faster(rows, 'pdcnno', 'cgmse', 'dense_sgd', 'CGMSE - SGD',
                                          'CGMSE / SGD at equal epochs')),
    Claim('P6', 'pdcnno', 'FMP removes redundant parameters without hurting accuracy.',
          'section 3.1, Fig. 4', ('pdcnno_accuracy.png',),
          lambda rows: [
              part('accuracy FMP - dense (SGD)',
                   paired(rows, 'pdcnno', 'fmp_sgd', 'dense_sgd', 'accuracy', 'diff'),
                   ('>=', _MAX_FALL), ('>=', _MAX_FALL)),
              part('parameters FMP / dense',
                   paired(rows, 'pdcnno', 'fmp_sgd', 'dense_sgd', 'params'), ('<', 1.0),
                   ('<', 1.0))]),
    Claim('M1', 'mr_fpdcnn', 'FMPTL (Taylor-loss feature-map pruning) reduces the cost and '
          'keeps the accuracy, against FMP, L1 and random pruning at equal MACs and at equal '
          'measured latency.', 'section 2.1 (FMPTL, Definition 2); no experiment figure',
          ('mr_fpdcnn_pruning.png',),
          lambda rows: [
              part('MACs FMPTL / dense', paired(rows, 'mr_fpdcnn', 'fmptl_macs', 'dense_caffe',
                                                'macs'), ('<', 1.0), ('<', 1.0)),
              part('accuracy FMPTL - dense', paired(rows, 'mr_fpdcnn', 'fmptl_macs',
                                                    'dense_caffe', 'accuracy', 'diff'),
                   ('>=', _MAX_FALL), ('>=', _MAX_FALL)),
              part('equal MACs: accuracy FMPTL - best of FMP / L1 / random',
                   _best_other(rows, 'macs'), ('>=', _MAX_FALL), ('>=', _MAX_FALL)),
              part('equal latency: accuracy FMPTL - best of FMP / L1 / random',
                   _best_other(rows, 'latency'), ('>=', _MAX_FALL), ('>=', _MAX_FALL))]),
    Claim('M2', 'mr_fpdcnn', 'IFAS (glowworm swarm with information sharing) initialisation '
          'speeds up training and improves the starting point.',
          'section 2.2 (IFAS); no experiment figure', ('mr_fpdcnn_pruning.png',),
          lambda rows: _better_and_faster(rows, 'mr_fpdcnn', 'ifas', 'dense_sgd', 'IFAS - He',
                                          'IFAS / He, search cost charged')),
    Claim('M3', 'mr_fpdcnn', 'DLBPCE (parallel computing entropy) balances the load of '
          'heterogeneous nodes.', 'section 2.3, Definition 1, eq. (5)',
          ('mr_fpdcnn_balancers.png',), _m3,
          note='Deterministic simulation of one round on drawn node speeds (4 nodes, speeds '
               'uniform in [1, 4], 64 blocks); one draw per seed, so the interval is the '
               'range over draws.'),
    Claim('M4', 'mr_fpdcnn', 'The speed-up of MR-FPDCNN is about 1.6 at 2 nodes and 9.3 at '
          '8 nodes (super-linear).', 'Fig. 2, section 4', ('mr_fpdcnn_speedup.png',), _m4,
          note='Cluster-model prediction (7 task nodes of Ryzen 9 + RTX 2080 Ti, 1 Gb/s). '
               'S(N) > N needs a serial baseline that does more work per example than a '
               'parallel node, e.g. an unpruned serial run against a pruned parallel one: the '
               'figure shows that curve too.'),
    Claim('D1', 'delay_sync', 'In the best case delay synchronization (SSP, s = 3) is almost '
          'three times faster than synchronous data parallel training on heterogeneous nodes.',
          'Figs. 11-12, section 5.2', ('delay_sync_staleness.png',),
          lambda rows: [
              part('measured T_train(s=0) / T_train(s=3), nodes of speed 1 and 1/2',
                   paired(rows, 'delay_sync', 'ssp_s0_hetero', 'ssp_s3_hetero',
                          'time_train_s'), ('>=', 2.4), ('>', 1.0)),
              part('model time per example sync / SSP (the paper\'s 4 servers)',
                   _per_example(rows, 'sync_noload', 'ssp_noload'), ('>=', 2.4), ('>', 1.0),
                   source='model', deterministic=True)]),
    Claim('D2', 'delay_sync', 'Accuracy falls as the number of processes increases, faster '
          'for SSP than for synchronous data parallel.', 'Figs. 11-13, sections 5.2-5.3',
          ('delay_sync_processes.png',), _d2),
    Claim('D3', 'delay_sync', 'With unrelated load added (10 processes), synchronous training '
          'slows down and SSP does not.', 'section 5.2', ('delay_sync_load.png',), _d3,
          note='Load: each step is 4x slower with probability 0.3 (parallel/slowdown.py).'),
    Claim('D4', 'delay_sync', 'A larger maximum interval s trains faster but less accurately '
          '(s = 1, 2, 3).', 'Figs. 14-15, section 5.4',
          ('delay_sync_staleness.png', 'delay_sync_accuracy_time.png'),
          lambda rows: [
              part('T_train(s=1) / T_train(s=3)', paired(rows, 'delay_sync', 'ssp_s1_hetero',
                                                         'ssp_s3_hetero', 'time_train_s'),
                   ('>', 1.0), ('>', 1.0)),
              part('accuracy(s=3) - accuracy(s=1)', paired(
                  rows, 'delay_sync', 'ssp_s3_hetero', 'ssp_s1_hetero', 'accuracy', 'diff'),
                   ('<', 0.0), ('<', 0.0))]),
)
CLAIM_IDS = tuple(c.id for c in CLAIMS)
BY_ID = {c.id: c for c in CLAIMS}
