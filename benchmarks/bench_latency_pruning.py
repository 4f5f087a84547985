"""MAC-targeted vs latency-targeted channel selection at equal measured speed-up.

Fewer MACs is not the same as faster on XLA:CPU (``bench_conv_widths.py``); the ``latency``
selection (pdcnno_jax/pruning/latency.py: a NetAdapt-style greedy search on candidate networks
measured end to end) targets the measured speed-up instead. One run of this script prints,
side by side:

1. LeNet-5 Caffe on Fashion-MNIST, through the trainer (``configs/prune_lenet5_caffe.py``),
   for each of ``--seeds``: the dense model trained for ``--epochs`` + the pre-training's
   share of an epoch (rounded up); FMP with ``selection=latency``, ``target_speedup``
   ``--lenet_speedup`` (inference, batch ``--batch_size``); FMP with ``selection=global_macs``
   for each of ``--mac_targets``. Each pruned model is fine-tuned for ``--epochs``. Columns:
   test accuracy, MAC reduction, measured inference speed-up of the compacted model over the
   dense one (same run, same batch), and the speed-up the search measured for it (its
   prediction). The comparison row takes, per seed,
   the MAC run with the smallest MAC target whose measured speed-up reaches the latency run's.
   Bars: latency run measured >= 2.5x, accuracy within 1 pp of the dense model, predicted
   within 15% of measured.
2. VGG (``--vgg`` at ``--vgg_width``) on 32x32x3 with random weights and batches (timing only:
   no 32x32 data set is imported here, so no accuracy), ``selection=latency``,
   ``latency_target=train_step``, ``target_speedup`` ``--vgg_speedup``, and ``global_macs`` for
   each of ``--mac_targets``: MACs and measured training-step speed-up. Bars: measured >= 1.9x,
   predicted within 15% of measured.

Measured (quiet machine, load 0.4-3.0, 3 seeds, ``--epochs=10 --mac_targets=4,6,8``, and
``--lenet_runs=latency --lenet_speedup=1.25``): LeNet-5 dense 91.85% on average; latency target
1.25 cuts conv2 50 -> 44 maps (1.12x fewer MACs), measures 1.25-1.30x and keeps the accuracy
(+0.04 pp); MAC targets 4 / 6 / 8x measure 0.99-1.19x / 1.17-1.25x / 1.05-1.29x and lose
0.55 / 0.75 / 1.14 pp (they cut conv1 below 20 maps, a slow XLA:CPU shape); latency target 2.5
stops at conv2 = 2 maps ("no faster width"), 1.87-1.92x, -2.51 pp: on XLA:CPU conv1 alone
costs more than a 2.5x network may (``bench_lenet_latency_breakdown.py``).

Network measurements are cached under ``--cache_dir`` (a second run only checks its choice).

Measured (quiet machine, load 2.5-3.3; ``--parts=vgg --step=0.25 --measurements=96
--mac_targets=4``): VGG-11 x0.5, batch 64, training step: the latency rule keeps every layer but
features.6 (256 -> 155 maps), 1.05x fewer MACs, search's confirmed estimate 2.21x, measured 2.29x
(22 networks and 2 confirmations measured, 319 s); the 4x MAC rule measures 4.72x. The dense network's features.6
(256 maps at 2x2) is a slow XLA:CPU shape: cut to 224 / 192 / 155 / 128 maps alone it gives
1.52 / 1.70 / 2.10 / 2.09x, the same cut of features.5 or features.7 1.34 / 1.38x.

  python benchmarks/bench_latency_pruning.py [--seeds=0,1,2 --epochs=10]
  python benchmarks/bench_latency_pruning.py --quick   # 1 seed, 1 epoch, small VGG: a smoke
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pdcnno_jax import config_lib
from pdcnno_jax.pruning import stage
from pdcnno_jax.testing import random_model
from pdcnno_jax.train import state as state_lib
from pdcnno_jax import experiment

import run_flags  # benchmarks/run_flags.py (this directory)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Experiment seeds (LeNet part).')
_EPOCHS = flags.DEFINE_float(
    'epochs', 10, 'Fine-tuning epochs (dense: + pre-training). A tiny value (0.001: no step) '
    'with a fixed --workdir_root runs the pre-training and selection only; a second invocation '
    'with the full value resumes that workdir (the selection is timed alone, the training not).')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Training (and timing) batch size.')
_LENET_SPEEDUP = flags.DEFINE_float('lenet_speedup', 2.5, 'LeNet target inference speed-up.')
_VGG = flags.DEFINE_string('vgg', 'vgg11', 'VGG configuration.')
_VGG_WIDTH = flags.DEFINE_float('vgg_width', 0.5, 'VGG width multiplier.')
_VGG_BATCH = flags.DEFINE_integer('vgg_batch_size', 64, 'VGG training-step batch size.')
_VGG_SPEEDUP = flags.DEFINE_float('vgg_speedup', 2.0, 'VGG target training-step speed-up.')
_MAC_TARGETS = flags.DEFINE_list('mac_targets', ['4', '6', '8'],
                                 'MAC reductions of the MAC-targeted runs.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'prune.latency_repeats.')
_MEASUREMENTS = flags.DEFINE_integer('measurements', 64, 'prune.latency_measurements.')
_STEP = flags.DEFINE_float('step', 0.125, 'prune.latency_step.')
_CACHE_DIR = flags.DEFINE_string('cache_dir', '', "prune.latency_cache_dir ('' = default).")
_PARTS = flags.DEFINE_list('parts', ['lenet', 'vgg'], 'Which parts to run.')
_LENET_RUNS = flags.DEFINE_list(
    'lenet_runs', [], "LeNet runs to do (empty: all): dense, latency, macs_<t>x. With a fixed "
    '--workdir_root a run resumes its workdir, so runs can be split over several invocations.')
_QUICK = flags.DEFINE_bool('quick', False, 'Smoke: seed 0, 1 epoch, MAC target 4, small VGG.')

MIN_LENET_SPEEDUP, MIN_VGG_SPEEDUP = 2.5, 1.9
MAX_ACCURACY_LOSS_PP, MAX_PREDICTION_ERROR = 1.0, 0.15


def _prune_settings(prune: ml_collections.ConfigDict, selection: str, target: float,
                    latency_target: str) -> None:
  prune.selection = selection
  prune.latency_target = latency_target
  prune.latency_repeats = 3 if _QUICK.value else _REPEATS.value
  prune.latency_cache_dir = _CACHE_DIR.value
  prune.latency_measurements = _MEASUREMENTS.value
  prune.latency_step = _STEP.value
  if selection == 'latency':
    prune.target_speedup = target
  else:
    prune.target_mac_reduction = target


def lenet_config(seed: int, selection: str | None, target: float, epochs: float):
  """``configs/prune_lenet5_caffe.py`` for one run (``selection`` None: the dense model)."""
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'prune_lenet5_caffe.py'))
  config.seed = seed
  config.data.data_dir = run_flags.DATA_DIR.value
  config.data.batch_size = _BATCH.value
  with config.ignore_type():  # A fractional number of epochs on default.py's int.
    config.num_epochs = epochs
  config.eval_every_epochs = max(1, math.ceil(epochs))
  config.checkpoint_every_steps = 10**9
  config.log_every_steps = 200
  if _QUICK.value:
    config.prune.pretrain_epochs = 1
  if selection is None:
    config.prune.method = 'none'
  else:
    _prune_settings(config.prune, selection, target, 'inference')
  return config


def lenet_row(name: str, seed: int, report: dict[str, Any]) -> dict[str, Any]:
  """One table row from a trainer report."""
  row = {'run': name, 'seed': seed, 'test_accuracy': report['test']['accuracy'],
         'macs': report['model']['macs']}
  prune = report.get('prune')
  if prune is not None:
    latency = prune.get('latency', {})
    row.update(mac_reduction=prune['mac_reduction'], channels=prune['channels_after'],
               measured_speedup=latency.get('measured_speedup',
                                            latency.get('inference_speedup')),
               predicted_speedup=latency.get('predicted_speedup'),
               table_entries=latency.get('table_entries'),
               table_measured=latency.get('table_measured'),
               table_seconds=latency.get('table_seconds'))
  return row


def run_lenet(root: str) -> list[dict[str, Any]]:
  seeds = [0] if _QUICK.value else [int(s) for s in _SEEDS.value]
  epochs = 1 if _QUICK.value else _EPOCHS.value
  macs = [4.0] if _QUICK.value else [float(t) for t in _MAC_TARGETS.value]
  base = lenet_config(0, None, 0, 1).prune
  dense_epochs = epochs + math.ceil(base.pretrain_epochs * base.pretrain_fraction)
  runs = [('dense', None, 0.0, dense_epochs), ('latency', 'latency', _LENET_SPEEDUP.value, epochs)]
  runs += [(f'macs_{t:g}x', 'global_macs', t, epochs) for t in macs]
  if _LENET_RUNS.value:
    runs = [run for run in runs if run[0] in _LENET_RUNS.value]
  rows = []
  for seed in seeds:
    for name, selection, target, run_epochs in runs:
      report = experiment.train_and_evaluate(lenet_config(seed, selection, target, run_epochs),
                                          os.path.join(root, f'{name}_seed{seed}'))
      rows.append(lenet_row(name, seed, report))
      print(f'[bench] lenet {name} seed {seed}: {rows[-1]}; loadavg {os.getloadavg()}',
            flush=True)
  return rows


def _synthetic_batch(size: int, shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (size,) + shape, dtype=np.uint8),
          'label': rng.integers(0, 10, size).astype(np.int32)}


def run_vgg() -> list[dict[str, Any]]:
  width, batch = (0.25, 32) if _QUICK.value else (_VGG_WIDTH.value, _VGG_BATCH.value)
  model_config = ml_collections.ConfigDict({'name': _VGG.value, 'width_multiplier': width})
  shape = (32, 32, 3)
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))
  graphdef, state = state_lib.create_train_state(random_model(model_config, shape), tx)
  target = stage.PruningTarget(graphdef, state, model_config, 10, shape,
                               lambda x: x.astype(jnp.float32) / 255.0, tx=tx)
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py')).prune
  config.method, config.min_channels = 'l1', 2
  macs = [4.0] if _QUICK.value else [float(t) for t in _MAC_TARGETS.value]
  runs = [('latency', 'latency', _VGG_SPEEDUP.value)]
  runs += [(f'macs_{t:g}x', 'global_macs', t) for t in macs]
  rows = []
  for name, selection, value in runs:
    run_config = ml_collections.ConfigDict(config.to_dict())
    _prune_settings(run_config, selection, value, 'train_step')
    _, _, report = stage.run_pruning(target, run_config,
                                     scoring_batches=[_synthetic_batch(batch, shape)])
    latency = report.get('latency', {})
    rows.append({'run': name, 'mac_reduction': report['mac_reduction'],
                 'macs': report['macs_after'], 'channels': report['channels_after'],
                 'measured_speedup': latency.get('measured_speedup',
                                                 latency.get('train_step_speedup')),
                 'predicted_speedup': latency.get('predicted_speedup'),
                 'table_entries': latency.get('table_entries'),
                 'table_measured': latency.get('table_measured'),
                 'table_seconds': latency.get('table_seconds')})
    print(f'[bench] {_VGG.value} x{width} batch {batch} {name}: {rows[-1]}; loadavg '
          f'{os.getloadavg()}', flush=True)
  return rows


def _fmt(value, spec):
  return '-' if value is None else format(value, spec)


def print_lenet(rows: list[dict[str, Any]]) -> dict[str, bool]:
  print(f'\nLeNet-5 Caffe / Fashion-MNIST: {"run":<10} seed  test acc  MACs x  measured x  '
        'predicted x')
  for r in rows:
    print(f'  {r["run"]:<10} {r["seed"]:4d}  {r["test_accuracy"]:8.4f}  '
          f'{_fmt(r.get("mac_reduction"), "6.2f")}  {_fmt(r.get("measured_speedup"), "10.2f")}  '
          f'{_fmt(r.get("predicted_speedup"), "11.2f")}')
  verdicts = {}
  for seed in sorted({r['seed'] for r in rows}):
    by = {r['run']: r for r in rows if r['seed'] == seed}
    if 'latency' not in by or 'dense' not in by:
      continue
    lat, dense = by['latency'], by['dense']
    matched = [r for r in rows if r['seed'] == seed and r['run'].startswith('macs_')
               and (r['measured_speedup'] or 0) >= lat['measured_speedup']]
    match = min(matched, key=lambda r: r['mac_reduction']) if matched else None
    loss = 100 * (dense['test_accuracy'] - lat['test_accuracy'])
    error = abs(lat['predicted_speedup'] / lat['measured_speedup'] - 1)
    verdicts[f'seed{seed}'] = (lat['measured_speedup'] >= MIN_LENET_SPEEDUP
                               and loss <= MAX_ACCURACY_LOSS_PP
                               and error <= MAX_PREDICTION_ERROR)
    print(f'  seed {seed}: latency {lat["measured_speedup"]:.2f}x measured (bar >= '
          f'{MIN_LENET_SPEEDUP}), {loss:+.2f} pp vs dense (bar <= {MAX_ACCURACY_LOSS_PP}), '
          f'prediction off by {100 * error:.1f}% (bar <= 15%); MAC-targeted at >= the same '
          'measured speed-up: ' + (f'{match["run"]} {match["test_accuracy"]:.4f} acc, '
                                   f'{match["mac_reduction"]:.2f}x MACs' if match else 'none'))
  return verdicts


def print_vgg(rows: list[dict[str, Any]]) -> bool:
  print(f'\n{_VGG.value} on 32x32x3, training step: {"run":<10} MACs x  measured x  predicted x')
  for r in rows:
    print(f'  {r["run"]:<10} {r["mac_reduction"]:6.2f}  {_fmt(r["measured_speedup"], "10.2f")}'
          f'  {_fmt(r["predicted_speedup"], "11.2f")}')
  lat = rows[0]
  error = abs(lat['predicted_speedup'] / lat['measured_speedup'] - 1)
  print(f'  latency: measured {lat["measured_speedup"]:.2f}x (bar >= {MIN_VGG_SPEEDUP}), '
        f'prediction off by {100 * error:.1f}% (bar <= 15%), {lat["table_entries"]} networks '
        f'looked up ({lat["table_measured"]} measured), {lat["table_seconds"]:.0f} s measuring')
  return lat['measured_speedup'] >= MIN_VGG_SPEEDUP and error <= MAX_PREDICTION_ERROR


def main(argv):
  del argv
  root = run_flags.WORKDIR_ROOT.value or tempfile.mkdtemp(prefix='bench_latency_')
  print(f'JAX {jax.__version__}, backend {jax.default_backend()}, cpus {os.cpu_count()}, '
        f'loadavg {os.getloadavg()}; workdirs under {root}', flush=True)
  result = {}
  if 'lenet' in _PARTS.value:
    result['lenet'] = run_lenet(root)
  if 'vgg' in _PARTS.value:
    result['vgg'] = run_vgg()
  if 'lenet' in result:
    result['lenet_bars'] = print_lenet(result['lenet'])
  if 'vgg' in result:
    result['vgg_bar'] = print_vgg(result['vgg'])
  print(f'loadavg {os.getloadavg()}')
  if run_flags.SAVE_JSON.value:
    with open(run_flags.SAVE_JSON.value, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2, default=str)


if __name__ == '__main__':
  app.run(main)
