"""Reruns the reliability probes: the faults a demanding user tries, and what each does now.

  python benchmarks/probe_reliability.py [--only=ckpt_xor,kill_sync_p0,...] [--list]

Every probe runs `python -m pdcnno_jax.main` (or the local launcher) in a fresh temporary
workdir and prints one row: probe, exit code, the error line printed, seconds until the
process ended, PASS/FAIL. A probe passes when the outcome is the documented one: a clear
one-line error (no Python traceback, no C++ stack) with the documented exit code, or, for a
damaged checkpoint, a resume from the newest intact one.

It uses the REAL Fashion-MNIST prepared at data/tfds (`--data_dir`; LeNet-5, a few tens of
steps per run; the TFRecord probes damage a copy). Run as root, the disk-full and read-only
probes mount small tmpfs file systems; otherwise disk-full is skipped (the unit tests inject
the writer error) and read-only uses chmod. The decoder probe fuzzes
`parallel.ssp.serialization.decode` in-process with a fixed seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PY = sys.executable
_ERROR_PREFIXES = ('Config error', 'Workdir error', 'Data error', 'Training diverged',
                   'Training collapsed', 'Checkpoint error', 'Error', 'launcher:')
_TRAINING = r'\[p\d\].*(steps/s|\bround \d|\bstep \d)'  # A line of a process that trains.
_RAW = ('Traceback (most recent call last)', 'Check failure', '*** SIG', 'FATAL')


@dataclasses.dataclass
class Row:
  probe: str
  code: int | None
  line: str
  seconds: float
  ok: bool | None  # None: skipped.


def _env(**extra) -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (_REPO, os.environ.get('PYTHONPATH')) if p), JAX_PLATFORMS='cpu')
  env.update(extra)
  return env


def _main(workdir: str, *overrides: str, config: str = 'configs/default.py',
          env: dict[str, str] | None = None, timeout_s: float = 600) -> tuple[int, str, float]:
  """Runs pdcnno_jax.main; returns (exit code, stdout + stderr, seconds)."""
  command = [_PY, '-m', 'pdcnno_jax.main', f'--config={config}', f'--workdir={workdir}',
             *overrides]
  start = time.monotonic()
  done = subprocess.run(command, cwd=_REPO, env=env or _env(), capture_output=True, text=True,
                        timeout=timeout_s, check=False)
  return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def error_line(text: str) -> str:
  """The last line that reports an error (else the last line)."""
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  errors = [l for l in lines if l.split('] ', 1)[-1].startswith(_ERROR_PREFIXES)]
  return (errors or lines or [''])[-1]


def is_clean(text: str) -> bool:
  """No Python traceback and no C++ stack in the output."""
  return not any(raw in text for raw in _RAW)


def _one_line_error(name: str, code: int, text: str, seconds: float, expected: int) -> Row:
  errors = [l for l in text.splitlines() if l.startswith(_ERROR_PREFIXES)]
  return Row(name, code, error_line(text), seconds,
             code == expected and len(errors) == 1 and is_clean(text))


# --- Checkpoint probes -------------------------------------------------------------------------


def _short(data_dir: str, steps: int, *more: str) -> list[str]:
  return [f'--config.data.data_dir={data_dir}', '--config.num_epochs=1',
          f'--config.max_steps={steps}', '--config.log_every_steps=10', *more]


def _trained(root: str, data_dir: str) -> str:
  """A workdir with checkpoints at steps 10 and 20 (made once, copied per probe)."""
  base = os.path.join(root, 'trained')
  if not os.path.isdir(base):
    code, text, _ = _main(base, *_short(data_dir, 20, '--config.checkpoint_every_steps=10'))
    if code:
      raise RuntimeError(f'the base run failed ({code}): {error_line(text)}')
  return base


def _data_file(step_dir: str) -> str:
  files = [f for f in glob.glob(os.path.join(step_dir, '**', '*'), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _xor(path: str, count: int, offset: int | None = None) -> None:
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, min(start + count, len(data))):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(data)


def _damage(kind: str, step_dir: str) -> None:
  if kind == 'xor':
    _xor(_data_file(step_dir), 256)
  elif kind == 'truncate':
    path = _data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)
  elif kind == 'delete':
    os.remove(_data_file(step_dir))
  elif kind == 'delete_meta':
    metas = glob.glob(os.path.join(step_dir, 'meta*', '**', '*metadata*'), recursive=True)
    os.remove(max(metas, key=len))


def probe_checkpoint(kind: str, root: str, data_dir: str) -> Row:
  """Damages the newest checkpoint (step 20): the rerun must resume from step 10."""
  workdir = os.path.join(root, f'ckpt_{kind}')
  shutil.copytree(_trained(root, data_dir), workdir)
  _damage(kind, os.path.join(workdir, 'checkpoints', '20'))
  code, text, seconds = _main(workdir, *_short(data_dir, 30))
  resumed = 'Resuming from step 10' in text
  warned = re.search(r'(Skipping|Replacing)[^\n]*\b20\b', text) is not None
  line = next((l for l in text.splitlines() if 'Skipping' in l), error_line(text))
  missing = [what for what, ok in (('resume from step 10', resumed), ('warning', warned),
                                   ('clean output', is_clean(text))) if not ok]
  raw = next((l for l in text.splitlines() if any(r in l for r in _RAW)), '')
  note = f' [missing: {", ".join(missing)}{"; " + raw[:80] if raw else ""}]' if missing else ''
  return Row(f'ckpt_{kind}', code, line[-160:] + note, seconds, code == 0 and not missing)


def probe_all_checkpoints_corrupt(root: str, data_dir: str) -> Row:
  workdir = os.path.join(root, 'ckpt_all')
  shutil.copytree(_trained(root, data_dir), workdir)
  for step in ('10', '20'):
    _damage('xor', os.path.join(workdir, 'checkpoints', step))
  code, text, seconds = _main(workdir, *_short(data_dir, 30))
  return _one_line_error('ckpt_all_corrupt', code, text, seconds, 1)


def probe_divergence(root: str, data_dir: str) -> Row:
  """lr = 1e6, a checkpoint every step: stops before saving a bad state, names a saved step."""
  workdir = os.path.join(root, 'diverge')
  code, text, seconds = _main(workdir, *_short(data_dir, 60, '--config.checkpoint_every_steps=1',
                                               '--config.optimizer.learning_rate=1e6'))
  row = _one_line_error('lr_1e6_every_step', code, text, seconds, 4)
  named = re.search(r'last good checkpoint is step (\d+)', row.line)
  ckpt = os.path.join(workdir, 'checkpoints')
  committed = named is not None and os.path.isdir(os.path.join(ckpt, named.group(1)))
  temporary = [d for d in os.listdir(ckpt) if 'tmp' in d] if os.path.isdir(ckpt) else []
  row.ok = row.ok and committed and not temporary
  return row


# --- Launcher probes ---------------------------------------------------------------------------


def _launch(args: list[str], num_processes: int = 2) -> subprocess.Popen:
  return subprocess.Popen(
      [_PY, '-m', 'pdcnno_jax.launch_local', f'--num_processes={num_processes}', '--', *args],
      cwd=_REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _job_pids(launcher: subprocess.Popen) -> dict[int, int]:
  """{process id in the job: OS pid} of the launcher's children."""
  import psutil  # pylint: disable=g-import-not-at-top
  found = {}
  for child in psutil.Process(launcher.pid).children(recursive=True):
    try:
      match = re.search(r'--process_id=(\d+)', ' '.join(child.cmdline()))
    except psutil.Error:
      continue
    if match and '--coordinator_address=' in ' '.join(child.cmdline()):
      found[int(match.group(1))] = child.pid
  return found


