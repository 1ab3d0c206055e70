"""The benchmarks' measuring tools: FLOP counts, device ceilings, option parsing, stand-ins."""

import collections
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks/ is a top-level folder, not an installed package

from benchmarks import common as C  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import profile, strategies, table5, train_time  # noqa: E402  pylint: disable=g-import-not-at-top
import mirrormeta as mm  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import configs  # noqa: E402  pylint: disable=g-import-not-at-top
from mirrormeta import data  # noqa: E402  pylint: disable=g-import-not-at-top


def test_flop_count_is_xlas_count_of_a_matrix_product():
  x = jnp.ones((32, 48), jnp.float32)
  compiled = jax.jit(lambda a, b: a @ b).lower(x, x.T).compile()
  assert C.flop_count(compiled) == 2 * 32 * 48 * 32


def test_measured_ceilings_are_positive_rates():
  rates = C.measured_ceilings(size=64, repeats=2)
  assert set(rates) == {'matmul_default_tflops', 'matmul_highest_tflops', 'copy_tbps'}
  assert all(np.isfinite(v) and v > 0 for v in rates.values())


def test_flops_lines_divide_by_the_measured_ceilings():
  class Built:
    flops = 2e12
  lines = table5.flops_lines({('maml', 5): Built()}, {('maml', 5): [0.5, 0.5, 0.5]},
                             {'matmul_default_tflops': 40.0, 'matmul_highest_tflops': 8.0})
  assert lines == ['- achieved FLOP/s, maml K=5: 4.00 TFLOP/s (2000.0 GFLOP/step) = 10.0% '
                   'of the measured default-precision matmul rate, 50.0% of the float32 one']


def test_gpu_target_is_three_times_faster_than_pytorch():
  class Built:
    memory = {'peak': 1.0}
  maml = [0.02, 0.021, 0.019, 0.02, 0.022, 0.02]
  times = {('maml', 5): maml}
  torch_times = {('maml', 'loops'): [2 * t for t in maml]}  # mirrormeta at 0.5x PyTorch's time
  verdict = lambda device: table5.targets(None, {('maml', 5): Built()}, times, torch_times,
                                          [5], 1, device)[0].split(']')[0][3:]
  assert verdict('cpu') == 'MET'  # <= 0.8
  assert verdict('cuda') == 'NOT MET'  # <= 1/3


def test_interleaved_timing_stops_before_the_deadline():
  """A lent machine kills a command at its time limit, and a killed benchmark saves
  nothing: with a deadline, rounds stop once another would pass it (at least one runs)."""
  import time  # pylint: disable=g-import-not-at-top
  calls = []
  fns = {'a': lambda: (calls.append('a'), time.sleep(0.02)),
         'b': lambda: (calls.append('b'), time.sleep(0.02))}
  start = time.monotonic()
  times = C.time_interleaved(fns, repeats=1000, warmup=0, deadline=start + 0.5)
  assert 1 <= len(times['a']) == len(times['b']) < 1000
  assert time.monotonic() - start < 1.0  # the deadline, plus slack for a loaded machine
  assert calls[:4] == ['a', 'b', 'a', 'b']  # still interleaved
  past = C.time_interleaved(fns, repeats=5, warmup=0, deadline=time.monotonic() - 1)
  assert len(past['a']) == 1
  assert C.deadline_after(None) is None


class _Killed(Exception):
  pass


def _killed_after_two_saves(module, argv, out, tmp_path, monkeypatch):
  """Runs ``module.main(argv)`` on a tiny Conv4, 'killed' after its second save; returns the
  results file's text then, and after a whole run."""
  monkeypatch.setattr(C, 'RESULTS', tmp_path)
  monkeypatch.setitem(C.SHAPES, 'tiny', C.Shape('tiny', (16, 16, 1), 4))
  path = tmp_path / f'{out}_{jax.default_backend()}.md'
  save, saves = C.save, []
  def save_then_die(name, text):
    saves.append(save(name, text))
    if len(saves) == 2:
      raise _Killed
  monkeypatch.setattr(C, 'save', save_then_die)
  with pytest.raises(_Killed):
    module.main(argv)
  killed = path.read_text()
  monkeypatch.setattr(C, 'save', save)
  module.main(argv)
  return killed, path.read_text()


def test_table5_saves_its_figures_after_every_round(tmp_path, monkeypatch):
  """A run killed mid-way (a lent machine's time limit, the OOM killer) keeps the rounds it
  timed: the results file is rewritten after each round, marked partial until the end."""
  killed, whole = _killed_after_two_saves(
      table5, ['--shapes=tiny', '--algorithms=maml,metamida', '--ks=1', '--repeats=3',
               '--warmup=0', '--torch=', '--out=t5', '--compile_workers=1'], 't5', tmp_path,
      monkeypatch)
  assert '**Partial: 2 of 3 rounds of the tiny shape**' in killed
  assert '| maml | 1 |' in killed and '| metamida | 1 |' in killed
  assert 'MetaMiDA / MAML time at K=1: ' in killed and 'no 95% CI from 2 rounds' in killed
  assert 'Partial' not in whole and 'no 95% CI from 3 rounds' in whole


