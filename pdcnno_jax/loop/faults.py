"""Fault injection for the resume and rejoin tests: SIGKILL this process at a chosen point.

``PDCNNO_FAULT_KILL_AT_STEP=<step>`` kills a synchronous or MapReduce run right after it saved
``step`` (the asynchronous save may still be writing: exactly the case resuming must survive).
The Ray engine's faults are planned per actor instead (`ray_engine.ssp_driver.FaultPlan`).
"""

from __future__ import annotations

import os
import signal

STEP_ENV = 'PDCNNO_FAULT_KILL_AT_STEP'


def maybe_kill(env_var: str, count: int) -> None:
  """SIGKILLs this process when ``$env_var`` is set to ``count``."""
  target = os.environ.get(env_var)
  if target and int(target) == count:
    os.kill(os.getpid(), signal.SIGKILL)
