"""Omniglot (Lake et al. 2015) with the Vinyals et al. (2016) split.

Inputs, either:
  * files: ``images_background.zip`` and ``images_evaluation.zip`` as downloaded from
    https://github.com/brendenlake/omniglot (``images_background/<Alphabet>/characterNN/
    XXXX_YY.png``, 105x105 1-bit PNGs; the extracted ``images_background/`` and
    ``images_evaluation/`` folders work too), or
  * tfds: a prepared TFDS ``omniglot`` dataset (its ``train`` and ``test`` splits).

The split files ``{train,val,test}.txt`` list one class per line as
``Alphabet/characterNN/rotDDD``: a character rotated counter-clockwise by DDD degrees
(as PIL's ``Image.rotate`` and ``np.rot90``) is a class of its own: 1028/172/423
characters x 4 rotations = 4112/688/1692 classes of 20 drawings. They are looked for in
``split_dir``, ``<data_dir>/splits/vinyals`` and ``<repo>/../shared/data/omniglot/splits/
vinyals``.

Images: uint8 ``[N, size, size, 1]``, ink = 255 (the PNGs store ink as black), resized
from 105x105 with LANCZOS. Classes are in split-file order; drawings in file-name order
(files) or shard order (tfds).
"""

from __future__ import annotations

import functools
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from mirrormeta.data import tfds_io
from mirrormeta.data.base import (ClassDataset, DataError, Plan, decode_image,
                                  find_split_dir, open_zip, parallel_map, require_dir,
                                  shared_data_root)

NAME = 'omniglot'
URL = 'https://github.com/brendenlake/omniglot/tree/master/python'
SETS = ('images_background', 'images_evaluation')
_CLASS_RE = re.compile(r'^([^/]+/character\d+)/rot(\d{3})$')


def _split_file(data_dir: Path, split: str, split_dir) -> Path:
  sdir = find_split_dir(NAME, (f'{split}.txt',),
                        [data_dir / 'splits' / 'vinyals',
                         shared_data_root() / 'omniglot' / 'splits' / 'vinyals'],
                        split_dir)
  return sdir / f'{split}.txt'


def _read_classes(split_file: Path) -> list[tuple[str, str, int]]:
  """``[(class_name, 'Alphabet/characterNN', quarter_turns)]`` from a split file."""
  out = []
  for line in split_file.read_text().split():
    m = _CLASS_RE.match(line)
    if not m or int(m[2]) % 90:
      raise DataError(f'{NAME}: line {line!r} of {split_file} is not '
                      '"Alphabet/characterNN/rotDDD" with DDD in 000/090/180/270; pass a '
                      'Vinyals split file')
    out.append((line, m[1], int(m[2]) // 90 % 4))
  return out


def plan_files(data_dir, split: str, size: int, split_dir=None) -> Plan:
  """Plans loading ``split`` from the official zips (or their extracted folders)."""
  data_dir = require_dir(NAME, data_dir, 'images_background.zip and images_evaluation.zip')
  sources = []
  for s in SETS:
    if (data_dir / f'{s}.zip').is_file():
      sources.append(data_dir / f'{s}.zip')
    elif (data_dir / s).is_dir():
      sources.append(data_dir / s)
    else:
      raise DataError(f'{NAME}: no {s}.zip in {data_dir}; download it from {URL} into '
                      'that folder or pass --config.data_dir=<folder with the zips>')
  split_file = _split_file(data_dir, split, split_dir)
  return Plan((*sources, split_file),
              functools.partial(_build_from_files, sources, split_file, split, size))


def files_present(data_dir: Path) -> bool:
  return all((data_dir / f'{s}.zip').is_file() or (data_dir / s).is_dir() for s in SETS)


def _build_from_files(sources: list[Path], split_file: Path, split: str,
                      size: int) -> ClassDataset:
  classes = _read_classes(split_file)
  wanted = {c for _, c, _ in classes}
  drawings: dict[str, list[tuple[str, bytes]]] = {}
  for src in sources:
    if src.is_dir():
      for p in sorted(src.glob('*/character*/*.png')):
        char = f'{p.parent.parent.name}/{p.parent.name}'
        if char in wanted:
          drawings.setdefault(char, []).append((str(p), p.read_bytes()))
      continue
    with open_zip(src, NAME) as z:
      for member in sorted(z.namelist()):
        parts = member.split('/')
        char = '/'.join(parts[-3:-1])
        if len(parts) < 3 or not member.endswith('.png') or char not in wanted:
          continue
        try:
          data = z.read(member)
        except (zipfile.BadZipFile, zlib.error, OSError) as e:
          raise DataError(f'{NAME}: {src} is corrupt at {member} ({e}); download it '
                          'again') from e
        drawings.setdefault(char, []).append((f'{src}:{member}', data))
  return _assemble(classes, drawings, split, size,
                   f'{" / ".join(map(str, sources))} (expected the official layout '
                   '<set>/<Alphabet>/characterNN/XXXX_YY.png)')


def tfds_present(data_dir: Path) -> bool:
  return tfds_io.is_prepared(data_dir, 'omniglot')


def plan_tfds(data_dir, split: str, size: int, split_dir=None) -> Plan:
  """Plans loading ``split`` from a prepared TFDS ``omniglot`` (its train + test)."""
  data_dir = require_dir(NAME, data_dir, 'a prepared TFDS omniglot dataset')
  info, files = tfds_io.prepared_split_files(NAME, 'omniglot', data_dir, ('train', 'test'))
  split_file = _split_file(data_dir, split, split_dir)

  def build():
    cols = tfds_io.read_examples(NAME, info, files, {
        'image': 'bytes', 'alphabet': 'int', 'alphabet_char_id': 'int'})
    alphabets = info.features['alphabet'].names
    drawings = {}
    for img, a, c in zip(cols['image'], cols['alphabet'], cols['alphabet_char_id']):
      drawings.setdefault(f'{alphabets[a]}/character{c + 1:02d}', []).append(
          (f'TFDS omniglot in {data_dir}', img))
    return _assemble(_read_classes(split_file), drawings, split, size,
                     f'the TFDS omniglot dataset in {data_dir}')
  return Plan((*files, split_file), build)


def _assemble(classes, drawings, split, size, where) -> ClassDataset:
  """Decodes each needed character once, then builds one class per (char, rotation)."""
  missing = sorted({c for _, c, _ in classes} - set(drawings))
  if missing:
    raise DataError(f'{NAME}: {len(missing)} characters of the {split} split (e.g. '
                    f'{missing[0]}) are missing from {where}; use the complete official '
                    'images_background.zip and images_evaluation.zip')
  chars = sorted({c for _, c, _ in classes})
  flat = [(w, b) for c in chars for w, b in drawings[c]]
  decoded = parallel_map(
      lambda wb: decode_image(wb[1], size, gray=True, invert=True, what=wb[0]), flat)
  start = np.cumsum([0] + [len(drawings[c]) for c in chars])
  per_char = {c: decoded[start[i]:start[i + 1]] for i, c in enumerate(chars)}
  images = np.concatenate([np.rot90(per_char[c], k, axes=(1, 2)) for _, c, k in classes])
  labels = np.repeat(np.arange(len(classes), dtype=np.int32),
                     [len(per_char[c]) for _, c, _ in classes])
  return ClassDataset(NAME, split, np.ascontiguousarray(images), labels, len(classes),
                      tuple(name for name, _, _ in classes))
