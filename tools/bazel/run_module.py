"""Runs a Python module as `python -m <module>` does; main of py_binary targets.

Bazel runs a py_binary's main file as a script, which puts that file's
directory first on sys.path (so pdcnno_jax/main.py would see `data`, `models`,
... as top-level modules) and makes it `__main__` by path, not by module name.
Declaring binaries with this file as main and the module name as first
argument runs them exactly as on the command line:

  py_binary(name = "main", srcs = ["//tools/bazel:run_module.py"],
            main = "//tools/bazel:run_module.py", args = ["pdcnno_jax.main"])
"""

import os
import runpy
import sys


def main() -> None:
  """Runs the module named by sys.argv[1] with the remaining arguments."""
  if len(sys.argv) < 2:
    sys.exit('usage: run_module.py <module> [args...]; give the module name '
             'in the py_binary\'s args, e.g. args = ["pdcnno_jax.main"].')
  module = sys.argv.pop(1)
  # As under `python -m`: this script's directory is not on the path, and
  # runpy sets argv[0] to the module's file.
  script_dir = os.path.dirname(os.path.abspath(__file__))
  if sys.path and os.path.abspath(sys.path[0]) == script_dir:
    del sys.path[0]
  runpy.run_module(module, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