def _wait_for(launcher: subprocess.Popen, pattern: str, lines: list[str],
              timeout_s: float = 300) -> bool:
  deadline = time.monotonic() + timeout_s
  for line in launcher.stdout:
    lines.append(line.rstrip('\n'))
    if re.search(pattern, line):
      return True
    if time.monotonic() > deadline:
      break
  return False


def probe_kill(mode: str, victim: int, root: str, data_dir: str) -> Row:
  """SIGKILLs one process of a 2-process job once it trains; the job must end in one line."""
  name = f'kill_{mode}_p{victim}'
  args = [f'--workdir={os.path.join(root, name)}', '--config=configs/default.py',
          *_short(data_dir, 100000), '--config.num_epochs=3', f'--config.parallel.mode={mode}']
  if mode == 'mapreduce':
    args.append('--config.parallel.engine=jax')
  launcher, lines = _launch(args), []
  if not _wait_for(launcher, _TRAINING, lines):
    launcher.kill()
    return Row(name, launcher.wait(), 'never started training: ' + ' | '.join(lines[-3:]), 0,
               False)
  time.sleep(2.0)
  os.kill(_job_pids(launcher)[victim], signal.SIGKILL)
  killed = time.monotonic()
  after = len(lines)
  for line in launcher.stdout:
    lines.append(line.rstrip('\n'))
  code = launcher.wait()
  seconds = time.monotonic() - killed
  text = '\n'.join(lines[after:])
  line = next((l for l in lines[after:] if l.startswith('launcher:')), '')
  survivor_errors = [l for l in lines[after:] if re.match(r'\[p\d\] \S*(Error|error)', l)]
  ok = (code == 128 + signal.SIGKILL and f'process {victim} was killed by SIGKILL' in line
        and is_clean(text) and len(survivor_errors) <= 1)
  extra = f' | survivor: {survivor_errors[0][:90]}' if survivor_errors else ''
  return Row(name, code, line[:120] + extra, seconds, ok)


