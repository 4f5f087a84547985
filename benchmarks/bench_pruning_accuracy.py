"""FMP vs FMPTL vs L1 vs random pruning of LeNet-5 (Caffe) on Fashion-MNIST at one MAC budget.

Bars: the compacted LeNet-5 Caffe variant (conv widths 20-50) needs >= 4x fewer MACs, runs
inference >= 2.5x faster on CPU, and loses <= 1.0 percentage point of test accuracy after
fine-tuning, for both fmp and fmptl. For each of ``--seeds`` this script trains, with the
trainer (``train_and_evaluate``) and ``configs/prune_lenet5_caffe.py``:

1. the dense reference for as many epochs of data as a pruned run sees (``--epochs`` of
   fine-tuning plus ``--pretrain_epochs`` x ``--pretrain_fraction`` of pre-training), so the
   comparison is fair; its dead maps (``diagnostics.dead_maps``) are counted at the end;
2. for each of ``--methods``: pre-training on a random ``--pretrain_fraction`` of the training
   set for ``--pretrain_epochs`` epochs, scoring, pruning with the global MAC budget
   (``--target_mac_reduction``, the same for every method), compaction and fine-tuning of the
   compacted model for ``--epochs`` epochs. The pre-trained model's dead maps and how many of
   the removed maps were dead come from ``report['prune']`` when the pruning stage records
   them (``benchmarks/sweep_recipes.py --table=caffe_pretrain`` counts them otherwise: the
   same seed gives the same pre-trained model).

It prints, per run: MACs and parameters before / after, test accuracy before pruning,
after pruning (before fine-tuning) and after fine-tuning, the loss vs the dense baseline in
percentage points, the inference latency of the masked vs the compacted model (the median
the pruning stage measures on one training batch, ``report['prune']['latency']``) and the
wall time; then, per method, the mean and standard deviation over the seeds of the accuracy
after pruning (before fine-tuning) and after fine-tuning; then the three bars for fmp and fmptl.
``benchmarks/bench_compaction.py`` measures the latencies alone, at several batch sizes.

  python benchmarks/bench_pruning_accuracy.py [--epochs=10 --seeds=0,1,2
      --methods=fmp,fmptl,l1,random --save_json=/tmp/pruning.json]
  python benchmarks/bench_pruning_accuracy.py --quick   # 1 epoch (~15-20 min on 2 busy cores)
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections

from pdcnno_jax import config_lib
from pdcnno_jax import experiment
from pdcnno_jax.diagnostics import dead_maps as dead_maps_lib

import run_flags  # benchmarks/run_flags.py (this directory)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_EPOCHS = flags.DEFINE_integer('epochs', 10, 'Dense training and fine-tuning epochs.')
_METHODS = flags.DEFINE_list('methods', ['fmp', 'fmptl', 'l1', 'random'], 'Pruning methods.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Experiment seeds (one row each).')
_PRETRAIN_FRACTION = flags.DEFINE_float('pretrain_fraction', 0.1,
                                        'Fraction of the training set used for pre-training.')
_PRETRAIN_EPOCHS = flags.DEFINE_integer('pretrain_epochs', 5, 'Pre-training epochs.')
_TARGET = flags.DEFINE_float('target_mac_reduction', 4.0, 'Dense MACs / pruned MACs.')
_DATA_DIR = run_flags.DATA_DIR
_WORKDIR_ROOT = run_flags.WORKDIR_ROOT
_SAVE_JSON = run_flags.SAVE_JSON
_QUICK = flags.DEFINE_bool('quick', False,
                           'Short run: 1 epoch of dense training and of fine-tuning.')

# Bars.
MIN_MAC_REDUCTION = 4.0
MIN_INFERENCE_SPEEDUP = 2.5
MAX_ACCURACY_LOSS_PP = 1.0


def dense_epochs(epochs: int) -> float:
  """Epochs of data a pruned run sees: the pre-training on the subset plus fine-tuning."""
  return epochs + _PRETRAIN_EPOCHS.value * _PRETRAIN_FRACTION.value


def make_config(method: str, epochs: int, seed: int):
  """``configs/prune_lenet5_caffe.py`` with this benchmark's settings.

  The dense reference (``method='none'``) trains for :func:`dense_epochs` epochs.
  """
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'prune_lenet5_caffe.py'))
  config.seed = seed
  config.data.data_dir = _DATA_DIR.value
  config.num_epochs = epochs
  config.eval_every_epochs = epochs  # Test accuracy at the end only.
  config.checkpoint_every_steps = 10**9  # Epoch-end checkpoints only.
  config.log_every_steps = 200
  config.prune.method = method
  config.prune.pretrain_fraction = _PRETRAIN_FRACTION.value
  config.prune.pretrain_epochs = _PRETRAIN_EPOCHS.value
  config.prune.selection = 'global_macs'
  config.prune.target_mac_reduction = _TARGET.value
  if method == 'none':  # A fractional epoch count (num_epochs is an int field).
    config = ml_collections.ConfigDict({**config.to_dict(), 'num_epochs': dense_epochs(epochs),
                                        'eval_every_epochs': 10**6})
  return config


def _accuracy(prune_report: dict[str, Any], suffix: str) -> float | None:
  for key, value in prune_report.items():
    if key.endswith(suffix) and isinstance(value, dict):
      return value.get('accuracy')
  return None


def dead_fractions(dead_maps: dict[str, Any] | None) -> dict[str, float] | None:
  if not dead_maps:
    return None
  return {name: v['dead_fraction'] for name, v in dead_maps['layers'].items()}


def summarize(method: str, report: dict[str, Any], seed: int) -> dict[str, Any]:
  """One table row from a trainer report."""
  row = {'method': method, 'seed': seed, 'test_accuracy': report['test']['accuracy'],
         'wall_time_s': report['wall_time_s']['total'], 'params_after': report['model']['params'],
         'macs_after': report['model']['macs']}
  prune = report.get('prune')
  if prune is None:
    row.update(macs_before=row['macs_after'], params_before=row['params_after'],
               mac_reduction=1.0,
               dead_fraction=dead_fractions(report.get('diagnostics', {}).get('dead_maps')))
    return row
  latency = prune.get('latency', {})
  row.update(
      macs_before=prune['macs_before'], macs_after=prune['macs_after'],
      params_before=prune['params_before'], params_after=prune['params_after'],
      mac_reduction=prune['mac_reduction'], channels_after=prune['channels_after'],
      accuracy_before_pruning=_accuracy(prune, '_before_pruning'),
      accuracy_after_pruning=_accuracy(prune, '_after_pruning_before_finetuning'),
      pretrain_seconds=prune.get('pretrain_seconds'),
      latency_batch_size=latency.get('batch_size'),
      inference_ms_masked=latency.get('inference_ms', {}).get('masked'),
      inference_ms_compacted=latency.get('inference_ms', {}).get('compacted'),
      inference_speedup=latency.get('inference_speedup'),
      train_step_speedup=latency.get('train_step_speedup'),
      dead_fraction=dead_fractions(prune.get('dead_maps_before')),
      removed_dead=prune.get('removed_dead'))
  return row


def _fmt(value, spec: str, missing: str = '-') -> str:
  return missing if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
  print(f'\n{"method":<7} {"seed":>4} {"MACs before":>11} {"MACs after":>10} {"red.":>6} '
        f'{"params":>8} {"acc pre":>7} {"pruned":>7} {"tuned":>7} {"loss pp":>7} {"masked ms":>9} '
        f'{"compact ms":>10} {"speedup":>7} {"wall s":>7}  dead maps (dense: end; pruned: '
        'pre-trained)')
  for r in rows:
    dense = next((d for d in rows if d['method'] == 'dense' and d['seed'] == r['seed']), None)
    loss = None if dense is None else 100 * (dense['test_accuracy'] - r['test_accuracy'])
    r['accuracy_loss_pp'] = loss
    dead = ('-' if r.get('dead_fraction') is None else
            ' '.join(f'{k} {100 * v:.1f}%' for k, v in r['dead_fraction'].items()))
    print(f'{r["method"]:<7} {r["seed"]:>4} {r["macs_before"]:>11,d} {r["macs_after"]:>10,d} '
          f'{r["mac_reduction"]:>5.2f}x {r["params_after"]:>8,d} '
          f'{_fmt(r.get("accuracy_before_pruning"), ".4f"):>7} '
          f'{_fmt(r.get("accuracy_after_pruning"), ".4f"):>7} {r["test_accuracy"]:>7.4f} '
          f'{_fmt(loss, "+.2f"):>7} {_fmt(r.get("inference_ms_masked"), ".3f"):>9} '
          f'{_fmt(r.get("inference_ms_compacted"), ".3f"):>10} '
          f'{_fmt(r.get("inference_speedup"), ".2f"):>6}x {r["wall_time_s"]:>7.0f}  {dead}')
  print('(acc pre: dense model after pre-training, before pruning; pruned: after pruning and '
        'compaction, before fine-tuning; tuned: after fine-tuning; loss pp: dense - tuned; '
        'latencies: median jitted inference of one training batch, masked vs compacted)')


def _mean_std(values: list[float | None]) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  return f'{100 * statistics.mean(values):.2f} +- {100 * statistics.pstdev(values):.2f}'


def print_means(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per method: mean +- std (pp) over the seeds, after pruning and after fine-tuning."""
  means = {}
  print(f'\n{"method":<7} {"seeds":>5} {"after pruning (%)":>18} {"after fine-tuning (%)":>22} '
        f'{"dense - tuned (pp)":>18}')
  for method in dict.fromkeys(r['method'] for r in rows):
    group = [r for r in rows if r['method'] == method]
    means[method] = {
        'after_pruning': _mean_std([r.get('accuracy_after_pruning') for r in group]),
        'after_finetuning': _mean_std([r['test_accuracy'] for r in group]),
        'loss_pp': _mean_std([None if r['accuracy_loss_pp'] is None else
                              r['accuracy_loss_pp'] / 100 for r in group])}
    print(f'{method:<7} {len(group):>5} {means[method]["after_pruning"]:>18} '
          f'{means[method]["after_finetuning"]:>22} {means[method]["loss_pp"]:>18}')
  return means


