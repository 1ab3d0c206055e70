"""miniImageNet and tieredImageNet in the layouts people share.

miniImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 split: 64/16/20 classes x 600
images), ``data_dir`` holding either
  * ``mini-imagenet-cache-{train,val,test}.pkl``: pickled dicts
    ``{'image_data': uint8 [N, 84, 84, 3], 'class_dict': {wnid: [image indices]}}``, or
  * ``images/<filename>.jpg`` and the Ravi CSVs ``{train,val,test}.csv`` (header
    ``filename,label``; ``label`` is the wnid). The CSVs are looked for in ``split_dir``,
    ``data_dir`` and ``<repo>/../shared/data/fewshot_splits/miniimagenet_ravi``.

tieredImageNet (Ren et al. 2018; 351/97/160 classes), ``data_dir`` holding
``{split}_images_png.pkl`` (a list of PNG-encoded images) or ``{split}_images.npz``
(key ``images``: uint8 ``[N, 84, 84, 3]``), and ``{split}_labels.pkl`` (dict with
``label_specific`` int ``[N]``, ``label_general``, ``label_specific_str``: class names
indexed by ``label_specific``).

Images: uint8 ``[N, size, size, 3]`` (LANCZOS resize when the stored size differs).
Classes: miniImageNet sorted by wnid, tieredImageNet in ``label_specific`` order; images
of a class in stored order.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np

from mirrormeta.data.base import (ClassDataset, DataError, Plan, decode_image,
                                  find_split_dir, load_pickle, parallel_map,
                                  require_dir, resize_all, shared_data_root)

MINI = 'miniimagenet'
TIERED = 'tieredimagenet'
_MINI_HINT = ('mini-imagenet-cache-{train,val,test}.pkl, or an images/ folder of .jpg '
              'files with the Ravi & Larochelle {train,val,test}.csv')


def _mini_pickle(data_dir: Path, split: str) -> Path:
  return data_dir / f'mini-imagenet-cache-{split}.pkl'


def mini_present(data_dir: Path) -> bool:
  return _mini_pickle(data_dir, 'train').is_file() or (data_dir / 'images').is_dir()


def plan_mini(data_dir, split: str, size: int, split_dir=None) -> Plan:
  """Plans loading a miniImageNet split from the pickles or the image folder."""
  data_dir = require_dir(MINI, data_dir, _MINI_HINT)
  pkl = _mini_pickle(data_dir, split)
  if pkl.is_file():
    return Plan((pkl,), functools.partial(_build_mini_pickle, pkl, split, size),
                cache=size != 84)
  if not (data_dir / 'images').is_dir():
    raise DataError(f'{MINI}: {data_dir} holds neither {pkl.name} nor an images/ folder; '
                    f'put there {_MINI_HINT} (or pass --config.data_dir=...)')
  sdir = find_split_dir(MINI, (f'{split}.csv',),
                        [data_dir, shared_data_root() / 'fewshot_splits' /
                         'miniimagenet_ravi'], split_dir)
  return Plan((data_dir / 'images', sdir / f'{split}.csv'), functools.partial(
      _build_mini_folder, data_dir / 'images', sdir / f'{split}.csv', split, size))


def _build_mini_pickle(pkl: Path, split: str, size: int) -> ClassDataset:
  obj = load_pickle(pkl, MINI)
  try:
    images, class_dict = np.asarray(obj['image_data']), obj['class_dict']
    names = sorted(class_dict)
    index = np.concatenate([np.asarray(class_dict[n], np.int64) for n in names])
    ids = np.repeat(np.arange(len(names)), [len(class_dict[n]) for n in names])
    ok = images.dtype == np.uint8 and images.ndim == 4 and index.max() < len(images)
  except (KeyError, TypeError, ValueError, IndexError) as e:
    ok, images = False, e
  if not ok:
    raise DataError(f'{MINI}: {pkl} is not a mini-imagenet-cache pickle (a dict with '
                    "'image_data' uint8 [N,84,84,3] and 'class_dict' {wnid: [indices]}); "
                    'download the standard pickles again')
  return ClassDataset(MINI, split, resize_all(images[index], size), ids.astype(np.int32),
                      len(names), tuple(names))


def _build_mini_folder(images_dir: Path, csv_file: Path, split: str,
                       size: int) -> ClassDataset:
  with open(csv_file, newline='') as f:
    rows = list(csv.reader(f))
  if len(rows) < 2 or rows[0] != ['filename', 'label'] or any(len(r) != 2 for r in rows):
    raise DataError(f'{MINI}: {csv_file} is not a Ravi & Larochelle split CSV (header '
                    '"filename,label", one image per row); use the official CSVs')
  rows = rows[1:]
  missing = [fn for fn, _ in rows if not (images_dir / fn).is_file()]
  if missing:
    raise DataError(f'{MINI}: {len(missing)} of the {len(rows)} images listed in '
                    f'{csv_file} are missing from {images_dir} (e.g. {missing[0]}); put '
                    'all miniImageNet images there')
  names = sorted({label for _, label in rows})
  class_id = {n: i for i, n in enumerate(names)}
  ids = [class_id[label] for _, label in rows]
  images = parallel_map(
      lambda fn: decode_image(images_dir / fn, size, what=str(images_dir / fn)),
      [fn for fn, _ in rows])
  return ClassDataset.from_unsorted(MINI, split, images, ids, names)


def tiered_present(data_dir: Path) -> bool:
  return (data_dir / 'train_labels.pkl').is_file()


def plan_tiered(data_dir, split: str, size: int, split_dir=None) -> Plan:
  """Plans loading a tieredImageNet split from the common pickle layout."""
  del split_dir  # The split is defined by the files themselves.
  data_dir = require_dir(TIERED, data_dir, '{split}_images_png.pkl + {split}_labels.pkl')
  labels = data_dir / f'{split}_labels.pkl'
  png, npz = data_dir / f'{split}_images_png.pkl', data_dir / f'{split}_images.npz'
  images = png if png.is_file() else npz
  if not labels.is_file() or not images.is_file():
    lacks = labels.name if not labels.is_file() else png.name
    raise DataError(f'{TIERED}: {data_dir} lacks {lacks}; it must hold {png.name} (or '
                    f'{npz.name}) and {labels.name} from the tieredImageNet release (or '
                    'pass --config.data_dir=...)')
  return Plan((images, labels), functools.partial(_build_tiered, images, labels, split,
                                                  size))


def _build_tiered(images_file: Path, labels_file: Path, split: str,
                  size: int) -> ClassDataset:
  meta = load_pickle(labels_file, TIERED)
  try:
    ids = np.asarray(meta['label_specific'], np.int64)
  except (KeyError, TypeError, ValueError) as e:
    raise DataError(f"{TIERED}: {labels_file} has no 'label_specific' integer array; use "
                    'the tieredImageNet {split}_labels.pkl') from e
  names = meta.get('label_specific_str')
  names = ([n.decode() if isinstance(n, bytes) else str(n) for n in names]
           if names is not None else [str(i) for i in range(ids.max() + 1)])
  if images_file.suffix == '.npz':
    try:
      with np.load(images_file) as z:
        images = resize_all(np.asarray(z['images'], np.uint8), size)
    except (OSError, ValueError, KeyError, EOFError) as e:
      raise DataError(f"{TIERED}: cannot read 'images' from {images_file} ({e}); the "
                      'file is corrupt: download it again') from e
  else:
    encoded = load_pickle(images_file, TIERED)
    images = parallel_map(
        lambda ib: decode_image(ib[1].encode('latin1') if isinstance(ib[1], str)
                                else bytes(ib[1]), size, what=f'#{ib[0]} of {images_file}'),
        enumerate(encoded))
  if len(images) != len(ids):
    raise DataError(f'{TIERED}: {images_file} has {len(images)} images but {labels_file} '
                    f'{len(ids)} labels; use files of the same split and release')
  present = np.unique(ids)  # Keep only classes with images, renumbered in id order.
  return ClassDataset.from_unsorted(TIERED, split, images, np.searchsorted(present, ids),
                                    [names[i] for i in present])
