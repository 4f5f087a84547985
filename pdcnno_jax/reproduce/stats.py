"""Means with 95% confidence intervals over seeds, and the verdict rule of every claim.

A claim's number is a per-seed metric (a paired ratio or difference); its interval is the
two-sided 95% Student-t interval mean +- t_{0.975, n-1} s / sqrt(n). A deterministic metric (a
makespan simulation) has a zero-width interval at its value; one seed of a measured metric has
no interval (it is (-inf, inf)), so it can never be `reproduced` or `not reproduced`.

The rule, stated once in REPORT.md (`RULE`): each claim names a target criterion (the paper's
figure, at the end of its range least favourable to the paper) and a weak criterion (the
direction of the effect). reproduced: the whole interval meets the target; not reproduced: no
point of the interval meets the weak criterion; partly: anything between. A claim of several
parts is reproduced when every part is, not reproduced when every part is not, else partly (a
part without numbers caps it at partly). A
claim whose numbers come only from the cluster model is capped at partly (the model's
validation error is large); one without numbers is `not testable here`, with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Sequence

from scipy import stats as scipy_stats

REPRODUCED, NOT_REPRODUCED, PARTLY, NOT_TESTABLE = (
    'reproduced', 'not reproduced', 'partly', 'not testable here')
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTABLE)

RULE = (
    'Each claim has a target criterion (the paper\'s figure, at the end of its range least '
    'favourable to the paper) and a weak criterion (the direction of the effect), applied to '
    'the 95% t-interval over seeds of a per-seed metric. `reproduced`: every point of the '
    'interval meets the target; `not reproduced`: no point meets the weak criterion; `partly`: '
    'otherwise (one seed has no interval, so it is at best `partly`). Several parts: '
    '`reproduced` if all are, `not reproduced` if all are not, else `partly`; a part without '
    'numbers caps the claim at `partly`. Evidence from '
    'the cluster model alone is capped at `partly`. No numbers: `not testable here`.')

_OPS = {'<': operator.lt, '<=': operator.le, '>': operator.gt, '>=': operator.ge}


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Mean and 95% interval of a metric over n seeds."""
  mean: float
  lo: float
  hi: float
  n: int
  exact: bool = False  # A deterministic metric: [lo, hi] is the range of its values.

  def __str__(self) -> str:
    if self.n == 0:
      return 'n/a'
    if self.exact:
      return (f'{self.mean:.4g} (exact)' if self.n == 1 else
              f'{self.mean:.4g}, range [{self.lo:.4g}, {self.hi:.4g}] (n={self.n})')
    if self.n == 1 or math.isinf(self.hi - self.lo):
      return f'{self.mean:.4g} (n={self.n}, no CI)'
    return f'{self.mean:.4g} +- {(self.hi - self.lo) / 2:.2g} (95% CI, n={self.n})'


def mean_ci(values: Sequence[float], *, deterministic: bool = False,
            level: float = 0.95) -> Estimate:
  """Mean and two-sided t-interval of ``values`` (NaNs dropped).

  Args:
    values: one metric value per seed.
    deterministic: the values are exact (a simulation): the interval is [min, max].
    level: confidence level.
  """
  xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
  n = len(xs)
  if n == 0:
    return Estimate(math.nan, math.nan, math.nan, 0)
  mean = sum(xs) / n
  if deterministic:
    return Estimate(mean, min(xs), max(xs), n, exact=True)
  if n == 1:
    return Estimate(mean, -math.inf, math.inf, 1)
  sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
  half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
  return Estimate(mean, mean - half, mean + half, n)


@dataclasses.dataclass(frozen=True)
class Criterion:
  """``metric <op> value``, e.g. Criterion('<=', 0.22)."""
  op: str
  value: float

  def __post_init__(self):
    if self.op not in _OPS:
      raise ValueError(f'Criterion op {self.op!r}; use one of {sorted(_OPS)}.')

  def all_of(self, est: Estimate) -> bool:
    """Every point of the interval meets the criterion."""
    worst = est.hi if self.op in ('<', '<=') else est.lo
    return bool(_OPS[self.op](worst, self.value))

  def any_of(self, est: Estimate) -> bool:
    """Some point of the interval meets the criterion."""
    best = est.lo if self.op in ('<', '<=') else est.hi
    return bool(_OPS[self.op](best, self.value))

  def __str__(self) -> str:
    return f'{self.op} {self.value:g}'


def verdict(est: Estimate, target: Criterion, weak: Criterion) -> str:
  """The verdict of one part of a claim (module docstring)."""
  if est.n == 0 or math.isnan(est.mean):
    return NOT_TESTABLE
  if target.all_of(est):
    return REPRODUCED
  if not weak.any_of(est):
    return NOT_REPRODUCED
  return PARTLY


def combine(parts: Sequence[str], *, model_only: bool = False) -> str:
  """The verdict of a claim from those of its parts (module docstring)."""
  tested = [p for p in parts if p != NOT_TESTABLE]
  if not tested:
    return NOT_TESTABLE
  if len(tested) < len(parts):
    result = PARTLY if any(p != NOT_REPRODUCED for p in tested) else NOT_REPRODUCED
  elif all(p == REPRODUCED for p in tested):
    result = REPRODUCED
  elif all(p == NOT_REPRODUCED for p in tested):
    result = NOT_REPRODUCED
  else:
    result = PARTLY
  if model_only and result == REPRODUCED:
    result = PARTLY
  return result
