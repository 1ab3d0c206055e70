"""CUB-200-2011 (Wah et al. 2011) with the 100/50/50 class split.

Inputs, either:
  * files: the original release, ``<data_dir>/CUB_200_2011/images/<NNN.Name>/*.jpg``
    (or ``data_dir`` being ``CUB_200_2011`` itself); the class id is the ``NNN`` prefix of
    the folder name (``classes.txt`` lists the same names and is not needed); or
  * tfds: a prepared TFDS ``caltech_birds2011`` (its ``train`` and ``test`` splits pooled;
    class id = ``label + 1``, name ``f'{id:03d}.{label_name}'``).

Class split convention: classes sorted by id; the first half are ``train``, the next
quarter ``val``, the rest ``test`` -- for the 200 classes of the release, ids 1-100 /
101-150 / 151-200 (the 100/50/50 split of Hilliard et al. 2018 and Chen et al. 2019 by
count; note that Chen et al.'s code assigns classes by id modulo 4 instead).

Images: uint8 ``[N, size, size, 3]``, the whole image resized (LANCZOS, aspect ratio not
kept); images of a class in file-name (files) or shard (tfds) order. Classes hold
different numbers of images (41-60).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mirrormeta.data import tfds_io
from mirrormeta.data.base import (ClassDataset, DataError, Plan, decode_image,
                                  parallel_map, require_dir)

NAME = 'cub'
_URL = 'https://www.vision.caltech.edu/datasets/cub_200_2011/'
_CLASS_RE = re.compile(r'^(\d+)\.(.+)$')
_EXTS = ('.jpg', '.jpeg', '.png')


def _images_dir(data_dir: Path) -> Path:
  sub = data_dir / 'CUB_200_2011' / 'images'
  return sub if sub.is_dir() else data_dir / 'images'


def files_present(data_dir: Path) -> bool:
  return _images_dir(data_dir).is_dir()


def tfds_present(data_dir: Path) -> bool:
  return tfds_io.is_prepared(data_dir, 'caltech_birds2011')


def split_class_ids(ids, split: str) -> list[int]:
  """The class ids of ``split``: sorted ids cut into first 1/2, next 1/4, last 1/4."""
  ids = sorted(ids)
  n_train, n_val = len(ids) // 2, len(ids) // 4
  return {'train': ids[:n_train], 'val': ids[n_train:n_train + n_val],
          'test': ids[n_train + n_val:]}[split]


def plan_files(data_dir, split: str, size: int, split_dir=None) -> Plan:
  """Plans loading a CUB split from the original ``CUB_200_2011/images`` folder."""
  del split_dir  # The split is a rule over class ids.
  data_dir = require_dir(NAME, data_dir, 'CUB_200_2011/images/<NNN.Name>/*.jpg')
  images_dir = _images_dir(data_dir)
  if not images_dir.is_dir():
    raise DataError(f'{NAME}: no CUB_200_2011/images folder in {data_dir}; extract '
                    f'CUB_200_2011.tgz from {_URL} there or pass --config.data_dir=...')
  folders = {}
  for d in sorted(p for p in images_dir.iterdir() if p.is_dir()):
    m = _CLASS_RE.match(d.name)
    if not m:
      raise DataError(f'{NAME}: class folder {d} is not named NNN.Name (e.g. '
                      '001.Black_footed_Albatross); use the original CUB_200_2011 layout')
    folders[int(m[1])] = d
  if not folders:
    raise DataError(f'{NAME}: {images_dir} has no class folders NNN.Name; use the '
                    'original CUB_200_2011 layout')
  chosen = [folders[i] for i in split_class_ids(folders, split)]

  def build():
    files = [sorted(f for f in d.iterdir() if f.suffix.lower() in _EXTS) for d in chosen]
    empty = [d for d, fs in zip(chosen, files) if not fs]
    if empty:
      raise DataError(f'{NAME}: class folder {empty[0]} has no images; restore it from '
                      'CUB_200_2011.tgz')
    images = parallel_map(lambda f: decode_image(f, size, what=str(f)),
                          [f for fs in files for f in fs])
    labels = np.repeat(np.arange(len(chosen), dtype=np.int32), [len(fs) for fs in files])
    return ClassDataset(NAME, split, images, labels, len(chosen),
                        tuple(d.name for d in chosen))
  return Plan((images_dir, *chosen), build)


def plan_tfds(data_dir, split: str, size: int, split_dir=None) -> Plan:
  """Plans loading a CUB split from a prepared TFDS ``caltech_birds2011``."""
  del split_dir
  data_dir = require_dir(NAME, data_dir, 'a prepared TFDS caltech_birds2011')
  info, files = tfds_io.prepared_split_files(NAME, 'caltech_birds2011', data_dir,
                                             ('train', 'test'))

  def build():
    cols = tfds_io.read_examples(NAME, info, files, {
        'image': 'bytes', 'label': 'int', 'label_name': 'str'})
    labels = np.asarray(cols['label']) + 1
    chosen = split_class_ids(np.unique(labels).tolist(), split)
    keep = np.flatnonzero(np.isin(labels, chosen))
    names = {i: n for i, n in zip(labels[keep], np.asarray(cols['label_name'])[keep])}
    images = parallel_map(
        lambda i: decode_image(cols['image'][i], size, what=f'TFDS cub example #{i}'),
        keep)
    return ClassDataset.from_unsorted(NAME, split, images,
                                      np.searchsorted(chosen, labels[keep]),
                                      [f'{i:03d}.{names[i]}' for i in chosen])
  return Plan(tuple(files), build)
