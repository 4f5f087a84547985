"""Epochs, wall time and gradient evaluations to 88% test accuracy: CGMSE vs SGD and Adam.

Issue #4, second bar: LeNet-5 on Fashion-MNIST trained by the trainer
(``train_and_evaluate``, ``configs/default.py``) with, in one run of this script and with the
same model, data, seed and batch size:

* ``sgd_momentum``: the default optimizer (Nesterov momentum 0.9, learning rate 0.05, cosine);
* ``adam``: optax.adam, learning rate 1e-3, cosine;
* ``cgmse_minibatch``: CGMSE with the line search and curvature pair on the current batch;
* ``cgmse_full_batch``: CGMSE over the whole training split, ``--full_batch_iterations`` CG
  iterations per "epoch" (PDCNNO's Map phase on one shard).

The test accuracy is evaluated after every epoch (the trainer's ``test/accuracy`` records in
``<workdir>/metrics.jsonl``); the script reports the first epoch at which it reached
``--target`` and the wall time from the start of ``train_and_evaluate`` to that evaluation
(data loading, compilation and the evaluations included). Gradient evaluations are counted,
not estimated: one value-and-gradient per optimizer step by the training step, plus CGMSE's
own (``opt_state.num_evals``: line-search trials and, in mini-batch mode, the re-evaluation
at the previous parameters), read from the checkpoint the trainer writes at every epoch end.
"Epoch-equivalents" converts them to passes over the training set (evaluations x examples per
evaluation / training examples), the fair unit between mini-batch and full-batch modes.

Note the learning-rate schedules of SGD and Adam decay over ``--epochs``, so their accuracy
after k epochs depends on the run length.

  python benchmarks/bench_cgmse_lenet.py [--epochs=10 --full_batch_iterations=50
      --save_json=/tmp/cgmse.json]
  python benchmarks/bench_cgmse_lenet.py --quick   # ~25 min on 2 busy cores; 88% may not be hit
  python benchmarks/bench_cgmse_lenet.py --collect_only --workdir_root=DIR \
      --optimizers=sgd_momentum,adam   # tabulate finished runs (e.g. after an interrupted one)

Cost on 2 idle CPU cores: one mini-batch epoch takes ~15-25 s with SGD or Adam and ~30 s with
CGMSE (about 3 value-and-gradient evaluations per step). A full-batch CG iteration evaluates
loss and gradient over all 60k images two or more times (line search), ~45-90 s; the loss is
evaluated in chunks of ``optimizer.full_batch_chunk_size`` examples with rematerialisation,
so the step holds one chunk's activations (~0.2 GB at 4096 examples) instead of the whole
split's. (With ``--config.model.conv_gradients=lax`` CGMSE is 3.5-7x slower: XLA:CPU runs
JAX's convolution gradients slowly inside the line search's while loop.)
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
import numpy as np

from pdcnno_jax import config_lib
from pdcnno_jax.train import checkpointing
from pdcnno_jax import experiment

import run_flags  # benchmarks/run_flags.py (this directory)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_EXAMPLES = 60000  # Fashion-MNIST training split (validation_holdout = 0).
OPTIMIZERS = ('sgd_momentum', 'adam', 'cgmse_minibatch', 'cgmse_full_batch')

_EPOCHS = flags.DEFINE_integer('epochs', 10, 'Epochs per mini-batch optimizer.')
_FULL_BATCH_EPOCHS = flags.DEFINE_integer(
    'full_batch_epochs', None, 'Blocks of full-batch CG iterations (default: --epochs).')
_FULL_BATCH_ITERATIONS = flags.DEFINE_integer('full_batch_iterations', 50,
                                              'Full-batch CG iterations per "epoch".')
_OPTIMIZERS = flags.DEFINE_list('optimizers', list(OPTIMIZERS), f'Subset of {OPTIMIZERS}.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Mini-batch size (every mini-batch method).')
_TARGET = flags.DEFINE_float('target', 0.88, 'Test accuracy to reach.')
_DATA_DIR = run_flags.DATA_DIR
_SEED = run_flags.SEED
_WORKDIR_ROOT = run_flags.WORKDIR_ROOT
_SAVE_JSON = run_flags.SAVE_JSON
_QUICK = flags.DEFINE_bool('quick', False,
                           'Short run: 2 epochs each; full batch 1 block of 1 iteration.')
_COLLECT_ONLY = flags.DEFINE_bool(
    'collect_only', False, 'Train nothing: tabulate the finished runs under --workdir_root.')


def make_config(name: str, epochs: int, full_batch_iterations: int):
  """``configs/default.py`` (LeNet-5, Fashion-MNIST) with optimizer ``name``."""
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'default.py'))
  config.seed = _SEED.value
  config.data.data_dir = _DATA_DIR.value
  config.data.batch_size = _BATCH.value
  config.num_epochs = epochs
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 10**9  # Epoch-end checkpoints only ...
  config.keep_checkpoints = epochs + 2  # ... all kept, for the evaluation counters.
  config.log_every_steps = 100
  if name == 'adam':
    config.optimizer.name = 'adam'
    config.optimizer.learning_rate = 1e-3
  elif name.startswith('cgmse'):
    config.optimizer.name = 'cgmse'
    config.optimizer.mode = 'full_batch' if name == 'cgmse_full_batch' else 'minibatch'
    config.optimizer.full_batch_iterations = full_batch_iterations
  elif name != 'sgd_momentum':
    raise ValueError(f'Unknown optimizer {name!r}; choose from {OPTIMIZERS}.')
  return config


def test_accuracy_records(workdir: str) -> list[dict[str, Any]]:
  """The per-epoch ``test/accuracy`` records of ``metrics.jsonl``, in order."""
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if 'test/accuracy' in r]


def internal_evaluations(workdir: str) -> dict[int, int]:
  """Checkpoint step -> CGMSE's ``opt_state.num_evals`` (empty for other optimizers)."""
  directory = os.path.join(workdir, 'checkpoints')
  counts = {}
  for entry in os.listdir(directory):
    if not entry.isdigit():
      continue
    tree = checkpointing.load_arrays(os.path.join(directory, entry, 'state'))
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if jax.tree_util.keystr(path).endswith("['num_evals']"):
        counts[int(entry)] = int(np.asarray(value))
  return counts


