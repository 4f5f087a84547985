"""SSP transport: the Ray parameter server next to the coordination-service store, in one run.

Measures, side by side on this machine:

  * Ray PS: 2 local worker actors push a VGG-16-sized delta (the vgg16 model at width 1.0 on
    28x28x1, ~15M float32 parameters, ~60 MB) to ``--shards`` parameter-server shards and read
    the parameters back, clock after clock (ASP so no read waits), once with the read in the
    push's reply (`ps_client.PSClient.step`) and once from the shards' shared-memory
    publications (`PSClient.read_shared`, the default where the shards are on the workers'
    node); effective throughput = (bytes_sent + bytes_received) / transfer_seconds
    over both workers, and the transfer seconds per clock of one worker;
  * the old store: one set by process 0 and one get by process 1 of a ``--store_mib`` MiB random
    payload through the key-value store of JAX's coordination service (2 processes joined by
    jax.distributed; the raw client's ``key_value_set_bytes`` and
    ``blocking_key_value_get_bytes``, as the SSP store used them), as MiB moved per second;
  * LeNet-5: SSP on Ray, 2 workers, 1 shard, 128 examples per worker, generated data, s = 3
    pushing and reading through shared memory (``parallel.ssp_shared_memory``, the default),
    s = 3 reading in the push's reply (a call), s = 3 with that read prefetched during the step
    (``parallel.ssp_prefetch``), s = 0 (BSP) through shared memory and s = 0 in calls,
    interleaved ``--lenet_repeats`` times: overhead =
    transfer seconds per clock / compute seconds of a step. Transfer seconds are
    the seconds a worker's clock is blocked in transport and not waiting for the staleness bound
    (`ps_client`'s definition; the bound's waits are reported apart, per clock).

Bars (issue #15): Ray PS >= 500 MiB/s, <= 0.4 s of transfer per clock for VGG-16, LeNet-5
overhead <= 10% of a step. Prints the figures, their ratios and os.getloadavg() (the machine may
be shared: run it on a quiet one).

Usage:
  python benchmarks/bench_ssp_transport.py [--clocks=10] [--store_mib=64] [--shards=1]
      [--lenet_clocks=40] [--lenet_repeats=2] [--only=store,vgg,lenet]
  python benchmarks/bench_ssp_transport.py --quick   # VGG-16 at width 0.25, 4 MiB, few clocks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


def _vgg_leaves(width):
  """Random float32 arrays shaped like vgg16's parameters at ``width`` (28x28x1, 10 classes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pdcnno_jax import testing  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.models import factory  # pylint: disable=g-import-not-at-top
  config = testing.section('model', name='vgg16', width_multiplier=width, batch_norm=False,
                           dropout_rate=0.0)
  abstract = nnx.eval_shape(lambda: factory.build_model(
      config, num_classes=10, input_shape=(28, 28, 1), rngs=nnx.Rngs(0)))
  shapes = [x.shape for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))]
  rng = np.random.default_rng(0)
  return [(1e-3 * rng.standard_normal(s)).astype(np.float32) for s in shapes]


def _ray_ps(ray, leaves, clocks, num_shards, workdir, shared):
  from pdcnno_jax.parallel.ray_engine import ps  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ray_engine import transport  # pylint: disable=g-import-not-at-top
  assignment = ps.split_by_bytes([x.nbytes for x in leaves], num_shards)
  shard_cls = ray.remote(ps.ParameterShard)
  shards = [shard_cls.options(num_cpus=1, max_concurrency=100).remote(
      i, [leaves[j] for j in a], 2, None, workdir, 0, 300.0, publish=shared)
      for i, a in enumerate(assignment)]

  @ray.remote(num_cpus=1)
  class Pusher:

    def run(self, me, delta):
      from pdcnno_jax.parallel.ray_engine import ps_client  # pylint: disable=g-import-not-at-top
      client = ps_client.PSClient(shards, assignment, me, None, 300.0)
      if shared:
        assert client.attach_shared(), 'the shards do not publish on this node'
        pipeline = ps_client.ClockPipeline(client, clocks + 2, prefetch=False, shared=True)
        pipeline.begin(0, delta)
        advance = pipeline.advance
      else:
        advance = lambda clock, d: client.step(clock, d, clock + 1)
      advance(0, delta)  # Warm-up: first touch of the object store's pages.
      first = client.log.as_dict()
      for clock in range(1, clocks + 1):
        advance(clock, delta)
      # Shared memory: clock c's push is collected at clock c + 1, so the window holds the
      # pushes of clocks 0 .. clocks - 1 and the reads of 1 .. clocks, as many as the calls'.
      log = dataclasses.replace(client.log)
      if shared:
        pipeline.drain()
      log.bytes_sent -= first['bytes_sent']
      log.bytes_received -= first['bytes_received']
      log.transfer_seconds -= first['transfer_seconds']
      log.transfers -= 1
      return log

  delta_ref = ray.put(leaves)
  logs = ray.get([Pusher.remote().run.remote(k, delta_ref) for k in range(2)])
  ray.get([shard.remove_shared_view.remote() for shard in shards])
  for shard in shards:
    ray.kill(shard)
  job = transport.job_transport(logs)
  return dict(mib_per_s=job['mib_per_s'], clocks=clocks,
              transfer_s_per_clock=max(w['transfer_seconds'] for w in job['workers']) / clocks,
              mib_per_clock=sum(x.nbytes for x in leaves) * 2 / 2**20)


