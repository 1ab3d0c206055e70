"""Execution strategies on the current backend: the evidence for ``mm.default_strategy()``.

    python -m benchmarks.strategies [--algorithm=maml] [--steps=5] [--repeats=3]
        [--shape=omniglot] [--strategies=loop:full,loop:1,vmap:full,vmap:1] [--deadline_s=540]

A strategy is written ``tasks:unroll[:map_remat[:conv[:layout[:icnn]]]]`` (e.g.
``vmap:full:tied:lax:NCHW``); omitted fields are the backend default's (``conv``:
``mirrormeta``, see ``mirrormeta.models.CONVOLUTIONS``; ``layout``:
``mirrormeta.models.default_layout()``; ``icnn``: how MetaMiDA's map is computed,
``native`` (the CPU kernel of ``mirrormeta.native``, the default where it builds),
``block_major`` (XLA's map) or ``natural`` (XLA's, ``conjugates.icnn(block_major=False)``).

The same math, second-order meta-step on Omniglot-shaped tasks (28x28x1, Conv4-64, 5-way
1-shot 15 query, 4 tasks), run with each ``Strategy(tasks, unroll)``: tasks 'loop' (an
unrolled Python loop inside the one jit) vs 'vmap', and the K inner steps fully unrolled
vs ``lax.scan`` with unroll=1. Each is compiled once, then timed in interleaved rounds
(medians); ratios are to the default strategy, per round. Also reports compile time and
XLA's peak-memory accounting. Results: ``benchmarks/results/strategies_<backend>.md``.
"""
from __future__ import annotations

import argparse
from typing import NamedTuple

import jax

import mirrormeta as mm
from benchmarks import common as C


DEFAULT_CONV = 'mirrormeta'


# How the MetaMiDA map is computed: XLA's, block-major or in the kernel's own order
# (conjugates.icnn(block_major=True / False)), or the native CPU kernel (icnn(native=True)).
ICNN_ORDERS = ('block_major', 'natural', 'native')


class Spec(NamedTuple):
  """One measured configuration: the meta-step's Strategy, the model's convolution and
  activation layout, and the order in which the ICNN map computes kernels."""
  strategy: mm.Strategy
  conv: str
  layout: str
  icnn: str = 'block_major'

  @property
  def key(self) -> tuple:
    # C.strategy_key: Strategy(unroll=True) == Strategy(unroll=1) as Python values.
    return C.strategy_key(self.strategy) + (self.conv, self.layout, self.icnn)

  def build_spec(self, algorithm: str, shape: C.Shape, steps: int) -> dict:
    """The arguments of :func:`benchmarks.common.build` for the meta-step in this
    configuration."""
    return dict(algorithm=algorithm, shape=shape, steps=steps, strategy=self.strategy,
                conv=self.conv, layout=self.layout, block_major=self.icnn != 'natural',
                native=self.icnn == 'native')

  @property
  def name(self) -> str:
    s = self.strategy
    return f'{s.tasks}:{C.unroll_label(s)}:{s.map_remat}:{self.conv}:{self.layout}:{self.icnn}'


def default_spec() -> Spec:
  return Spec(mm.default_strategy(), DEFAULT_CONV, mm.models.default_layout(),
              'native' if mm.native.default() else 'block_major')


def parse_spec(s: str) -> Spec:
  """'tasks:unroll[:map_remat[:conv[:layout[:icnn]]]]' -> Spec; omitted fields are the
  default's."""
  tasks, unroll, *rest = s.split(':') if ':' in s else (s, '')
  allowed = dict(map_remat=mm.core.MAP_REMATS, conv=mm.models.CONVOLUTIONS,
                 layout=mm.models.LAYOUTS, icnn=ICNN_ORDERS)
  fields = dict(zip(allowed, rest))
  if (len(rest) > len(allowed) or tasks not in ('vmap', 'loop')
      or not (unroll == 'full' or unroll.isdigit() and int(unroll) > 0)
      or any(value not in allowed[field] for field, value in fields.items())):
    raise ValueError(f'{s!r} is not tasks:unroll[:map_remat[:conv[:layout[:icnn]]]] with tasks '
                     'in vmap|loop, unroll full or a positive number, ' +
                     ', '.join(f'{f} in {"|".join(v)}' for f, v in allowed.items()))
  default = default_spec()
  return Spec(default.strategy._replace(
                  tasks=tasks, unroll=True if unroll == 'full' else int(unroll),
                  map_remat=fields.get('map_remat', default.strategy.map_remat)),
              fields.get('conv', default.conv), fields.get('layout', default.layout),
              fields.get('icnn', default.icnn))