def print_bars(rows: list[dict[str, Any]]) -> dict[str, dict[str, bool]]:
  """The bars on the mean over the seeds of each of fmp and fmptl."""
  verdicts = {}
  for method in ('fmp', 'fmptl'):
    group = [r for r in rows if r['method'] == method]
    if not group:
      continue
    losses = [r['accuracy_loss_pp'] for r in group]
    r = {'method': method, 'mac_reduction': min(g['mac_reduction'] for g in group),
         'inference_speedup': (None if any(g.get('inference_speedup') is None for g in group)
                               else statistics.median(g['inference_speedup'] for g in group)),
         'accuracy_loss_pp': None if None in losses else statistics.mean(losses)}
    checks = {
        f'MACs >= {MIN_MAC_REDUCTION}x fewer': r['mac_reduction'] >= MIN_MAC_REDUCTION,
        f'inference >= {MIN_INFERENCE_SPEEDUP}x faster': (
            r.get('inference_speedup') is not None
            and r['inference_speedup'] >= MIN_INFERENCE_SPEEDUP),
        f'accuracy loss <= {MAX_ACCURACY_LOSS_PP} pp': (
            r.get('accuracy_loss_pp') is not None
            and r['accuracy_loss_pp'] <= MAX_ACCURACY_LOSS_PP),
    }
    verdicts[method] = checks
    print(f'  {r["method"]:<6} ' + '   '.join(
        f'{name}: {"PASS" if ok else "FAIL"}' for name, ok in checks.items()))
  return verdicts


