"""Named configs: resolution by name and path, overrides, checks, and every config building
its model and data pipeline (real Omniglot; stand-in files in the other datasets' layouts)."""
import os
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from PIL import Image  # noqa: E402

from experiments import configs, run  # noqa: E402
from experiments.configs import base  # noqa: E402
from mirrormeta import (MirrormetaError, algorithms, checkpoint, data, models, native,  # noqa: E402
                        train)

# Stand-in writers of the data layer's tests (same folder, on sys.path under pytest).
from test_data import _cifar_standin, _mini_pickles, _tiered_standin  # noqa: E402

# ml_collections loads config files with the deprecated importlib load_module().
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')

NAMED = ('mini_1shot', 'mini_5shot', 'tiered_1shot', 'tiered_5shot', 'cub_1shot', 'cub_5shot',
         'cifarfs_1shot', 'fc100_1shot', 'omniglot_5w1s', 'omniglot_20w1s', 'sinusoid', 'smoke')


def parse(*args: str):
  """The config that ``python -m experiments.run <args>`` would run (fresh flag values)."""
  argv = run.resolve_argv(['run'] + list(args))
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, flag_values=fv, lock_config=True,
                                           sys_argv=argv)  # overrides are read from here
  fv(argv)
  return holder.value


# --- resolution and overrides -----------------------------------------------------------

def test_every_paper_setting_has_a_named_config():
  assert set(NAMED) <= set(configs.available())
  assert 'base' not in configs.available()


@pytest.mark.parametrize('name', NAMED)
def test_named_config_by_name_and_path(name):
  by_name = parse(f'--config={name}')
  by_path = parse('--config', str(configs.path_of(name)))
  assert by_name.name == by_path.name == name
  assert by_name.to_dict() == by_path.to_dict()
  train.check_config(by_name)
  doc = configs.path_of(name).read_text().split('"""')[1]
  assert f'python -m experiments.run --config={name}' in doc  # launch command in docstring


def test_defaults_follow_design_section_2():
  c = parse('--config=mini_1shot')
  assert (c.dataset, c.n_way, c.shot, c.query, c.model, c.filters) == (
      'miniimagenet', 5, 1, 15, 'conv4', 64)
  assert (c.inner_steps, c.inner_lr, c.meta_batch, c.num_steps) == (5, 0.01, 4, 60000)
  o = c.optimizer
  assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay, o.decay_every) == (
      'sgd', 1e-3, 0.9, True, 1e-4, 20000)
  assert (c.eval_every, c.val_tasks, c.test_tasks, c.algorithm) == (2000, 1000, 1000, 'metamida')
  assert parse('--config=omniglot_20w1s').optimizer.name == 'adam'
  assert parse('--config=omniglot_20w1s').n_way == 20
  assert parse('--config=mini_5shot').shot == 5


def test_overrides_are_typed_and_nested():
  c = parse('--config=mini_1shot', '--config.algorithm=maml', '--config.inner_lr=0.1',
            '--config.inner_steps=1', '--config.eval_inner_steps=10',
            '--config.optimizer.name=adam', '--config.icnn.width=4',
            '--config.resnet_widths=(32,64,128,256)', '--config.strategy.remat=true',
            '--config.data_dir=/somewhere')
  assert (c.algorithm, c.inner_lr, c.inner_steps, c.eval_inner_steps) == ('maml', 0.1, 1, 10)
  assert (c.optimizer.name, c.icnn.width, c.strategy.remat) == ('adam', 4, True)
  assert tuple(c.resnet_widths) == (32, 64, 128, 256) and c.data_dir == '/somewhere'


def test_config_file_path_with_overrides(tmp_path):
  path = tmp_path / 'mine.py'
  path.write_text('from experiments.configs import base\n\n'
                  'def get_config():\n  c = base.get_config("cub")\n  c.name = "mine"\n'
                  '  return c\n')
  c = parse(f'--config={path}', '--config.shot=3')
  assert (c.name, c.dataset, c.shot) == ('mine', 'cub', 3)


