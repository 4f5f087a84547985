"""One predicate for periodic work (logging, evaluation, checkpoints): `every`.

Modelled on big_vision's ``utils.itstime``: every loop asks the same question the same way.
"""

from __future__ import annotations


def every(step: int, n: int, total: int | None = None, *, first: bool = False,
          last: bool = True) -> bool:
  """Whether periodic work is due after ``step`` steps (``step`` counted from 1).

  Args:
    step: steps done so far.
    n: period in steps; ``n <= 0`` means never (apart from ``first`` / ``last``).
    total: the loop's last step, if known.
    first: also due at step 1.
    last: also due at ``step == total``.

  Returns:
    True when ``step`` is a positive multiple of ``n``, or is the first / last step as asked.
  """
  if last and total is not None and step == total:
    return True
  if first and step == 1:
    return True
  return n > 0 and step > 0 and step % n == 0


def crossed(previous_step: int, step: int, n: int) -> bool:
  """Whether a multiple of ``n`` lies in ``(previous_step, step]`` (loops that jump steps)."""
  return n > 0 and step // n > previous_step // n
