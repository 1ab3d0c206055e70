"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018) from CIFAR-100.

Inputs, either:
  * files: the CIFAR-100 python version, ``<data_dir>/cifar-100-python/{train,test,meta}``
    (or those three files in ``data_dir`` itself): pickles with ``data`` uint8
    ``[N, 3072]`` (channel-major 3x32x32), ``fine_labels``, ``coarse_labels``; ``meta``
    has ``fine_label_names`` and ``coarse_label_names``; or
  * tfds: a prepared TFDS ``cifar100`` (its ``train`` and ``test`` splits).

The train and test images of each class are pooled (600 per class) and split by class:
CIFAR-FS by fine-label names in ``{train,val,test}.txt`` (64/16/20 classes), FC100 by
superclass (coarse-label) names in ``{train,val,test}.json`` (12/4/4 superclasses = 60/20/20
fine classes). Split files are looked for in ``split_dir``, ``data_dir`` and
``<repo>/../shared/data/fewshot_splits/{cifar-fs_bertinetto,fc100_oreshkin}``.

Images: uint8 ``[N, size, size, 3]``; classes sorted by fine-label name.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from mirrormeta.data import tfds_io
from mirrormeta.data.base import (ClassDataset, DataError, Plan, decode_image,
                                  find_split_dir, load_pickle, parallel_map,
                                  require_dir, resize_all, shared_data_root)

_FILES = ('train', 'test', 'meta')
_HINT = 'cifar-100-python/{train,test,meta}'
_URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'


def _python_dir(data_dir: Path) -> Path:
  sub = data_dir / 'cifar-100-python'
  return sub if sub.is_dir() else data_dir


def files_present(data_dir: Path) -> bool:
  return all((_python_dir(data_dir) / f).is_file() for f in _FILES)


def tfds_present(data_dir: Path) -> bool:
  return tfds_io.is_prepared(data_dir, 'cifar100')


def _split_spec(name: str, data_dir: Path, split: str, split_dir) -> tuple[Path, bool]:
  """``(split file, by_superclass)`` for CIFAR-FS (.txt, fine) or FC100 (.json, coarse)."""
  folder, ext = {'cifarfs': ('cifar-fs_bertinetto', 'txt'),
                 'fc100': ('fc100_oreshkin', 'json')}[name]
  sdir = find_split_dir(name, (f'{split}.{ext}',),
                        [data_dir, shared_data_root() / 'fewshot_splits' / folder],
                        split_dir)
  return sdir / f'{split}.{ext}', name == 'fc100'


def _plan_files(name: str, data_dir, split: str, size: int, split_dir=None) -> Plan:
  data_dir = require_dir(name, data_dir, _HINT)
  py = _python_dir(data_dir)
  missing = [f for f in _FILES if not (py / f).is_file()]
  if missing:
    raise DataError(f'{name}: no CIFAR-100 python file {missing[0]!r} in {py}; extract '
                    f'{_URL} into {data_dir} (giving {_HINT}) or pass '
                    '--config.data_dir=...')
  split_file, coarse = _split_spec(name, data_dir, split, split_dir)

  def build():
    meta = _unbytes(load_pickle(py / 'meta', name))
    parts = [_unbytes(load_pickle(py / f, name)) for f in ('train', 'test')]
    try:
      data = np.concatenate([np.asarray(p['data'], np.uint8) for p in parts])
      images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
      fine = np.concatenate([p['fine_labels'] for p in parts])
      coarse_ids = np.concatenate([p['coarse_labels'] for p in parts])
      fine_names, coarse_names = meta['fine_label_names'], meta['coarse_label_names']
    except (KeyError, ValueError, TypeError) as e:
      raise DataError(f'{name}: {py} does not hold the CIFAR-100 python pickles '
                      f"(data, fine_labels, coarse_labels; meta: *_label_names): {e!r}; "
                      f'extract {_URL} again') from e
    return _select(name, split, split_file, coarse, resize_all(images, size), fine,
                   coarse_ids, fine_names, coarse_names)
  return Plan((*(py / f for f in _FILES), split_file), build, cache=size != 32)


def _plan_tfds(name: str, data_dir, split: str, size: int, split_dir=None) -> Plan:
  data_dir = require_dir(name, data_dir, 'a prepared TFDS cifar100')
  info, files = tfds_io.prepared_split_files(name, 'cifar100', data_dir, ('train', 'test'))
  split_file, coarse = _split_spec(name, data_dir, split, split_dir)

  def build():
    cols = tfds_io.read_examples(name, info, files, {
        'image': 'bytes', 'label': 'int', 'coarse_label': 'int'})
    images = parallel_map(
        lambda b: decode_image(b, size, what=f'TFDS cifar100 in {data_dir}'),
        cols['image'])
    return _select(name, split, split_file, coarse, images, np.asarray(cols['label']),
                   np.asarray(cols['coarse_label']), info.features['label'].names,
                   info.features['coarse_label'].names)
  return Plan((*files, split_file), build)


def _select(name, split, split_file, by_coarse, images, fine, coarse, fine_names,
            coarse_names) -> ClassDataset:
  """Keeps the classes (or superclasses) the split file lists."""
  text = split_file.read_text()
  try:
    wanted = json.loads(text) if split_file.suffix == '.json' else text.split()
  except json.JSONDecodeError as e:
    raise DataError(f'{name}: {split_file} is not a JSON list of superclass names; use '
                    'the shipped FC100 split files') from e
  known = coarse_names if by_coarse else fine_names
  unknown = sorted(set(wanted) - set(known))
  if unknown or not wanted:
    raise DataError(f'{name}: {split_file} names {len(unknown)} classes that are not '
                    f'CIFAR-100 {"superclasses" if by_coarse else "classes"} (e.g. '
                    f'{(unknown or ["<empty file>"])[0]!r}); pass the {name} split files')
  ids = coarse if by_coarse else fine
  keep_ids = [known.index(w) for w in wanted]
  mask = np.isin(ids, keep_ids)
  classes = sorted({fine_names[i] for i in np.unique(fine[mask])})
  index = {n: i for i, n in enumerate(classes)}
  return ClassDataset.from_unsorted(name, split, images[mask],
                                    [index[fine_names[i]] for i in fine[mask]], classes)


def _unbytes(obj):
  """CIFAR pickles (encoding latin1) may have bytes keys/names; make them str."""
  if isinstance(obj, dict):
    return {_unbytes(k): _unbytes(v) for k, v in obj.items()}
  if isinstance(obj, list) and obj and isinstance(obj[0], bytes):
    return [b.decode() for b in obj]
  return obj.decode() if isinstance(obj, bytes) else obj


plan_files_cifarfs = functools.partial(_plan_files, 'cifarfs')
plan_files_fc100 = functools.partial(_plan_files, 'fc100')
plan_tfds_cifarfs = functools.partial(_plan_tfds, 'cifarfs')
plan_tfds_fc100 = functools.partial(_plan_tfds, 'fc100')
