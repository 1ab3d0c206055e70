"""Synchronous vs asynchronous CPU dispatch: time per step and resident memory.

    python -m benchmarks.dispatch [--shapes=omniglot,mini] [--algorithm=maml] [--steps=5]
        [--runs=20] [--pairs=3]

JAX's CPU client dispatches a computation asynchronously by default, and XLA:CPU frees
an execution's temporaries only after its outputs are ready, so the next step can take
its slab before the last one's is freed. ``mirrormeta.runtime.synchronous_dispatch`` (the
runner's ``config.synchronous_dispatch``) runs computations inline instead. The setting
is per process (JAX reads it when the backend starts), so every measurement is a fresh
process, and the two settings alternate (sync, async, sync, ... ``--pairs`` times) so that
the machine's drift hits both. Each process compiles the step (the persistent cache makes
a repeat cheap), notes its resident memory, resets its high-water mark, and runs ``--runs``
steps as the runner does (dispatch step s+1, then fetch step s's metrics), with glibc
malloc retention on as in the runner. Reported: wall time per step over all the steps and
over their last half, once every slab has been faulted in (pairs' ratios), and
the high-water rise over those steps against XLA's peak of the step (1x: one step's
temporaries held at a time). Results: ``benchmarks/results/dispatch_<backend>.md``.
"""
from __future__ import annotations

import argparse
import json

SETTINGS = ('sync', 'async')


def _measure(args) -> dict:
  """In this (fresh) process: ``args.runs`` runner-like steps under this process's dispatch."""
  from benchmarks import common as C  # pylint: disable=g-import-not-at-top
  C.setup(synchronous_dispatch=args.setting == 'sync')
  b = C.build(args.algorithm, args.shapes, args.steps, verbose=False)
  before_kb = C.resident_kb()
  C.reset_high_water()
  s_all, s_last_half = C.runner_like_steps(b, args.runs)
  # The last half apart: by then every slab either setting takes has been faulted in.
  return dict(s_per_step=s_all, s_per_step_last_half=s_last_half,
              rise_mb=(C.high_water_kb() - before_kb) / 1024,
              xla_peak_mb=C.mb(b.memory['peak']), resident_before_mb=before_kb / 1024)


def _child(args, shape: str, setting: str) -> dict:
  from benchmarks import common as C  # pylint: disable=g-import-not-at-top
  return C.child_json('dispatch', [f'--shapes={shape}', f'--setting={setting}',
                                   *C.fresh_process_flags(args)],
                      f'measurement ({shape}, {setting})')


def main(argv=None):
  from benchmarks import common as C  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  C.add_fresh_process_args(p, 'omniglot,mini', 'processes per setting, alternating', 'dispatch')
  p.add_argument('--setting', choices=SETTINGS, help='(child processes only)')
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(_measure(args)))
    return
  rows, notes = [], []
  for shape in C.csv_list(args.shapes):
    res = {s: [] for s in SETTINGS}
    for i in range(args.pairs):
      for setting in SETTINGS:
        res[setting].append(_child(args, shape, setting))
        r = res[setting][-1]
        print(f'  {shape} {setting} {i + 1}/{args.pairs}: {r["s_per_step"]:.3f} s/step '
              f'({r["s_per_step_last_half"]:.3f} over the last half), '
              f'high-water rise {r["rise_mb"]:.0f} MB (XLA peak {r["xla_peak_mb"]:.0f} MB)',
              flush=True)
    for key, what in (('s_per_step', 'all steps'), ('s_per_step_last_half', 'last half')):
      notes.append(C.paired_ratio_note(f'{shape}: time sync / async over {what}',
                                       res['sync'], res['async'], key))
    for setting in SETTINGS:
      rs = res[setting]
      rise = [r['rise_mb'] for r in rs]
      rows.append([shape, setting, f'{C.median([r["s_per_step"] for r in rs]):.3f}',
                   f'{C.median([r["s_per_step_last_half"] for r in rs]):.3f}',
                   f'{rs[0]["xla_peak_mb"]:.0f}', ', '.join(f'{x:.0f}' for x in rise),
                   f'{C.median(rise) / rs[0]["xla_peak_mb"]:.2f}',
                   f'{C.median([r["resident_before_mb"] for r in rs]):.0f}'])
  text = '\n'.join([
      f'# Synchronous vs asynchronous CPU dispatch ({C.jax.default_backend()})', '',
      f'`{C.command("dispatch", argv)}`  ', C.environment(), '',
      f'{args.algorithm}, second order, K={args.steps}, {C.N_WAY}-way {C.SHOT}-shot '
      f'{C.QUERY} query, {C.TASKS} tasks, default strategy, glibc malloc retention; '
      f'{args.runs} runner-like steps per fresh process, {args.pairs} processes per '
      'setting, alternating.', '',
      C.markdown_table(['shape', 'dispatch', 's/step (median)', 'last half', 'XLA peak MB',
                        'high-water rise over the steps, MB (each process)',
                        'rise / XLA peak (median)', 'resident before the steps, MB'],
                       rows), '', *notes, ''])
  print('\n' + text)
  print(f'saved {C.save(args.out, text)}')


if __name__ == '__main__':
  main()
