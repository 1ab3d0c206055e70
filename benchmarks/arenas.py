"""malloc arenas under memory retention: one shared arena vs one per thread, steps compiled
in the process vs loaded from the compilation cache.

    python -m benchmarks.arenas [--shapes=omniglot] [--algorithm=maml] [--steps=5]
        [--runs=20] [--pairs=3]

``mirrormeta.runtime.retain_freed_memory`` (the runner's ``config.retain_freed_memory``)
turns glibc's ``mmap`` and trimming off so that each step reuses the last one's pages.
Which arenas the threads then use is its ``arenas`` argument: 'one' (``M_ARENA_MAX=1``)
or 'per_thread' (glibc's default; 'auto' picks it under synchronous dispatch). The
setting is per process, so every measurement is a fresh process, alternating settings
(``--pairs`` times) so that the machine's drift hits both, in two modes:

* here: the process compiles the step itself (persistent cache off), as a first run of
  the runner does, then runs it;
* cache: the process loads the step from the persistent compilation cache (filled by an
  uncounted first process), as a rerun does.

Each process runs ``--runs`` steps as the runner does (dispatch step s+1, then fetch step
s's metrics) under synchronous dispatch. Reported: compile (or load) time, time per step
over the last half of the steps, and the process's resident high-water mark; pairs'
ratios per_thread / one. Results: ``benchmarks/results/arenas_<backend>.md``.
"""
from __future__ import annotations

import argparse
import json
import time

SETTINGS = ('one', 'per_thread')
MODES = ('here', 'cache')


def _measure(args) -> dict:
  """In this (fresh) process: build (compile here or load) and run ``args.runs`` steps."""
  from benchmarks import common as C  # pylint: disable=g-import-not-at-top
  C.setup(no_cache=args.mode == 'here', arenas=args.setting)
  assert C.runtime.applied_arenas() == args.setting, C.runtime.applied_arenas()
  t = time.perf_counter()
  b = C.build(args.algorithm, args.shapes, args.steps, verbose=False)
  build_s = time.perf_counter() - t
  s_last_half = C.runner_like_steps(b, args.runs)[1]
  return dict(s_per_step=s_last_half,
              build_s=build_s, loaded=bool(b.loaded), high_water_mb=C.high_water_kb() / 1024)


def _child(args, shape: str, mode: str, setting: str) -> dict:
  from benchmarks import common as C  # pylint: disable=g-import-not-at-top
  return C.child_json('arenas', [f'--shapes={shape}', f'--mode={mode}', f'--setting={setting}',
                                 *C.fresh_process_flags(args)],
                      f'measurement ({shape}, {mode}, {setting})')


def main(argv=None):
  from benchmarks import common as C  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  C.add_fresh_process_args(p, 'omniglot', 'processes per setting and mode, alternating',
                           'arenas')
  p.add_argument('--modes', default=','.join(MODES))
  p.add_argument('--setting', choices=SETTINGS, help='(child processes only)')
  p.add_argument('--mode', choices=MODES, help='(child processes only)')
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(_measure(args)))
    return
  rows, notes = [], []
  for shape in C.csv_list(args.shapes):
    for mode in C.csv_list(args.modes):
      if mode == 'cache':  # fills the cache (or finds it filled); not counted
        _child(args, shape, mode, 'per_thread')
      res = {s: [] for s in SETTINGS}
      for i in range(args.pairs):
        for setting in SETTINGS:
          r = _child(args, shape, mode, setting)
          res[setting].append(r)
          print(f'  {shape} {mode} {setting} {i + 1}/{args.pairs}: {r["s_per_step"]:.3f} '
                f's/step, built in {r["build_s"]:.1f} s (loaded: {r["loaded"]}), high water '
                f'{r["high_water_mb"]:.0f} MB', flush=True)
      for key, what in (('s_per_step', 'time per step'), ('build_s', 'build time'),
                        ('high_water_mb', 'resident high water')):
        notes.append(C.paired_ratio_note(f'{shape}, compiled {mode}: {what} per_thread / one',
                                         res['per_thread'], res['one'], key))
      for setting in SETTINGS:
        rs = res[setting]
        rows.append([shape, mode, setting,
                     f'{C.median([r["s_per_step"] for r in rs]):.3f}',
                     ', '.join(f'{r["s_per_step"]:.3f}' for r in rs),
                     f'{C.median([r["build_s"] for r in rs]):.1f}',
                     f'{C.median([r["high_water_mb"] for r in rs]):.0f}'])
  text = '\n'.join([
      f'# malloc arenas under memory retention ({C.jax.default_backend()})', '',
      f'`{C.command("arenas", argv)}`  ', C.environment(), '',
      f'{args.algorithm}, second order, K={args.steps}, {C.N_WAY}-way {C.SHOT}-shot '
      f'{C.QUERY} query, {C.TASKS} tasks, default strategy, synchronous dispatch, glibc '
      f'malloc retention; {args.runs} runner-like steps per fresh process (time over the '
      f'last half), {args.pairs} processes per setting and mode, alternating. "here": the '
      'process compiled the step (persistent cache off); "cache": it loaded it.', '',
      C.markdown_table(['shape', 'compiled', 'arenas', 's/step (median)', 'each process',
                        'build s (median)', 'resident high water MB (median)'], rows), '',
      *notes, ''])
  print('\n' + text)
  print(f'saved {C.save(args.out, text)}')


if __name__ == '__main__':
  main()