def probe_listeners(root: str, data_dir: str) -> Row:
  """Every TCP listener of a 2-process local job (launcher and its service too) is on loopback."""
  import psutil  # pylint: disable=g-import-not-at-top
  args = [f'--workdir={os.path.join(root, "listen")}', '--config=configs/default.py',
          *_short(data_dir, 60)]
  start = time.monotonic()
  launcher, found = _launch(args), set()
  lines: list[str] = []
  _wait_for(launcher, _TRAINING, lines)
  children = psutil.Process(launcher.pid).children(recursive=True)
  pids = {launcher.pid, *(c.pid for c in children)}
  out = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True, check=False).stdout
  for row in out.splitlines():
    owners = {int(p) for p in re.findall(r'pid=(\d+)', row)}
    if owners & pids:
      found.add(row.split()[3])
  for line in launcher.stdout:
    lines.append(line)
  code = launcher.wait()
  exposed = sorted(a for a in found if not a.startswith(('127.0.0.1:', '[::1]:', '[::ffff:127')))
  return Row('ss_ltn_2proc', code, f'listeners {sorted(found)}; outside loopback: {exposed}',
             time.monotonic() - start, bool(found) and not exposed and code == 0)


# --- Config and workdir probes -----------------------------------------------------------------


def probe_config(name: str, root: str, data_dir: str) -> Row:
  workdir, config, env = os.path.join(root, name), 'configs/default.py', None
  overrides = [f'--config.data.data_dir={data_dir}']
  if name == 'num_epochs_abc':
    overrides.append('--config.num_epochs=abc')
  elif name == 'config_missing':
    config = 'configs/no_such_config.py'
  elif name == 'config_broken':
    config = os.path.join(root, 'broken.py')
    with open(config, 'w') as f:
      f.write('def get_config(:\n  return None\n')
  elif name == 'batch_not_divisible':
    overrides.append('--config.data.batch_size=100')
    env = _env(XLA_FLAGS='--xla_force_host_platform_device_count=8')
  elif name == 'unknown_optimizer':
    overrides.append('--config.optimizer.name=adamx')
  elif name == 'impossible_mac_target':
    overrides += ['--config.prune.method=fmp', '--config.prune.selection=global_macs',
                  '--config.prune.target_mac_reduction=1000000']
  elif name == 'staleness_minus_2':
    overrides += ['--config.parallel.mode=ssp', '--config.parallel.staleness=-2']
  elif name == 'workdir_is_file':
    open(workdir, 'w').close()
  elif name == 'workdir_read_only':
    workdir = os.path.join(_read_only_dir(root), 'run')
  code, text, seconds = _main(workdir, *overrides, config=config, env=env)
  return _one_line_error(name, code, text, seconds, 2)


def _mount_tmpfs(path: str, options: str) -> bool:
  os.makedirs(path, exist_ok=True)
  if os.geteuid() != 0:
    return False
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', path],
                        capture_output=True, check=False).returncode == 0


def _read_only_dir(root: str) -> str:
  path = os.path.join(root, 'read_only')
  if not _mount_tmpfs(path, 'ro,size=1m'):
    os.chmod(path, 0o555)  # Enough unless root (root writes through modes).
  return path


def probe_disk_full(root: str, data_dir: str) -> Row:
  """A workdir on a 3 MiB tmpfs, a checkpoint every 5 steps, none rotated out."""
  mount = os.path.join(root, 'tiny')
  if not _mount_tmpfs(mount, 'size=3m'):
    return Row('disk_full', None, 'skipped: mounting a tmpfs needs root', 0.0, None)
  code, text, seconds = _main(os.path.join(mount, 'run'), *_short(
      data_dir, 400, '--config.checkpoint_every_steps=5', '--config.keep_checkpoints=1000'))
  row = _one_line_error('disk_full', code, text, seconds, 1)
  row.ok = row.ok and 'No space left on device' in row.line
  return row


def _unmount_all(root: str) -> None:
  for path in ('tiny', 'read_only'):
    subprocess.run(['umount', os.path.join(root, path)], capture_output=True, check=False)


