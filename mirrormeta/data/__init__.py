"""Episodic data: N-way k-shot q-query tasks from class-split image datasets, and sinusoids.

Typical use::

  from mirrormeta import data
  ds = data.load_dataset('omniglot', '../shared/data/omniglot', 'train')
  sampler = data.EpisodeSampler(ds, n_way=5, shot=1, query=15)
  episode = sampler.sample(jax.random.key(0), batch_size=4)

`load_dataset` decodes a split once and caches it as an uncompressed ``.npz`` of uint8
arrays (``<data_dir>/.mirrormeta_cache`` if writable, else ``~/.cache/mirrormeta``), keyed
by dataset, split, image size, source and the inputs' paths, sizes and mtimes; later runs
load it in well under a second. The cache is written to a temporary file and renamed, so a
failed preparation never leaves a cache file behind.

Every bad input (missing folder or file, wrong layout, corrupt file, impossible task
shape, unknown name) raises `DataError` with one message naming the problem and the fix.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from mirrormeta.data import cifar, cub, imagenet, omniglot
from mirrormeta.data.base import (ClassDataset, DataError, Episode, Plan,
                                  default_cache_dir, fingerprint, load_saved,
                                  require_dir, save_dataset)
from mirrormeta.data.episodes import (EpisodeSampler, SinusoidSampler,
                                      sample_episodes, sample_sinusoids)

__all__ = ['DATASETS', 'ClassDataset', 'DataError', 'Episode', 'EpisodeSampler',
           'SinusoidSampler', 'load_dataset', 'make_sampler', 'sample_episodes',
           'sample_sinusoids']

DATASETS = ('omniglot', 'miniimagenet', 'tieredimagenet', 'cifarfs', 'fc100', 'cub',
            'sinusoid')
SPLITS = ('train', 'val', 'test', 'trainval')


class _Loader(NamedTuple):
  image_size: int
  files_present: Callable[[Path], bool]
  plan_files: Callable[..., Plan]
  tfds_present: Callable[[Path], bool] | None
  plan_tfds: Callable[..., Plan] | None
  hint: str  # What a data_dir should hold.


_LOADERS = types.MappingProxyType({
    'omniglot': _Loader(28, omniglot.files_present, omniglot.plan_files,
                        omniglot.tfds_present, omniglot.plan_tfds,
                        'images_background.zip + images_evaluation.zip, or a prepared '
                        'TFDS omniglot'),
    'miniimagenet': _Loader(84, imagenet.mini_present, imagenet.plan_mini, None, None,
                            'mini-imagenet-cache-{train,val,test}.pkl, or images/*.jpg '
                            '+ {train,val,test}.csv'),
    'tieredimagenet': _Loader(84, imagenet.tiered_present, imagenet.plan_tiered, None,
                              None, '{split}_images_png.pkl (or {split}_images.npz) + '
                              '{split}_labels.pkl'),
    'cifarfs': _Loader(32, cifar.files_present, cifar.plan_files_cifarfs,
                       cifar.tfds_present, cifar.plan_tfds_cifarfs,
                       'cifar-100-python/{train,test,meta}, or a prepared TFDS cifar100'),
    'fc100': _Loader(32, cifar.files_present, cifar.plan_files_fc100, cifar.tfds_present,
                     cifar.plan_tfds_fc100,
                     'cifar-100-python/{train,test,meta}, or a prepared TFDS cifar100'),
    'cub': _Loader(84, cub.files_present, cub.plan_files, cub.tfds_present, cub.plan_tfds,
                   'CUB_200_2011/images/<NNN.Name>/*.jpg, or a prepared TFDS '
                   'caltech_birds2011'),
})


def load_dataset(name: str, data_dir, split: str, *, image_size: int | None = None,
                 cache_dir=None, source: str = 'auto', split_dir=None) -> ClassDataset:
  """Loads one split of a class-organised image dataset (decoding it once, then cached).

  Args:
    name: one of `DATASETS` except ``'sinusoid'``.
    data_dir: folder with the dataset in one of the layouts its module documents
      (`omniglot`, `imagenet`, `cifar`, `cub`), or a TFDS data dir where it is prepared.
    split: ``'train'``, ``'val'``, ``'test'``, or ``'trainval'`` (train + val classes).
    image_size: output height = width; default 28 (omniglot), 32 (cifarfs, fc100),
      84 (miniimagenet, tieredimagenet, cub).
    cache_dir: where decoded splits are cached; default ``<data_dir>/.mirrormeta_cache``
      if writable, else ``~/.cache/mirrormeta``.
    source: ``'files'`` (native layout), ``'tfds'`` (prepared TFDS dataset, read without
      TensorFlow), or ``'auto'`` (files if present in ``data_dir``, else TFDS).
    split_dir: folder with the class-split files (Vinyals .txt, Ravi .csv, CIFAR-FS .txt,
      FC100 .json); default: ``data_dir`` and then ``<repo>/../shared/data``.

  Returns:
    The split as a ClassDataset: uint8 images ``[N, image_size, image_size, C]``, labels
    grouped by class.

  Raises:
    DataError: unknown name/split/source, missing or malformed input (see module doc).
  """
  if name == 'sinusoid':
    raise DataError('sinusoid has no files to load; use data.SinusoidSampler(shot, query) '
                    "or data.make_sampler('sinusoid', ...)")
  if name not in _LOADERS:
    raise DataError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')
  if split not in SPLITS:
    raise DataError(f'{name}: unknown split {split!r}; choose one of {", ".join(SPLITS)}')
  if split == 'trainval':
    kw = dict(image_size=image_size, cache_dir=cache_dir, source=source,
              split_dir=split_dir)
    return _concat(load_dataset(name, data_dir, 'train', **kw),
                   load_dataset(name, data_dir, 'val', **kw), 'trainval')
  loader = _LOADERS[name]
  size = image_size or loader.image_size
  data_dir = require_dir(name, data_dir, loader.hint)
  plan_fn = _choose_source(name, loader, data_dir, source)
  plan = plan_fn(data_dir, split, size, split_dir)
  if not plan.cache:
    return plan.build()
  src = 'tfds' if plan_fn is loader.plan_tfds else 'files'
  cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir(data_dir)
  path = cache / f'{name}-{split}-{size}px-{src}-{fingerprint(plan.inputs)}.npz'
  ds = load_saved(path)
  if ds is None:
    ds = plan.build()
    save_dataset(ds, path)
  return ds


def _choose_source(name: str, loader: _Loader, data_dir: Path, source: str):
  if source not in ('auto', 'files', 'tfds'):
    raise DataError(f"{name}: unknown source {source!r}; use 'auto', 'files' or 'tfds'")
  if source == 'tfds' and loader.plan_tfds is None:
    raise DataError(f"{name}: TFDS has no {name} dataset; use source='files' with "
                    f'{loader.hint}')
  if source == 'files' or loader.plan_tfds is None:
    return loader.plan_files
  if source == 'tfds' or (not loader.files_present(data_dir)
                          and loader.tfds_present(data_dir)):
    return loader.plan_tfds
  return loader.plan_files  # auto with files present, or neither: files explains.


def _concat(a: ClassDataset, b: ClassDataset, split: str) -> ClassDataset:
  return ClassDataset(a.name, split, np.concatenate([a.images, b.images]),
                      np.concatenate([a.labels, b.labels + a.num_classes]),
                      a.num_classes + b.num_classes, a.class_names + b.class_names)


def make_sampler(name: str, data_dir=None, split: str = 'train', n_way: int = 5,
                 shot: int = 1, query: int = 15, **kw):
  """`EpisodeSampler` over `load_dataset(name, data_dir, split, **kw)`, or a
  `SinusoidSampler(shot, query, **kw)` for ``'sinusoid'`` (``data_dir``, ``split`` and
  ``n_way`` are ignored there)."""
  if name == 'sinusoid':
    return SinusoidSampler(shot, query, **kw)
  return EpisodeSampler(load_dataset(name, data_dir, split, **kw), n_way, shot, query)
