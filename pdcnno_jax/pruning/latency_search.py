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

The best of many noisy measurements is biased low (the winner's curse: the point chosen is
often the one measured at a lucky moment), so the chosen point is measured again (a
:class:`Confirm`), its latency becomes that confirmation, and the choice is made again until
it falls on a confirmed point.

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


class Confirm(Protocol):
  """``confirm(widths)``: the network's latency measured afresh (None: budget spent)."""

  def __call__(self, widths: Widths) -> float | None:
    ...


@dataclasses.dataclass
class SearchResult:
  """Where a search ended.

  Attributes:
    widths: the chosen widths.
    latency: their measured latency (dense = 1).
    reached: whether that latency reaches the target.
    points: every point the search measured or looked up: widths key -> (widths, latency).
    stopped: why the search stopped: ``'target'``, ``'budget'``, ``'no faster width'`` or
      ``'confirmation'`` (every point that reached the target missed it, measured again).
    confirmed: widths keys of the points measured again by the :class:`Confirm`.
  """

  widths: Widths
  latency: float
  reached: bool
  points: Points
  stopped: str
  confirmed: tuple[str, ...] = ()


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


def _confirmed_choice(costs: ScoreCosts, points: Points, goal: float,
                      confirm: Confirm | None, rounds: int,
                      confirmed: list[str]) -> tuple[Widths, float]:
  """:func:`_choose`, its winner measured again (its latency replaced by the confirmation)
  and the choice made again, until it falls on a point in ``confirmed`` (which grows; at
  most ``rounds`` confirmations)."""
  for _ in range(rounds if confirm is not None else 0):
    widths, _ = _choose(costs, points, goal)
    key = widths_key(widths)
    if key in confirmed:
      break
    latency = confirm(widths)
    if latency is None:
      break
    points[key] = (widths, float(latency))
    confirmed.append(key)
  return _choose(costs, points, goal)


def _descend(costs: ScoreCosts, measure: Measure, widths: Widths, latency: float,
             points: Points, goal: float, step_fraction: float, min_channels: int) -> str:
  """Greedy steps from ``widths`` (measured ``latency``) until a measured point reaches
  ``goal``, then the cut that crossed it bisected; adds every measured point to ``points``.
  Returns why it stopped: ``'target'``, ``'budget'`` or ``'no faster width'``."""
  multiplier = {name: 1 for name in widths}
  crossed = None
  while latency > goal:
    faster = _propose(costs, measure, widths, latency, multiplier, points, step_fraction,
                      min_channels)
    if faster is None:
      return 'budget'
    if not faster:
      if all(w <= min_channels or _cut(w, step_fraction, multiplier[n] // 2, min_channels)
             == w - min_channels for n, w in widths.items()):
        return 'no faster width'  # Every layer was tried down to min_channels.
      continue  # Larger steps next time.
    reaching = [f for f in faster if f[4] <= goal]
    _, _, name, candidate, latency = (min(reaching, key=lambda f: (f[1], f[0])) if reaching
                                      else min(faster))
    crossed = (name, widths[name])
    widths, multiplier[name] = candidate, 1
  if crossed is not None:
    _bisect(measure, widths, crossed[0], crossed[1], goal, points)
  return 'target'


def greedy_search(costs: ScoreCosts, measure: Measure, *, target_speedup: float,
                  min_channels: int, step_fraction: float, start: Mapping[str, int],
                  start_latency: float, confirm: Confirm | None = None,
                  confirm_rounds: int = 4) -> SearchResult:
  """NetAdapt-style greedy removal from ``start`` until the measured speed-up is reached.

  When the confirmed choice misses the target, the search resumes from it (at most
  ``confirm_rounds`` times).

  Args:
    costs: score lost per layer width (:meth:`ScoreCosts.from_scores`).
    measure: measures candidate networks (:class:`Measure`); every latency is relative to
      the dense network.
    target_speedup: dense latency / pruned latency wanted.
    min_channels: no layer goes below this width.
    step_fraction: channels cut per proposal, as a fraction of the layer's width (at least
      one channel; doubled for a layer while its cut measures no faster).
    start: the widths to start from, and ``start_latency`` their measured latency.
    confirm: measures a chosen point afresh (None: the search's measurements stand).
    confirm_rounds: confirmations per choice, and resumptions, at most.

  Returns:
    A :class:`SearchResult`.
  """
  goal = 1.0 / float(target_speedup)
  widths, latency = dict(start), float(start_latency)
  points = {widths_key(widths): (dict(widths), latency)}
  confirmed: list[str] = []
  for _ in range(max(1, confirm_rounds + 1 if confirm is not None else 1)):
    stopped = _descend(costs, measure, widths, latency, points, goal, step_fraction,
                       min_channels)
    widths, latency = _confirmed_choice(costs, points, goal, confirm, confirm_rounds,
                                        confirmed)
    if latency <= goal or stopped != 'target':
      break
    stopped = 'confirmation'  # The point that reached the target did not, measured again.
  reached = latency <= goal
  return SearchResult(widths, latency, reached, points, 'target' if reached else stopped,
                      tuple(confirmed))
