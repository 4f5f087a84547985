"""Prints the CPU cores this process may run on and its arguments (for test_launch_local)."""

import os
import sys

if __name__ == '__main__':
  print(f'affinity={sorted(os.sched_getaffinity(0))} argv={sys.argv[1:]}', flush=True)
