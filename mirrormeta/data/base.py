"""Shared pieces of the data layer: the error type, the class-organised dataset, image
decoding, the on-disk cache and the search for shipped class-split files."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import os
import pickle
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mirrormeta.errors import MirrormetaError

CACHE_FORMAT = 1  # Bump when the cached arrays of any loader change meaning.


class DataError(MirrormetaError):  # A ValueError.
  """Bad data input: the message names the problem and what to do about it."""


@dataclasses.dataclass(frozen=True, eq=False)
class ClassDataset:
  """Images of one split, grouped by class.

  Attributes:
    name: dataset name, e.g. ``'omniglot'``.
    split: ``'train'``, ``'val'``, ``'test'`` or ``'trainval'``.
    images: uint8 ``[num_images, H, W, C]``.
    labels: int32 ``[num_images]``, contiguous class ids ``0..num_classes-1``, sorted
      ascending (all images of class 0 first, then class 1, ...).
    num_classes: number of classes.
    class_names: ``num_classes`` names, ``class_names[c]`` names class ``c``.
  """

  name: str
  split: str
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f'images must be uint8 [N, H, W, C], got {self.images.dtype} '
                       f'{self.images.shape}')
    if self.labels.shape != self.images.shape[:1]:
      raise ValueError(f'labels {self.labels.shape} do not match images '
                       f'{self.images.shape}')
    if len(self.class_names) != self.num_classes:
      raise ValueError(f'{len(self.class_names)} class names for {self.num_classes} '
                       'classes')
    if np.any(np.diff(self.labels) < 0) or np.any(self.class_counts == 0):
      raise ValueError('labels must be grouped: sorted, every class 0..num_classes-1 '
                       'present')

  @property
  def class_counts(self) -> np.ndarray:
    """int64 ``[num_classes]``: number of images of each class."""
    return np.bincount(self.labels, minlength=self.num_classes)

  @property
  def class_offsets(self) -> np.ndarray:
    """int64 ``[num_classes]``: index of the first image of each class."""
    return np.concatenate([[0], np.cumsum(self.class_counts)[:-1]])

  @classmethod
  def from_unsorted(cls, name: str, split: str, images: np.ndarray,
                    class_ids: Sequence[int] | np.ndarray,
                    class_names: Sequence[str]) -> ClassDataset:
    """Groups images by class id (stable: keeps each class's image order).

    Args:
      name: dataset name.
      split: split name.
      images: uint8 ``[N, H, W, C]``.
      class_ids: ``[N]`` ints in ``0..len(class_names)-1``.
      class_names: one name per class id; every class must have an image.
    """
    class_ids = np.asarray(class_ids, np.int32)
    order = np.argsort(class_ids, kind='stable')
    return cls(name, split, np.ascontiguousarray(images[order]), class_ids[order],
               len(class_names), tuple(class_names))


class Episode(NamedTuple):
  """A batch of tasks (a pytree).

  Classification: ``support_x`` float32 ``[B, n_way*shot, H, W, C]`` in [0, 1],
  ``support_y`` int32 ``[B, n_way*shot]`` in ``0..n_way-1``, ``query_x`` float32
  ``[B, n_way*query, H, W, C]``, ``query_y`` int32 ``[B, n_way*query]``. Examples are
  ordered class by class: the ``shot`` support examples of task class 0, then those of
  class 1, ...; the same for the query set. Task class ``j`` is the ``j``-th class of
  the task's randomly drawn class list, so ``support_y == repeat(arange(n_way), shot)``.

  Regression (sinusoid): ``*_x`` and ``*_y`` float32 ``[B, shot, 1]`` / ``[B, query, 1]``.
  """

  support_x: Any
  support_y: Any
  query_x: Any
  query_y: Any


# --- images -----------------------------------------------------------------------------

def decode_image(data: bytes | Path, size: int | None, *, gray: bool = False,
                 invert: bool = False, what: str = '') -> np.ndarray:
  """Decodes an encoded image (bytes or a file path) to uint8 ``[size, size, C]``.

  Args:
    data: encoded PNG/JPEG bytes or the path of an image file.
    size: output height and width (LANCZOS resampling); None keeps the stored size.
    gray: one channel (PIL 'L') if True, else RGB.
    invert: ``255 - pixel`` before resizing (Omniglot stores ink as black).
    what: where the image comes from, for the error message.

  Raises:
    DataError: the image cannot be read or decoded.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
      if size is not None and im.format == 'JPEG':
        im.draft('L' if gray else 'RGB', (size, size))  # DCT downscaling, >= size.
      im = im.convert('L' if gray else 'RGB')
  except (OSError, ValueError, SyntaxError, zlib.error) as e:
    raise DataError(f'cannot decode image {what or data}: {e}; the file is corrupt or '
                    'not an image: replace it with a fresh copy') from e
  if invert:
    im = Image.eval(im, lambda v: 255 - v)
  if size is not None and im.size != (size, size):
    im = im.resize((size, size), Image.Resampling.LANCZOS)
  arr = np.asarray(im, np.uint8)
  return arr[..., None] if gray else arr


def parallel_map(fn: Callable[[Any], np.ndarray], items: Iterable[Any]) -> np.ndarray:
  """``np.stack([fn(x) for x in items])`` on a thread pool (PIL decodes without the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    out = list(pool.map(fn, items))
  return np.stack(out) if out else np.zeros((0, 1, 1, 1), np.uint8)


def resize_all(images: np.ndarray, size: int | None) -> np.ndarray:
  """Resizes uint8 ``[N, H, W, C]`` images to ``[N, size, size, C]`` (LANCZOS)."""
  if size is None or images.shape[1:3] == (size, size):
    return images
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def one(img):
    im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    out = np.asarray(im.resize((size, size), Image.Resampling.LANCZOS), np.uint8)
    return out.reshape(size, size, img.shape[-1])
  return parallel_map(one, images)


# --- files ------------------------------------------------------------------------------

def require_dir(name: str, data_dir: str | os.PathLike | None, hint: str) -> Path:
  """Returns ``data_dir`` as a Path, or raises DataError if it is not a directory."""
  if data_dir is None:
    raise DataError(f'{name}: no data_dir given; pass the folder that holds {hint} '
                    '(--config.data_dir=...)')
  path = Path(data_dir).expanduser()
  if not path.is_dir():
    raise DataError(f'{name}: data directory {path} does not exist; pass the folder '
                    f'that holds {hint} (--config.data_dir=...)')
  return path


def load_pickle(path: Path, name: str) -> Any:
  """Unpickles ``path`` (Python 2 pickles too), raising DataError if it is corrupt."""
  try:
    with open(path, 'rb') as f:
      return pickle.load(f, encoding='latin1')
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
          ImportError, IndexError, KeyError, MemoryError, OSError) as e:
    raise DataError(f'{name}: cannot unpickle {path} ({type(e).__name__}: {e}); the '
                    'file is corrupt or truncated: download it again') from e


def open_zip(path: Path, name: str) -> zipfile.ZipFile:
  """Opens a zip archive, raising DataError if it is corrupt."""
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise DataError(f'{name}: {path} is not a readable zip archive ({e}); download it '
                    'again') from e


def shared_data_root() -> Path:
  """``<repo>/../shared/data``: where the project's shipped split files live."""
  return Path(__file__).resolve().parents[2].parent / 'shared' / 'data'


def find_split_dir(name: str, required: Sequence[str], candidates: Sequence[Path],
                   split_dir: str | os.PathLike | None) -> Path:
  """The first directory holding all ``required`` split files.

  Args:
    name: dataset name, for messages.
    required: file names that must all be present, e.g. ``('train.txt', 'val.txt')``.
    candidates: directories to search, in order (``split_dir`` is tried first).
    split_dir: a user-given directory; if given it must hold the files.

  Raises:
    DataError: no candidate holds all the files.
  """
  if split_dir is not None:
    candidates = [Path(split_dir).expanduser()]
  for d in candidates:
    if all((d / f).is_file() for f in required):
      return d
  raise DataError(f'{name}: class-split files {", ".join(required)} not found in '
                  f'{", ".join(map(str, candidates))}; pass split_dir=<folder with them> '
                  '(the project ships them in ../shared/data)')


# --- cache ------------------------------------------------------------------------------

def default_cache_dir(data_dir: Path) -> Path:
  """``data_dir/.mirrormeta_cache`` if that can be written, else ``~/.cache/mirrormeta``.

  A ``data_dir`` without any write permission bit counts as read-only even for root
  (who passes ``os.access``): shared, write-protected data folders stay untouched.
  """
  local = data_dir / '.mirrormeta_cache'
  if local.is_dir():
    writable = os.access(local, os.W_OK)
  else:
    writable = bool(data_dir.stat().st_mode & 0o222) and os.access(data_dir, os.W_OK)
  return local if writable else Path.home() / '.cache' / 'mirrormeta'


def fingerprint(inputs: Iterable[Path]) -> str:
  """A short hash of the cache format and the input files' paths, sizes and mtimes."""
  h = hashlib.sha256(f'mirrormeta-cache-v{CACHE_FORMAT};'.encode())
  for p in inputs:
    st = p.stat()
    h.update(f'{p.resolve()}|{st.st_size}|{st.st_mtime_ns};'.encode())
  return h.hexdigest()[:16]


def save_dataset(ds: ClassDataset, path: Path) -> None:
  """Writes ``ds`` to ``path`` (.npz) atomically: a temporary file, then os.replace."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, images=ds.images, labels=ds.labels,
               class_names=np.asarray(ds.class_names, dtype=str),
               name=np.asarray(ds.name), split=np.asarray(ds.split))
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is as readable as its data.
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def load_saved(path: Path) -> ClassDataset | None:
  """Reads a dataset written by `save_dataset`; None if missing or unreadable."""
  try:
    with np.load(path, allow_pickle=False) as z:
      names = tuple(str(s) for s in z['class_names'])
      return ClassDataset(str(z['name']), str(z['split']), z['images'], z['labels'],
                          len(names), names)
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
    return None  # A damaged cache is rebuilt, not trusted.


class Plan(NamedTuple):
  """How a loader will build a split: checked inputs first, the slow work deferred.

  Attributes:
    inputs: files and folders the result depends on; their paths, sizes and mtimes key
      the cache.
    build: decodes the inputs into a ClassDataset.
    cache: whether the result is worth caching (False when the inputs are already
      arrays of the requested size, e.g. the miniImageNet pickles at 84x84).
  """

  inputs: tuple[Path, ...]
  build: Callable[[], ClassDataset]
  cache: bool = True
