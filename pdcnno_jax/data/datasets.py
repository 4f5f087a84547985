"""Per-data-set metadata: TFDS names, splits, classes, normalisation, fixes.

Every data set the input pipeline serves is described here once, so that the
loader (`input_pipeline.py`), the offline importer (`idx_import.py`) and the
error messages agree on names, splits and the command that makes a missing data
set available.

Split conventions (the names the trainer sees):

* 'train': the TFDS training split, minus the validation holdout if any.
* 'validation': `validation_holdout` training images held out (PDCNNO holds out
  6,000 SVHN training images); absent when the holdout is 0.
* 'test': the split accuracy is reported on. ImageNet's labelled evaluation
  split is TFDS's 'validation' (its 'test' split has no labels), so ImageNet's
  'test' reads TFDS 'validation'.

References:
  DESIGN.md, "Data flow". Normalisation constants
  are the per-channel mean and standard deviation of each training set (pixel
  values scaled to [0, 1]) as published with the data sets / torchvision.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


class DatasetNotFoundError(FileNotFoundError):
  """A data set is not prepared in `data_dir`; the message gives the fix."""


class DatasetCorruptError(OSError):
  """A prepared data set's record file is truncated or corrupt; the message names the
  file and the command that rebuilds the data set."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static description of one supported data set.

  Attributes:
    name: the name used in `config.data.name` (also the TFDS name).
    num_classes: number of classes of the full data set.
    image_shape: native (H, W, C) of the stored images; None if it varies
      (ImageNet), in which case `config.data.image_size` must be > 0.
    train_split: TFDS split read for 'train' (and the validation holdout).
    test_split: TFDS split read for 'test'.
    mean: per-channel mean of [0, 1]-scaled training pixels; None means the
      loader computes it from the training images it loaded.
    std: per-channel standard deviation, same convention as `mean`.
    paper_validation_holdout: the holdout the papers use (informational; a
      negative `config.data.validation_holdout` selects it).
    idx_files: True if the data set ships as IDX files that
      `python -m pdcnno_jax.data.idx_import` can import offline.
    in_memory: True if the data set fits comfortably in host memory.
    debian_idx_dir: where a Debian package installs the IDX files, if any.
  """

  name: str
  num_classes: int
  image_shape: Optional[tuple[int, int, int]]
  train_split: str = 'train'
  test_split: str = 'test'
  mean: Optional[tuple[float, ...]] = None
  std: Optional[tuple[float, ...]] = None
  paper_validation_holdout: int = 0
  idx_files: bool = False
  in_memory: bool = True
  debian_idx_dir: Optional[str] = None


_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name='mnist',
            num_classes=10,
            image_shape=(28, 28, 1),
            mean=(0.1307,),
            std=(0.3081,),
            idx_files=True,
        ),
        DatasetSpec(
            name='fashion_mnist',
            num_classes=10,
            image_shape=(28, 28, 1),
            mean=(0.2860,),
            std=(0.3530,),
            idx_files=True,
            debian_idx_dir='/usr/share/datasets/fashion-mnist',
        ),
        DatasetSpec(
            name='emnist/digits',
            num_classes=10,
            image_shape=(28, 28, 1),
            # No widely published constants: computed from the training images.
            mean=None,
            std=None,
            idx_files=True,
        ),
        DatasetSpec(
            name='svhn_cropped',
            num_classes=10,
            image_shape=(32, 32, 3),
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
            paper_validation_holdout=6000,
        ),
        DatasetSpec(
            name='imagenet2012',
            num_classes=1000,
            image_shape=None,
            test_split='validation',
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            in_memory=False,
        ),
    )
}

SUPPORTED_DATASETS: tuple[str, ...] = tuple(_SPECS)


def get_spec(name: str) -> DatasetSpec:
  """Returns the spec of data set `name`.

  Args:
    name: a name from `SUPPORTED_DATASETS`.

  Returns:
    The data set's `DatasetSpec`.

  Raises:
    ValueError: `name` is not a supported data set.
  """
  try:
    return _SPECS[name]
  except KeyError:
    raise ValueError(
        f'Unknown data set {name!r}; config.data.name must be one of '
        f'{", ".join(SUPPORTED_DATASETS)}.'
    ) from None


def fix_command(name: str, data_dir: str) -> str:
  """Returns the instructions that make data set `name` available in `data_dir`.

  Args:
    name: a supported data set name.
    data_dir: the TFDS data directory the loader searched.

  Returns:
    A human-readable, copy-pasteable instruction (one or more lines).
  """
  spec = get_spec(name)
  if spec.idx_files:
    src = spec.debian_idx_dir or '<directory with the IDX files>'
    lines = [
        'Import the IDX files offline:',
        f'  python -m pdcnno_jax.data.idx_import --dataset={name} '
        f'--src={src} --data_dir={data_dir}',
    ]
    if spec.debian_idx_dir:
      lines.append(
          f'(Debian/Ubuntu: `apt-get install dataset-fashion-mnist` installs '
          f'the files in {spec.debian_idx_dir}.)'
      )
    lines.append(
        f'or, with network access: tfds build {name} --data_dir={data_dir} '
        '(or --config.data.download=True)'
    )
    return '\n'.join(lines)
  if name == 'imagenet2012':
    return (
        'ImageNet cannot be downloaded automatically. Download '
        'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from '
        'https://image-net.org/ into <manual_dir>, then run:\n'
        f'  tfds build imagenet2012 --data_dir={data_dir} '
        '--manual_dir=<manual_dir>'
    )
  return (f'  tfds build {name} --data_dir={data_dir}\n'
          'or re-run with --config.data.download=True (needs network access).')


def rebuild_command(name: str, data_dir: str, prepared_dir: str) -> str:
  """Returns the instructions that rebuild a corrupt copy of data set `name`.

  Args:
    name: a supported data set name.
    data_dir: the TFDS data directory the loader read.
    prepared_dir: the directory of the prepared copy (`builder.data_dir`).

  Returns:
    A human-readable, copy-pasteable instruction (one or more lines).
  """
  spec = get_spec(name)
  if spec.idx_files:
    src = spec.debian_idx_dir or '<directory with the IDX files>'
    return (
        'Re-import the IDX files:\n'
        f'  python -m pdcnno_jax.data.idx_import --dataset={name} --src={src} '
        f'--data_dir={data_dir} --overwrite\n'
        f'or delete {prepared_dir} and re-run with --config.data.download=True.'
    )
  return f'Delete {prepared_dir}, then prepare it again:\n{fix_command(name, data_dir)}'
