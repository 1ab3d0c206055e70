"""Tests of mirrormeta.data: real Omniglot, stand-in files in every other layout (written to
tmp_path, never committed, never downloaded), TFDS read offline, samplers, bad input."""

import csv
import functools
import io
import json
import os
import pickle
import time
import zipfile
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest
from PIL import Image

from mirrormeta import data
from mirrormeta.data import base

OMNIGLOT = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'omniglot'
FEWSHOT_SPLITS = OMNIGLOT.parent / 'fewshot_splits'
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / 'images_background.zip').is_file(),
    reason=f'real Omniglot not found at {OMNIGLOT} (../shared/data/omniglot)')


# --- stand-in file writers ------------------------------------------------------------

def _encode(arr: np.ndarray, fmt: str = 'PNG', mode: str | None = None) -> bytes:
  buf = io.BytesIO()
  im = Image.fromarray(arr)
  (im.convert(mode) if mode else im).save(buf, fmt)
  return buf.getvalue()


def _rgb(rng, n, size):
  return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@functools.cache
def _crc_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    table.append(c)
  return table


def _masked_crc32c(data: bytes) -> bytes:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _crc_table()[(crc ^ b) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF).to_bytes(4, 'little')


def _write_tfds(data_dir: Path, tfds_name: str, splits: dict, fmt: str = 'array_record',
                names: dict | None = None) -> None:
  """Writes a prepared TFDS dataset without TensorFlow: one shard per split."""
  tfds = pytest.importorskip('tensorflow_datasets')
  info = tfds.builder(tfds_name, data_dir=str(data_dir), file_format=fmt).info
  for feature, feature_names in (names or {}).items():
    info.features[feature].names = feature_names
  out = data_dir / tfds_name / str(info.version)
  out.mkdir(parents=True)
  split_infos = []
  for split, examples in splits.items():
    records = [info.features.serialize_example(ex) for ex in examples]
    path = out / f'{tfds_name}-{split}.{fmt}-00000-of-00001'
    if fmt == 'array_record':
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      writer = array_record_module.ArrayRecordWriter(str(path), 'group_size:1')
      for r in records:
        writer.write(r)
      writer.close()
    else:
      with open(path, 'wb') as f:
        for r in records:
          n = len(r).to_bytes(8, 'little')
          f.write(n + _masked_crc32c(n) + r + _masked_crc32c(r))
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[len(records)], num_bytes=sum(map(len, records)),
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=out, template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
            dataset_name=tfds_name, split=split, filetype_suffix=fmt)))
  info.set_splits(tfds.core.SplitDict(split_infos))
  info.write_to_directory(out)


# Omniglot stand-in: 3 alphabets, 8 characters, 4 drawings each.
_OMNI_CHARS = {'images_background': {'Alpha': 3, 'Beta': 2},
               'images_evaluation': {'Gamma': 3}}
_OMNI_SPLITS = {'train': ['Alpha/character01', 'Alpha/character02', 'Alpha/character03',
                          'Beta/character01'],
                'val': ['Beta/character02'],
                'test': ['Gamma/character01', 'Gamma/character02', 'Gamma/character03']}


def _omniglot_standin(root: Path, drawings: int = 4):
  """Writes the official zip layout and Vinyals-style split files; returns
  ``{'Alphabet/characterNN': [encoded 1-bit PNG bytes]}``."""
  rng = np.random.default_rng(0)
  pngs, char_id = {}, 0
  for zip_set, alphabets in _OMNI_CHARS.items():
    with zipfile.ZipFile(root / f'{zip_set}.zip', 'w') as z:
      for alphabet, n_chars in alphabets.items():
        for c in range(1, n_chars + 1):
          char_id += 1
          key = f'{alphabet}/character{c:02d}'
          pngs[key] = []
          for d in range(1, drawings + 1):
            ink = rng.random((105, 105)) < 0.1
            png = _encode(np.where(ink, 0, 255).astype(np.uint8), mode='1')
            z.writestr(f'{zip_set}/{key}/{char_id:04d}_{d:02d}.png', png)
            pngs[key].append(png)
  split_dir = root / 'splits' / 'vinyals'
  split_dir.mkdir(parents=True)
  for split, chars in _OMNI_SPLITS.items():
    (split_dir / f'{split}.txt').write_text(
        ''.join(f'{c}/rot{r:03d}\n' for c in chars for r in (0, 90, 180, 270)))
  return pngs


def _write_omniglot_tfds(root: Path, pngs: dict, fmt: str) -> None:
  alphabets = sorted({k.split('/')[0] for k in pngs} | {f'Z{i:02d}' for i in range(47)})
  splits = {'train': [], 'test': []}
  for label, (key, images) in enumerate(pngs.items()):
    alphabet, char = key.split('/')
    split = 'test' if alphabet == 'Gamma' else 'train'
    splits[split] += [dict(image=png, alphabet=alphabets.index(alphabet),
                           alphabet_char_id=int(char[9:]) - 1, label=label)
                      for png in images]
  rng = np.random.default_rng(1)  # TFDS shuffles examples when preparing.
  splits = {s: [exs[i] for i in rng.permutation(len(exs))] for s, exs in splits.items()}
  _write_tfds(root, 'omniglot', splits, fmt, names={'alphabet': alphabets})