# --- Data and decoder probes -------------------------------------------------------------------


def probe_tfrecord(kind: str, root: str, data_dir: str) -> Row:
  copy = os.path.join(root, f'tfds_{kind}')
  shutil.copytree(os.path.join(data_dir, 'fashion_mnist'), os.path.join(copy, 'fashion_mnist'))
  shard = sorted(glob.glob(os.path.join(copy, 'fashion_mnist', '*', '*train.tfrecord*')))[0]
  if kind == 'truncated':
    os.truncate(shard, os.path.getsize(shard) // 2)
  else:
    _xor(shard, 64)
  code, text, seconds = _main(os.path.join(root, f'run_{kind}'), *_short(copy, 10))
  row = _one_line_error(f'tfrecord_{kind}', code, text, seconds, 3)
  row.ok = row.ok and os.path.basename(shard) in text and 'idx_import' in text
  return row


def probe_decoder_fuzz(root: str, data_dir: str) -> Row:
  """3000 mutations of a valid payload (seed 0): every failure is the module's PayloadError."""
  del root, data_dir
  sys.path.insert(0, _REPO)
  from pdcnno_jax.parallel.ssp import serialization  # pylint: disable=g-import-not-at-top
  tree = {'w': np.arange(1000, dtype=np.float32).reshape(10, 100), 'b': np.ones(7, np.int32)}
  payload = serialization.encode(tree)
  rng = np.random.default_rng(0)
  start, raw = time.monotonic(), {}
  for _ in range(3000):
    data = bytearray(payload)
    for i in rng.integers(0, len(data), rng.integers(1, 9)):
      data[i] = rng.integers(0, 256)
    if rng.random() < 0.2:
      data = data[:rng.integers(0, len(data))]
    try:
      serialization.decode(bytes(data))
    except serialization.PayloadError:
      pass
    except Exception as e:  # pylint: disable=broad-except
      raw[type(e).__name__] = raw.get(type(e).__name__, 0) + 1
  return Row('decoder_fuzz', 0, f'3000 mutations: other exceptions {raw or "none"}',
             time.monotonic() - start, not raw)


PROBES = {
    **{f'ckpt_{k}': (lambda k: lambda r, d: probe_checkpoint(k, r, d))(k)
       for k in ('xor', 'truncate', 'delete', 'delete_meta')},
    'ckpt_all_corrupt': probe_all_checkpoints_corrupt,
    'lr_1e6_every_step': probe_divergence,
    'ss_ltn_2proc': probe_listeners,
    **{f'kill_{m}_p{v}': (lambda m, v: lambda r, d: probe_kill(m, v, r, d))(m, v)
       for m in ('sync', 'mapreduce') for v in (1, 0)},
    **{n: (lambda n: lambda r, d: probe_config(n, r, d))(n)
       for n in ('num_epochs_abc', 'config_missing', 'config_broken', 'batch_not_divisible',
                 'unknown_optimizer', 'impossible_mac_target', 'staleness_minus_2',
                 'workdir_read_only', 'workdir_is_file')},
    'disk_full': probe_disk_full,
    **{f'tfrecord_{k}': (lambda k: lambda r, d: probe_tfrecord(k, r, d))(k)
       for k in ('truncated', 'bitflip')},
    'decoder_fuzz': probe_decoder_fuzz,
}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data_dir', default=os.path.join(_REPO, 'data', 'tfds'))
  parser.add_argument('--only', default='', help='comma-separated probe names')
  parser.add_argument('--list', action='store_true')
  ns = parser.parse_args()
  if ns.list:
    print('\n'.join(PROBES))
    return 0
  names = [n for n in ns.only.split(',') if n] or list(PROBES)
  unknown = sorted(set(names) - set(PROBES))
  if unknown:
    parser.error(f'unknown probes {unknown}; --list shows them')
  data_dir = os.path.abspath(ns.data_dir)
  failed = 0
  print('| probe | exit | line printed | s | result |\n|---|---|---|---|---|', flush=True)
  with tempfile.TemporaryDirectory(prefix='probe_reliability_') as root:
    try:
      for name in names:
        try:
          row = PROBES[name](root, data_dir)
        except Exception as e:  # pylint: disable=broad-except
          row = Row(name, None, f'probe error: {type(e).__name__}: {e}', 0.0, False)
        result = {True: 'PASS', False: 'FAIL', None: 'skip'}[row.ok]
        failed += row.ok is False
        line = row.line.replace('|', '/')
        print(f'| {row.probe} | {row.code} | {line} | {row.seconds:.1f} | {result} |',
              flush=True)
    finally:
      _unmount_all(root)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