def test_strategies_saves_its_figures_after_every_round(tmp_path, monkeypatch):
  killed, whole = _killed_after_two_saves(
      strategies, ['--shape=tiny', '--algorithm=maml', '--steps=1', '--repeats=3',
                   '--warmup=0', '--strategies=loop:full,loop:1', '--out=st',
                   '--compile_workers=1'], 'st',
      tmp_path, monkeypatch)
  assert '**Partial: 2 of 3 rounds**' in killed and '2 interleaved rounds' in killed
  assert 'Partial' not in whole and '3 interleaved rounds' in whole


_BUILD_ALL = """
import concurrent.futures, json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from benchmarks import common as C

pools = []
class Pool(concurrent.futures.ProcessPoolExecutor):
  def __init__(self, *args, **kwargs):
    pools.append(args[0])
    super().__init__(*args, **kwargs)
C.concurrent.futures.ProcessPoolExecutor = Pool

def main():
  C.setup()
  tiny = C.Shape('tiny', (16, 16, 1), 4)
  specs = {f'{a} K={k}': dict(algorithm=a, shape=tiny, steps=k)
           for a, k in (('metamida', 1), ('maml', 2), ('maml', 1))}
  built = C.build_all(specs, workers=2, verbose=False)
  again = C.build_all(specs, workers=2, verbose=False)  # already built: reused, no compiling
  out = {}
  for name, b in built.items():
    _, metrics = b.compiled(b.state, b.support, b.query)
    out[name] = [b.loaded, b.compile_s, bool(np.isfinite(float(metrics['loss']))),
                 again[name] is b]
  print(json.dumps([pools, out]))

if __name__ == '__main__':  # build_all's processes are spawned: they import this module
  main()
"""


