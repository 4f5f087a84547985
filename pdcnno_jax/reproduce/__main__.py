"""python -m pdcnno_jax.reproduce --paper=pdcnno|mr_fpdcnn|delay_sync|all --scale=smoke|full
    --workdir=DIR [--tfds_data_dir=data/tfds] [--methods=a,b] [--max_seeds=N]

Writes DIR/results.csv, DIR/*.png and DIR/REPORT.md; rerunning skips the completed cells.
"""

from absl import app
from absl import flags

from pdcnno_jax.reproduce import grids
from pdcnno_jax.reproduce import runner

_PAPER = flags.DEFINE_enum('paper', 'all', list(grids.PAPERS) + ['all'], 'Paper to reproduce.')
_SCALE = flags.DEFINE_enum('scale', 'smoke', list(grids.SCALES), 'smoke: minutes; full: hours.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory (cells/, results.csv, ...).')
_DATA_DIR = flags.DEFINE_string('tfds_data_dir', 'data/tfds',
                                 'TFDS data_dir of the full scale (smoke generates its own).')
_METHODS = flags.DEFINE_list('methods', [], 'Only the cells of these methods (default: all).')
_MAX_SEEDS = flags.DEFINE_integer('max_seeds', 0, 'Only seeds below this (0: all).')
_TIMEOUT = flags.DEFINE_float('cell_timeout_s', 3600.0, 'Wall-clock limit of one cell.')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  out = runner.run(_PAPER.value, _SCALE.value, _WORKDIR.value, data_dir=_DATA_DIR.value,
                   methods=_METHODS.value, max_seeds=_MAX_SEEDS.value, timeout_s=_TIMEOUT.value)
  print(f'cells: {out["run"]} run, {out["skipped"]} skipped (complete), {out["failed"]} failed; '
        f'{out["wall_s"]:.0f} s')
  for claim, verdict in out['verdicts'].items():
    print(f'{claim}: {verdict}')
  print(f'report: {_WORKDIR.value}/REPORT.md')


if __name__ == '__main__':
  app.run(main)
