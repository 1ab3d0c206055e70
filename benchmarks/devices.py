"""Meta-step time on 1 device vs N fake CPU devices: the cost of sharding the task batch.

    python -m benchmarks.devices [--configs=smoke,conv4] [--devices=1,8] [--meta_batch=8]
        [--steps=10] [--rounds=2] [--data_dir=../shared/data/omniglot]

Each (config, device count) runs in its own process (the device count is fixed when JAX
starts: ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, ``JAX_PLATFORMS=cpu``) and
times the runner's own meta-step (``mirrormeta.train.build_experiment`` + ``make_runner``:
``jax.jit`` on 1 device; ``shard_map`` over the 'tasks' mesh with ``pmean`` otherwise) on
one batch of real Omniglot tasks already placed on the devices: the median and the best of
``--steps`` calls, after a first call that traces and compiles (its time, from the first
round, is printed too). ``iteration`` adds drawing the tasks and placing them on the mesh
(the training loop's whole step). The device counts run one after another, ``--rounds``
times (1, 8, 1, 8, ...; later rounds load the compiled programs from a temporary cache),
and each figure is the median over rounds, so that load from other processes on a shared
machine hits both alike; the per-round ratios and the load average are printed to judge
the noise. Configs:

  smoke  experiments/configs/smoke.py: MAML, Conv4-16, K=1, 5-way 1-shot 5 query.
  conv4  experiments/configs/omniglot_5w1s.py with MAML: Conv4-64, K=5, 15 query (the
         DESIGN.md §3 reference step, there with 4 tasks).
  conv4_metamida  the same with MetaMiDA.

The meta-batch is ``--meta_batch`` tasks for every device count (default 8: it must split
over the devices; 1 task per device on 8), so both columns do the same work. Fake devices
share the machine's cores (XLA:CPU runs each device's program on the same thread pool), so
no speed-up is expected: the ratio measures what sharding costs (the collective, per-device
dispatch, smaller per-device programs), and what it saves: in one program XLA:CPU's
executor makes each task's operations wait for the other tasks' buffers
(``mirrormeta.runtime.cpu_devices``; the runner's ``cpu_devices``). Each child sets the
runner's process settings (``runtime.synchronous_dispatch``, ``retain_freed_memory``), so
the first round compiles each step in the process, as a first run of the runner does, and
later rounds load it, as reruns do: read the ratio per round. Results:
``benchmarks/results/devices_cpu.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results'
CONFIGS = {
    'smoke': ('smoke', {}),
    'conv4': ('omniglot_5w1s', {'algorithm': 'maml', 'inner_steps': 5}),
    'conv4_metamida': ('omniglot_5w1s', {'algorithm': 'metamida', 'inner_steps': 5}),
}


def _config(name: str, meta_batch: int, devices: int, data_dir: str | None):
  from experiments import configs  # pylint: disable=g-import-not-at-top
  file, overrides = CONFIGS[name]
  c = configs.get(file)
  for k, v in overrides.items():
    c[k] = v
  c.meta_batch, c.num_devices, c.progress = meta_batch, devices, False
  if data_dir:
    c.data_dir = data_dir
  return c


def child(args) -> dict:
  """Times one (config, device count) in this process; returns the figures."""
  import jax  # pylint: disable=g-import-not-at-top
  from mirrormeta import runtime, train  # pylint: disable=g-import-not-at-top
  runtime.synchronous_dispatch()  # as experiments.run does, before the backend starts
  runtime.retain_freed_memory()

  if args.cache_dir:
    jax.config.update('jax_compilation_cache_dir', args.cache_dir)
  config = _config(args.config, args.meta_batch, args.devices, args.data_dir)
  exp = train.build_experiment(config, splits=('train',))
  runner = train.make_runner(exp)
  state = runner.place_state(exp.init_state())
  key = jax.random.key(0)

  def draw(i):
    support, query = exp.draw['train'](jax.random.fold_in(key, i), runner.tasks.start,
                                       len(runner.tasks))
    return runner.place_batch(support, query)

  batch = jax.block_until_ready(draw(0))
  t = time.perf_counter()
  state, metrics = runner.step(state, *batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, metrics = runner.step(state, *batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  iters = []
  for i in range(1, args.steps + 1):
    t = time.perf_counter()
    state, metrics = runner.step(state, *draw(i))
    jax.block_until_ready(metrics)
    iters.append(time.perf_counter() - t)
  return {'config': args.config, 'devices': len(jax.devices()), 'mesh': exp.num_devices,
          'tasks': config.meta_batch, 'first_call_s': first, 'median_s': statistics.median(times),
          'best_s': min(times), 'iteration_s': statistics.median(iters),
          'load': round(os.getloadavg()[0], 2), 'arenas': runtime.applied_arenas()}


def run_child(config: str, devices: int, args, cache_dir: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  cmd = [sys.executable, '-m', 'benchmarks.devices', '--child', f'--config={config}',
         f'--devices={devices}', f'--meta_batch={args.meta_batch}', f'--steps={args.steps}',
         f'--cache_dir={cache_dir}']
  if args.data_dir:
    cmd.append(f'--data_dir={args.data_dir}')
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if p.returncode:
    sys.exit(f'{config} on {devices} devices failed:\n{p.stderr[-3000:]}')
  return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--configs', default='smoke,conv4')
  p.add_argument('--devices', default='1,8', help='device counts; the first is the baseline')
  p.add_argument('--meta_batch', type=int, default=8)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--data_dir', default=None, help='Omniglot folder (default: the config\'s)')
  p.add_argument('--no_save', action='store_true')
  p.add_argument('--out', default='devices', help='results file stem (<out>_cpu.md)')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--config', help=argparse.SUPPRESS)
  p.add_argument('--cache_dir', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    args.devices = int(args.devices)
    print(json.dumps(child(args)))
    return
  counts = [int(d) for d in args.devices.split(',')]
  rows = []
  with tempfile.TemporaryDirectory(prefix='mirrormeta_devices_') as cache_dir:
    for name in args.configs.split(','):
      if name not in CONFIGS:
        sys.exit(f'unknown config {name!r}; choose from {", ".join(CONFIGS)}')
      rounds = [{n: run_child(name, n, args, cache_dir) for n in counts}
                for _ in range(args.rounds)]
      med = {n: {k: statistics.median(r[n][k] for r in rounds)
                 for k in ('median_s', 'best_s', 'iteration_s')} for n in counts}
      base = med[counts[0]]['median_s']
      for n in counts:
        m, first = med[n], rounds[0][n]['first_call_s']
        per_round = [r[n]['median_s'] / r[counts[0]]['median_s'] for r in rounds]
        loads = [r[n]['load'] for r in rounds]
        rows.append([name, rounds[0][n]['tasks'], n, f'{m["median_s"] * 1e3:.1f}',
                     f'{m["best_s"] * 1e3:.1f}', f'{m["iteration_s"] * 1e3:.1f}',
                     f'{m["median_s"] / base:.2f}',
                     ' '.join(f'{x:.2f}' for x in per_round), f'{first:.1f}',
                     ' '.join(f'{x:.1f}' for x in loads)])
        print(f'{name}: {rounds[0][n]["tasks"]} tasks on {n} device(s): '
              f'{m["median_s"] * 1e3:.1f} ms/step (best {m["best_s"] * 1e3:.1f}; with '
              f'drawing+placing tasks {m["iteration_s"] * 1e3:.1f}); x{m["median_s"] / base:.2f} '
              f'vs {counts[0]} device(s) (per round: {rows[-1][7]}); first call {first:.1f} s; '
              f'load average {rows[-1][9]}', flush=True)
  header = ['config', 'tasks', 'devices', 'step ms (median)', 'step ms (best)',
            'iteration ms (median)', f'ratio to {counts[0]} device(s)', 'ratio per round',
            'first call s', 'load avg per round']
  table = '\n'.join(['| ' + ' | '.join(header) + ' |', '|---|' + '---:|' * (len(header) - 1)]
                    + ['| ' + ' | '.join(map(str, r)) + ' |' for r in rows])
  print()
  print(table)
  if not args.no_save:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f'{args.out}_cpu.md'
    path.write_text(f'# Meta-step time vs fake CPU devices\n\n`python -m benchmarks.devices '
                    f'{" ".join(argv if argv is not None else sys.argv[1:])}` on '
                    f'{os.cpu_count()} CPU cores ({time.strftime("%Y-%m-%d")}).\n\n'
                    f'{table}\n')
    print(f'\nsaved {path}')


if __name__ == '__main__':
  main()
