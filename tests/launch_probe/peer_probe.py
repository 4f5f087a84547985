"""A sync job in which process ``--victim`` freezes (SIGSTOP) mid-run (for test_launch_local).

Every process joins through pdcnno_jax.distributed (heartbeat ``--heartbeat_s``) and runs
all-gathers; the victim stops itself after a few (or, with ``--at_exit``, after the last one,
so the survivors are already in JAX's exit barrier), and the survivors hang until their peer
watchdog ends them.
"""

import argparse
import os
import signal
import time

if __name__ == '__main__':
  parser = argparse.ArgumentParser()
  parser.add_argument('--victim', type=int)
  parser.add_argument('--heartbeat_s', type=float)
  parser.add_argument('--at_exit', action='store_true')
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  args = parser.parse_args()
  from pdcnno_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                         heartbeat_timeout_s=args.heartbeat_s)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  victim = args.process_id == args.victim
  for step in range(10 if args.at_exit else 600):
    multihost_utils.process_allgather(jnp.ones(2))
    if step == 5 and victim and not args.at_exit:
      print('freezing', flush=True)
      os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(0.1)
  if victim and args.at_exit:
    print('freezing before exit', flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
  print('finished without noticing' if not args.at_exit else 'leaving', flush=True)