def test_bad_command_lines():
  with pytest.raises(run.UsageError, match="unknown config 'mini_1shto'; available: .*mini_1shot"):
    parse('--config=mini_1shto')
  with pytest.raises(run.UsageError, match='config file .*nope.py not found'):
    parse('--config=/tmp/nope.py')
  with pytest.raises(flags.IllegalFlagValueError, match='could not convert'):
    parse('--config=smoke', '--config.inner_lr=fast')
  with pytest.raises(flags.IllegalFlagValueError, match='invalid literal'):
    parse('--config=smoke', '--config.n_way=5.5')
  with pytest.raises((KeyError, AttributeError)) as e:
    parse('--config=smoke', '--config.n_wya=5')
  assert run._unknown_field_message(e.value, ['run', '--config.n_wya=5']) == (
      "unknown config field 'n_wya' in --config.n_wya (did you mean 'n_way'?)")
  with pytest.raises((KeyError, AttributeError)) as e:
    parse('--config=smoke', '--config.optimizer.lrr=5')
  assert run._unknown_field_message(e.value, ['run', '--config.optimizer.lrr=5']).startswith(
      "unknown config field 'lrr' in --config.optimizer.lrr")


@pytest.mark.parametrize('field, value, match', [
    ('shot', 0, r'config.shot=0 must be >= 1'),
    ('query', -1, r'config.query=-1 must be >= 1'),
    ('inner_lr', 0.0, r'config.inner_lr=0.0 must be > 0'),
    ('inner_lr', -0.1, r'config.inner_lr=-0.1 must be > 0'),
    ('n_way', 1, r'config.n_way=1 must be >= 2'),
    ('algorithm', 'reptile', r"config.algorithm='reptile' is unknown; choose one of maml"),
    ('dataset', 'imagenet', r"config.dataset='imagenet' is unknown"),
    ('model', 'mlp', r"config.model='mlp' does not fit the data"),
    ('meta_batch', 0, r'config.meta_batch=0 must be >= 1'),
    ('cpu_devices', 0, r'config.cpu_devices=0 must be >= 1 \(XLA:CPU devices'),
    ('image_size', 8, r'config.image_size=8 must be >= 16'),
    ('eval_checkpoint', 'final', r"config.eval_checkpoint='final' must be 'best' or 'latest'"),
    ('optimizer.name', 'rmsprop', r"config.optimizer.name='rmsprop' is unknown"),
    ('optimizer.lr', 0.0, r'config.optimizer.lr=0.0 must be > 0'),
    ('strategy.tasks', 'pmap', r"config.strategy.tasks='pmap' must be"),
    ('strategy.conv', 'fft',
     r"config.strategy.conv='fft' must be one of mirrormeta, mirrormeta_batched_wgrad, lax"),
    ('strategy.layout', 'NWHC',
     r"config.strategy.layout='NWHC' must be 'auto' or one of NHWC, NCHW"),
    ('strategy.map_remat', 'never',
     r"config.strategy.map_remat='never' must be 'auto' or one of checkpoint, tied"),
])
def test_impossible_settings_are_refused(field, value, match):
  c = parse('--config=mini_1shot')
  *path, last = field.split('.')
  target = c
  for p in path:
    target = target[p]
  target[last] = value
  with pytest.raises(MirrormetaError, match=match) as e:
    train.check_config(c)
  assert '\n' not in str(e.value)


def test_icnn_settings_are_checked_by_the_conjugate():
  c = parse('--config=mini_1shot', '--config.icnn.mu=2.0')
  with pytest.raises(MirrormetaError, match='icnn mu must be in'):
    algorithms.get(c.algorithm, icnn=c.icnn.to_dict())


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setattr(base, 'SHARED_DATA', tmp_path)
  assert base.default_data_dir('cub') == str(Path('~/data/cub'))
  (tmp_path / 'cifar100').mkdir()
  assert base.default_data_dir('fc100') == str(tmp_path / 'cifar100')
  assert base.default_data_dir('sinusoid') == ''


def test_n_way_larger_than_a_split_is_refused(omniglot_dir):
  c = parse('--config=smoke', f'--config.data_dir={omniglot_dir}', '--config.n_way=1000')
  with pytest.raises(data.DataError, match='omniglot/val: n_way=1000 but the split has only 688'):
    train.build_experiment(c)


# --- every config builds its model and data pipeline ------------------------------------

def _cub_folder(root: Path, n_classes: int = 24, per_class: int = 7):
  """The original CUB layout (CUB_200_2011/images/NNN.Name/*.jpg), small JPEGs."""
  rng = np.random.default_rng(0)
  for c in range(1, n_classes + 1):
    folder = root / 'CUB_200_2011' / 'images' / f'{c:03d}.Bird_{c}'
    folder.mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(
          folder / f'Bird_{c}_{i:04d}.jpg')


