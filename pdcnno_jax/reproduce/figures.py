"""The papers' figure types, drawn from results.csv rows with matplotlib (Agg backend).

Bars are means over seeds with 95% t-interval error bars; every cluster-model curve is dashed
and labelled "model prediction".
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from pdcnno_jax.reproduce import claims as claims_lib  # pylint: disable=wrong-import-position
from pdcnno_jax.reproduce import stats  # pylint: disable=wrong-import-position

Rows = Sequence[dict[str, Any]]
_MODEL = dict(linestyle='--', marker='o')


def _bars(ax, rows: Rows, paper: str, methods: Sequence[str], field: str, label: str,
          scale: float = 1.0) -> None:
  shown, means, errs = [], [], []
  for m in methods:
    est = stats.mean_ci(list(claims_lib.by_seed(rows, paper, m, field).values()))
    if est.n:
      shown.append(m)
      means.append(est.mean * scale)
      errs.append(0.0 if math.isinf(est.hi) else (est.hi - est.mean) * scale)
  ax.bar(range(len(shown)), means, yerr=errs, capsize=3, color='tab:blue')
  ax.set_xticks(range(len(shown)), shown, rotation=30, ha='right', fontsize=8)
  ax.set_ylabel(label)


def _curve(ax, rows: Rows, paper: str, method: str, label: str) -> None:
  for e in claims_lib.extras(rows, paper, method):
    curve = {int(k): v for k, v in e.get('speedup', {}).items() if int(k) <= 16}
    ax.plot(list(curve), list(curve.values()), label=f'{label} (model prediction)', **_MODEL)


def _ideal(ax, nodes=range(1, 17)) -> None:
  ax.plot(list(nodes), list(nodes), color='grey', linewidth=0.8, label='linear')
  ax.set_xlabel('nodes')
  ax.set_ylabel('speed-up T_1 / T_N')
  ax.legend(fontsize=7)


def pdcnno_time_memory(ax_pair, rows):
  methods = ('pdcnno', 'pdcnn', 'dense_sgd', 'dense_adam')
  _bars(ax_pair[0], rows, 'pdcnno', methods, 'time_s', 'running time (s)')
  _bars(ax_pair[1], rows, 'pdcnno', methods, 'peak_rss_mb', 'peak RSS (MiB)')


def pdcnno_accuracy(ax_pair, rows):
  methods = ('pdcnno', 'pdcnn', 'cgmse', 'dense_sgd', 'dense_adam', 'fmp_sgd')
  _bars(ax_pair[0], rows, 'pdcnno', methods, 'accuracy', 'test accuracy (%)', 100.0)
  _bars(ax_pair[1], rows, 'pdcnno', methods, 'params', 'parameters')


def pdcnno_speedup(ax, rows):
  _curve(ax, rows, 'pdcnno', 'model_speedup', 'PDCNNO, LBRLA')
  measured = claims_lib.paired(rows, 'pdcnno', 'pdcnno', 'pdcnno_2proc', 'time_train_s')
  if measured:
    ax.plot([2] * len(measured), measured, 'k^', label='measured, this machine')
  _ideal(ax)


def mr_fpdcnn_pruning(ax_pair, rows):
  ax = ax_pair[0]
  for method in ('dense_caffe', 'fmptl_macs', 'fmp_macs', 'l1_macs', 'random_macs',
                 'fmptl_latency', 'fmp_latency', 'l1_latency', 'random_latency'):
    macs = claims_lib.by_seed(rows, 'mr_fpdcnn', method, 'macs')
    acc = claims_lib.by_seed(rows, 'mr_fpdcnn', method, 'accuracy')
    if macs:
      ax.scatter([macs[s] for s in sorted(macs)], [100 * acc[s] for s in sorted(macs)],
                 label=method, s=14)
  ax.set_xlabel('MACs per example')
  ax.set_ylabel('test accuracy (%)')
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=6)
  _bars(ax_pair[1], rows, 'mr_fpdcnn', ('dense_sgd', 'ifas'), 'accuracy',
        'test accuracy (%), He vs IFAS', 100.0)


def mr_fpdcnn_balancers(ax, rows):
  spans = claims_lib.extras(rows, 'mr_fpdcnn', 'balancers')
  names = ('equal', 'proportional', 'lbrla', 'dlbpce')
  ax.boxplot([[s[n] / s['equal'] for s in spans] for n in names] if spans else [[]] * 4)
  ax.set_xticks(range(1, 5), names)
  ax.set_ylabel('makespan / equal split (simulation)')


def mr_fpdcnn_speedup(ax, rows):
  _curve(ax, rows, 'mr_fpdcnn', 'model_pruned', 'pruned serial and parallel')
  _curve(ax, rows, 'mr_fpdcnn', 'model_dense_serial_vs_pruned_parallel',
         'dense serial vs pruned parallel')
  ax.plot([2, 8], [1.6, 9.3], 'r*', markersize=10, label='paper (Fig. 2)')
  _ideal(ax)


def delay_sync_staleness(ax_pair, rows):
  methods = [f'ssp_s{s}_hetero' for s in range(4)]
  _bars(ax_pair[0], rows, 'delay_sync', methods, 'time_train_s', 'training time (s)')
  _bars(ax_pair[1], rows, 'delay_sync', methods, 'accuracy', 'test accuracy (%)', 100.0)


def delay_sync_processes(ax_pair, rows):
  for prefix, label in (('sync_', 'synchronous'), ('ssp_s3_', 'SSP s = 3')):
    for ax, field, scale in ((ax_pair[0], 'accuracy', 100.0), (ax_pair[1], 'time_train_s', 1)):
      xs, ys = [], []
      for p in range(1, 17):
        est = stats.mean_ci(list(claims_lib.by_seed(rows, 'delay_sync', f'{prefix}{p}proc',
                                                    field).values()))
        if est.n:
          xs.append(p)
          ys.append(est.mean * scale)
      ax.plot(xs, ys, marker='o', label=label)
      ax.set_xlabel('processes')
      ax.set_ylabel('test accuracy (%)' if scale > 1 else 'training time (s)')
      ax.legend(fontsize=7)


def delay_sync_accuracy_time(ax, rows):
  for method in [f'ssp_s{s}_hetero' for s in range(4)]:
    for i, e in enumerate(claims_lib.extras(rows, 'delay_sync', method)):
      curve = e.get('accuracy_vs_time', [])
      if curve:
        ax.plot([t for t, _ in curve], [100 * a for _, a in curve], marker='.',
                label=method if i == 0 else None)
  ax.set_xlabel('training wall time (s)')
  ax.set_ylabel('test accuracy (%), worker 0')
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)


def delay_sync_load(ax, rows):
  labels, values = [], []
  for e in claims_lib.extras(rows, 'delay_sync', 'model_ssp_vs_sync'):
    per = e.get('per_example_s', {})
    for mode in ('sync', 'ssp'):
      if per:
        labels.append(f'{mode} (model)')
        values.append(per[f'{mode}_load'] / per[f'{mode}_noload'])
  for method in ('ssp_s0', 'ssp_s3'):
    ratio = claims_lib.paired(rows, 'delay_sync', f'{method}_load', f'{method}_noload',
                              'time_train_s')
    if ratio:
      labels.append(f'{method} (measured)')
      values.append(sum(ratio) / len(ratio))
  ax.bar(range(len(labels)), values, color='tab:orange')
  ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
  ax.axhline(1.0, color='grey', linewidth=0.8)
  ax.set_ylabel('time with load / without')


FIGURES: dict[str, tuple[str, int, Callable]] = {
    'pdcnno_time_memory.png': ('pdcnno', 2, pdcnno_time_memory),
    'pdcnno_accuracy.png': ('pdcnno', 2, pdcnno_accuracy),
    'pdcnno_speedup.png': ('pdcnno', 1, pdcnno_speedup),
    'mr_fpdcnn_pruning.png': ('mr_fpdcnn', 2, mr_fpdcnn_pruning),
    'mr_fpdcnn_balancers.png': ('mr_fpdcnn', 1, mr_fpdcnn_balancers),
    'mr_fpdcnn_speedup.png': ('mr_fpdcnn', 1, mr_fpdcnn_speedup),
    'delay_sync_staleness.png': ('delay_sync', 2, delay_sync_staleness),
    'delay_sync_processes.png': ('delay_sync', 2, delay_sync_processes),
    'delay_sync_accuracy_time.png': ('delay_sync', 1, delay_sync_accuracy_time),
    'delay_sync_load.png': ('delay_sync', 1, delay_sync_load),
}


def draw(rows: Rows, outdir: str, papers: Sequence[str]) -> list[str]:
  """Writes the figures of `papers` to `outdir`; returns their file names."""
  written = []
  for name, (paper, panels, fn) in FIGURES.items():
    if paper not in papers:
      continue
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.4))
    fn(axes if panels > 1 else axes, rows)
    fig.suptitle(name[:-4].replace('_', ' '), fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, name), dpi=90)
    plt.close(fig)
    written.append(name)
  return written
