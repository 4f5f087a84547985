"""python -m pdcnno_jax.reproduce --paper=pdcnno|mr_fpdcnn|delay_sync|all --scale=smoke|full
    --workdir=DIR [--tfds_data_dir=data/tfds] [--methods=a,b] [--only_claims=P1,D1]
    [--max_seeds=N]

Writes DIR/results.csv, DIR/*.png and DIR/REPORT.md; rerunning skips the completed cells, so
a long run goes in pieces (`--only_claims=P1,P2`, then the next claims, ...): the last
command without a filter finds every cell complete and reports on all claims. Before it
starts it prints the number of cells and the estimated time of the rest.
The flags are defined only when this module runs as the program, so importing it (the package
import test does) does not clash with `pdcnno_jax.main`'s ``--workdir``.
"""

from absl import app
from absl import flags

from pdcnno_jax.reproduce import grids
from pdcnno_jax.reproduce import runner


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (absl), by name."""
  found = dict(
      paper=flags.DEFINE_enum('paper', 'all', list(grids.PAPERS) + ['all'],
                              'Paper to reproduce.'),
      scale=flags.DEFINE_enum('scale', 'smoke', list(grids.SCALES),
                              'smoke: minutes; full: hours.'),
      workdir=flags.DEFINE_string('workdir', None,
                                  'Output directory (cells/, results.csv, ...).'),
      data_dir=flags.DEFINE_string('tfds_data_dir', 'data/tfds',
                                   'TFDS data_dir of the full scale (smoke generates its own).'),
      methods=flags.DEFINE_list('methods', [], 'Only the cells of these methods (default: all).'),
      claims=flags.DEFINE_list('only_claims', [], 'Only the cells of these claim ids, e.g. '
                               'P1,D1 (default: all); a run in pieces, one command each.'),
      max_seeds=flags.DEFINE_integer('max_seeds', 0, 'Only seeds below this (0: all).'),
      timeout=flags.DEFINE_float('cell_timeout_s', 3600.0, 'Wall-clock limit of one cell.'),
  )
  flags.mark_flag_as_required('workdir')
  return found


def main(argv, values) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = values['workdir'].value
  out = runner.run(values['paper'].value, values['scale'].value, workdir,
                   data_dir=values['data_dir'].value, methods=values['methods'].value,
                   max_seeds=values['max_seeds'].value, claims=values['claims'].value,
                   timeout_s=values['timeout'].value)
  print(f'cells: {out["run"]} run, {out["skipped"]} skipped (complete), {out["shared"]} shared '
        f'between papers, {out["failed"]} failed; '
        f'{out["wall_s"]:.0f} s')
  for claim, verdict in out['verdicts'].items():
    print(f'{claim}: {verdict}')
  print(f'report: {workdir}/REPORT.md')


if __name__ == '__main__':
  _VALUES = define_flags()
  app.run(lambda argv: main(argv, _VALUES))
