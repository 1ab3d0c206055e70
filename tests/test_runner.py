"""`python -m experiments.run` end to end: the smoke config on real Omniglot (train, validate,
checkpoint, resume exactly, test, report), NaN/inf stops, eval-only, MetaMiDA on sinusoids,
and bad input giving one error line with nothing overwritten.

One small compiled Conv4 is shared by every smoke run here (``experiment=``), so only the
first run compiles (and the persistent cache of tests/conftest.py makes reruns cheap).
"""
import dataclasses
import functools
import itertools
import json
import operator
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from experiments.configs import sinusoid as sinusoid_config  # noqa: E402
from experiments.configs import smoke as smoke_config  # noqa: E402
from mirrormeta import MirrormetaError, ahead, checkpoint, evaluate, runtime, train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = 6  # checkpoints every 2 steps, validation every 3


def small_smoke(omniglot_dir):
  c = smoke_config.get_config()
  c.data_dir = str(omniglot_dir)
  c.num_steps, c.checkpoint_every, c.eval_every, c.log_every = STEPS, 2, 3, 2
  c.val_tasks, c.test_tasks, c.progress = 10, 20, False
  return c


@pytest.fixture(scope='module')
def smoke(omniglot_dir):
  config = small_smoke(omniglot_dir)
  return config, train.build_experiment(config)


@pytest.fixture(scope='module')
def trained(smoke, tmp_path_factory):
  """A run of STEPS steps, never interrupted."""
  config, exp = smoke
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  results = train.train_and_evaluate(config, workdir, experiment=exp)
  return workdir, results


def restore(exp, workdir, which='latest'):
  return checkpoint.Checkpoints(Path(workdir) / 'checkpoints').restore(which, exp.init_state())


