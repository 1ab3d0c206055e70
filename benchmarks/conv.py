"""Convolution derivatives and malloc retention: the evidence for the CPU defaults.

    python -m benchmarks.conv [--algorithm=maml] [--shape=omniglot] [--steps=5] [--repeats=5]

The Conv4 meta-step (Omniglot-shaped, 5-way 1-shot 15 query, 4 tasks, second order, the
backend's default strategy) with its convolutions computed by ``mirrormeta.conv`` (every
derivative order a canonical NHWC convolution; weight gradients image by image where
``conv._per_image`` says so), by the same with XLA's whole-batch weight gradients
(``mirrormeta_batched_wgrad``) or by ``lax.conv_general_dilated``'s own transpose rules,
each under glibc's default malloc and under
``mirrormeta.runtime.retain_freed_memory``. The malloc setting is per process, so each
setting runs in its own subprocess that times both convolutions in interleaved rounds;
ratios are to the default configuration (mirrormeta conv, retained memory) per round
where they share a process. Results: ``benchmarks/results/<out>_<backend>.md``.
"""
from __future__ import annotations

import argparse
import json
import sys

CONVS = ('mirrormeta', 'mirrormeta_batched_wgrad', 'lax')


def _measure(args) -> dict:
  """In this process: every convolution under this process's malloc setting."""
  from benchmarks import common as C  # pylint: disable=g-import-not-at-top
  C.setup(default_malloc=args.default_malloc)
  built = {c: C.build(args.algorithm, args.shape, args.steps, conv=c, verbose=False)
           for c in CONVS}
  times = C.time_interleaved({c: b.run for c, b in built.items()}, repeats=args.repeats,
                             warmup=args.warmup)
  return {c: dict(times=times[c], peak_mb=C.mb(built[c].memory['peak']),
                  compile_s=built[c].compile_s) for c in CONVS}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--algorithm', default='maml')
  p.add_argument('--shape', default='omniglot')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--default_malloc', action='store_true', help='(child processes only)')
  p.add_argument('--child', action='store_true', help='(internal) measure and print JSON')
  p.add_argument('--out', default='conv')
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(_measure(args)))
    return
  from benchmarks import common as C  # pylint: disable=g-import-not-at-top
  argv = list(argv if argv is not None else sys.argv[1:])
  results = {}
  for malloc in ('retained', 'default'):
    print(f'  measuring with {malloc} malloc ...', flush=True)
    results[malloc] = C.child_json(
        'conv', argv + (['--default_malloc'] if malloc == 'default' else []), 'measurement')
  ref = results['retained']['mirrormeta']['times']
  rows = []
  for malloc, res in results.items():
    for conv in CONVS:
      ts = res[conv]['times']
      same_process = malloc == 'retained'
      rel = (C.median([a / b for a, b in zip(ts, ref)]) if same_process
             else C.median(ts) / C.median(ref))
      rows.append([f'`{conv}`', malloc, f'{C.median(ts):.3f}', f'{min(ts):.3f}',
                   f'{rel:.2f}' + ('' if same_process else ' (across processes)'),
                   f'{res[conv]["peak_mb"]:.1f}', f'{res[conv]["compile_s"]:.0f}'])
  text = '\n'.join([
      f'# Convolution derivatives and malloc retention ({C.jax.default_backend()})', '',
      f'`python -m benchmarks.conv {" ".join(argv)}`  ', C.environment(), '',
      f'{args.algorithm}, second order, K={args.steps}, {args.shape}-shaped, '
      f'{C.N_WAY}-way {C.SHOT}-shot {C.QUERY} query, {C.TASKS} tasks, default strategy; '
      f'{args.repeats} interleaved rounds per process after {args.warmup} warm-up.', '',
      C.markdown_table(['convolution', 'malloc', 's/step (median)', 's/step (min)',
                        'time / default', 'peak MB (XLA)', 'compile s'], rows), ''])
  print('\n' + text)
  print(f'saved {C.save(args.out, text)}')


if __name__ == '__main__':
  main()