@pytest.fixture(scope='module')
def standins(tmp_path_factory, request):
  """{dataset: data_dir}: stand-in files in each dataset's layout (real Omniglot)."""
  root = tmp_path_factory.mktemp('standins')
  dirs = {'sinusoid': ''}
  for name, write in (('miniimagenet', _mini_pickles),
                      ('tieredimagenet', lambda d: _tiered_standin(d, per_class=8)),
                      ('cifar100', _cifar_standin), ('cub', _cub_folder)):
    (root / name).mkdir()
    write(root / name)
    dirs[name] = str(root / name)
  dirs['cifarfs'] = dirs['fc100'] = dirs.pop('cifar100')
  dirs['omniglot'] = str(request.getfixturevalue('omniglot_dir'))
  return dirs, root / 'cache'


@pytest.mark.parametrize('name', NAMED)
def test_named_config_builds_model_and_data(name, standins):
  dirs, cache = standins
  c = parse(f'--config={name}')
  c.data_dir = dirs[c.dataset]
  if c.dataset not in ('omniglot', 'sinusoid'):  # the stand-ins hold 3-8 images per class
    c.query = c.eval_query = 2
    c.cache_dir = str(cache)
  exp = train.build_experiment(c)
  (sx, sy), (qx, qy) = exp.draw['train'](jax.random.key(0), 0, c.meta_batch)
  if c.dataset == 'sinusoid':
    assert sx.shape == (c.meta_batch, c.shot, 1) and qy.shape == (c.meta_batch, c.query, 1)
  else:
    size = {'omniglot': 28, 'cifarfs': 32, 'fc100': 32}.get(c.dataset, 84)
    channels = 1 if c.dataset == 'omniglot' else 3
    assert sx.shape == (c.meta_batch, c.n_way * c.shot, size, size, channels)
    assert qx.shape[:2] == (c.meta_batch, c.n_way * c.query) and sy.dtype == np.int32
  state = jax.eval_shape(exp.init_state)
  out = jax.eval_shape(exp.model.apply, state.params.z, sx[0])
  assert out.shape == (sx.shape[1], c.n_way if c.dataset != 'sinusoid' else 1)
  bounds = jax.eval_shape(exp.algorithm.conjugate.bounds, state.params.h)
  assert set(bounds) == {'mu', 'lipschitz'}
  if c.dataset == 'sinusoid':  # small enough to trace the whole meta-step
    _, metrics = jax.eval_shape(exp.meta.step, state, (sx, sy), (qx, qy))
    assert metrics['support_loss'].shape == (c.inner_steps + 1,)


@pytest.mark.parametrize('algorithm', algorithms.ALGORITHMS)
def test_every_algorithm_builds_a_meta_step(algorithm):
  c = parse('--config=sinusoid', f'--config.algorithm={algorithm}', '--config.mlp_hidden=(8,)',
            '--config.meta_batch=2')
  exp = train.build_experiment(c, splits=('train',))
  assert exp.algorithm.first_order == (algorithm == 'fomaml')
  state = exp.init_state()
  support, query = exp.draw['train'](jax.random.key(0), 0, 2)
  _, metrics = jax.eval_shape(exp.meta.step, state, support, query)
  assert metrics['loss'].shape == () and metrics['grad_norm'].shape == (c.inner_steps,)
  bounds = jax.device_get(exp.algorithm.conjugate.bounds(state.params.h))
  assert 0 < bounds['mu'] <= bounds['lipschitz'] < 100