def assert_same_state(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit for bit on CPU


def steps_in(workdir, which):
  d = Path(workdir) / 'checkpoints' / which
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def test_logs_opened_within_one_second_keep_both_event_files(tmp_path):
  """A crash and its resume can open TensorBoard writers in the same second; the resumed
  run must not overwrite the crashed run's scalars (tensorboardX names files by second)."""
  config = types.SimpleNamespace(num_steps=4, name='t', algorithm='maml', progress=False)
  for start, step in ((0, 2), (2, 4)):
    log = train._Log(tmp_path, types.SimpleNamespace(config=config), start, True)
    log.scalars(step, {'train/loss': float(step)})
    log.close()
  assert evaluate.read_scalars(tmp_path)['train/loss'] == {2: 2.0, 4: 4.0}


def fail_at(monkeypatch, call, exc=None, poison=False, poison_loss=False):
  """Makes the runner's step raise ``exc`` at its ``call``-th call, or (poison) return NaN
  meta-parameters from it, or (poison_loss) a NaN loss only: a stand-in for a kill or a
  diverging run."""
  real = train.make_runner

  def make_runner(exp):
    runner = real(exp)
    calls = itertools.count(1)

    def step(state, *batch):
      n = next(calls)
      if n == call and exc is not None:
        raise exc
      state, metrics = runner.step(state, *batch)
      if n == call and poison:
        state = state._replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
      if n == call and poison_loss:
        metrics = dict(metrics, loss=metrics['loss'] * np.nan)
      return state, metrics
    return runner._replace(step=step)
  monkeypatch.setattr(train, 'make_runner', make_runner)


# --- the smoke config end to end ---------------------------------------------------------

def test_smoke_run_writes_everything(trained):
  workdir, results = trained
  names = {p.name for p in workdir.iterdir()}
  assert {'config.json', 'checkpoints', 'tensorboard', 'results.json', 'results.md',
          'accuracy_vs_step.png'} <= names
  assert steps_in(workdir, 'latest') == [4, 6]  # keep_checkpoints=2
  assert len(steps_in(workdir, 'best')) == 1
  assert (workdir / 'accuracy_vs_step.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  stored = json.loads((workdir / 'results.json').read_text())
  assert stored == json.loads(json.dumps(results))
  k = results['inner_steps']
  assert k == 3 and results['per_step']['step'] == [0, 1, 2, 3]
  assert len(results['per_step']['accuracy']) == len(results['per_step']['loss_ci95']) == k + 1
  assert results['num_tasks'] == 20 and results['metric'] == 'accuracy'
  assert 0 <= results['accuracy'] <= 100 and results['accuracy_ci95'] > 0
  assert results['accuracy'] == results['per_step']['accuracy'][-1]
  assert results['per_step']['accuracy'][0] == pytest.approx(20, abs=10)  # 5-way chance
  assert results['checkpoint']['which'] == 'best'
  assert results['checkpoint']['step'] == results['best_val']['step'] in (3, 6)
  assert results['train'] == {'steps': STEPS, 'resumed_from': 0,
                              'wall_s': results['train']['wall_s']}
  md = (workdir / 'results.md').read_text()
  assert f'**{results["accuracy"]:.2f}% ± {results["accuracy_ci95"]:.2f}%**' in md
  assert md.count('\n| ') == k + 2  # header + one row per step 0..K

  tb = evaluate.read_scalars(workdir)
  assert set(tb['train/loss']) == {2, 4, 6} and set(tb['val/accuracy']) == {3, 6}
  for tag in ('train/accuracy', 'train/meta_grad_norm', 'inner/support_loss/step_0',
              'inner/support_loss/step_1', 'inner/grad_norm/step_0', 'optim/meta_lr',
              'optim/inner_lr', 'conjugate/mu', 'conjugate/lipschitz', 'perf/steps_per_sec'):
    assert tag in tb, tag
  assert not any(tag.startswith('val/accuracy_per_step') for tag in tb)  # val_curve off
  assert tb['conjugate/mu'][2] == tb['conjugate/lipschitz'][2] == 1.0  # maml: h* = ½‖z‖²
  assert tb['optim/meta_lr'][2] == pytest.approx(1e-3)


def test_validation_after_step_k_is_the_curves_last_point(smoke, trained):
  del trained  # compiled both evaluation functions
  config, exp = smoke
  theta = exp.init_state().params
  after_k = train.validate(exp, theta)
  curve = train.validate(dataclasses.replace(exp, val_fn=exp.eval_fn), theta)
  k = exp.eval_steps
  assert after_k['per_step']['step'] == [k] and curve['per_step']['step'] == list(range(k + 1))
  np.testing.assert_allclose(after_k['per_step']['loss'], curve['per_step']['loss'][-1:],
                             rtol=1e-5)
  # Accuracy counts argmax hits: allow one of the 10 x 75 queries to flip on rounding.
  assert after_k['accuracy'] == pytest.approx(curve['accuracy'], abs=100 / 750 + 1e-9)
  with_curve = small_smoke(config.data_dir)
  with_curve.val_curve = True
  val = train.validate(train.build_experiment(with_curve, splits=('val',)), theta)
  assert val['per_step']['step'] == list(range(k + 1))
  np.testing.assert_allclose(val['per_step']['loss'], curve['per_step']['loss'], rtol=1e-6)


def test_resume_after_interrupt_is_exact(smoke, trained, tmp_path, monkeypatch):
  config, exp = smoke
  workdir = tmp_path / 'run'
  fail_at(monkeypatch, call=4, exc=KeyboardInterrupt())  # Ctrl-C during step 4
  with pytest.raises(train.Interrupted, match='interrupted at step 4; checkpoint at .*latest/3'):
    train.train_and_evaluate(config, workdir, experiment=exp)
  assert steps_in(workdir, 'latest') == [2, 3] and not (workdir / 'results.json').exists()
  monkeypatch.undo()
  results = train.train_and_evaluate(config, workdir, experiment=exp)
  assert results['train']['resumed_from'] == 3
  assert_same_state(restore(exp, workdir), restore(exp, trained[0]))
  assert results['per_step'] == trained[1]['per_step']


def test_resume_after_crash_is_exact(smoke, trained, tmp_path, monkeypatch):
  config, exp = smoke
  workdir = tmp_path / 'run'
  fail_at(monkeypatch, call=6, exc=RuntimeError('killed'))  # dies in step 6: no save
  with pytest.raises(RuntimeError, match='killed'):
    train.train_and_evaluate(config, workdir, experiment=exp)
  assert steps_in(workdir, 'latest') == [2, 4]
  monkeypatch.undo()
  results = train.train_and_evaluate(config, workdir, experiment=exp)
  assert results['train']['resumed_from'] == 4
  assert_same_state(restore(exp, workdir), restore(exp, trained[0]))
  assert_same_state(restore(exp, workdir, 'best'), restore(exp, trained[0], 'best'))
  assert (evaluate.read_scalars(workdir)['train/loss']
          == evaluate.read_scalars(trained[0])['train/loss'])


def test_finished_run_can_be_extended(smoke, trained, tmp_path):
  config, exp = smoke
  workdir = tmp_path / 'run'
  shutil.copytree(trained[0], workdir)
  longer = config.copy_and_resolve_references()
  longer.num_steps = STEPS + 2  # num_steps may change in a workdir
  results = train.train_and_evaluate(longer, workdir, experiment=exp)
  assert results['train']['resumed_from'] == STEPS
  assert steps_in(workdir, 'latest') == [STEPS, STEPS + 2]


def test_eval_only_retests_a_checkpoint(smoke, trained, tmp_path):
  config, _ = smoke
  workdir = tmp_path / 'run'
  shutil.copytree(trained[0], workdir)
  other = config.copy_and_resolve_references()
  other.test_tasks, other.eval_inner_steps, other.eval_checkpoint = 30, 1, 'latest'
  results = train.evaluate_checkpoint(other, workdir)
  assert results['num_tasks'] == 30 and results['inner_steps'] == 1
  assert results['checkpoint']['which'] == 'latest' and results['checkpoint']['step'] == STEPS
  assert json.loads((workdir / 'results.json').read_text())['num_tasks'] == 30
  with pytest.raises(MirrormetaError, match='holds no trained run'):
    train.evaluate_checkpoint(other, tmp_path / 'empty')


@pytest.mark.parametrize('call, poison, what, last_good', [
    (4, 'params', 'meta-parameters at step 4', 2),  # caught before saving step 4
    (5, 'params', 'meta-loss at step 6', 4),        # caught by the next step's loss
    # Step 5 neither logs nor saves: its loss is checked once step 6 is dispatched.
    (5, 'loss', 'meta-loss at step 5', 4),
])
def test_nonfinite_run_stops_and_keeps_last_good_checkpoint(smoke, tmp_path, monkeypatch, call,
                                                            poison, what, last_good):
  config, exp = smoke
  workdir = tmp_path / 'run'
  fail_at(monkeypatch, call=call, poison=poison == 'params', poison_loss=poison == 'loss')
  with pytest.raises(train.NonFiniteError) as e:
    train.train_and_evaluate(config, workdir, experiment=exp)
  message = str(e.value)
  assert message.startswith(f'non-finite {what}; last good checkpoint at ')
  assert f'latest/{last_good} (try a lower inner_lr' in message and '\n' not in message
  assert steps_in(workdir, 'latest')[-1] == last_good
  good = restore(exp, workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good.params))
  assert not (workdir / 'results.json').exists()


# --- compiling ahead ---------------------------------------------------------------------

def test_compile_ahead_compiles_each_program_once_and_the_runs_load_it(omniglot_dir, tmp_path):
  """config.compile_ahead: a first run compiles its step, validation and test programs in
  fresh processes into its (empty) cache and loads them; had the run lowered any of them
  otherwise, it would have compiled and cached a second entry. Resuming the run starts no
  process and compiles none of them again."""
  cache = tmp_path / 'cache'
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache))
  args = [sys.executable, '-m', 'experiments.run', '--config=smoke',
          f'--workdir={tmp_path / "run"}', f'--config.data_dir={omniglot_dir}',
          '--config.compile_ahead=True', '--config.progress=False', '--config.val_tasks=10',
          '--config.test_tasks=20']

  def run(steps):
    proc = subprocess.run(args + [f'--config.num_steps={steps}'], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr

  def programs():
    return sorted(p.name.split('-')[0] for p in cache.glob('jit_*-cache')
                  if p.name.startswith(('jit_step-', 'jit_fn-')))

  first = run(20)
  assert 'compiling step, val, test in 2 fresh processes' in first
  assert 'compiled ' in first and 'ahead failed' not in first
  assert programs() == ['jit_fn', 'jit_fn', 'jit_step']  # validation's, the test's, the step
  assert len(list((cache / ahead.MARKERS).iterdir())) == 3
  second = run(40)
  assert 'resuming' in second and 'compiling' not in second
  assert programs() == ['jit_fn', 'jit_fn', 'jit_step']


def test_compile_ahead_by_default_only_where_threads_share_one_arena(omniglot_dir):
  c = small_smoke(omniglot_dir)
  assert runtime.applied_arenas() == 'per_thread'  # synchronous dispatch, one device
  for value, expected in ((None, False), (True, True), (False, False)):
    c.compile_ahead = value
    assert train.compiles_ahead(c) is expected


def test_compile_ahead_leaves_a_program_it_could_not_compile_to_the_caller():
  lowered = {'tiny': jax.jit(lambda x: x * 3.0 + 1.0).lower(1.0)}
  lines = []
  done = ahead.compile_ahead(lowered, functools.partial(operator.getitem, {}), log=lines.append)
  assert done == {}
  assert lines[0].startswith('compiling tiny in 1 fresh process ')
  assert lines[1].startswith('compiling tiny ahead failed (exit status 1: TypeError')
  assert lines[1].endswith('; it compiles here') and len(lines) == 2


# --- MetaMiDA, regression ----------------------------------------------------------------

def test_metamida_sinusoid_end_to_end(tmp_path):
  c = sinusoid_config.get_config()
  c.mlp_hidden, c.meta_batch, c.num_steps = (16, 16), 4, 4
  c.eval_inner_steps, c.eval_every, c.checkpoint_every, c.log_every = 2, 2, 2, 2
  c.val_tasks, c.test_tasks, c.progress = 8, 16, False
  results = train.train_and_evaluate(c, tmp_path)
  assert results['algorithm'] == 'metamida' and results['metric'] == 'mse'
  assert results['mse'] == results['per_step']['loss'][-1] > 0 and 'accuracy' not in results
  assert (tmp_path / 'mse_vs_step.png').is_file()
  assert '| step k | query MSE | ± 95% CI |' in (tmp_path / 'results.md').read_text()
  tb = evaluate.read_scalars(tmp_path)
  assert 0 < tb['conjugate/mu'][4] < tb['conjugate/lipschitz'][4] < 100
  assert 'val/mse' in tb and 'train/accuracy' not in tb


# --- bad input: one error line, exit status 2, nothing written ---------------------------

def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=str(REPO / '.jax_cache'))
  return subprocess.Popen([sys.executable, '-m', 'experiments.run', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_input_gives_one_error_line(trained, omniglot_dir, tmp_path):
  workdir, _ = trained
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  new = tmp_path / 'new'
  data = f'--config.data_dir={omniglot_dir}'
  cases = {
      'unknown config': (['--config=mini_1sht', f'--workdir={new}'],
                         "error: unknown config 'mini_1sht'; available: cifarfs_1shot, "),
      'unknown field': (['--config=smoke', '--config.inner_lrr=0.1', f'--workdir={new}'],
                        "error: unknown config field 'inner_lrr' in --config.inner_lrr "
                        "(did you mean 'inner_lr'?)"),
      'wrong type': (['--config=smoke', '--config.shot=one', f'--workdir={new}'],
                     'error: flag --config.shot=one: invalid literal for int()'),
      'shot <= 0': (['--config=smoke', '--config.shot=0', f'--workdir={new}'],
                    'error: config.shot=0 must be >= 1'),
      # With all three process settings on (synchronous_dispatch by default): they must
      # apply before JAX starts, not error out.
      'inner lr <= 0': (['--config=smoke', '--config.inner_lr=-0.5',
                         '--config.low_memory_schedule=True',
                         '--config.threaded_convolutions=True', f'--workdir={new}'],
                        'error: config.inner_lr=-0.5 must be > 0'),
      'n_way > split': (['--config=smoke', '--config.n_way=5000', data, f'--workdir={new}'],
                        'error: omniglot/train: n_way=5000 but the split has only 4112 classes'),
      'other run in workdir': (['--config=smoke', '--config.shot=2', data, f'--workdir={workdir}'],
                               f'error: --workdir {workdir} holds a run of a different config '
                               "(shot: 2 here vs 1 there); use another --workdir"),
  }
  procs = {name: run_cli(*args) for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (name, err[-2000:])
    assert out == '', (name, out)
    assert len(err.strip().splitlines()) == 1, (name, err[-2000:])
    assert err.startswith(cases[name][1]), (name, err)
  assert not new.exists()
  assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == before
