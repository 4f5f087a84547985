"""Per-step SSP coordination cost (publish + gather) vs a plain allreduce.

Starts 2 local processes joined by jax.distributed.initialize (CPU). For the
parameter trees of LeNet-5 (28x28x1, ~62k params) and VGG-16 at width 0.25
(32x32x3, ~0.96M params) it measures, side by side in one run:

  * payload formats: size and encode/decode time of a float32 update delta
    (raw float32, zlib level 1, bfloat16 cast);
  * the store alone: one set + get of the delta's bytes laid out as raw
    float32, byte-shuffled float32, bfloat16, and zeros (JAX's gRPC channel
    gzips every write, so the entropy of the bytes matters);
  * SSP: mean time per step of `publish(c, delta)` + `pull(c + 1)` with s = 0
    (every step exchanges one update each way through the coordination
    service's key-value store), per payload format;
  * allreduce: a jitted cross-process sum of the same tree (gloo CPU
    collectives), on device-resident arrays, and including the host<->device
    copies that the SSP path also pays.

Usage:
  python benchmarks/bench_ssp_overhead.py [--steps=20]

Prints a table plus os.getloadavg() (the machine may be shared). Encode,
decode and store set/get times are the best of a few repeats (the intrinsic
cost); SSP and allreduce times are means over `--steps` steps. The overhead
as a fraction of a real training step is measured with the SSP trainer.

References:
  DESIGN.md, "SSP"; issue #7 (per-step coordination overhead).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

FORMATS = (('raw f32', 'none', None), ('zlib-1 f32', 'zlib', None),
           ('bf16 (lossy)', 'none', 'bfloat16'))
MODELS = (('lenet5', 1.0, (28, 28, 1)), ('vgg16', 0.25, (32, 32, 3)))


def _param_delta(name, width, input_shape):
  """A float32 tree shaped like the model's params, filled like an SGD delta."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pdcnno_jax import testing  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.models import factory  # pylint: disable=g-import-not-at-top

  config = testing.section('model', name=name, width_multiplier=width, batch_norm=False,
                           dropout_rate=0.0)
  model = factory.build_model(config, num_classes=10, input_shape=input_shape,
                              rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
      lambda p: (1e-3 * rng.standard_normal(np.shape(p))).astype(np.float32),
      params)


def _time_formats(delta, repeats):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pdcnno_jax.parallel.ssp import serialization  # pylint: disable=g-import-not-at-top
  out = {}
  for label, compression, cast in FORMATS:
    enc, dec = [], []
    for _ in range(repeats):
      t0 = time.perf_counter()
      payload = serialization.encode(delta, compression=compression,
                                     cast_floats_to=cast)
      t1 = time.perf_counter()
      serialization.decode(payload, like=delta)
      dec.append(time.perf_counter() - t1)
      enc.append(t1 - t0)
    out[label] = {'bytes': len(payload), 'encode_ms': 1e3 * np.min(enc),
                  'decode_ms': 1e3 * np.min(dec)}
  return out