def _cifar_names():
  fine = sorted(w for s in ('train', 'val', 'test')
                for w in (FEWSHOT_SPLITS / 'cifar-fs_bertinetto' / f'{s}.txt').read_text().split())
  coarse = sorted(w for s in ('train', 'val', 'test') for w in json.loads(
      (FEWSHOT_SPLITS / 'fc100_oreshkin' / f'{s}.json').read_text()))
  return fine, coarse


def _cifar_standin(root: Path):
  """CIFAR-100 python layout: 100 real class names (from the shipped split files), fine
  class i in superclass i // 5, 2 train + 1 test image per class; returns the arrays."""
  fine_names, coarse_names = _cifar_names()
  rng = np.random.default_rng(0)
  py = root / 'cifar-100-python'
  py.mkdir()
  out = {}
  for part, per_class in (('train', 2), ('test', 1)):
    fine = np.repeat(np.arange(100), per_class)
    images = _rgb(rng, len(fine), 32)
    out[part] = (images, fine)
    with open(py / part, 'wb') as f:
      pickle.dump({'data': images.transpose(0, 3, 1, 2).reshape(len(fine), -1),
                   'fine_labels': fine.tolist(), 'coarse_labels': (fine // 5).tolist(),
                   'filenames': [f'{i}.png' for i in range(len(fine))]}, f)
  with open(py / 'meta', 'wb') as f:
    pickle.dump({'fine_label_names': fine_names, 'coarse_label_names': coarse_names}, f)
  return out


def _cub_standin(root: Path, n_classes: int = 8):
  """Original CUB layout, 5-7 JPEGs of varying size per class."""
  rng = np.random.default_rng(0)
  images_dir = root / 'CUB_200_2011' / 'images'
  jpgs = {}
  for c in range(1, n_classes + 1):
    folder = images_dir / f'{c:03d}.Bird_{c}'
    folder.mkdir(parents=True)
    jpgs[c] = []
    for i in range(5 + c % 3):
      jpg = _encode(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8), 'JPEG')
      (folder / f'Bird_{c}_{i:04d}.jpg').write_bytes(jpg)
      jpgs[c].append(jpg)
  (root / 'CUB_200_2011' / 'classes.txt').write_text(
      ''.join(f'{c} {c:03d}.Bird_{c}\n' for c in range(1, n_classes + 1)))
  return jpgs


def _mini_pickles(root: Path, n_classes=6, per_class=8, size=84):
  rng = np.random.default_rng(0)
  out = {}
  for split in ('train', 'val', 'test'):
    images = _rgb(rng, n_classes * per_class, size)
    order = rng.permutation(len(images))  # Class members need not be contiguous.
    class_dict = {f'n{split}{c:03d}': order[c::n_classes].tolist() for c in range(n_classes)}
    with open(root / f'mini-imagenet-cache-{split}.pkl', 'wb') as f:
      pickle.dump({'image_data': images, 'class_dict': class_dict}, f)
    out[split] = (images, class_dict)
  return out


def _mini_folder(root: Path, n_classes=6, per_class=5, size=20):
  rng = np.random.default_rng(0)
  (root / 'images').mkdir()
  for split in ('train', 'val', 'test'):
    rows = [('filename', 'label')]
    for c in range(n_classes):
      wnid = f'n0{split}{c:03d}'
      for i in range(per_class):
        fn = f'{wnid}{i:08d}.jpg'
        Image.fromarray(_rgb(rng, 1, size)[0]).save(root / 'images' / fn)
        rows.append((fn, wnid))
    with open(root / f'{split}.csv', 'w', newline='') as f:
      csv.writer(f).writerows(rows)


