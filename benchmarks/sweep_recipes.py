"""Training recipes swept over seeds: test accuracy, collapse and dead maps per run.

Each table is a list of recipes (a config file plus ``key=value`` overrides) run for a list of
seeds, one training run at a time, through ``experiment.train_and_evaluate``. Per run it prints
the test accuracy and loss, whether the run collapsed (test loss within 2% of ln(C) at chance
accuracy) and the dead-map fraction of every conv layer of the final model on the first
``diagnostics.dead_map_examples`` test examples (``diagnostics.dead_maps``); per recipe, the
median, worst, best and standard deviation of the test accuracy over the seeds.

  python benchmarks/sweep_recipes.py --table=default            # default.py, seeds 0-4, 10 epochs
  python benchmarks/sweep_recipes.py --table=default_screen     # seeds 5-9, 2 epochs
  python benchmarks/sweep_recipes.py --table=caffe_dense        # prune_lenet5_caffe, dense
  python benchmarks/sweep_recipes.py --table=caffe_pretrain     # its pruning pre-training only
  python benchmarks/sweep_recipes.py --config=default --recipe='lr=optimizer.learning_rate=0.02'
      --seeds=0,1 --epochs=2                                     # an ad-hoc sweep

``mnist_lenet5.py`` with ``data.name=fashion_mnist`` is exactly ``default.py`` (the script
checks it), so the ``default`` tables stand for both.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import jax

from pdcnno_jax import config_lib
from pdcnno_jax import experiment
from pdcnno_jax.diagnostics import dead_maps as dead_maps_lib

import run_flags  # benchmarks/run_flags.py (this directory)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Pre-training alone: score nothing away (l1 scores > 0 = threshold 0 x mean), train 0 epochs
# after it, so the final model is the pre-trained dense model the pruners would score.
PRETRAIN_ONLY = ('prune.method=l1', 'prune.selection=threshold', 'prune.threshold=0.0',
                 'prune.compact=False', 'num_epochs=0')

TABLES: dict[str, dict[str, Any]] = {
    'default': dict(config='default', seeds=range(5), epochs=10, recipes={
        'default.py': ()}),
    'default_screen': dict(config='default', seeds=range(5, 10), epochs=2, recipes={
        'default.py': ()}),
    'caffe_dense': dict(config='prune_lenet5_caffe', seeds=range(5), epochs=10, recipes={
        'dense': ('prune.method=none',)}),
    'caffe_pretrain': dict(config='prune_lenet5_caffe', seeds=range(3), epochs=0, recipes={
        'pre-training': PRETRAIN_ONLY}),
}

_TABLE = flags.DEFINE_string('table', None, f'One of {sorted(TABLES)}.')
_CONFIG = flags.DEFINE_string('config', 'default', 'configs/<name>.py for --recipe sweeps.')
_RECIPES = flags.DEFINE_multi_string(
    'recipe', [], "label=key=value,key=value (repeatable): one recipe of an ad-hoc sweep.")
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds of an ad-hoc sweep (or override a table).')
_EPOCHS = flags.DEFINE_integer('epochs', None, 'Epochs (default: the table\'s).')
_DATA_DIR = run_flags.DATA_DIR
_WORKDIR_ROOT = run_flags.WORKDIR_ROOT
_SAVE_JSON = run_flags.SAVE_JSON


def _parse_value(text: str) -> Any:
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {'True': True, 'False': False}.get(text, text)


def make_config(config_name: str, overrides: tuple[str, ...], seed: int, epochs: int):
  """``configs/<config_name>.py`` with the overrides, seed and epoch count."""
  config = config_lib.load_config(os.path.join(REPO, 'configs', f'{config_name}.py'))
  config.seed = seed
  config.data.data_dir = _DATA_DIR.value
  config.num_epochs = epochs
  config.eval_every_epochs = max(1, epochs)
  config.checkpoint_every_steps = 10**9
  config.log_every_steps = 200
  for item in overrides:
    key, value = item.split('=', 1)
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = _parse_value(value)
  return config


def final_dead_maps(config, workdir: str, report: dict[str, Any]) -> dict[str, Any]:
  """Dead maps of the run's final model (the report's, when the trainer wrote them)."""
  if 'dead_maps' in report.get('diagnostics', {}):
    return report['diagnostics']['dead_maps']
  prune = report.get('prune', {})
  overrides = prune['architecture']['constructor_kwargs'] if prune.get('compacted') else None
  return dead_maps_lib.count_dead_maps_in_checkpoint(config, workdir, model_overrides=overrides)


def run_one(config, workdir: str) -> dict[str, Any]:
  """Trains one run and returns its table row."""
  start = time.perf_counter()
  report = experiment.train_and_evaluate(config, workdir)
  dead = final_dead_maps(config, workdir, report)
  test = report['test']
  num_classes = 10
  collapsed = (abs(test['loss'] - math.log(num_classes)) <= 0.02 * math.log(num_classes)
               and test['accuracy'] <= 1.5 / num_classes)
  return {'seed': config.seed, 'test_accuracy': test['accuracy'], 'test_loss': test['loss'],
          'collapsed': collapsed, 'wall_s': time.perf_counter() - start,
          'dead_fraction': {k: v['dead_fraction'] for k, v in dead['layers'].items()},
          'near_dead_fraction': {k: v['near_dead_fraction'] for k, v in dead['layers'].items()},
          'pruned_before_accuracy': report.get('prune', {}).get('test_before_pruning', {}).get(
              'accuracy')}


def summarize(label: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
  accs = [r['test_accuracy'] for r in rows]
  worst_dead = max(max(r['dead_fraction'].values()) for r in rows)
  return {'recipe': label, 'seeds': [r['seed'] for r in rows],
          'median': statistics.median(accs), 'worst': min(accs), 'best': max(accs),
          'std': statistics.pstdev(accs), 'spread_pp': 100 * (max(accs) - min(accs)),
          'collapsed': sum(r['collapsed'] for r in rows), 'max_dead_fraction': worst_dead}


def print_rows(label: str, rows: list[dict[str, Any]]) -> None:
  for r in rows:
    dead = ' '.join(f'{k} {100 * v:.1f}%' for k, v in r['dead_fraction'].items())
    print(f'  {label:<22} seed {r["seed"]}: test acc {r["test_accuracy"]:.4f} loss '
          f'{r["test_loss"]:.4f} collapsed {str(r["collapsed"]):<5} dead {dead} '
          f'({r["wall_s"]:.0f} s)')


def main(argv):
  del argv
  if _TABLE.value:
    table = dict(TABLES[_TABLE.value])
  else:
    recipes = {}
    for text in _RECIPES.value:
      label, _, items = text.partition('=')
      recipes[label] = tuple(i for i in items.split(',') if i)
    table = dict(config=_CONFIG.value, seeds=None, epochs=10, recipes=recipes or {'': ()})
  seeds = [int(s) for s in _SEEDS.value] if (flags.FLAGS['seeds'].present
                                               or table['seeds'] is None) else table['seeds']
  epochs = table['epochs'] if _EPOCHS.value is None else _EPOCHS.value
  default = make_config('default', (), 0, 1)
  mnist = make_config('mnist_lenet5', ('data.name=fashion_mnist',), 0, 1)
  assert default.to_dict() == mnist.to_dict(), 'mnist_lenet5 is no longer default.py + mnist'
  root = _WORKDIR_ROOT.value or tempfile.mkdtemp(prefix='sweep_recipes_')
  print(f'JAX {jax.__version__}, backend {jax.default_backend()}, cpus {os.cpu_count()}, '
        f'loadavg {os.getloadavg()}; {table["config"]}.py, {epochs} epochs, seeds {seeds}; '
        f'workdirs under {root}', flush=True)
  results = {}
  for label, overrides in table['recipes'].items():
    rows = []
    for seed in seeds:
      name = f'{label}_s{seed}'.replace(' ', '_').replace('/', '_')
      config = make_config(table['config'], overrides, seed, epochs)
      rows.append(run_one(config, os.path.join(root, name)))
      print_rows(label, rows[-1:])
      print(f'    loadavg {os.getloadavg()}', flush=True)
    results[label] = {'overrides': overrides, 'rows': rows, 'summary': summarize(label, rows)}
  print(f'\n{table["config"]}.py, {epochs} epochs, seeds {seeds}:')
  print(f'{"recipe":<22} {"median":>7} {"worst":>7} {"best":>7} {"std pp":>6} '
        f'{"spread pp":>9} {"collapsed":>9} {"max dead":>8}')
  for label, result in results.items():
    s = result['summary']
    print(f'{label:<22} {s["median"]:>7.4f} {s["worst"]:>7.4f} {s["best"]:>7.4f} '
          f'{100 * s["std"]:>6.2f} {s["spread_pp"]:>9.2f} {s["collapsed"]:>9d} '
          f'{100 * s["max_dead_fraction"]:>7.1f}%')
  print(f'loadavg {os.getloadavg()}')
  if _SAVE_JSON.value:
    with open(_SAVE_JSON.value, 'w', encoding='utf-8') as f:
      json.dump({'table': _TABLE.value, 'epochs': epochs, 'seeds': list(seeds),
                 'results': results}, f, indent=2, default=str)
    print(f'Saved {_SAVE_JSON.value}')


if __name__ == '__main__':
  app.run(main)
