"""Execution strategies on the current backend: the evidence for ``mm.default_strategy()``.

    python -m benchmarks.strategies [--algorithm=maml] [--steps=5] [--repeats=3]
        [--shape=omniglot] [--strategies=loop:full,loop:1,vmap:full,vmap:1]

A strategy is written ``tasks:unroll[:map_remat[:conv]]`` (e.g. ``vmap:full:tied:lax``);
omitted fields are the backend default's (``conv``: ``mirrormeta``, see
``mirrormeta.models.CONVOLUTIONS``).

The same math, second-order meta-step on Omniglot-shaped tasks (28x28x1, Conv4-64, 5-way
1-shot 15 query, 4 tasks), run with each ``Strategy(tasks, unroll)``: tasks 'loop' (an
unrolled Python loop inside the one jit) vs 'vmap', and the K inner steps fully unrolled
vs ``lax.scan`` with unroll=1. Each is compiled once, then timed in interleaved rounds
(medians); ratios are to the default strategy, per round. Also reports compile time and
XLA's peak-memory accounting. Results: ``benchmarks/results/strategies_<backend>.md``.
"""
from __future__ import annotations

import argparse
import sys

import jax

import mirrormeta as mm
from benchmarks import common as C


DEFAULT_CONV = 'mirrormeta'


def _strategy(s: str) -> tuple[mm.Strategy, str]:
  """'tasks:unroll[:map_remat[:conv]]' -> (Strategy, conv)."""
  tasks, unroll, *rest = s.split(':')
  strategy = mm.default_strategy()._replace(tasks=tasks,
                                            unroll=True if unroll == 'full' else int(unroll))
  if rest:
    strategy = strategy._replace(map_remat=rest[0])
  return strategy, rest[1] if len(rest) > 1 else DEFAULT_CONV


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--algorithm', default='maml')
  p.add_argument('--shape', default='omniglot', choices=sorted(C.SHAPES))
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--strategies', type=lambda s: [_strategy(x) for x in s.split(',') if x],
                 default=[_strategy(x) for x in ('loop:full', 'loop:1', 'vmap:full', 'vmap:1')])
  p.add_argument('--no_cache', action='store_true')
  p.add_argument('--default_malloc', action='store_true',
                 help="glibc's default malloc (no mirrormeta.runtime.retain_freed_memory)")
  p.add_argument('--out', default='strategies')
  args = p.parse_args(argv)
  C.setup(args.no_cache, args.default_malloc)
  env = C.environment()
  print(env)
  default = (mm.default_strategy(), DEFAULT_CONV)
  shape = C.SHAPES[args.shape]
  # Keyed by C.strategy_key: Strategy(unroll=True) == Strategy(unroll=1) as Python values.
  key = lambda sc: C.strategy_key(sc[0]) + (sc[1],)
  strategies = list(args.strategies)
  if key(default) not in map(key, strategies):
    strategies.insert(0, default)
  built = {key(s): C.build(args.algorithm, shape, args.steps, s[0], conv=s[1])
           for s in strategies}
  names = {key(s): f'{s[0].tasks}:{"full" if s[0].unroll is True else s[0].unroll}:'
                  f'{s[0].map_remat}:{s[1]}' for s in strategies}
  times = C.time_interleaved({k: b.run for k, b in built.items()}, repeats=args.repeats,
                             warmup=args.warmup, label=names.get)
  rel = {k: C.ratio_interval(times[k], times[key(default)])[0] for k in built}
  rows = []
  for s, conv in strategies:
    k = key((s, conv))
    rows.append([f'`{s.tasks}`', 'full' if s.unroll is True else s.unroll, s.map_remat, conv,
                 'yes' if k == key(default) else '', f'{C.median(times[k]):.4f}',
                 f'{min(times[k]):.4f}', f'{rel[k]:.2f}',
                 f'{C.mb(built[k].memory["peak"]):.1f}', f'{built[k].compile_s:.0f}'])
  fastest, fastest_conv = min(strategies, key=lambda s: C.median(times[key(s)]))
  cmd = 'python -m benchmarks.strategies ' + ' '.join(argv if argv is not None else sys.argv[1:])
  text = '\n'.join([
      f'# Execution strategies ({jax.default_backend()})', '', f'`{cmd.strip()}`  ', env, '',
      f'{args.algorithm}, second order, K={args.steps}, {shape.name}-shaped {shape.image} '
      f'Conv4-{shape.filters}, {C.N_WAY}-way {C.SHOT}-shot {C.QUERY} query, {C.TASKS} tasks; '
      f'{args.repeats} interleaved rounds after {args.warmup} warm-up.', '',
      C.markdown_table(['tasks', 'scan unroll', 'map_remat', 'conv', 'default',
                        's/step (median)', 's/step (min)', 'time / default',
                        'peak MB (XLA)', 'compile s'], rows), '',
      f'Fastest: {C.strategy_label(fastest)} conv={fastest_conv}; `mm.default_strategy()` = '
      f'{C.strategy_label(default[0])} conv={default[1]} '
      f'({"agrees" if key((fastest, fastest_conv)) == key(default) else "DISAGREES"}).', ''])
  print('\n' + text)
  print(f'saved {C.save(args.out, text)}')


if __name__ == '__main__':
  main()