def _tiered_standin(root: Path, npz: bool = False, n_classes=6, per_class=5):
  """tieredImageNet pickle layout; returns ``{split: (images, label_specific)}``."""
  rng = np.random.default_rng(0)
  out = {}
  for split in ('train', 'val', 'test'):
    labels = np.tile(np.arange(n_classes), per_class)  # Interleaved, as in the release.
    images = _rgb(rng, len(labels), 84)
    if npz:
      np.savez(root / f'{split}_images.npz', images=images)
    else:
      with open(root / f'{split}_images_png.pkl', 'wb') as f:
        pickle.dump([np.frombuffer(_encode(im), np.uint8) for im in images], f)
    with open(root / f'{split}_labels.pkl', 'wb') as f:
      pickle.dump({'label_specific': labels, 'label_general': labels // 2,
                   'label_specific_str': [f'n{split}{c}' for c in range(n_classes)],
                   'label_general_str': [f'g{c}' for c in range(n_classes // 2)]}, f)
    out[split] = images, labels
  return out


def _grouped_ok(ds: data.ClassDataset):
  assert ds.images.dtype == np.uint8 and ds.images.ndim == 4
  assert ds.labels.dtype == np.int32
  assert np.array_equal(np.unique(ds.labels), np.arange(ds.num_classes))
  assert np.all(np.diff(ds.labels) >= 0)
  assert len(ds.class_names) == len(set(ds.class_names)) == ds.num_classes


def _class_sets(ds):
  """[sorted image bytes of class c for each c]: the classes' content, ignoring order."""
  return [sorted(im.tobytes() for im in ds.images[ds.labels == c])
          for c in range(ds.num_classes)]


# --- real Omniglot --------------------------------------------------------------------

@pytest.fixture(scope='module')
def omniglot(tmp_path_factory):
  """The three Vinyals splits of the real Omniglot, decoded once into a fresh cache."""
  if not (OMNIGLOT / 'images_background.zip').is_file():
    pytest.skip(f'real Omniglot not found at {OMNIGLOT}')
  cache = tmp_path_factory.mktemp('omniglot_cache')
  t = time.perf_counter()
  splits = {s: data.load_dataset('omniglot', OMNIGLOT, s, cache_dir=cache)
            for s in ('train', 'val', 'test')}
  return splits, cache, time.perf_counter() - t


@needs_omniglot
def test_omniglot_counts_shapes_labels(omniglot):
  splits, _, _ = omniglot
  for split, n_chars in (('train', 1028), ('val', 172), ('test', 423)):
    ds = splits[split]
    _grouped_ok(ds)
    assert (ds.name, ds.split, ds.num_classes) == ('omniglot', split, 4 * n_chars)
    assert ds.images.shape == (20 * 4 * n_chars, 28, 28, 1)
    assert np.array_equal(ds.labels, np.repeat(np.arange(ds.num_classes), 20))
    assert ds.class_names == tuple(
        (OMNIGLOT / 'splits' / 'vinyals' / f'{split}.txt').read_text().split())
  # Ink is 1 (255): a minority of the pixels, a blank background.
  ink = splits['train'].images.mean() / 255
  assert 0.03 < ink < 0.25
  assert np.median(splits['train'].images) == 0


@needs_omniglot
def test_omniglot_disjoint_splits(omniglot):
  splits, _, _ = omniglot
  chars = {s: {n.rsplit('/', 1)[0] for n in ds.class_names} for s, ds in splits.items()}
  assert [len(c) for c in chars.values()] == [1028, 172, 423]
  assert not chars['train'] & chars['val'] and not chars['train'] & chars['test']
  assert not chars['val'] & chars['test']


@needs_omniglot
def test_omniglot_pixels_and_rotations(omniglot):
  """rot000 equals the npz copy (ink inverted, LANCZOS to 28); rotDDD is rot000 turned
  counter-clockwise by DDD degrees, as PIL's rotate does."""
  train = omniglot[0]['train']
  with open(OMNIGLOT / 'omniglot_index.csv') as f:
    row = next(r for r in csv.DictReader(f)
               if r['vinyals_split'] == 'train' and r['set'] == 'evaluation')
  with np.load(OMNIGLOT / row['npz_file']) as z:
    background = z['images'][int(row['npz_index'])]           # bool [20, 105, 105]
  expected = np.stack([np.asarray(Image.fromarray(np.where(b, 0, 255).astype(np.uint8))
                                  .resize((28, 28), Image.Resampling.LANCZOS))
                       for b in background])[..., None]
  name = f'{row["alphabet"]}/{row["character"]}'
  per_rot = {r: train.images[train.labels == train.class_names.index(f'{name}/rot{r:03d}')]
             for r in (0, 90, 180, 270)}
  np.testing.assert_array_equal(per_rot[0], expected)
  for r, k in ((90, 1), (180, 2), (270, 3)):
    np.testing.assert_array_equal(per_rot[r], np.rot90(per_rot[0], k, axes=(1, 2)))
  img = per_rot[0][0, ..., 0]
  np.testing.assert_array_equal(np.asarray(Image.fromarray(img).rotate(90)),
                                per_rot[90][0, ..., 0])


@needs_omniglot
def test_omniglot_second_load_is_fast_and_identical(omniglot):
  splits, cache, first = omniglot
  files = sorted(p.name for p in cache.iterdir())
  assert len(files) == 3 and all(f.endswith('.npz') for f in files), files
  t = time.perf_counter()
  again = data.load_dataset('omniglot', OMNIGLOT, 'train', cache_dir=cache)
  second = time.perf_counter() - t
  assert second < 3.0 and second < first / 3, (first, second)
  for field in ('images', 'labels'):
    np.testing.assert_array_equal(getattr(again, field), getattr(splits['train'], field))
  assert again.class_names == splits['train'].class_names


@needs_omniglot
def test_omniglot_trainval(omniglot):
  splits, cache, _ = omniglot
  tv = data.load_dataset('omniglot', OMNIGLOT, 'trainval', cache_dir=cache)
  _grouped_ok(tv)
  assert tv.num_classes == 4800
  assert tv.class_names == tuple(
      (OMNIGLOT / 'splits' / 'vinyals' / 'trainval.txt').read_text().split())
  np.testing.assert_array_equal(tv.images[-20:], splits['val'].images[-20:])


@needs_omniglot
@pytest.mark.parametrize('n_way,shot,query,batch', [(5, 1, 15, 4), (20, 5, 5, 2)])
def test_omniglot_episodes(omniglot, n_way, shot, query, batch):
  sampler = data.EpisodeSampler(omniglot[0]['train'], n_way, shot, query)
  ep = sampler.sample(jax.random.key(0), batch)
  assert isinstance(ep, data.Episode)
  assert ep.support_x.shape == (batch, n_way * shot, 28, 28, 1)
  assert ep.query_x.shape == (batch, n_way * query, 28, 28, 1)
  assert ep.support_x.dtype == ep.query_x.dtype == np.float32
  assert ep.support_y.dtype == ep.query_y.dtype == np.int32
  assert 0.0 <= float(ep.support_x.min()) and float(ep.query_x.max()) <= 1.0
  np.testing.assert_array_equal(ep.support_y,
                                np.tile(np.repeat(np.arange(n_way), shot), (batch, 1)))
  np.testing.assert_array_equal(ep.query_y,
                                np.tile(np.repeat(np.arange(n_way), query), (batch, 1)))
  again = sampler.sample(jax.random.key(0), batch)
  other = sampler.sample(jax.random.key(1), batch)
  for a, b in zip(jax.tree.leaves(ep), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(ep.query_x, other.query_x)
  assert not np.array_equal(ep.support_x[0], ep.support_x[1])  # Tasks differ.


# --- sampler invariants on a dataset whose pixels name (class, example) -----------------

def _tagged_dataset(counts):
  labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
  within = np.concatenate([np.arange(c) for c in counts])
  images = np.stack([labels, within], -1).astype(np.uint8).reshape(-1, 1, 2, 1)
  return data.ClassDataset('tagged', 'train', images, labels, len(counts),
                           tuple(f'c{i}' for i in range(len(counts))))


def _tags(x):
  t = np.rint(np.asarray(x)[..., 0] * 255).astype(int)   # [..., 1, 2]
  return t[..., 0, 0], t[..., 0, 1]                      # class, example


@pytest.mark.parametrize('counts', [[6] * 10, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
def test_sampler_invariants(counts):
  n_way, shot, query, batch = 4, 1, 2, 500
  sampler = data.EpisodeSampler(_tagged_dataset(counts), n_way, shot, query)
  ep = sampler.sample(jax.random.key(3), batch)
  s_cls, s_ex = _tags(ep.support_x)
  q_cls, q_ex = _tags(ep.query_x)
  s_cls, s_ex = s_cls.reshape(batch, n_way, shot), s_ex.reshape(batch, n_way, shot)
  q_cls, q_ex = q_cls.reshape(batch, n_way, query), q_ex.reshape(batch, n_way, query)
  # One dataset class per way, the same in support and query, distinct within a task.
  assert np.all(s_cls == s_cls[..., :1]) and np.all(q_cls == s_cls[..., :1])
  assert all(len(set(t)) == n_way for t in s_cls[..., 0])
  # Distinct, valid examples per way.
  both = np.concatenate([s_ex, q_ex], -1)
  assert all(len(set(w)) == shot + query for w in both.reshape(-1, shot + query))
  assert np.all(both < np.asarray(counts)[s_cls[..., :1]])
  # Every class is drawn, about equally often; every example of a class is used.
  freq = np.bincount(s_cls.ravel(), minlength=len(counts)) / (batch * n_way / len(counts))
  assert np.all(np.abs(freq - 1) < 0.2), freq
  for c, n in enumerate(counts):
    assert set(both[s_cls[..., 0] == c].ravel()) == set(range(n))


def test_sampler_is_jittable_and_compiles_once():
  sampler = data.EpisodeSampler(_tagged_dataset([5] * 6), 3, 2, 3)
  direct = sampler.sample(jax.random.key(0), 2)
  size = data.sample_episodes._cache_size()
  sampler.sample(jax.random.key(7), 2)
  assert data.sample_episodes._cache_size() == size
  jitted = jax.jit(lambda k: sampler.sample(k, 2))(jax.random.key(0))
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(a, b)


# --- sinusoid -------------------------------------------------------------------------

def test_sinusoid():
  sampler = data.make_sampler('sinusoid', shot=10, query=7)
  ep = sampler.sample(jax.random.key(0), 64)
  assert ep.support_x.shape == ep.support_y.shape == (64, 10, 1)
  assert ep.query_x.shape == ep.query_y.shape == (64, 7, 1)
  assert all(a.dtype == np.float32 for a in ep)
  x = np.concatenate([ep.support_x, ep.query_x], 1)[..., 0].astype(np.float64)
  y = np.concatenate([ep.support_y, ep.query_y], 1)[..., 0].astype(np.float64)
  assert np.all(np.abs(x) <= 5)
  for xi, yi in zip(x, y):  # y = A sin(x - phi) = a sin x + b cos x, a = A cos phi.
    (a, b), *_ = np.linalg.lstsq(np.stack([np.sin(xi), np.cos(xi)], 1), yi, rcond=None)
    np.testing.assert_allclose(np.stack([np.sin(xi), np.cos(xi)], 1) @ [a, b], yi,
                               atol=1e-4)
    amp, phase = np.hypot(a, b), np.arctan2(-b, a)
    assert 0.1 - 1e-4 <= amp <= 5 + 1e-4 and -1e-4 <= phase <= np.pi + 1e-4
  again = sampler.sample(jax.random.key(0), 64)
  np.testing.assert_array_equal(ep.query_y, again.query_y)


# --- stand-in layouts -----------------------------------------------------------------

def test_omniglot_standin_zip_and_tfds(tmp_path):
  pngs = _omniglot_standin(tmp_path)
  files = {s: data.load_dataset('omniglot', tmp_path, s, cache_dir=tmp_path / 'c',
                                source='files') for s in ('train', 'val', 'test')}
  assert [files[s].num_classes for s in files] == [16, 4, 12]
  assert files['train'].images.shape == (16 * 4, 28, 28, 1)
  for fmt in ('array_record', 'tfrecord'):
    tf_dir = tmp_path / fmt
    tf_dir.mkdir()
    _write_omniglot_tfds(tf_dir, pngs, fmt)
    for split, ds in files.items():
      via = data.load_dataset('omniglot', tf_dir, split, cache_dir=tmp_path / 'c',
                              split_dir=tmp_path / 'splits' / 'vinyals')  # auto -> tfds
      assert via.class_names == ds.class_names
      np.testing.assert_array_equal(via.labels, ds.labels)
      assert _class_sets(via) == _class_sets(ds)  # TFDS shuffles drawings.


def test_omniglot_extracted_folders(tmp_path):
  _omniglot_standin(tmp_path)
  zipped = data.load_dataset('omniglot', tmp_path, 'test', cache_dir=tmp_path / 'c')
  folder = tmp_path / 'extracted'
  folder.mkdir()
  for s in ('images_background', 'images_evaluation'):
    with zipfile.ZipFile(tmp_path / f'{s}.zip') as z:
      z.extractall(folder)
  (folder / 'splits').symlink_to(tmp_path / 'splits')
  extracted = data.load_dataset('omniglot', folder, 'test', cache_dir=tmp_path / 'c')
  np.testing.assert_array_equal(extracted.images, zipped.images)


def test_miniimagenet_pickles(tmp_path):
  raw = _mini_pickles(tmp_path)
  ds = data.load_dataset('miniimagenet', tmp_path, 'val', cache_dir=tmp_path / 'c')
  _grouped_ok(ds)
  images, class_dict = raw['val']
  assert ds.images.shape == (48, 84, 84, 3) and ds.class_names == tuple(sorted(class_dict))
  for c, name in enumerate(ds.class_names):
    np.testing.assert_array_equal(ds.images[ds.labels == c], images[class_dict[name]])
  assert not (tmp_path / 'c').exists()  # Already arrays at 84x84: nothing to cache.
  small = data.load_dataset('miniimagenet', tmp_path, 'val', image_size=32,
                            cache_dir=tmp_path / 'c')
  assert small.images.shape == (48, 32, 32, 3)
  ep = data.make_sampler('miniimagenet', tmp_path, 'test', 5, 1, 7).sample(
      jax.random.key(0), 2)
  assert ep.query_x.shape == (2, 35, 84, 84, 3)


def test_miniimagenet_folder(tmp_path):
  _mini_folder(tmp_path)
  ds = data.load_dataset('miniimagenet', tmp_path, 'train', image_size=16,
                         cache_dir=tmp_path / 'c')
  _grouped_ok(ds)
  assert ds.images.shape == (30, 16, 16, 3)
  assert ds.class_names == tuple(f'n0train{c:03d}' for c in range(6))
  first = np.asarray(Image.open(tmp_path / 'images' / 'n0train00100000003.jpg').convert('RGB')
                     .resize((16, 16), Image.Resampling.LANCZOS))
  np.testing.assert_array_equal(ds.images[ds.labels == 1][3], first)


@pytest.mark.skipif(not FEWSHOT_SPLITS.is_dir(), reason='../shared/data not found')
def test_miniimagenet_finds_shipped_csvs_and_names_missing_images(tmp_path):
  (tmp_path / 'images').mkdir()
  with pytest.raises(data.DataError, match=r'12000 of the 12000 images listed in .*'
                     r'miniimagenet_ravi.test\.csv are missing .*n0'):
    data.load_dataset('miniimagenet', tmp_path, 'test')


@pytest.mark.parametrize('npz', [False, True])
def test_tieredimagenet(tmp_path, npz):
  images, labels = _tiered_standin(tmp_path, npz=npz)['test']
  ds = data.load_dataset('tieredimagenet', tmp_path, 'test', cache_dir=tmp_path / 'c')
  _grouped_ok(ds)
  assert ds.images.shape == (30, 84, 84, 3)
  assert ds.class_names == tuple(f'ntest{c}' for c in range(6))
  assert np.array_equal(ds.class_counts, [5] * 6)
  for c in range(6):  # PNG is lossless: the same pixels either way.
    np.testing.assert_array_equal(ds.images[ds.labels == c], images[labels == c])


@pytest.mark.skipif(not FEWSHOT_SPLITS.is_dir(), reason='../shared/data not found')
def test_cifarfs_fc100_files_and_tfds(tmp_path):
  raw = _cifar_standin(tmp_path)
  fine_names, coarse_names = _cifar_names()
  sizes = {}
  for name in ('cifarfs', 'fc100'):
    for split in ('train', 'val', 'test'):
      ds = data.load_dataset(name, tmp_path, split, cache_dir=tmp_path / 'c')
      _grouped_ok(ds)
      assert ds.images.shape[1:] == (32, 32, 3) and np.all(ds.class_counts == 3)
      sizes[name, split] = ds.num_classes
  assert [sizes['cifarfs', s] for s in ('train', 'val', 'test')] == [64, 16, 20]
  assert [sizes['fc100', s] for s in ('train', 'val', 'test')] == [60, 20, 20]
  cfs = data.load_dataset('cifarfs', tmp_path, 'val', cache_dir=tmp_path / 'c')
  assert set(cfs.class_names) == set(
      (FEWSHOT_SPLITS / 'cifar-fs_bertinetto' / 'val.txt').read_text().split())
  c = cfs.class_names.index('otter')
  fine = fine_names.index('otter')
  np.testing.assert_array_equal(
      cfs.images[cfs.labels == c],
      np.concatenate([raw[p][0][raw[p][1] == fine] for p in ('train', 'test')]))
  fc = data.load_dataset('fc100', tmp_path, 'test', cache_dir=tmp_path / 'c')
  wanted = json.loads((FEWSHOT_SPLITS / 'fc100_oreshkin' / 'test.json').read_text())
  assert {fine_names[i] for i in range(100) if coarse_names[i // 5] in wanted} == set(
      fc.class_names)
  # The same data through a prepared TFDS cifar100 (PNG, lossless).
  tf_dir = tmp_path / 'tfds'
  tf_dir.mkdir()
  _write_tfds(tf_dir, 'cifar100', {
      p: [dict(id=f'{p}_{i}', image=_encode(im), label=int(f), coarse_label=int(f) // 5)
          for i, (im, f) in enumerate(zip(*raw[p]))] for p in ('train', 'test')},
      names={'label': fine_names, 'coarse_label': coarse_names})
  via = data.load_dataset('fc100', tf_dir, 'test', cache_dir=tmp_path / 'c', source='tfds')
  assert via.class_names == fc.class_names
  np.testing.assert_array_equal(via.images, fc.images)


def test_cub_files_and_tfds(tmp_path):
  jpgs = _cub_standin(tmp_path)
  split_ids = {'train': [1, 2, 3, 4], 'val': [5, 6], 'test': [7, 8]}
  for split, ids in split_ids.items():
    ds = data.load_dataset('cub', tmp_path, split, image_size=12, cache_dir=tmp_path / 'c')
    _grouped_ok(ds)
    assert ds.class_names == tuple(f'{i:03d}.Bird_{i}' for i in ids)
    assert list(ds.class_counts) == [5 + i % 3 for i in ids]
  assert data.cub.split_class_ids(range(1, 201), 'val') == list(range(101, 151))
  ep = data.EpisodeSampler(ds, 2, 2, 3).sample(jax.random.key(0), 3)  # Unequal counts.
  assert ep.support_x.shape == (3, 4, 12, 12, 3)
  tf_dir = tmp_path / 'tfds'
  tf_dir.mkdir()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  examples = [dict(image=jpg, label=c - 1, label_name=f'bird_{c}',
                   **{'image/filename': f'{c}/{i}.jpg'},
                   bbox=tfds.features.BBox(0.1, 0.1, 0.9, 0.9),
                   segmentation_mask=Image.fromarray(np.zeros((4, 4), np.uint8)))
              for c, cls_jpgs in jpgs.items() for i, jpg in enumerate(cls_jpgs)]
  _write_tfds(tf_dir, 'caltech_birds2011', {'train': examples[::2], 'test': examples[1::2]},
              fmt='tfrecord')
  files = data.load_dataset('cub', tmp_path, 'val', image_size=12, cache_dir=tmp_path / 'c')
  via = data.load_dataset('cub', tf_dir, 'val', image_size=12, cache_dir=tmp_path / 'c')
  assert via.class_names == ('005.bird_5', '006.bird_6')
  np.testing.assert_array_equal(via.labels, files.labels)
  assert _class_sets(via) == _class_sets(files)


# --- bad input ------------------------------------------------------------------------

def _fails(match, fn, *args, **kw):
  with pytest.raises(data.DataError, match=match) as info:
    fn(*args, **kw)
  assert isinstance(info.value, ValueError)
  return str(info.value)


def test_bad_names_and_task_shapes(tmp_path):
  _fails(r"unknown dataset 'imagenet'; choose one of omniglot, miniimagenet",
         data.load_dataset, 'imagenet', tmp_path, 'train')
  _fails(r'sinusoid has no files.*SinusoidSampler', data.load_dataset, 'sinusoid',
         tmp_path, 'train')
  _fails(r"unknown split 'validation'; choose one of train, val, test, trainval",
         data.load_dataset, 'cub', tmp_path, 'validation')
  _fails(r"unknown source 'gcs'", data.load_dataset, 'cub', tmp_path, 'train',
         source='gcs')
  _fails(r'TFDS has no miniimagenet', data.load_dataset, 'miniimagenet', tmp_path,
         'train', source='tfds')
  ds = _tagged_dataset([5, 5, 4])
  _fails(r"tagged/train: n_way=4 but the split has only 3 classes; use n_way <= 3",
         data.EpisodeSampler, ds, 4, 1, 1)
  _fails(r"class 'c2' has 4 images, fewer than shot\+query=5; use shot\+query <= 4",
         data.EpisodeSampler, ds, 2, 1, 4)
  _fails(r'shot=0.*must all be >= 1', data.EpisodeSampler, ds, 2, 0, 4)
  _fails(r'sinusoid: shot=1 and query=0', data.SinusoidSampler, 1, 0)


@pytest.mark.parametrize('name', ['omniglot', 'miniimagenet', 'tieredimagenet', 'cifarfs',
                                  'fc100', 'cub'])
def test_missing_directory_and_files(tmp_path, name):
  msg = _fails(r'data directory .*nowhere does not exist; pass the folder that holds',
               data.load_dataset, name, tmp_path / 'nowhere', 'train')
  assert 'data_dir' in msg
  expected = {'omniglot': r'no images_background\.zip in .*; download it from https://',
              'miniimagenet': r'holds neither mini-imagenet-cache-train\.pkl nor an images/',
              'tieredimagenet': r'lacks train_labels\.pkl; it must hold train_images_png',
              'cifarfs': r"no CIFAR-100 python file 'train' in .*; extract https://",
              'fc100': r"no CIFAR-100 python file 'train'",
              'cub': r'no CUB_200_2011/images folder in .*; extract CUB_200_2011\.tgz'}
  _fails(expected[name], data.load_dataset, name, tmp_path, 'train')


def test_tfds_not_prepared(tmp_path):
  _fails(r"TFDS dataset 'caltech_birds2011' is not prepared in .*pip install tensorflow; "
         r'tfds build caltech_birds2011', data.load_dataset, 'cub', tmp_path, 'train',
         source='tfds')


def test_wrong_layouts(tmp_path):
  _omniglot_standin(tmp_path)
  (tmp_path / 'splits' / 'vinyals' / 'val.txt').write_text('Beta/character09/rot000\n')
  _fails(r'1 characters of the val split \(e\.g\. Beta/character09\) are missing from '
         r'.*images_background\.zip.*official layout', data.load_dataset, 'omniglot',
         tmp_path, 'val', cache_dir=tmp_path / 'c')
  (tmp_path / 'splits' / 'vinyals' / 'val.txt').write_text('Beta/character02/rot045\n')
  _fails(r"line 'Beta/character02/rot045' of .*val\.txt is not", data.load_dataset,
         'omniglot', tmp_path, 'val', cache_dir=tmp_path / 'c')
  _fails(r'class-split files test\.txt not found in .*; pass split_dir=',
         data.load_dataset, 'omniglot', tmp_path, 'test', split_dir=tmp_path / 'nope')

  mini = tmp_path / 'mini'
  mini.mkdir()
  with open(mini / 'mini-imagenet-cache-train.pkl', 'wb') as f:
    pickle.dump({'images': np.zeros((2, 84, 84, 3), np.uint8)}, f)
  _fails(r"mini-imagenet-cache-train\.pkl is not a mini-imagenet-cache pickle",
         data.load_dataset, 'miniimagenet', mini, 'train')
  folder = tmp_path / 'mini_folder'
  folder.mkdir()
  _mini_folder(folder)
  (folder / 'val.csv').write_text('image,class\nx.jpg,n1\n')
  _fails(r'val\.csv is not a Ravi & Larochelle split CSV', data.load_dataset,
         'miniimagenet', folder, 'val', cache_dir=tmp_path / 'c')

  tiered = tmp_path / 'tiered'
  tiered.mkdir()
  _tiered_standin(tiered)
  with open(tiered / 'val_labels.pkl', 'wb') as f:
    pickle.dump({'labels': [0, 1]}, f)
  _fails(r"val_labels\.pkl has no 'label_specific'", data.load_dataset, 'tieredimagenet',
         tiered, 'val', cache_dir=tmp_path / 'c')

  cub = tmp_path / 'cub'
  cub.mkdir()
  _cub_standin(cub)
  (cub / 'CUB_200_2011' / 'images' / 'birds').mkdir()
  _fails(r"class folder .*birds is not named NNN\.Name", data.load_dataset, 'cub', cub,
         'train', cache_dir=tmp_path / 'c')

  cifar = tmp_path / 'cifar'
  cifar.mkdir()
  if FEWSHOT_SPLITS.is_dir():
    _cifar_standin(cifar)
    (cifar / 'val.txt').write_text('apple\nunicorn\n')
    _fails(r"val\.txt names 1 classes that are not CIFAR-100 classes \(e\.g\. 'unicorn'\)",
           data.load_dataset, 'cifarfs', cifar, 'val', cache_dir=tmp_path / 'c')
  assert not (tmp_path / 'c').exists() or not list((tmp_path / 'c').iterdir())


def test_corrupt_files_leave_no_cache(tmp_path):
  cache = tmp_path / 'cache'
  # Corrupt zip.
  _omniglot_standin(tmp_path)
  (tmp_path / 'images_evaluation.zip').write_bytes(b'PK\x03\x04 not really a zip')
  _fails(r'images_evaluation\.zip is not a readable zip archive .*download it again',
         data.load_dataset, 'omniglot', tmp_path, 'test', cache_dir=cache)
  # Corrupt PNG inside a valid zip.
  with zipfile.ZipFile(tmp_path / 'images_evaluation.zip', 'w') as z:
    for c in (1, 2, 3):
      z.writestr(f'images_evaluation/Gamma/character{c:02d}/0007_01.png', b'\x89PNG junk')
  _fails(r'cannot decode image .*images_evaluation\.zip:images_evaluation/Gamma/'
         r'character01/0007_01\.png', data.load_dataset, 'omniglot', tmp_path, 'test',
         cache_dir=cache)
  # Corrupt pickles.
  mini = tmp_path / 'mini'
  mini.mkdir()
  _mini_pickles(mini)
  blob = (mini / 'mini-imagenet-cache-val.pkl').read_bytes()
  (mini / 'mini-imagenet-cache-val.pkl').write_bytes(blob[:len(blob) // 2])
  _fails(r'cannot unpickle .*mini-imagenet-cache-val\.pkl .*corrupt or truncated',
         data.load_dataset, 'miniimagenet', mini, 'val', image_size=32, cache_dir=cache)
  # Corrupt JPEG in a folder layout.
  folder = tmp_path / 'mini_folder'
  folder.mkdir()
  _mini_folder(folder)
  (folder / 'images' / 'n0test00200000004.jpg').write_bytes(b'\xff\xd8\xff garbage')
  _fails(r'cannot decode image .*n0test00200000004\.jpg', data.load_dataset,
         'miniimagenet', folder, 'test', cache_dir=cache)
  # Truncated TFDS shard.
  fresh, tf_dir = tmp_path / 'fresh', tmp_path / 'tfds'
  fresh.mkdir()
  tf_dir.mkdir()
  _write_omniglot_tfds(tf_dir, _omniglot_standin(fresh), 'tfrecord')
  shard = next((tf_dir / 'omniglot').glob('*/omniglot-test.tfrecord-*'))
  shard.write_bytes(shard.read_bytes()[:-10])
  _fails(r'TFDS shard .*omniglot-test\.tfrecord.* is truncated', data.load_dataset,
         'omniglot', tf_dir, 'test', cache_dir=cache,
         split_dir=fresh / 'splits' / 'vinyals')
  assert not cache.exists() or not list(cache.iterdir())


def test_failed_cache_write_leaves_nothing(tmp_path, monkeypatch):
  _omniglot_standin(tmp_path)
  cache = tmp_path / 'cache'

  def broken_savez(f, **arrays):
    f.write(b'half a file')
    raise OSError('disk full')
  monkeypatch.setattr(np, 'savez', broken_savez)
  with pytest.raises(OSError, match='disk full'):
    data.load_dataset('omniglot', tmp_path, 'val', cache_dir=cache)
  assert not list(cache.iterdir())
  monkeypatch.undo()
  ds = data.load_dataset('omniglot', tmp_path, 'val', cache_dir=cache)
  assert [p.suffix for p in cache.iterdir()] == ['.npz']
  # A damaged cache file is rebuilt, not trusted.
  path = next(cache.iterdir())
  path.write_bytes(path.read_bytes()[:100])
  again = data.load_dataset('omniglot', tmp_path, 'val', cache_dir=cache)
  np.testing.assert_array_equal(again.images, ds.images)


def test_default_cache_dir(tmp_path, monkeypatch):
  assert base.default_cache_dir(tmp_path) == tmp_path / '.mirrormeta_cache'
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  shared = tmp_path / 'shared'
  shared.mkdir()
  _omniglot_standin(shared)
  shared.chmod(0o555)  # Write-protected, as ../shared/data is: even root leaves it alone.
  try:
    data.load_dataset('omniglot', shared, 'val')
    assert sorted(p.name for p in shared.iterdir()) == [
        'images_background.zip', 'images_evaluation.zip', 'splits']
    cached = list((tmp_path / 'home' / '.cache' / 'mirrormeta').iterdir())
    assert len(cached) == 1 and cached[0].stat().st_mode & 0o044 == 0o044
  finally:
    shared.chmod(0o755)