def test_workdir_guard(tmp_path):
  c = parse('--config=smoke')
  assert checkpoint.check_workdir(tmp_path / 'new', c) is False
  assert checkpoint.check_workdir(tmp_path, c) is False  # empty folder
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(MirrormetaError, match='is not empty and holds no mirrormeta run'):
    checkpoint.check_workdir(tmp_path, c)
  with pytest.raises(MirrormetaError, match='is a file'):
    checkpoint.check_workdir(tmp_path / 'notes.txt', c)
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  checkpoint.write_config(run_dir, c)
  changed = c.copy_and_resolve_references()
  changed.num_steps, changed.test_tasks, changed.eval_inner_steps = 99, 600, 10  # free
  changed.strategy.tasks, changed.data_dir, changed.progress = 'vmap', '/elsewhere', False
  assert checkpoint.check_workdir(run_dir, changed) is True
  changed.inner_lr, changed.icnn.width, changed.optimizer.lr = 0.1, 3, 0.5
  with pytest.raises(MirrormetaError) as e:
    checkpoint.check_workdir(run_dir, changed)
  assert str(e.value) == (
      f'--workdir {run_dir} holds a run of a different config (icnn.width: 3 here vs 8 there; '
      'inner_lr: 0.1 here vs 0.4 there; optimizer.lr: 0.5 here vs 0.001 there); use another '
      '--workdir, or the same config to resume it')
  stored = checkpoint.read_config(run_dir)
  del stored['icnn']['width']  # a field added after the run started is not compared
  assert checkpoint.config_differences(stored, checkpoint.config_dict(c)) == []


def test_strategy_layout_reaches_the_model():
  """'auto' is the backend's default; NCHW builds the same function of the same parameters."""
  x = np.random.default_rng(0).standard_normal((3, 28, 28, 1)).astype(np.float32)
  outputs = {}
  for layout in ('auto', 'NCHW'):
    c = parse('--config=smoke', f'--config.strategy.layout={layout}')
    train.check_config(c)
    model = train.make_model(c, x[0])
    outputs[layout] = model.apply(model.init(jax.random.key(0)), x)
  assert models.default_layout() == 'NHWC'
  np.testing.assert_allclose(outputs['NCHW'], outputs['auto'], rtol=1e-4, atol=1e-5)


def test_strategy_icnn_block_major_reaches_the_conjugate():
  """An execution option, not part of the conjugate: outside config.icnn (which a resumed run
  must match) and free to change on resume; the map computes kernels block-major only when
  it is on."""
  params = {'kernel': jnp.zeros((3, 3, 2, 4))}
  z = {'kernel': jnp.ones((3, 3, 2, 4))}
  stored, transposes = {}, {}
  for flag in (True, False):
    c = parse('--config=smoke', '--config.algorithm=metamida', '--config.strategy.icnn_map=xla',
              f'--config.strategy.icnn_block_major={flag}')
    assert 'block_major' not in c.icnn
    stored[flag] = checkpoint.config_dict(c)
    conj = train.make_algorithm(c).conjugate
    jaxpr = jax.make_jaxpr(conj.apply)(conj.init(jax.random.key(0), params), z)
    transposes[flag] = 'transpose' in str(jaxpr)
  assert checkpoint.config_differences(stored[True], stored[False]) == []
  assert transposes == {True: True, False: False}


def test_strategy_icnn_map_reaches_the_conjugate():
  """'native' computes the MetaMiDA map with mirrormeta.native's kernel, 'xla' without it,
  'auto' natively on CPU where the kernel builds; an execution option (free to change on
  resume); a bad value is one clear error."""
  params = {'kernel': jnp.zeros((3, 3, 2, 4))}
  z = {'kernel': jnp.ones((3, 3, 2, 4))}
  stored, uses_kernel = {}, {}
  for mode in ('native', 'xla', 'auto'):
    c = parse('--config=smoke', '--config.algorithm=metamida', f'--config.strategy.icnn_map={mode}')
    train.check_config(c)
    stored[mode] = checkpoint.config_dict(c)
    conj = train.make_algorithm(c).conjugate
    theta_h = conj.init(jax.random.key(0), params)
    jaxpr = jax.make_jaxpr(jax.grad(conj.apply, argnums=1))(theta_h, z)
    uses_kernel[mode] = 'mirrormeta_icnn_map_fwd' in str(jaxpr)
  assert checkpoint.config_differences(stored['native'], stored['xla']) == []
  assert uses_kernel == {'native': True, 'xla': False, 'auto': native.default()}
  with pytest.raises(MirrormetaError, match='strategy.icnn_map'):
    train.check_config(parse('--config=smoke', '--config.strategy.icnn_map=fast'))
  with pytest.raises(MirrormetaError, match="icnn_map='native' covers icnn.depth=1"):
    train.check_config(parse('--config=smoke', '--config.algorithm=metamida',
                             '--config.strategy.icnn_map=native', '--config.icnn.depth=2'))