def test_build_all_compiles_in_other_processes_and_loads_their_programs(tmp_path):
  """Into an empty persistent cache, build_all compiles the cheapest program here, then
  the rest in fresh processes, and loads those from the cache. Run again (a fresh process,
  as a benchmark's rerun), the cheapest is loaded from the cache and so are the rest, here:
  no compiling processes. In fresh processes, as a benchmark runs it (JAX reads the
  cache's folder once)."""
  script = tmp_path / 'build_all.py'
  script.write_text(_BUILD_ALL)
  def run():
    proc = subprocess.run([sys.executable, str(script), ROOT], capture_output=True, text=True,
                          check=False, cwd=ROOT,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu',
                               'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'cache')})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])
  pools, out = run()
  assert pools == [2] and list(out) == ['metamida K=1', 'maml K=2', 'maml K=1']
  here = [name for name, (loaded, *_) in out.items() if not loaded]
  assert len(here) == 1 and here[0].endswith('K=1')  # the probe: a cheapest program
  for name, (loaded, compile_s, finite, reused) in out.items():
    assert finite and reused
    if name not in here:
      assert compile_s > 1  # the compiling process's time, not this one's load
  pools, out = run()
  assert pools == [] and all(loaded for loaded, *_ in out.values())


_UNTIL_SETUP = """
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
from jax._src import xla_bridge
from benchmarks import common as C
class Reached(Exception):
  pass
def setup(*args, **kwargs):
  raise Reached(xla_bridge.backends_are_initialized())
C.setup = setup
started = []
for name, argv in json.loads(sys.argv[2]):
  sys.argv = [name] + argv
  try:
    importlib.import_module('benchmarks.' + name).main()
  except Reached as e:
    started.append([name, argv, e.args[0]])
print(json.dumps(started))
"""


def test_benchmarks_reach_setup_before_jax_starts():
  """setup()'s process settings (synchronous dispatch, XLA flags) apply only before JAX's
  backend starts: parsing a benchmark's flags, defaults included, must not start it. Each
  main runs, in a fresh process, until it calls setup()."""
  runs = [['table5', ['--shapes=omniglot']], ['memory', []], ['sampler', []],
          ['map_cost', []], ['build_time', []], ['train_time', []], ['strategies', []],
          ['strategies', ['--strategies=vmap:full,loop:1:tied']],
          ['profile', ['--strategy=loop:full:tied']], ['executor', []]]
  proc = subprocess.run([sys.executable, '-c', _UNTIL_SETUP, ROOT, json.dumps(runs)],
                        capture_output=True, text=True, check=False, cwd=ROOT,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.splitlines()[-1]) == [run + [False] for run in runs]


_EXECUTOR_CHILD = """import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from mirrormeta import runtime
runtime.cpu_devices(2)
from benchmarks import executor
programs = executor.programs(4, images=3)
outs = {k: np.asarray(fn(*a)).tolist() for k, (fn, a) in programs.items()}
xs, ws = programs['4 convs, 2 devices'][1]  # the stacked inputs all three programs share
print(json.dumps({'outs': outs, 'xs': np.asarray(xs).tolist(), 'ws': np.asarray(ws).tolist()}))
"""


def test_executor_programs_compute_the_same_convolutions():
  """benchmarks.executor times one, N on one device and N on 2 devices: the same N
  convolutions (the unit is the first of them), checked against NumPy."""
  proc = subprocess.run([sys.executable, '-c', _EXECUTOR_CHILD, ROOT], capture_output=True,
                        text=True, check=False, cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(proc.stdout.splitlines()[-1])
  outs = {k: np.asarray(v) for k, v in got['outs'].items()}
  xs, ws = np.asarray(got['xs'], np.float32), np.asarray(got['ws'], np.float32)
  pad = np.pad(xs, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  want = sum(np.einsum('tbhwi,tio->tbhwo', pad[:, :, i:i + 14, j:j + 14], ws[:, i, j])
             for i in range(3) for j in range(3))
  np.testing.assert_allclose(outs['1 conv'], want[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(outs['4 convs, 1 device'], want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(outs['4 convs, 2 devices'], want, rtol=1e-4, atol=1e-4)


def test_build_stops_before_passing_the_memory_mapping_limit(monkeypatch):
  """A program that would pass vm.max_map_count is refused with the fix, not left to abort
  the process inside LLVM."""
  if C._mappings() is None:
    pytest.skip('no /proc memory-mapping counts here')
  count, limit = C._mappings()
  monkeypatch.setattr(C, '_MAPPINGS_PER_PROGRAM', [0])
  C._check_mappings('x', (count, limit))  # nothing loaded yet: no estimate, no refusal
  monkeypatch.setattr(C, '_MAPPINGS_PER_PROGRAM', [limit - count + 1])
  with pytest.raises(SystemExit, match=r'vm.max_map_count=\d+.*sysctl -w vm.max_map_count'):
    C._check_mappings('maml omniglot K=5', (count, limit))
  monkeypatch.setattr(C, '_MAPPINGS_PER_PROGRAM', [(limit - count) // 2])
  C._check_mappings('x', (count, limit))


def test_strategy_spec_fills_the_backend_defaults():
  s, conv, layout, icnn = strategies.parse_spec('vmap:1')
  default_icnn = 'native' if mm.native.default() else 'block_major'
  assert (s.tasks, s.unroll, conv, layout, icnn) == ('vmap', 1, 'mirrormeta',
                                                     mm.models.default_layout(), default_icnn)
  assert s.map_remat == mm.default_strategy().map_remat
  s, conv, layout, icnn = strategies.parse_spec('loop:full:checkpoint:lax:NCHW:natural')
  assert (s.tasks, s.unroll, s.map_remat, conv, layout, icnn) == ('loop', True, 'checkpoint',
                                                                  'lax', 'NCHW', 'natural')
  assert strategies.parse_spec('loop:full:tied:mirrormeta:NHWC:native').icnn == 'native'
  for bad in ('loop:full:tied:lax:NWHC', 'loops:1', 'loop:1:tied:cudnn', 'loop', 'loop:bad',
              'loop:0', 'vmap:full:tie',
              'loop:1:tied:lax:NHWC:channel_major', 'loop:1:tied:lax:NHWC:natural:x'):
    with pytest.raises(ValueError, match='tasks:unroll'):
      strategies.parse_spec(bad)


def test_train_time_overrides_are_checked_by_the_config():
  config = configs.get('mini_1shot')
  config.lock()
  train_time.override(config, 'strategy.tasks=loop')
  train_time.override(config, 'inner_steps=3')
  assert config.strategy.tasks == 'loop' and config.inner_steps == 3
  with pytest.raises(KeyError):
    train_time.override(config, 'strategy.taks=loop')
  with pytest.raises(TypeError):
    train_time.override(config, 'inner_steps=many')


def test_mini_standin_loads_as_miniimagenet(tmp_path):
  root = train_time.write_mini_standin(tmp_path, per_class=2, size=84)
  sizes = {}
  for split in ('train', 'val', 'test'):
    ds = data.load_dataset('miniimagenet', root, split, cache_dir=tmp_path / 'cache')
    assert ds.images.shape[1:] == (84, 84, 3) and ds.images.dtype == np.uint8
    sizes[split] = ds.num_classes
  assert sizes == {'train': 64, 'val': 16, 'test': 20}


def test_train_time_projects_the_smoke_run(tmp_path, monkeypatch, omniglot_dir):
  monkeypatch.setattr(C, 'RESULTS', tmp_path)
  train_time.main(['--config=smoke', '--steps=4', '--warmup_steps=1',
                   f'--data_dir={omniglot_dir}', '--set', 'val_tasks=8',
                   '--set', 'test_tasks=8', '--out=tt_smoke'])
  text = (tmp_path / f'tt_smoke_{jax.default_backend()}.md').read_text()
  rows = {line.split(' | ')[0].strip('| '): line.split(' | ')[1:] for line in text.splitlines()
          if line.startswith('| ')}
  assert {'one training step (runner loop)', 'bare compiled step', 'one validation',
          'one validation with the per-step curve', 'test',
          'projected whole run'} <= set(rows)
  assert rows['one validation'][1].startswith('8 tasks, K=3, val_curve=False')
  # The curve evaluates the query set after steps 0..3 instead of after step 3 only.
  curve_ratio = float(rows['one validation with the per-step curve'][1].split(': ')[1][:-3])
  assert curve_ratio > 1.5
  assert '] projected whole run' in text and '40 steps, 2 validations, test' in text


def _inner_step(theta_h, z, x):
  """A model layer and a mirror map: the profiler should tell their operations apart."""
  phi = mm.primal_map(mm.conjugates.icnn(width=2).apply, theta_h, z)
  y = jax.lax.conv_general_dilated(x, phi['w'], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jnp.tanh(y).sum()


def test_profile_names_operations_by_kind_and_code_and_splits_interleaved_runs(tmp_path):
  z = {'w': jnp.ones((3, 3, 2, 4)) * 0.1}
  theta_h = mm.conjugates.icnn(width=2).init(jax.random.key(0), z)
  x = jnp.ones((2, 8, 8, 2))
  grad = jax.jit(jax.grad(_inner_step, argnums=(0, 1))).lower(theta_h, z, x).compile()
  tanh = jax.jit(lambda x: jnp.tanh(x) * 2).lower(x).compile()
  ops = profile.hlo_ops(grad, roots=(os.path.dirname(os.path.abspath(__file__)),))
  kinds = collections.Counter(op.kind for op in ops.values())
  assert kinds['convolution'] >= 2  # forward, and the kernel's gradient
  # Frames are read back to the test's own function, and (in mirrormeta/) to primal_map.
  assert any(op.source == 'test_benchmark_tools.py:_inner_step' for op in ops.values())
  assert any(op.in_map for op in ops.values())
  assert not any(op.in_map for op in ops.values() if op.kind == 'convolution')
  assert all(op.source == '(convolutions)' for op in ops.values() if op.kind == 'convolution')
  # Calls of two programs, interleaved, are told apart by their annotated spans.
  calls = [lambda: jax.block_until_ready(grad(theta_h, z, x)),
           lambda: jax.block_until_ready(tanh(x))] * 2
  times, walls = profile.trace_calls(calls, keep=str(tmp_path))
  assert list(tmp_path.glob('**/*.trace.json.gz'))  # kept for a trace viewer
  assert len(times) == len(walls) == 4 and all(w > 0 for w in walls)
  assert set(times[0]) == set(times[2]) and set(times[1]) == set(times[3])
  assert set(times[0]) <= set(ops) and not set(times[0]) & set(times[1])
  assert sum(times[0].values()) > 0


def test_profile_report_takes_medians_over_rounds_and_differences():
  Op = profile.Op
  info = {'conv': Op('convolution', '(convolutions)', False),
          'sig': Op('elementwise', 'conjugates.py:icnn.slope', True),
          'loop': Op(None, '(elsewhere)', False)}  # a container (a while loop)
  # Three rounds each; one slow round must not move a median.
  maml = profile.Profile([1.0, 1.1, 5.0], [{'conv': 0.8}, {'conv': 0.9}, {'conv': 4.0}], info)
  mida = profile.Profile([1.2, 1.3, 1.2], [{'conv': 0.9, 'sig': 0.2, 'loop': 9.0}] * 3, info)
  text = '\n'.join(profile.report({'maml': maml, 'metamida': mida}, top=5))
  rows = {line.split(' | ')[0].strip('| '): line.split(' | ')[1:] for line in text.splitlines()
          if line.startswith('| ')}
  assert rows['wall time'] == ['1100.0', '1200.0', '+100.0 |']
  assert rows["operations' time"] == ['900.0', '1100.0', '+200.0 |']  # the loop not counted
  assert rows['elementwise'] == ['0.0 (0.0%)', '200.0 (18.2%)', '+200.0 |']
  assert rows['… under `primal_map` (a lower bound, see below)'][1] == '200.0 (18.2%)'
  slowest = text.split('Slowest operations, metamida')[1]
  assert '`sig`' in slowest and '`loop`' not in slowest