def _store_worker(args):
  """One process of the old-store measurement (``--process_id``): JAX's raw key-value client."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(f'127.0.0.1:{args.port}', 2, args.process_id,
                             heartbeat_timeout_seconds=60)
  client = distributed.global_state.client
  payload = np.random.default_rng(0).bytes(args.store_mib * 2**20)
  timeout_ms = 300_000
  client.wait_at_barrier('bench_start', timeout_ms, [0, 1])
  start = time.perf_counter()
  if args.process_id == 0:
    client.key_value_set_bytes('bench/payload', payload)
    client.wait_at_barrier('bench_set', timeout_ms, [0, 1])
    seconds = time.perf_counter() - start
  else:
    client.wait_at_barrier('bench_set', timeout_ms, [0, 1])
    start = time.perf_counter()
    got = client.blocking_key_value_get_bytes('bench/payload', timeout_ms)
    seconds = time.perf_counter() - start
    assert len(got) == len(payload)
  print('RESULT ' + json.dumps({'seconds': seconds}), flush=True)
  client.wait_at_barrier('bench_done', timeout_ms, [0, 1])
  jax.distributed.shutdown()


def _old_store(store_mib):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = [subprocess.Popen([sys.executable, __file__, f'--process_id={pid}', f'--port={port}',
                             f'--store_mib={store_mib}'], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True) for pid in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  if any(p.returncode for p in procs):
    raise SystemExit(f'old-store processes failed: {[p.returncode for p in procs]}\n{outputs}')
  set_s, get_s = (json.loads([l for l in o.splitlines() if l.startswith('RESULT ')][-1][7:])
                  ['seconds'] for o in outputs)
  return dict(mib=store_mib, set_s=set_s, get_s=get_s, mib_per_s=2 * store_mib / (set_s + get_s))


def _lenet(clocks, workdir, staleness, prefetch=False, shared=True):
  """SSP on Ray for LeNet-5, 2 workers x 128 examples, 1 shard: transfer per clock vs a step."""
  from pdcnno_jax.parallel.ray_engine import ssp_driver  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.testing import experiments  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.train import sharding  # pylint: disable=g-import-not-at-top
  config = experiments.mapreduce_config(mode='ssp', engine='ray', num_workers=2,
                                        staleness=staleness)
  config.parallel.ssp_prefetch = prefetch
  config.parallel.ssp_shared_memory = shared
  config.data.batch_size = 256
  config.num_epochs = 1
  config.checkpoint_every_steps = 0
  exp, tx, host_state = experiments.make_experiment(config, workdir, num_devices=1,
                                                    num_train=256 * (clocks + 1))
  _, report = ssp_driver.train(exp, sharding.replicate(host_state, exp.mesh), tx=tx)
  steps = sum(r['steps'] for r in report['per_worker'])
  transfer = report['transport']['transfer_seconds'] / steps
  step = sum(r['busy_s'] for r in report['per_worker']) / steps
  wait = sum(sum(w) for w in report['transport']['wait_seconds']) / steps
  clock = sum(r['loop_s'] for r in report['per_worker']) / steps
  paths = sorted({r['read_path'] for r in report['per_worker']})
  return dict(clocks=report['clocks'], transfer_s_per_clock=transfer, step_s=step,
              wait_s_per_clock=wait, clock_s=clock, overhead=transfer / step, paths=paths)


def _print_vgg(runs, old, width, params, shards):
  if runs:
    print(f'\nvgg16 width {width}: {params:,} params ({4 * params / 2**20:.1f} MiB float32)')
  for name, new in runs:
    print(f'  Ray PS, read {name} ({shards} shard(s), 2 workers, {new["clocks"]} clocks): '
          f'{new["mib_per_s"]:.0f} MiB/s, {new["transfer_s_per_clock"]:.3f} s transfer per '
          f'clock ({new["mib_per_clock"]:.0f} MiB pushed + pulled per worker)   bars: '
          '>= 500 MiB/s, <= 0.4 s')
  if old:
    print(f'  old coordination store ({old["mib"]} MiB): set {old["set_s"]:.2f} s + get '
          f'{old["get_s"]:.2f} s = {old["mib_per_s"]:.1f} MiB/s')
  for name, new in runs if old else ():
    print(f'  ratio Ray PS (read {name}) / old store: '
          f'{new["mib_per_s"] / old["mib_per_s"]:.1f}x')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--clocks', type=int, default=10)
  parser.add_argument('--store_mib', type=int, default=64)
  parser.add_argument('--shards', type=int, default=1)
  parser.add_argument('--lenet_clocks', type=int, default=40)
  parser.add_argument('--lenet_repeats', type=int, default=2,
                      help='LeNet-5 rounds of (s=3 shared memory, s=3 call, s=3 prefetched, '
                      's=0 shared memory, s=0 call), in A B C D E A B C D E order')
  parser.add_argument('--only', default='store,vgg,lenet', help='parts to run')
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--port', type=int, default=None)
  args = parser.parse_args()
  if args.process_id is not None:
    _store_worker(args)
    return
  if args.quick:
    args.clocks, args.store_mib, args.lenet_clocks, args.lenet_repeats = 3, 4, 4, 1
  parts = set(args.only.split(','))
  from pdcnno_jax.parallel.ray_engine import runtime  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.testing import config as config_testing  # pylint: disable=g-import-not-at-top
  print(f'load average (1, 5, 15 min) at start: {os.getloadavg()}')
  old = _old_store(args.store_mib) if 'store' in parts else None
  config = config_testing.default_config()
  config.parallel.ps_shards = args.shards
  ray = runtime.start(config)
  width = 0.25 if args.quick else 1.0
  leaves = _vgg_leaves(width)
  lenet = []
  with tempfile.TemporaryDirectory() as workdir:
    vgg = [(name, _ray_ps(ray, leaves, args.clocks, args.shards, workdir, shared))
           for name, shared in (('in the reply', False), ('from shared memory', True))
           if 'vgg' in parts]
    for _ in range(args.lenet_repeats if 'lenet' in parts else 0):
      for name, staleness, prefetch, shared in (('s=3 shared memory', 3, False, True),
                                                ('s=3 call', 3, False, False),
                                                ('s=3 call prefetched', 3, True, False),
                                                ('s=0 shared memory', 0, False, True),
                                                ('s=0 call', 0, False, False)):
        lenet.append((name, _lenet(args.lenet_clocks, workdir, staleness, prefetch, shared)))
  runtime.stop()
  print(f'load average (1, 5, 15 min) at end: {os.getloadavg()}')
  _print_vgg(vgg, old, width, sum(x.size for x in leaves), args.shards)
  for name, row in lenet:
    print(f'\nlenet5 {name} (read path {"/".join(row["paths"])}), 2 workers x 128 examples, '
          f'1 shard, {row["clocks"]} clocks: '
          f'transfer {1e3 * row["transfer_s_per_clock"]:.1f} ms per clock, step '
          f'{1e3 * row["step_s"]:.1f} ms: overhead {100 * row["overhead"]:.1f}% of a step '
          f'(bar: <= 10%); wait for the bound {1e3 * row["wait_s_per_clock"]:.1f} ms per clock '
          f'(not counted); loop {1e3 * row["clock_s"]:.1f} ms per clock')


if __name__ == '__main__':
  main()
