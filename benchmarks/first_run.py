"""The runner's first run of a config, with and without compiling ahead (config.compile_ahead).

    python -m benchmarks.first_run [--config=omniglot_5w1s] [--steps=300] [--pairs=2]
        [--set field=value ...] [--out=NAME]

Each run is ``python -m experiments.run`` in a fresh process with an empty compilation
cache of its own (what a new user's first run is), alternating the two settings pair by
pair. Per run: the whole command's wall time, the training throughput over the second
half of its steps (TensorBoard's perf/steps_per_sec), and the runner process's maximum
resident memory (its compiling processes are not counted). ``--set`` overrides config
fields of both, e.g. ``--set cpu_devices=2``.
Results: ``benchmarks/results/<out>_<backend>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common as C
from mirrormeta import evaluate

# Runs experiments.run and prints the process's own maximum resident memory at exit.
_WRAPPER = ('import atexit, resource, runpy, sys\n'
            'atexit.register(lambda: print("MAXRSS_KB", resource.getrusage('
            'resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))\n'
            'sys.argv = ["experiments.run"] + sys.argv[1:]\n'
            'runpy.run_module("experiments.run", run_name="__main__")\n')


def one_run(config: str, steps: int, ahead: bool, sets: list[str], tmp: Path) -> dict:
  workdir, cache = tmp / 'run', tmp / 'cache'
  log_every = max(1, steps // 10)
  args = [f'--config={config}', f'--workdir={workdir}', f'--config.num_steps={steps}',
          f'--config.eval_every={steps}', f'--config.log_every={log_every}',
          '--config.val_tasks=100', '--config.test_tasks=100', '--config.progress=False',
          f'--config.compile_ahead={ahead}', *(f'--config.{s}' for s in sets)]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache))
  t = time.perf_counter()
  proc = subprocess.run([sys.executable, '-c', _WRAPPER, *args], cwd=C.REPO, env=env,
                        capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t
  if proc.returncode:
    raise SystemExit(f'run failed ({" ".join(args)}):\n{proc.stderr[-3000:]}')
  rate = evaluate.read_scalars(workdir)['perf/steps_per_sec']
  late = [v for s, v in rate.items() if s > steps // 2]
  rss = next(int(line.split()[1]) for line in proc.stderr.splitlines()
             if line.startswith('MAXRSS_KB'))
  results = json.loads((workdir / 'results.json').read_text())
  return {'ahead': ahead, 'wall_s': wall, 'steps_per_s': sum(late) / len(late),
          'max_rss_gb': rss / 2**20, 'accuracy': results.get('accuracy')}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='omniglot_5w1s')
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--pairs', type=int, default=2)
  p.add_argument('--set', action='append', default=[], help='field=value, for both runs')
  p.add_argument('--out', default='first_run')
  args = p.parse_args(argv)
  runs = {False: [], True: []}
  for pair in range(args.pairs):
    for ahead in ((False, True) if pair % 2 == 0 else (True, False)):
      with tempfile.TemporaryDirectory() as tmp:
        r = one_run(args.config, args.steps, ahead, args.set, Path(tmp))
      runs[ahead].append(r)
      print(f'pair {pair + 1} compile_ahead={ahead}: {r["wall_s"]:.1f} s, '
            f'{r["steps_per_s"]:.3f} steps/s, {r["max_rss_gb"]:.2f} GB', flush=True)
  rows = [[f'compile_ahead={ahead}', ', '.join(f'{r["wall_s"]:.0f}' for r in rs),
           ', '.join(f'{r["steps_per_s"]:.3f}' for r in rs),
           ', '.join(f'{r["max_rss_gb"]:.2f}' for r in rs)] for ahead, rs in runs.items()]
  text = '\n'.join([
      f'# The runner\'s first run: {args.config}, {args.steps} steps'
      + (f', {" ".join(args.set)}' if args.set else ''), '',
      f'`{C.command("first_run", argv)}`', '', C.environment(), '',
      'Each run in a fresh process with an empty compilation cache, alternating.', '',
      C.markdown_table(['', 'whole command (s)', f'steps/s after step {args.steps // 2}',
                        'runner max resident (GB)'], rows), '',
      C.paired_ratio_note('steps/s, ahead / not', runs[True], runs[False], 'steps_per_s'),
      C.paired_ratio_note('whole command, ahead / not', runs[True], runs[False], 'wall_s'),
      C.paired_ratio_note('max resident, ahead / not', runs[True], runs[False],
                          'max_rss_gb'), ''])
  print(text)
  print(f'saved {C.save(args.out, text)}')


if __name__ == '__main__':
  main()