def run_one(name: str, root: str, epochs: int, full_batch_iterations: int) -> dict[str, Any]:
  """Trains with optimizer ``name`` (or, with ``--collect_only``, reads its finished run)."""
  workdir = os.path.join(root, name)
  config = make_config(name, epochs, full_batch_iterations)
  start_file = os.path.join(workdir, 'bench_start_time.txt')
  if not _COLLECT_ONLY.value:
    if os.path.exists(os.path.join(workdir, 'checkpoints')):
      raise ValueError(f'{workdir} already holds a run; pass a fresh --workdir_root.')
    os.makedirs(workdir, exist_ok=True)
    with open(start_file, 'w', encoding='utf-8') as f:
      f.write(repr(time.time()))
    experiment.train_and_evaluate(config, workdir)
  report_path = os.path.join(workdir, 'report.json')
  if not os.path.exists(report_path):
    raise FileNotFoundError(f'{report_path} does not exist: the {name} run did not finish.')
  with open(report_path, encoding='utf-8') as f:
    report = json.load(f)
  if os.path.exists(start_file):
    with open(start_file, encoding='utf-8') as f:
      start = float(f.read())
  else:  # A run started by an older version of this script.
    start = os.path.getmtime(report_path) - report['wall_time_s']['total']
  examples_per_eval = config.data.batch_size
  if name == 'cgmse_full_batch':  # The whole split, cut to a multiple of the device count.
    examples_per_eval = TRAIN_EXAMPLES - TRAIN_EXAMPLES % report['devices']['count']
  internal = internal_evaluations(workdir)
  curve = []
  for epoch, record in enumerate(test_accuracy_records(workdir), start=1):
    step = record['step']
    evals = step + internal.get(step, 0)
    curve.append({'epoch': epoch, 'step': step, 'test_accuracy': record['test/accuracy'],
                  'wall_s': record['time'] - start, 'gradient_evaluations': evals,
                  'internal_evaluations_counted': step in internal or not name.startswith('cgmse'),
                  'epoch_equivalents': evals * examples_per_eval / TRAIN_EXAMPLES})
  hit = next((c for c in curve if c['test_accuracy'] >= _TARGET.value), None)
  return {'optimizer': name, 'epochs': epochs, 'curve': curve, 'reached': hit,
          'final_test_accuracy': report['test']['accuracy'],
          'wall_time_s': report['wall_time_s']['total'], 'steps': report['steps']}


