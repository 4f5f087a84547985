"""Reproduction of the three papers: one command per paper, a report with a verdict per claim.

  python -m pdcnno_jax.reproduce --paper=all --scale=smoke --workdir=workdirs/reproduce

* `grids`: each paper's declared grid of cells (configs/*.py + overrides, seeds an axis);
* `cells`: one cell in its own sub-workdir keyed by a hash of its config (train cells through
  `pdcnno_jax.main`, simulations of the balancers and of the cluster model);
* `results`: results.csv; `stats`: means, 95% t-intervals and the verdict rule;
* `claims`: the 14 claim ids (P1-P6, M1-M4, D1-D4) and the metrics that test them;
* `figures`, `report`: the PNGs and REPORT.md; `runner`: all of it in order.
"""
