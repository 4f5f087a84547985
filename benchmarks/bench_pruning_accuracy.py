"""FMP vs FMPTL vs random pruning of LeNet-5 (Caffe) on Fashion-MNIST at an equal MAC budget.

Issue #3, first bar: the compacted LeNet-5 Caffe variant (conv widths 20-50) needs >= 4x fewer
MACs, runs inference >= 2.5x faster on CPU, and loses <= 1.0 percentage point of test
accuracy after fine-tuning, for both fmp and fmptl. One run of this script trains, with the
trainer (``train_and_evaluate``) and ``configs/prune_lenet5_caffe.py``:

1. the dense baseline for ``--epochs`` epochs;
2. for each of ``--methods``: pre-training on a random ``--pretrain_fraction`` of the training
   set for ``--pretrain_epochs`` epochs, scoring, pruning with the global MAC budget
   (``--target_mac_reduction``, the same for every method), compaction and fine-tuning of the
   compacted model for ``--epochs`` epochs.

It prints, per method: MACs and parameters before / after, test accuracy before pruning,
after pruning (before fine-tuning) and after fine-tuning, the loss vs the dense baseline in
percentage points, the inference latency of the masked vs the compacted model (the median
the pruning stage measures on one training batch, ``report['prune']['latency']``) and the
wall time; then the three bars for fmp and fmptl. Note that each pruned run trains slightly
more than the baseline (the pre-training on the subset, reported in its wall time).
``benchmarks/bench_compaction.py`` measures the latencies alone, at several batch sizes.

  python benchmarks/bench_pruning_accuracy.py [--epochs=10 --methods=fmp,fmptl,random
      --save_json=/tmp/pruning.json]
  python benchmarks/bench_pruning_accuracy.py --quick   # 1 epoch (~15-20 min on 2 busy cores)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import jax

from pdcnno_jax import config_lib
from pdcnno_jax import experiment

import run_flags  # benchmarks/run_flags.py (this directory)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_EPOCHS = flags.DEFINE_integer('epochs', 10, 'Dense training and fine-tuning epochs.')
_METHODS = flags.DEFINE_list('methods', ['fmp', 'fmptl', 'random'], 'Pruning methods.')
_PRETRAIN_FRACTION = flags.DEFINE_float('pretrain_fraction', 0.1,
                                        'Fraction of the training set used for pre-training.')
_PRETRAIN_EPOCHS = flags.DEFINE_integer('pretrain_epochs', 5, 'Pre-training epochs.')
_TARGET = flags.DEFINE_float('target_mac_reduction', 4.0, 'Dense MACs / pruned MACs.')
_DATA_DIR = run_flags.DATA_DIR
_SEED = run_flags.SEED
_WORKDIR_ROOT = run_flags.WORKDIR_ROOT
_SAVE_JSON = run_flags.SAVE_JSON
_QUICK = flags.DEFINE_bool('quick', False,
                           'Short run: 1 epoch of dense training and of fine-tuning.')

# Issue #3 bars.
MIN_MAC_REDUCTION = 4.0
MIN_INFERENCE_SPEEDUP = 2.5
MAX_ACCURACY_LOSS_PP = 1.0


def make_config(method: str, epochs: int):
  """``configs/prune_lenet5_caffe.py`` with this benchmark's settings."""
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'prune_lenet5_caffe.py'))
  config.seed = _SEED.value
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
  return config


def _accuracy(prune_report: dict[str, Any], suffix: str) -> float | None:
  for key, value in prune_report.items():
    if key.endswith(suffix) and isinstance(value, dict):
      return value.get('accuracy')
  return None


def summarize(method: str, report: dict[str, Any]) -> dict[str, Any]:
  """One table row from a trainer report."""
  row = {'method': method, 'test_accuracy': report['test']['accuracy'],
         'wall_time_s': report['wall_time_s']['total'], 'params_after': report['model']['params'],
         'macs_after': report['model']['macs']}
  prune = report.get('prune')
  if prune is None:
    row.update(macs_before=row['macs_after'], params_before=row['params_after'],
               mac_reduction=1.0)
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
      train_step_speedup=latency.get('train_step_speedup'))
  return row


