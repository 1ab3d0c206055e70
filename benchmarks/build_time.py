"""Time to build a meta-step: tracing, lowering and XLA compilation, first run and rerun.

    python -m benchmarks.build_time [--shape=omniglot] [--algorithms=maml,metamida]
        [--ks=1,5] [--repeats=3]

Each configuration (the runner's meta-step, the backend's default strategy) is built
with its unrolled loops over tasks and inner steps traced once (a nested ``jax.jit``,
``mirrormeta.core._traced_once``, the default) and, as the reference in the same run,
traced per call (plain Python loops, as before). A build is ``jax.jit(step).trace``,
``.lower()`` and ``.compile()``, each in a fresh process, as a user's run starts:
- first run: an empty persistent compilation cache (compile, then write the cache);
- rerun: the cache the first run filled (the executable is loaded, not compiled), as a
  rerun, a resumed run or ``--eval_only`` pays; ``--repeats`` times, the two variants
  interleaved.
Then both programs, loaded from the cache in this process, run once on the same state
and tasks: their metrics should agree to float32 rounding (XLA inlines the nested calls;
sums may associate differently). Results: ``benchmarks/results/build_time_<backend>.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from unittest import mock

import jax
import numpy as np

import mirrormeta as mm
from mirrormeta import core
from benchmarks import common as C

VARIANTS = ('per call', 'once')  # the reference first


def _loops(variant: str):
  """The meta-step's loops traced per call (the reference) or once (the library's way)."""
  if variant == 'once':
    return contextlib.nullcontext()
  return mock.patch.object(core, '_traced_once', lambda fn: fn)


def _use_cache(cache_dir: str) -> None:
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def _build(alg: str, shape: C.Shape, k: int, variant: str) -> dict:
  with _loops(variant):
    meta, theta, support, query, _ = C.make_step(alg, shape, k)
    state = jax.jit(meta.init)(theta)
    t0 = time.perf_counter()
    traced = jax.jit(meta.step, donate_argnums=0).trace(state, support, query)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
  return dict(trace=t1 - t0, lower=t2 - t1, compile=t3 - t2, total=t3 - t0,
              eqns=len(traced.jaxpr.eqns), run=lambda: compiled(state, support, query)[1])


def _child(args) -> None:
  """One build in this fresh process; prints its times as JSON."""
  C.setup(no_cache=True)
  _use_cache(args.cache_dir)
  b = _build(args.algorithms[0], C.SHAPES[args.shape], args.ks[0], args.variant)
  print(json.dumps({k: v for k, v in b.items() if k != 'run'}))


def _measure(args, alg: str, k: int, variant: str, cache_dir: str) -> dict:
  return C.child_json('build_time', [f'--shape={args.shape}', f'--algorithms={alg}',
                                    f'--ks={k}', f'--variant={variant}',
                                    f'--cache_dir={cache_dir}'], 'build')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--shape', default='omniglot', choices=sorted(C.SHAPES))
  p.add_argument('--algorithms', type=C.csv_list, default=['maml', 'metamida'])
  p.add_argument('--ks', type=C.int_list, default=[1, 5])
  p.add_argument('--repeats', type=int, default=3, help='reruns per variant')
  p.add_argument('--out', default='build_time')
  p.add_argument('--child', action='store_true', help='(internal) one build, JSON out')
  p.add_argument('--variant', choices=VARIANTS, help='(internal)')
  p.add_argument('--cache_dir', help='(internal)')
  args = p.parse_args(argv)
  if args.child:
    _child(args)
    return
  C.setup(no_cache=True)
  cache_dir = tempfile.mkdtemp(prefix='mirrormeta_build_time_')
  _use_cache(cache_dir)  # this process only loads what the first runs wrote
  env = C.environment()
  print(env)
  shape = C.SHAPES[args.shape]
  rows = []
  for alg in args.algorithms:
    for k in args.ks:
      first = {v: _measure(args, alg, k, v, cache_dir) for v in VARIANTS}
      for v, f in first.items():
        print(f'  {alg} K={k} loops traced {v}, first run: trace {f["trace"]:.1f} s, lower '
              f'{f["lower"]:.1f} s, compile {f["compile"]:.1f} s', flush=True)
      rerun = {v: [] for v in VARIANTS}
      for r in range(args.repeats):
        for v in VARIANTS:
          rerun[v].append(_measure(args, alg, k, v, cache_dir))
        print(f'  {alg} K={k} rerun {r + 1}/{args.repeats}: ' + ', '.join(
            f'{v} {rerun[v][-1]["total"]:.1f} s' for v in VARIANTS), flush=True)
      outs = {}
      for v in VARIANTS:
        outs[v] = jax.device_get(_build(alg, shape, k, v)['run']())
        jax.clear_caches()
      diff = max(float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))
                 for a, b in zip(jax.tree.leaves(outs['once']), jax.tree.leaves(outs['per call'])))
      ref_first = first['per call']['total']
      ref_rerun = [x['total'] for x in rerun['per call']]
      for v in VARIANTS:
        f, totals = first[v], [x['total'] for x in rerun[v]]
        ratios = [a / b for a, b in zip(totals, ref_rerun)]
        rows.append([
            alg, k, v, f['eqns'], f'{f["trace"]:.1f}', f'{f["lower"]:.1f}',
            f'{f["compile"]:.1f}', f'{f["total"]:.1f}', f'{f["total"] / ref_first:.2f}',
            f'{C.median([x["trace"] + x["lower"] for x in rerun[v]]):.1f}',
            f'{C.median([x["compile"] for x in rerun[v]]):.1f}', f'{C.median(totals):.1f}',
            f'{C.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})',
            '' if v == 'per call' else f'{diff:.1e}'])
  text = '\n'.join([
      f'# Time to build the meta-step ({jax.default_backend()})', '',
      f'`{C.command("build_time", argv)}`  ',
      env, '',
      f'{shape.name}-shaped {shape.image} Conv4-{shape.filters}, {C.N_WAY}-way {C.SHOT}-shot '
      f'{C.QUERY} query, {C.TASKS} tasks, second order, strategy '
      f'[{C.strategy_label(mm.default_strategy())}]. Every build in a fresh process. First '
      'run: an empty persistent compilation cache (compile includes writing the cache); '
      f'rerun: loaded from that cache, median of {args.repeats}, the variants interleaved '
      '(ratio: median of per-round ratios, and their range). Outputs: the largest relative '
      "difference between the two programs' metrics after one step (0: bit for bit).", '',
      C.markdown_table(['algorithm', 'K', 'loops traced', 'jaxpr eqns (top level)',
                        'trace s', 'lower s', 'compile + cache write s', 'first run s',
                        'first / per call', 'rerun: trace + lower s', 'rerun: cache load s',
                        'rerun s', 'rerun / per call', 'outputs differ by'], rows), ''])
  print('\n' + text)
  print(f'saved {C.save(args.out, text)}')


if __name__ == '__main__':
  main()
