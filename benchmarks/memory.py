"""Peak memory of a meta-step vs K, with and without ``jax.checkpoint`` of each inner step.

    python -m benchmarks.memory [--algorithms=maml,metamida] [--ks=1,5,10,20]
        [--unroll=1] [--shape=omniglot]

Omniglot-shaped (28x28x1, Conv4-64), 5-way 1-shot 15 query, 4 tasks, second order, the
backend's default task strategy, built as the runner builds it (``benchmarks.common``).
Memory is XLA's accounting of the compiled step (argument + output + temp − alias), so
only compilation is needed, no run. ``Strategy(remat=True)`` wraps each inner step in
``jax.checkpoint``: the backward pass recomputes a step's activations from its dual
iterate instead of storing them, so memory should grow with K by one iterate per step.

The K-sweep uses ``unroll=1`` (``lax.scan``, one step body whatever K): fully unrolled
K=20 compiles for minutes on CPU. ``--unroll=full`` (or ``1,full``) measures the unrolled
program too. Results: ``benchmarks/results/memory_<backend>.md``.
"""
from __future__ import annotations

import argparse

import jax

import mirrormeta as mm
from benchmarks import common as C

TARGET = 2.0  # with checkpointing, K=20 uses at most 2x the memory of K=1


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--shape', default='omniglot', choices=sorted(C.SHAPES))
  p.add_argument('--algorithms', type=C.csv_list, default=['maml', 'metamida'])
  p.add_argument('--ks', type=C.int_list, default=[1, 5, 10, 20])
  p.add_argument('--unroll',
                 type=lambda s: [True if x == 'full' else int(x) for x in C.csv_list(s)],
                 default=[1], help="scan unroll values: ints or 'full'")
  p.add_argument('--no_cache', action='store_true')
  p.add_argument('--default_malloc', action='store_true',
                 help="glibc's default malloc (no mirrormeta.runtime.retain_freed_memory)")
  p.add_argument('--low_memory_schedule', action='store_true',
                 help="XLA:CPU's memory-ordered scheduler (mirrormeta.runtime.low_memory_schedule)")
  C.add_compile_workers_flag(p)
  p.add_argument('--out', default='memory')
  args = p.parse_args(argv)
  C.setup(args.no_cache, args.default_malloc, args.low_memory_schedule)
  env = C.environment()
  print(env)
  shape = C.SHAPES[args.shape]
  default = mm.default_strategy()  # the backend's task mapping and map recomputation
  built = C.build_all({(unroll, alg, remat, k): dict(
      algorithm=alg, shape=shape, steps=k, strategy=default._replace(unroll=unroll, remat=remat))
                       for unroll in args.unroll for alg in args.algorithms
                       for remat in (False, True) for k in args.ks},
                      workers=args.compile_workers)
  peaks = {}
  for key, b in built.items():
    peaks[key] = b.memory
    b.free()  # Only the accounting is needed; keep the process small.

  cmd = C.command('memory', argv)
  lines = [f'# Peak memory vs K, with and without jax.checkpoint ({jax.default_backend()})', '',
           f'`{cmd}`  ', env, '',
           f'{shape.name}-shaped {shape.image} Conv4-{shape.filters}, {C.N_WAY}-way {C.SHOT}-shot '
           f'{C.QUERY} query, {C.TASKS} tasks, second order, tasks={default.tasks}, '
           f'map_remat={default.map_remat}. Peak = XLA '
           'memory_analysis of the compiled step: argument + output + temp − alias (MB); '
           'in parentheses: relative to K=1 of the same row.', '']
  target_lines = []
  for unroll in args.unroll:
    label = 'full (unrolled)' if unroll is True else f'{unroll} (lax.scan)'
    rows = []
    for alg in args.algorithms:
      for remat in (False, True):
        base = peaks[unroll, alg, remat, args.ks[0]]['peak']
        rows.append([alg, 'jax.checkpoint per step' if remat else 'none'] + [
            f'{C.mb(peaks[unroll, alg, remat, k]["peak"]):.1f} '
            f'({peaks[unroll, alg, remat, k]["peak"] / base:.2f}x)' for k in args.ks])
      if 1 in args.ks and 20 in args.ks:
        r = peaks[unroll, alg, True, 20]['peak'] / peaks[unroll, alg, True, 1]['peak']
        target_lines.append(
            f'- [{"MET" if r <= TARGET else "NOT MET"}] {alg}, unroll={label}: with '
            f'checkpointing K=20 / K=1 memory = {r:.2f} (target ≤ {TARGET}); without: '
            f'{peaks[unroll, alg, False, 20]["peak"] / peaks[unroll, alg, False, 1]["peak"]:.2f}')
    lines += [f'### scan unroll = {label}', '',
              C.markdown_table(['algorithm', 'remat'] + [f'K={k}' for k in args.ks], rows), '']
    rows = [[alg, remat, k] + [f'{C.mb(peaks[unroll, alg, remat, k][f]):.1f}'
                               for f in ('argument', 'output', 'temp', 'alias')]
            for alg in args.algorithms for remat in (False, True) for k in args.ks]
    lines += ['Breakdown (MB):', '', C.markdown_table(
        ['algorithm', 'remat', 'K', 'argument', 'output', 'temp', 'alias'], rows), '']
  if target_lines:
    lines += ['### Target', ''] + target_lines + ['']
  text = '\n'.join(lines)
  print('\n' + text)
  print(f'saved {C.save(args.out, text)}')


if __name__ == '__main__':
  main()
