"""Greedy NetAdapt-style width search on measured end-to-end network latencies (pure NumPy).

Each step proposes, for every prunable layer, the current widths with that layer cut by its
step (``step_fraction`` of its width, at least one channel), has each candidate network
measured end to end, and moves to the candidate with the least score lost per unit of
measured latency saved. A candidate measured no faster than the current (wider) network is
never chosen; its layer's step doubles for the next proposal, so the search jumps over the
plateaus that XLA's kernels show for neighbouring channel counts. Once a candidate reaches
the target, the cut that crossed it is refined by bisection (the widest width of that layer
that still reaches the target), and the result is the measured point reaching the target with
the least score lost; short of the target (measurement budget spent, or no layer can be cut
to a faster network), the fastest measured point. Either way no measured network that is at
least as wide in every layer is as fast as the result.

Latencies are in units of the dense network's, measured side by side with it, so load changes
between measurements cancel. Scores lost are sums of per-layer L2-normalised channel scores,
from any scorer.

References:
  Yang et al. 2018, "NetAdapt: platform-aware neural network adaptation for mobile
  applications" (ECCV), Algorithm 1 (greedy per-layer proposals, empirical measurements).
  DESIGN.md, "Latency-aware selection".
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol

import numpy as np

Widths = dict[str, int]
Masks = dict[str, np.ndarray]
Points = dict[str, tuple[Widths, float]]  # Widths key -> (widths, measured latency).


def widths_key(widths: Mapping[str, int]) -> str:
  """``'conv1=20,conv2=50'``: a widths tuple as a cache key, in the layers' order."""
  return ','.join(f'{name}={int(width)}' for name, width in widths.items())


@dataclasses.dataclass(frozen=True)
class ScoreCosts:
  """Score lost by removing the lowest-scoring kept channels of each layer.

  Attributes:
    order: per layer, its kept channels, lowest normalised score first.
    cumulative: per layer, ``[k]`` = normalised score of its ``k`` lowest kept channels.
    start: kept widths before the search.
  """

  order: dict[str, np.ndarray]
  cumulative: dict[str, np.ndarray]
  start: dict[str, int]

  @classmethod
  def from_scores(cls, scores: Mapping[str, np.ndarray],
                  masks: Mapping[str, np.ndarray]) -> ScoreCosts:
    """Costs from raw scores, normalised per layer by the L2 norm of its kept scores."""
    order, cumulative, start = {}, {}, {}
    for name, mask in masks.items():
      kept = np.flatnonzero(mask)
      score = np.asarray(scores[name], np.float64)
      norm = np.linalg.norm(score[kept])
      normalized = score / norm if norm > 0 else score
      order[name] = kept[np.argsort(normalized[kept], kind='stable')]
      cumulative[name] = np.concatenate([[0.0], np.cumsum(normalized[order[name]])])
      start[name] = int(kept.size)
    return cls(order, cumulative, start)

  def lost(self, widths: Mapping[str, int]) -> float:
    """Score removed when each layer keeps its ``widths[name]`` best channels."""
    return float(sum(self.cumulative[name][self.start[name] - int(width)]
                     for name, width in widths.items()))

  def masks(self, masks: Mapping[str, np.ndarray], widths: Mapping[str, int]) -> Masks:
    """``masks`` with each layer keeping only its ``widths[name]`` best-scoring channels."""
    new = {name: np.asarray(mask, np.float32).copy() for name, mask in masks.items()}
    for name, mask in new.items():
      mask[self.order[name][:self.start[name] - int(widths[name])]] = 0.0
    return new


@dataclasses.dataclass(frozen=True)
class Measurement:
  """A candidate's measured latency and, when timed in the same session, the current's.

  Both are in units of the dense network's latency.
  """

  latency: float
  current: float | None = None


class Measure(Protocol):
  """``measure(candidate, current)``: the candidate network's measured latency.

  ``current`` (None for the starting point) is timed alongside when given. Returns None when
  the candidate is not known yet and the measurement budget is spent.
  """

  def __call__(self, candidate: Widths, current: Widths | None = None) -> Measurement | None:
    ...


@dataclasses.dataclass
class SearchResult:
  """Where a search ended.

  Attributes:
    widths: the chosen widths.
    latency: their measured latency (dense = 1).
    reached: whether that latency reaches the target.
    points: every point the search measured or looked up: widths key -> (widths, latency).
    stopped: why the search stopped: ``'target'``, ``'budget'`` or ``'no faster width'``.
  """

  widths: Widths
  latency: float
  reached: bool
  points: Points
  stopped: str


