"""The stale-synchronous-parallel (SSP) staleness bound s, as every SSP component reads it.

A worker at clock c must see every update stamped <= c - s - 1 from every worker, always sees
its own and may see newer ones: s = 0 is BSP, s = None (infinite) is ASP. The parameter
server (`parallel/ray_engine/ps.py`) serves reads under this rule; the workers and the report
carry s in the form `normalise_staleness` gives.

References:
  Ho et al., "More effective distributed ML via a stale synchronous parallel parameter
    server", NIPS 2013 (the SSP condition, section 2).
  papers/delay_sync_parallel.txt, section 4 (delay synchronization = SSP); DESIGN.md, "SSP".
"""

from __future__ import annotations

import math


def normalise_staleness(staleness: int | float | None) -> int | None:
  """s as an int >= 0, or None for infinite (ASP: -1, None or inf)."""
  if staleness is None or (isinstance(staleness, float) and math.isinf(staleness)):
    return None
  if int(staleness) != staleness or staleness < -1:
    raise ValueError(
        f'staleness must be an int >= 0, or -1 / None for infinite (ASP); '
        f'got {staleness!r}.')
  return None if staleness == -1 else int(staleness)
