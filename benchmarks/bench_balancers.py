"""Simulated MapReduce makespan of the block balancers on heterogeneous workers.

Each profile gives per-worker slowdown factors (worker k trains a block in `slowdown_k` time
units). Round 0 is an equal split (nothing measured yet); every later round, each balancer
assigns the blocks from the speeds measured in the round before, with multiplicative log-normal
measurement noise (--noise), DLBPCE starting from its own previous assignment. The figure is
the mean makespan over rounds 1..R, printed side by side with its ratio to the proportional
rule (blocks ~ speed) and to the equal split, plus the cost of one balancer call.

  python benchmarks/bench_balancers.py [--num_blocks=64 --rounds=5 --noise=0.05]

This is a model of the round time, not a measurement: the real 4-process benchmark needs the
MapReduce loop. Issue #6 bars: lbrla and dlbpce within 10% of proportional and >= 1.8x better
than equal on slowdowns [1, 1, 2, 4].
"""

import os
import time

from absl import app
from absl import flags
import numpy as np

from pdcnno_jax.parallel import balancers

_NUM_BLOCKS = flags.DEFINE_integer('num_blocks', 64, 'Blocks per round (config default 64).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Balanced rounds after the equal first round.')
_NOISE = flags.DEFINE_float('noise', 0.05, 'Log-normal sigma of the speed measurements.')
_SEEDS = flags.DEFINE_integer('seeds', 20, 'Noise seeds averaged per profile.')

PROFILES = {
    '1,1,2,4': [1, 1, 2, 4],
    '1,2': [1, 2],
    '1,1,1,8': [1, 1, 1, 8],
    '1,1.5,2,2.5,3,4': [1, 1.5, 2, 2.5, 3, 4],
    '1x7,3': [1] * 7 + [3],
    '1,1,1,1': [1, 1, 1, 1],
}
# name -> (balancer, options); DLBPCE at the config default H_b and stricter ones.
CONTENDERS = {
    'equal': ('equal', {}),
    'proportional': ('proportional', {}),
    'lbrla': ('lbrla', {}),
    'dlbpce(Hb=.99)': ('dlbpce', {'entropy_target': 0.99}),
    'dlbpce(Hb=.999)': ('dlbpce', {'entropy_target': 0.999}),
    'dlbpce(Hb=.9999)': ('dlbpce', {'entropy_target': 0.9999}),
}


def simulate(slowdowns, name, options, num_blocks, rounds, noise, seed):
  """Mean makespan over the balanced rounds (time unit: one block on an unslowed worker)."""
  rng = np.random.default_rng(seed)
  speed = 1.0 / np.asarray(slowdowns, dtype=np.float64)
  assign = balancers.get_balancer(name)
  blocks = balancers.equal(num_blocks, balancers.WorkerStats(speed))  # Round 0: no figures.
  spans = []
  for _ in range(rounds):
    measured = speed * np.exp(rng.normal(0.0, noise, speed.shape))
    blocks = assign(num_blocks, balancers.WorkerStats(measured), blocks, **options)
    spans.append(balancers.makespan(blocks, speed))
  return float(np.mean(spans))


def call_cost_us(name, options, num_workers, num_blocks, repeats=20):
  rng = np.random.default_rng(0)
  stats = balancers.WorkerStats(rng.uniform(0.25, 1.0, num_workers))
  assign = balancers.get_balancer(name)
  start = time.perf_counter()
  for _ in range(repeats):
    assign(num_blocks, stats, None, **options)
  return 1e6 * (time.perf_counter() - start) / repeats


def main(argv):
  del argv
  print(f'loadavg before: {os.getloadavg()}')
  num_blocks, rounds, noise = _NUM_BLOCKS.value, _ROUNDS.value, _NOISE.value
  print(f'num_blocks={num_blocks} rounds={rounds} noise={noise} seeds={_SEEDS.value}')
  print('mean makespan per round (unit: one block on an unslowed worker), '
        'ratio to proportional, speed-up over equal')
  for profile, slowdowns in PROFILES.items():
    ideal = num_blocks / np.sum(1.0 / np.asarray(slowdowns, dtype=np.float64))
    print(f'\nslowdowns [{profile}]  ideal (fluid) makespan {ideal:.2f}')
    spans = {}
    for label, (name, options) in CONTENDERS.items():
      spans[label] = np.mean([
          simulate(slowdowns, name, options, num_blocks, rounds, noise, seed)
          for seed in range(_SEEDS.value)])
    for label, span in spans.items():
      print(f'  {label:18s} makespan {span:8.2f}   vs proportional {span / spans["proportional"]:5.3f}'
            f'   equal / this {spans["equal"] / span:5.2f}x')
  print('\ncost of one call (microseconds, from scratch; DLBPCE from the equal split)')
  for num_workers, blocks in ((4, 64), (16, 1024), (64, 4096)):
    costs = '  '.join(f'{label} {call_cost_us(name, options, num_workers, blocks):9.0f}'
                      for label, (name, options) in CONTENDERS.items())
    print(f'  K={num_workers:3d} blocks={blocks:5d}: {costs}')
  print(f'\nloadavg after: {os.getloadavg()}')


if __name__ == '__main__':
  app.run(main)