def main(argv):
  del argv
  epochs = 1 if _QUICK.value else _EPOCHS.value
  root = _WORKDIR_ROOT.value or tempfile.mkdtemp(prefix='bench_pruning_')
  print(f'JAX {jax.__version__}, backend {jax.default_backend()}, cpus {os.cpu_count()}, '
        f'loadavg {os.getloadavg()}')
  seeds = [int(s) for s in _SEEDS.value]
  print(f'lenet5_caffe on fashion_mnist: {epochs} epochs fine-tuning ({dense_epochs(epochs):g} '
        f'dense), pre-training {_PRETRAIN_EPOCHS.value} epoch(s) on '
        f'{_PRETRAIN_FRACTION.value:.0%} of the data, global MAC budget {_TARGET.value}x, seeds '
        f'{seeds}; workdirs under {root}')
  rows = []
  for seed in seeds:
    for method in ['none'] + list(_METHODS.value):
      workdir = os.path.join(root, f'{"dense" if method == "none" else method}_s{seed}')
      if os.path.exists(os.path.join(workdir, 'checkpoints')):
        raise ValueError(f'{workdir} already holds a run; pass a fresh --workdir_root.')
      start = time.perf_counter()
      config = make_config(method, epochs, seed)
      report = experiment.train_and_evaluate(config, workdir)
      row = summarize('dense' if method == 'none' else method, report, seed)
      if method == 'none' and row['dead_fraction'] is None:
        row['dead_fraction'] = dead_fractions(
            dead_maps_lib.count_dead_maps_in_checkpoint(config, workdir))
      rows.append(row)
      print(f'[bench] {method} seed {seed}: test accuracy {report["test"]["accuracy"]:.4f} in '
            f'{time.perf_counter() - start:.0f} s; loadavg {os.getloadavg()}', flush=True)
  print_table(rows)
  means = print_means(rows)
  print(f'\nBars (LeNet-5 Caffe, {epochs} epochs, mean over seeds {seeds}):')
  verdicts = print_bars(rows)
  print(f'loadavg {os.getloadavg()}')
  if _SAVE_JSON.value:
    with open(_SAVE_JSON.value, 'w', encoding='utf-8') as f:
      json.dump({'epochs': epochs, 'pretrain_epochs': _PRETRAIN_EPOCHS.value,
                 'pretrain_fraction': _PRETRAIN_FRACTION.value,
                 'target_mac_reduction': _TARGET.value, 'seeds': seeds, 'rows': rows,
                 'means': means, 'bars': verdicts,
                 'loadavg': os.getloadavg()}, f, indent=2)
    print(f'Saved {_SAVE_JSON.value}')


if __name__ == '__main__':
  app.run(main)