def _cut(width: int, step_fraction: float, multiplier: int, min_channels: int) -> int:
  return min(width - min_channels, max(1, round(step_fraction * width)) * multiplier)


def _propose(costs: ScoreCosts, measure: Measure, widths: Widths, latency: float,
             multiplier: dict[str, int], points: Points, step_fraction: float,
             min_channels: int) -> list[tuple[float, float, str, Widths, float]] | None:
  """Measures one candidate per layer; returns ``(ratio, lost, layer, widths, latency)`` of
  those faster than the current network (None: the budget ran out)."""
  faster = []
  for name, width in widths.items():
    if width <= min_channels:
      continue
    candidate = {**widths, name: width - _cut(width, step_fraction, multiplier[name],
                                              min_channels)}
    measured = measure(candidate, widths)
    if measured is None:
      return None
    points[widths_key(candidate)] = (candidate, measured.latency)
    saved = (latency if measured.current is None else measured.current) - measured.latency
    if saved <= 0:  # No faster than the wider current network: jump further next time.
      multiplier[name] *= 2
      continue
    lost = costs.lost(candidate) - costs.lost(widths)
    faster.append((lost / saved, lost, name, candidate, measured.latency))
  return faster


def _bisect(measure: Measure, widths: Widths, name: str, wider: int, goal: float,
            points: Points) -> None:
  """Measures widths of ``name`` between its chosen width and ``wider`` (which misses the
  goal), keeping the widest that reaches it: the cut that crossed the target, refined."""
  low, high = widths[name], wider
  current = dict(widths)
  while high - low > 1:
    middle = (low + high) // 2
    candidate = {**widths, name: middle}
    measured = measure(candidate, current)
    if measured is None:
      return
    points[widths_key(candidate)] = (candidate, measured.latency)
    if measured.latency <= goal:
      low, current = middle, candidate
    else:
      high = middle


def _choose(costs: ScoreCosts, points: Points,
            goal: float) -> tuple[Widths, float]:
  """The measured point reaching ``goal`` with the least score lost, else the fastest; ties go
  to the wider network, so no measured network at least as wide is as fast."""

  def rank(point):
    widths, latency = point
    total = -sum(widths.values())
    if latency <= goal:
      return (0, costs.lost(widths), total, latency)
    return (1, latency, costs.lost(widths), total)

  return min(points.values(), key=rank)


def greedy_search(costs: ScoreCosts, measure: Measure, *, target_speedup: float,
                  min_channels: int, step_fraction: float, start: Mapping[str, int],
                  start_latency: float) -> SearchResult:
  """NetAdapt-style greedy removal from ``start`` until the measured speed-up is reached.

  Args:
    costs: score lost per layer width (:meth:`ScoreCosts.from_scores`).
    measure: measures candidate networks (:class:`Measure`); every latency is relative to
      the dense network.
    target_speedup: dense latency / pruned latency wanted.
    min_channels: no layer goes below this width.
    step_fraction: channels cut per proposal, as a fraction of the layer's width (at least
      one channel; doubled for a layer while its cut measures no faster).
    start: the widths to start from, and ``start_latency`` their measured latency.

  Returns:
    A :class:`SearchResult`.
  """
  goal = 1.0 / float(target_speedup)
  widths, latency = dict(start), float(start_latency)
  points = {widths_key(widths): (dict(widths), latency)}
  multiplier = {name: 1 for name in widths}
  stopped, crossed = 'target', None
  while latency > goal:
    faster = _propose(costs, measure, widths, latency, multiplier, points, step_fraction,
                      min_channels)
    if faster is None:
      stopped = 'budget'
      break
    if not faster:
      if all(w <= min_channels or _cut(w, step_fraction, multiplier[n] // 2, min_channels)
             == w - min_channels for n, w in widths.items()):
        stopped = 'no faster width'  # Every layer was tried down to min_channels.
        break
      continue  # Larger steps next time.
    reaching = [f for f in faster if f[4] <= goal]
    _, _, name, candidate, latency = (min(reaching, key=lambda f: (f[1], f[0])) if reaching
                                      else min(faster))
    crossed = (name, widths[name])
    widths, multiplier[name] = candidate, 1
  if latency <= goal and crossed is not None:
    _bisect(measure, widths, crossed[0], crossed[1], goal, points)
  chosen, chosen_latency = _choose(costs, points, goal)
  reached = chosen_latency <= goal
  return SearchResult(chosen, chosen_latency, reached, points, 'target' if reached else stopped)
