"""A sync job in which process ``--victim`` freezes (SIGSTOP) or dies (SIGKILL) mid-run.

For test_launch_local. Every process joins through pdcnno_jax.distributed (heartbeat
``--heartbeat_s``) and runs all-gathers; the victim freezes itself after a few (or, with
``--at_exit``, after the last one, so the survivors are already in JAX's exit barrier), so
the survivors hang until their peer watchdog ends them; with ``--kill`` it SIGKILLs itself
instead, and the launcher stops the survivors (or their next collective fails: one line).
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
  parser.add_argument('--kill', action='store_true')
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
  how = signal.SIGKILL if args.kill else signal.SIGSTOP
  for step in range(10 if args.at_exit else 600):
    try:
      multihost_utils.process_allgather(jnp.ones(2))
    except Exception as e:  # pylint: disable=broad-except
      # A collective with a dead peer fails: one line, as pdcnno_jax.main reports errors.
      print(f'Error: {type(e).__name__}: {str(e).splitlines()[0]}', flush=True)
      os._exit(1)
    if step == 5 and victim and not args.at_exit:
      print('freezing' if how == signal.SIGSTOP else 'dying', flush=True)
      os.kill(os.getpid(), how)
    time.sleep(0.1)
  if victim and args.at_exit:
    print('freezing before exit', flush=True)
    os.kill(os.getpid(), how)
  print('finished without noticing' if not args.at_exit else 'leaving', flush=True)
