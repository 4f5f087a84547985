"""A process of a fake job in which one process dies once (for test_launch_local).

Process ``--victim`` SIGKILLs itself on its first run (after writing ``died``) and, if it is
started again, writes ``finished_<id>`` and exits 0. Every other process waits for
``--wait_for`` (a file name in ``--marker_dir``) and then writes ``finished_<id>``; it never
finishes on its own if that file does not come, so a launcher that stops the job leaves no
``finished_<id>`` of the survivors. Each start appends a line to ``runs_<id>``.
"""

import argparse
import os
import signal
import time

if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--marker_dir')
  parser.add_argument('--victim', type=int)
  parser.add_argument('--wait_for')
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  args = parser.parse_args()
  marker = lambda name: os.path.join(args.marker_dir, name)
  with open(marker(f'runs_{args.process_id}'), 'a') as f:
    f.write('run\n')
  with open(marker(f'runs_{args.process_id}')) as f:
    runs = len(f.readlines())
  if args.process_id == args.victim:
    if runs == 1:
      open(marker('died'), 'w').close()
      os.kill(os.getpid(), signal.SIGKILL)
  else:
    while not os.path.exists(marker(args.wait_for)):
      time.sleep(0.05)
  open(marker(f'finished_{args.process_id}'), 'w').close()
  print(f'process {args.process_id} finished', flush=True)