def _fmt(value, spec: str, missing: str = '-') -> str:
  return missing if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
  dense = next((r for r in rows if r['method'] == 'dense'), None)
  print(f'\n{"method":<7} {"MACs before":>11} {"MACs after":>10} {"red.":>6} {"params":>8} '
        f'{"acc pre":>7} {"pruned":>7} {"tuned":>7} {"loss pp":>7} {"masked ms":>9} '
        f'{"compact ms":>10} {"speedup":>7} {"wall s":>7}')
  for r in rows:
    loss = None if dense is None else 100 * (dense['test_accuracy'] - r['test_accuracy'])
    r['accuracy_loss_pp'] = loss
    print(f'{r["method"]:<7} {r["macs_before"]:>11,d} {r["macs_after"]:>10,d} '
          f'{r["mac_reduction"]:>5.2f}x {r["params_after"]:>8,d} '
          f'{_fmt(r.get("accuracy_before_pruning"), ".4f"):>7} '
          f'{_fmt(r.get("accuracy_after_pruning"), ".4f"):>7} {r["test_accuracy"]:>7.4f} '
          f'{_fmt(loss, "+.2f"):>7} {_fmt(r.get("inference_ms_masked"), ".3f"):>9} '
          f'{_fmt(r.get("inference_ms_compacted"), ".3f"):>10} '
          f'{_fmt(r.get("inference_speedup"), ".2f"):>6}x {r["wall_time_s"]:>7.0f}')
  print('(acc pre: dense model after pre-training, before pruning; pruned: after pruning and '
        'compaction, before fine-tuning; tuned: after fine-tuning; loss pp: dense - tuned; '
        'latencies: median jitted inference of one training batch, masked vs compacted)')


def print_bars(rows: list[dict[str, Any]]) -> dict[str, dict[str, bool]]:
  verdicts = {}
  for r in rows:
    if r['method'] not in ('fmp', 'fmptl'):
      continue
    checks = {
        f'MACs >= {MIN_MAC_REDUCTION}x fewer': r['mac_reduction'] >= MIN_MAC_REDUCTION,
        f'inference >= {MIN_INFERENCE_SPEEDUP}x faster': (
            r.get('inference_speedup') is not None
            and r['inference_speedup'] >= MIN_INFERENCE_SPEEDUP),
        f'accuracy loss <= {MAX_ACCURACY_LOSS_PP} pp': (
            r.get('accuracy_loss_pp') is not None
            and r['accuracy_loss_pp'] <= MAX_ACCURACY_LOSS_PP),
    }
    verdicts[r['method']] = checks
    print(f'  {r["method"]:<6} ' + '   '.join(
        f'{name}: {"PASS" if ok else "FAIL"}' for name, ok in checks.items()))
  return verdicts


def main(argv):
  del argv
  epochs = 1 if _QUICK.value else _EPOCHS.value
  root = _WORKDIR_ROOT.value or tempfile.mkdtemp(prefix='bench_pruning_')
  print(f'JAX {jax.__version__}, backend {jax.default_backend()}, cpus {os.cpu_count()}, '
        f'loadavg {os.getloadavg()}')
  print(f'lenet5_caffe on fashion_mnist: {epochs} epochs dense / fine-tuning, pre-training '
        f'{_PRETRAIN_EPOCHS.value} epoch(s) on {_PRETRAIN_FRACTION.value:.0%} of the data, '
        f'global MAC budget {_TARGET.value}x; workdirs under {root}')
  rows = []
  for method in ['none'] + list(_METHODS.value):
    workdir = os.path.join(root, 'dense' if method == 'none' else method)
    if os.path.exists(os.path.join(workdir, 'checkpoints')):
      raise ValueError(f'{workdir} already holds a run; pass a fresh --workdir_root.')
    start = time.perf_counter()
    report = experiment.train_and_evaluate(make_config(method, epochs), workdir)
    rows.append(summarize('dense' if method == 'none' else method, report))
    print(f'[bench] {method}: test accuracy {report["test"]["accuracy"]:.4f} in '
          f'{time.perf_counter() - start:.0f} s; loadavg {os.getloadavg()}', flush=True)
  print_table(rows)
  print(f'\nIssue #3 bars (LeNet-5 Caffe, {epochs} epochs):')
  verdicts = print_bars(rows)
  print(f'loadavg {os.getloadavg()}')
  if _SAVE_JSON.value:
    with open(_SAVE_JSON.value, 'w', encoding='utf-8') as f:
      json.dump({'epochs': epochs, 'pretrain_epochs': _PRETRAIN_EPOCHS.value,
                 'pretrain_fraction': _PRETRAIN_FRACTION.value,
                 'target_mac_reduction': _TARGET.value, 'rows': rows, 'bars': verdicts,
                 'loadavg': os.getloadavg()}, f, indent=2)
    print(f'Saved {_SAVE_JSON.value}')


if __name__ == '__main__':
  app.run(main)