def _time_store_writes(store, delta, repeats):
  """Times one store set + get of differently laid out bytes of `delta`."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(delta)])
  layouts = {
      'raw f32': flat.tobytes(),
      'byte-shuffled f32': flat.view(np.uint8).reshape(-1, 4).T.tobytes(),
      'bf16': flat.astype(ml_dtypes.bfloat16).tobytes(),
      'zeros (lower bound)': bytes(flat.nbytes),
  }
  out = {}
  for label, payload in layouts.items():
    sets, gets = [], []
    for i in range(repeats):
      key = f'bench_store/{label}/{i}'.replace(' ', '_')
      t0 = time.perf_counter()
      store.set(key, payload)
      t1 = time.perf_counter()
      store.try_get(key)
      gets.append(time.perf_counter() - t1)
      sets.append(t1 - t0)
    store.delete('bench_store')
    out[label] = {'bytes': len(payload), 'set_ms': 1e3 * np.min(sets),
                  'get_ms': 1e3 * np.min(gets)}
  return out


def _time_ssp(store, pid, delta, steps, tag):
  from pdcnno_jax.parallel import ssp  # pylint: disable=g-import-not-at-top
  out = {}
  for label, compression, cast in FORMATS:
    worker = ssp.SSPWorker(store, pid, 2, staleness=0, timeout_s=120.0,
                           run_id=f'bench_{tag}_{compression}_{cast}',
                           like=delta, compression=compression,
                           cast_floats_to=cast)
    worker.join()
    warmup = 3
    worker.pull(0)
    for clock in range(steps + warmup):
      if clock == warmup:
        t0 = time.perf_counter()
      worker.publish(clock, delta)
      worker.pull(clock + 1)
    elapsed = time.perf_counter() - t0
    worker.publish(steps + warmup, delta)
    worker.drain(steps + warmup)
    stats = worker.stats()
    worker.close()
    out[label] = {'step_ms': 1e3 * elapsed / steps,
                  'wait_ms_total_run': 1e3 * stats.wait_s}
  return out


def _time_allreduce(delta, steps):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,g-multiple-import

  mesh = Mesh(np.array(jax.devices()), ('p',))
  split = NamedSharding(mesh, P('p'))
  replicated = NamedSharding(mesh, P())

  def to_global(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(split, x[None]), tree)

  allreduce = jax.jit(
      lambda t: jax.tree_util.tree_map(lambda x: x.sum(0), t),
      out_shardings=replicated)
  device_tree = to_global(delta)
  jax.block_until_ready(allreduce(device_tree))
  t0 = time.perf_counter()
  for _ in range(steps):
    result = allreduce(device_tree)
  jax.block_until_ready(result)
  device_ms = 1e3 * (time.perf_counter() - t0) / steps
  t0 = time.perf_counter()
  for _ in range(steps):
    result = allreduce(to_global(delta))
    jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), result)
  host_ms = 1e3 * (time.perf_counter() - t0) / steps
  return {'device_ms': device_ms, 'with_host_copies_ms': host_ms}


def _worker(args):
  from pdcnno_jax.parallel.ssp import coordination  # pylint: disable=g-import-not-at-top
  coordination.initialize(f'127.0.0.1:{args.port}', 2, args.process_id,
                          heartbeat_timeout_s=10, recoverable=True)
  store = coordination.CoordinationStore()
  results = {}
  for name, width, shape in MODELS:
    delta = _param_delta(name, width, shape)
    import jax  # pylint: disable=g-import-not-at-top
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(delta))
    results[name] = {
        'params': int(num_params),
        'formats': _time_formats(delta, repeats=5),
        'store': (_time_store_writes(store, delta, repeats=5)
                  if args.process_id == 0 else {}),
        'ssp': _time_ssp(store, args.process_id, delta, args.steps, name),
        'allreduce': _time_allreduce(delta, args.steps),
    }
  if args.process_id == 0:
    print('RESULT ' + json.dumps(results), flush=True)
  coordination.shutdown(store)


def _print(results):
  print(f'load average (1, 5, 15 min): {os.getloadavg()}')
  for name, r in results.items():
    print(f'\n{name}: {r["params"]:,} params '
          f'({4 * r["params"] / 2**20:.2f} MiB float32)')
    print(f'  {"format":<14}{"payload KiB":>12}{"encode ms":>11}'
          f'{"decode ms":>11}{"SSP publish+pull ms/step":>26}')
    for label, f in r['formats'].items():
      print(f'  {label:<14}{f["bytes"] / 1024:>12.1f}{f["encode_ms"]:>11.2f}'
            f'{f["decode_ms"]:>11.2f}{r["ssp"][label]["step_ms"]:>26.2f}')
    print(f'  {"store set+get (process 0)":<26}{"KiB":>10}{"set ms":>9}'
          f'{"get ms":>9}')
    for label, w in r['store'].items():
      print(f'  {label:<26}{w["bytes"] / 1024:>10.1f}{w["set_ms"]:>9.1f}'
            f'{w["get_ms"]:>9.1f}')
    a = r['allreduce']
    raw = r['ssp']['raw f32']['step_ms']
    print(f'  allreduce (jit, gloo): {a["device_ms"]:.2f} ms on device, '
          f'{a["with_host_copies_ms"]:.2f} ms with host copies')
    print(f'  ratio SSP raw f32 / allreduce with host copies: '
          f'{raw / a["with_host_copies_ms"]:.2f}x')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--port', type=int, default=None)
  args = parser.parse_args()
  if args.process_id is not None:
    _worker(args)
    return
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen(
      [sys.executable, __file__, f'--process_id={pid}', f'--port={port}',
       f'--steps={args.steps}'], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL if pid else None, text=True)
           for pid in range(2)]
  output = procs[0].communicate()[0]
  procs[1].wait()
  lines = [l for l in output.splitlines() if l.startswith('RESULT ')]
  if not lines or any(p.returncode for p in procs):
    raise SystemExit(f'benchmark workers failed (exit codes '
                     f'{[p.returncode for p in procs]}):\n{output}')
  _print(json.loads(lines[-1][len('RESULT '):]))


if __name__ == '__main__':
  main()