def print_rows(rows: list[dict[str, Any]]) -> None:
  target = _TARGET.value
  print('\nPer-epoch test accuracy (grad evals = value-and-gradient calls; ep.eq. = passes '
        'over the 60k training examples):')
  for row in rows:
    print(f'  {row["optimizer"]}')
    for c in row['curve']:
      star = '' if c['internal_evaluations_counted'] else '*'
      print(f'    epoch {c["epoch"]:3d}: accuracy {c["test_accuracy"]:.4f}  wall '
            f'{c["wall_s"]:7.0f} s  grad evals {c["gradient_evaluations"]:7d}{star}  ep.eq. '
            f'{c["epoch_equivalents"]:6.1f}')
  print(f'\n{"optimizer":<17} {"epochs to " + format(target, ".0%"):>12} {"wall s":>8} '
        f'{"grad evals":>10} {"ep.eq.":>7} {"final acc":>9} {"total s":>8}')
  for row in rows:
    hit = row['reached']
    if hit is None:
      print(f'{row["optimizer"]:<17} {"not reached in " + str(row["epochs"]):>12} {"-":>8} '
            f'{"-":>10} {"-":>7} {row["final_test_accuracy"]:>9.4f} {row["wall_time_s"]:>8.0f}')
    else:
      star = '' if hit['internal_evaluations_counted'] else '*'
      print(f'{row["optimizer"]:<17} {hit["epoch"]:>12d} {hit["wall_s"]:>8.0f} '
            f'{hit["gradient_evaluations"]:>9d}{star or " "} {hit["epoch_equivalents"]:>7.1f} '
            f'{row["final_test_accuracy"]:>9.4f} {row["wall_time_s"]:>8.0f}')
  print('(* CGMSE internal evaluations missing for that epoch: caller evaluations only)')


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Whether each CGMSE mode reached the target sooner than SGD (epochs and wall time)."""
  by_name = {r['optimizer']: r for r in rows}
  sgd = by_name.get('sgd_momentum')
  verdicts = {}
  for name in ('cgmse_minibatch', 'cgmse_full_batch'):
    row = by_name.get(name)
    if row is None or sgd is None:
      continue
    mine, theirs = row['reached'], sgd['reached']
    if mine is None and theirs is None:
      text = 'neither reached the target'
      verdict = {'epochs': None, 'wall_time': None}
    elif mine is None:
      text = 'SGD reached it, CGMSE did not: CGMSE slower'
      verdict = {'epochs': False, 'wall_time': False}
    elif theirs is None:
      text = 'CGMSE reached it, SGD did not: CGMSE faster'
      verdict = {'epochs': True, 'wall_time': True}
    else:
      verdict = {'epochs': mine['epoch'] < theirs['epoch'],
                 'wall_time': mine['wall_s'] < theirs['wall_s']}
      text = (f'epochs {mine["epoch"]} vs {theirs["epoch"]} '
              f'({"faster" if verdict["epochs"] else "not faster"}), wall '
              f'{mine["wall_s"]:.0f} s vs {theirs["wall_s"]:.0f} s '
              f'({"faster" if verdict["wall_time"] else "not faster"})')
    verdicts[name] = verdict
    print(f'  {name} vs sgd_momentum: {text}')
  return verdicts


def main(argv):
  del argv
  quick = _QUICK.value
  epochs = 2 if quick else _EPOCHS.value
  fb_epochs = 1 if quick else (_FULL_BATCH_EPOCHS.value or epochs)
  fb_iterations = 1 if quick else _FULL_BATCH_ITERATIONS.value
  if _COLLECT_ONLY.value and not _WORKDIR_ROOT.value:
    raise ValueError('--collect_only reads the runs under --workdir_root; pass it.')
  root = _WORKDIR_ROOT.value or tempfile.mkdtemp(prefix='bench_cgmse_')
  print(f'JAX {jax.__version__}, backend {jax.default_backend()}, cpus {os.cpu_count()}, '
        f'loadavg {os.getloadavg()}')
  print(f'lenet5 on fashion_mnist, batch {_BATCH.value}, {epochs} epochs; full batch '
        f'{fb_epochs} x {fb_iterations} CG iterations; target {_TARGET.value:.0%}; workdirs '
        f'under {root}')
  rows = []
  for name in _OPTIMIZERS.value:
    full = name == 'cgmse_full_batch'
    row = run_one(name, root, fb_epochs if full else epochs, fb_iterations)
    rows.append(row)
    print(f'[bench] {name}: final test accuracy {row["final_test_accuracy"]:.4f}, '
          f'{row["wall_time_s"]:.0f} s; loadavg {os.getloadavg()}', flush=True)
  print_rows(rows)
  print(f'\nIssue #4 bar (paper: CGMSE converges faster than SGD), target {_TARGET.value:.0%}:')
  verdicts = compare(rows)
  print(f'loadavg {os.getloadavg()}')
  if _SAVE_JSON.value:
    with open(_SAVE_JSON.value, 'w', encoding='utf-8') as f:
      json.dump({'target': _TARGET.value, 'batch_size': _BATCH.value, 'rows': rows,
                 'faster_than_sgd': verdicts, 'loadavg': os.getloadavg()}, f, indent=2)
    print(f'Saved {_SAVE_JSON.value}')


if __name__ == '__main__':
  app.run(main)