def parse_specs(parser: argparse.ArgumentParser, texts: list[str]) -> list[Spec]:
  """:func:`parse_spec` of each text, a bad one refused as ``parser``'s usage error."""
  try:
    return [parse_spec(t) for t in texts]
  except ValueError as e:
    parser.error(str(e))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--algorithm', default='maml')
  p.add_argument('--shape', default='omniglot', choices=sorted(C.SHAPES))
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--warmup', type=int, default=1)
  # Parsed after setup(): a spec's omitted fields are the backend's defaults, and asking for
  # the backend starts it, which setup's process settings must precede.
  p.add_argument('--strategies', type=C.csv_list,
                 default=['loop:full', 'loop:1', 'vmap:full', 'vmap:1'])
  p.add_argument('--no_cache', action='store_true')
  p.add_argument('--default_malloc', action='store_true',
                 help="glibc's default malloc (no mirrormeta.runtime.retain_freed_memory)")
  C.add_deadline_flag(p)
  C.add_compile_workers_flag(p)
  p.add_argument('--out', default='strategies')
  args = p.parse_args(argv)
  deadline = C.deadline_after(args.deadline_s)
  C.setup(args.no_cache, args.default_malloc)
  env = C.environment()
  print(env)
  default = default_spec()
  shape = C.SHAPES[args.shape]
  specs = parse_specs(p, args.strategies)
  if default.key not in [s.key for s in specs]:
    specs.insert(0, default)
  built = C.build_all({s.key: s.build_spec(args.algorithm, shape, args.steps) for s in specs},
                      workers=args.compile_workers)
  names = {s.key: s.name for s in specs}
  cmd = C.command('strategies', argv)

  def report(times, partial_rounds=None):
    rows = []
    for s in specs:
      k = s.key
      ratio, low, high = C.ratio_interval(times[k], times[default.key])
      rows.append([f'`{s.strategy.tasks}`', C.unroll_label(s.strategy), s.strategy.map_remat,
                   s.conv, s.layout, s.icnn, 'yes' if k == default.key else '',
                   f'{C.median(times[k]):.4f}', f'{min(times[k]):.4f}',
                   f'{ratio:.3f} [{low:.3f}, {high:.3f}]',
                   f'{C.mb(built[k].memory["peak"]):.1f}', f'{built[k].compile_s:.0f}'])
    fastest = min(specs, key=lambda s: C.median(times[s.key]))
    describe = lambda s: (f'{C.strategy_label(s.strategy)} conv={s.conv} layout={s.layout} '
                          f'icnn={s.icnn}')
    if len(specs) == 1:
      verdict = 'the only configuration measured: nothing to compare'
    else:
      verdict = 'agrees' if fastest.key == default.key else 'DISAGREES'
    partial = [C.partial_note(partial_rounds, args.repeats), ''] if partial_rounds else []
    text = '\n'.join([
        f'# Execution strategies ({jax.default_backend()})', '', f'`{cmd}`  ', env, ''
    ] + partial + [
        f'{args.algorithm}, second order, K={args.steps}, {shape.name}-shaped {shape.image} '
        f'Conv4-{shape.filters}, {C.N_WAY}-way {C.SHOT}-shot {C.QUERY} query, {C.TASKS} '
        f'tasks; {len(next(iter(times.values())))} interleaved rounds after {args.warmup} '
        'warm-up.', '',
        C.markdown_table(['tasks', 'scan unroll', 'map_remat', 'conv', 'layout', 'icnn',
                          'default', 's/step (median)', 's/step (min)',
                          'time / default (95% CI)', 'peak MB (XLA)', 'compile s'], rows), '',
        f'Fastest: {describe(fastest)}; the defaults (`mm.default_strategy()`, '
        f'`mm.models.default_layout()`): {describe(default)} ({verdict}).', ''])
    return text

  times = C.time_interleaved(
      {k: b.run for k, b in built.items()}, repeats=args.repeats, warmup=args.warmup,
      label=names.get, deadline=deadline,
      between=lambda r, ts: r + 1 < args.repeats and C.save(args.out, report(ts, r + 1)))
  text = report(times)
  print('\n' + text)
  print(f'saved {C.save(args.out, text)}')


if __name__ == '__main__':
  main()
