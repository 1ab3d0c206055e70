"""Reading datasets that TFDS has already prepared, without TensorFlow.

tensorflow-datasets installs without TensorFlow, but its readers (``tfds.load``,
``as_dataset``) need it, and preparing a dataset does too. A prepared dataset is only
shard files of serialized ``tf.train.Example`` protos plus ``dataset_info.json``, so this
module reads the shards directly: ArrayRecord shards with the ``array_record`` package,
TFRecord shards by their framing (uint64 length, uint32 CRC, payload, uint32 CRC; the
CRCs are not checked), and the protos with TFDS's own ``tf_example_pb2``. Images come
back still encoded; the caller decodes only the fields it needs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mirrormeta.data.base import DataError


def is_prepared(data_dir: Path, tfds_name: str) -> bool:
  """Whether ``data_dir/<tfds_name>/[<config>/]<version>/dataset_info.json`` exists."""
  root = data_dir / tfds_name
  return any(root.glob('*/dataset_info.json')) or any(root.glob('*/*/dataset_info.json'))


def prepared_split_files(name: str, tfds_name: str, data_dir: Path,
                         splits: tuple[str, ...]) -> tuple[Any, list[Path]]:
  """Finds the shard files of prepared TFDS splits.

  Args:
    name: mirrormeta dataset name, for messages.
    tfds_name: TFDS builder name, e.g. ``'omniglot'``.
    data_dir: the TFDS data directory (``tfds.builder(..., data_dir=...)``).
    splits: TFDS split names to read.

  Returns:
    ``(info, files)``: the builder's ``tfds.core.DatasetInfo`` and, per split in order,
    its shard paths (plus ``dataset_info.json`` last, for cache fingerprints).

  Raises:
    DataError: TFDS is not installed or the dataset is not prepared in ``data_dir``.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f'{name}: source="tfds" needs tensorflow-datasets: pip install '
                    'tensorflow-datasets, or use the files layout') from e
  builder = tfds.builder(tfds_name, data_dir=str(data_dir))
  if not builder.is_prepared():
    raise DataError(
        f'{name}: TFDS dataset {tfds_name!r} is not prepared in {data_dir}; prepare it '
        f'once where TensorFlow is installed (pip install tensorflow; tfds build '
        f'{tfds_name} --data_dir={data_dir}) or use the files layout')
  info = builder.info
  files = []
  for split in splits:
    if split not in info.splits:
      raise DataError(f'{name}: prepared TFDS dataset {tfds_name!r} in {data_dir} has no '
                      f'split {split!r} (has {list(info.splits)}); prepare it again')
    files += [Path(p) for p in info.splits[split].filepaths]
  missing = [p for p in files if not p.is_file()]
  if missing:
    raise DataError(f'{name}: TFDS shard {missing[0]} is missing; prepare '
                    f'{tfds_name!r} again')
  return info, files + [Path(builder.data_dir) / 'dataset_info.json']


def read_examples(name: str, info: Any, files: list[Path],
                  fields: Mapping[str, str]) -> dict[str, list[Any]]:
  """Reads fields of every example in the shard ``files``.

  Args:
    name: dataset name, for messages.
    info: the ``DatasetInfo`` from `prepared_split_files` (gives the file format).
    files: shard paths (non-shard files, e.g. dataset_info.json, are skipped).
    fields: feature key -> kind: ``'bytes'`` (e.g. an encoded image), ``'int'``,
      ``'str'``.

  Returns:
    Feature key -> list of values, one per example, in shard order.
  """
  from google.protobuf.message import DecodeError  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  fmt = getattr(info.file_format, 'value', str(info.file_format))
  out = {k: [] for k in fields}
  for path in files:
    if path.name == 'dataset_info.json':
      continue
    for record in _records(name, path, fmt):
      try:
        feature = tf_example_pb2.Example.FromString(record).features.feature
        for key, kind in fields.items():
          out[key].append(_value(feature[key], kind))
      except (DecodeError, IndexError) as e:
        raise DataError(f'{name}: corrupt example in TFDS shard {path} ({e!r}); prepare '
                        'the dataset again') from e
  return out


def _value(feature: Any, kind: str) -> Any:
  if kind == 'bytes':
    return feature.bytes_list.value[0]
  if kind == 'str':
    return feature.bytes_list.value[0].decode()
  return int(feature.int64_list.value[0])


def _records(name: str, path: Path, fmt: str) -> Iterator[bytes]:
  if fmt == 'array_record':
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    try:
      reader = array_record_module.ArrayRecordReader(str(path))
      records = reader.read_all()
      reader.close()
    except Exception as e:  # array_record raises plain RuntimeError/ValueError.
      raise DataError(f'{name}: cannot read TFDS shard {path} ({e}); prepare the '
                      'dataset again') from e
    yield from records
  elif fmt == 'tfrecord':
    with open(path, 'rb') as f:
      while header := f.read(12):
        (length,) = struct.unpack('<Q', header[:8]) if len(header) == 12 else (-1,)
        payload = f.read(length) if length >= 0 else b''
        if length < 0 or len(payload) != length or len(f.read(4)) != 4:
          raise DataError(f'{name}: TFDS shard {path} is truncated; prepare the dataset '
                          'again')
        yield payload
  else:
    raise DataError(f'{name}: TFDS file format {fmt!r} is not supported without '
                    'TensorFlow; prepare the dataset as tfrecord or array_record')
