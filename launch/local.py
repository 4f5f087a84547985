#!/usr/bin/env python3
"""Local launcher: N CPU processes on this machine as N hosts of one JAX job.

  python launch/local.py --num_processes=2 -- --config=configs/default.py --workdir=/tmp/w

See pdcnno_jax/launch_local.py for the options.
"""

import sys

from pdcnno_jax import launch_local

if __name__ == '__main__':
  sys.exit(launch_local.main())
