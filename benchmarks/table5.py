"""Table 5: time and peak memory per meta-step, relative to MAML at K=5 (figures, not a test).

    python -m benchmarks.table5 [--shapes=omniglot,mini] [--algorithms=maml,metasgd,...]
        [--ks=1,2,3,4,5] [--repeats=5] [--torch=loops,func] [--torch_algorithms=maml,metamida]
        [--rss] [--deadline_s=540]

For each shape (Omniglot-shaped 28x28x1 Conv4-64; miniImageNet-shaped 84x84x3 Conv4-32),
5-way 1-shot, 15 query, 4 tasks, second order, Adam, every (algorithm, K) is built and
compiled once exactly as the runner builds it (``benchmarks.common``), with the backend's
``mm.default_strategy()``; then all of them are timed in interleaved rounds (A B C ... A B
C ...), medians reported. Memory is XLA's accounting of the compiled step (argument +
output + temp − alias; deterministic). Times and memory are relative to MAML at K=5 of the
same shape; ratios between JAX variants are medians of the per-round ratios.

The PyTorch reference (``benchmarks.torch_reference``: second-order MAML and MetaMiDA,
plain loops and ``torch.func``, same shapes and tasks, K=5) runs between the JAX rounds of
the same process (one subprocess per algorithm and variant, kept for the whole run:
``torch_reference.Worker``), on the GPU when JAX's backend is one, and its median is
compared with mirrormeta's same algorithm at K=5.
On a GPU the run also measures the device's matmul and copy rates and reports each K=5
step's achieved FLOP/s (XLA's count) against them. Each round's times are printed as it
ends, and the results file, ``benchmarks/results/<out>_<backend>.md``, is rewritten
after each round (marked partial until the run ends), so a killed run keeps what it
timed. Compiles take 20-120 s per configuration on a 2-core CPU and 40-100 s on an H100
(jax 0.11.2, 16 cores): pick a subset with the flags (on a lent GPU, ``--ks=1,5`` of two
algorithms is ~5 min), and ``--deadline_s`` to time fewer rounds rather than be cut off
by a time limit.
"""
from __future__ import annotations

import argparse

import jax

from benchmarks import common as C

ALGORITHMS = ('maml', 'metasgd', 'metacurvature', 'metamida')
TARGETS = dict(vs_torch=0.8, vs_torch_gpu=1 / 3, mida_vs_maml_time=1.05,
               mida_k1_vs_maml_k5=0.25, mida_vs_maml_memory=1.03)


def run_shape(shape, algorithms, ks, args, on_round=None):
  """Builds, times and sizes one shape's grid; returns (built, times, torch results, rss).
  ``on_round(built, times, torch_times, torch_rss, torch_info, rounds)`` runs after each
  round with the samples so far."""
  print(f'\n== {shape.name}: image {shape.image}, Conv4-{shape.filters}, {C.N_WAY}-way '
        f'{C.SHOT}-shot {C.QUERY} query, {C.TASKS} tasks, second order', flush=True)
  built = C.build_all({(alg, k): dict(algorithm=alg, shape=shape, steps=k)
                       for alg in algorithms for k in ks}, workers=args.compile_workers)

  pairs = [(a, v) for a in args.torch_algorithms for v in args.torch]
  torch_times = {key: [] for key in pairs}
  torch_rss = {key: [] for key in pairs}
  torch_info = {}
  if pairs:
    try:
      import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      print('  torch is not installed: skipping the PyTorch reference '
            "(pip install 'mirrormeta[bench]')")
      args.torch, pairs, torch_times, torch_rss = [], [], {}, {}
  # One process per algorithm and variant for the whole run (torch_reference.Worker),
  # measured between the JAX rounds.
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  workers = {(a, v): torch_reference.Worker(
      v, shape.image, shape.filters, C.N_WAY, C.SHOT, C.QUERY, C.TASKS, 5, first_order=False,
      inner_lr=C.INNER_LR, device=args.torch_device, algorithm=a) for a, v in pairs}

  def between(r, times):
    if pairs:
      torch_round(r)
    if on_round is not None:
      on_round(built, times, torch_times, torch_rss, torch_info, r + 1)

  def torch_round(r):
    for key, worker in workers.items():
      res = worker.measure(warmup=args.torch_warmup, repeats=args.torch_repeats)
      torch_times[key] += res['all']
      torch_rss[key].append(res['peak_rss_mb'])
      torch_info.update(version=res['torch_version'], threads=res['threads'],
                        device=args.torch_device)
    print(f'  round {r + 1}: PyTorch ' + ', '.join(
        f'{a} {v} {1e3 * C.median(torch_times[a, v][-args.torch_repeats:]):.1f} ms'
        for a, v in pairs), flush=True)

  try:
    times = C.time_interleaved({key: b.run for key, b in built.items()},
                               repeats=args.repeats, warmup=args.warmup,
                               between=between,
                               label=lambda key: f'{key[0]} K={key[1]}',
                               deadline=args.deadline)
  finally:
    for worker in workers.values():
      worker.close()
  rss = {}
  if args.rss:
    for alg in algorithms:
      if 5 in ks or len(ks) == 1:
        k = 5 if 5 in ks else ks[0]
        rss[alg, k] = C.rss_peak_mb(alg, shape.name, k)
  return built, times, torch_times, torch_rss, torch_info, rss


def report_shape(shape, algorithms, ks, built, times, torch_times, torch_rss, torch_info, rss):
  ref_key = ('maml', 5) if ('maml', 5) in built else None
  lines = [f'### {shape.name}-shaped: {shape.image} Conv4-{shape.filters}, {C.N_WAY}-way '
           f'{C.SHOT}-shot, {C.QUERY} query, {C.TASKS} tasks, second order, '
           f'strategy [{C.strategy_label(next(iter(built.values())).strategy)}]'
           + (f', tasks split over {C.devices()} CPU devices' if C.devices() > 1 else ''), '']
  ref_t = C.median(times[ref_key]) if ref_key else None
  ref_m = built[ref_key].memory['peak'] if ref_key else None
  # Time relative to MAML K=5: the median of the per-round ratios, used by both tables.
  rel_t = {key: C.ratio_interval(ts, times[ref_key])[0] for key, ts in times.items()
           } if ref_key else {}
  # Table 5 layout: algorithms x K, "time x / memory x" relative to MAML K=5.
  if ref_key:
    rows = []
    for alg in algorithms:
      cells = []
      for k in ks:
        m = built[alg, k].memory['peak'] / ref_m
        cells.append(f'{rel_t[alg, k]:.2f} / {m:.2f}')
      rows.append([alg] + cells)
    lines += ['Relative to MAML at K=5 (time x / peak memory x):', '',
              C.markdown_table(['algorithm'] + [f'K={k}' for k in ks], rows), '']
  rows = []
  for alg in algorithms:
    for k in ks:
      b, ts = built[alg, k], times[alg, k]
      rows.append([alg, k, f'{C.median(ts):.4f}', f'{min(ts):.4f}',
                   f'{rel_t[alg, k]:.3f}' if ref_key else '-',
                   f'{C.mb(b.memory["peak"]):.1f}', f'{C.mb(b.memory["temp"]):.1f}',
                   f'{b.memory["peak"] / ref_m:.3f}' if ref_key else '-',
                   f'{b.flops / 1e9:.1f}', f'{b.flops / C.median(ts) / 1e12:.2f}',
                   f'{b.compile_s:.0f}'])
  lines += ['Absolute (time: median of interleaved rounds; memory: XLA memory_analysis, '
            'argument + output + temp − alias; GFLOP: XLA cost analysis of the step):', '',
            C.markdown_table(['algorithm', 'K', 's/step (median)', 's/step (min)',
                              'time / MAML K=5', 'peak MB', 'temp MB', 'memory / MAML K=5',
                              'GFLOP/step', 'TFLOP/s', 'compile s'], rows), '']
  if torch_times:
    rows = []
    for (a, v), ts in torch_times.items():
      tr = C.median(ts)
      rows.append([f'PyTorch {torch_info.get("version", "")} {a} `{v}`', 5, f'{tr:.4f}',
                   f'{min(ts):.4f}', f'{C.median(torch_rss[a, v]):.0f}',
                   f'{C.median(times[a, 5]) / tr:.2f}' if (a, 5) in times else '-'])
    if torch_info.get('device', 'cpu') == 'cpu':
      how = (f'{torch_info.get("threads")} threads; peak = RSS rise of the steps in the '
             "reference's own process (ru_maxrss, which a child can inherit from this large "
             'JAX process, then reading low; `python -m benchmarks.torch_reference` alone '
             "measures it cleanly), not comparable 1:1 with XLA's accounting")
    else:
      how = (f'on {torch_info["device"]}, cudnn.benchmark on; peak = the CUDA caching '
             "allocator's peak of allocated bytes during the steps")
    lines += [f'PyTorch reference (second order, K=5, {how}):', '',
              C.markdown_table(['reference', 'K', 's/step (median)', 's/step (min)',
                                'peak MB', "mirrormeta's same algorithm at K=5 / this"],
                               rows), '']
  if rss:
    rows = [[alg, k, f'{r["xla_peak_mb"]:.1f}', f'{r["rss_peak_delta_mb"]:.1f}']
            for (alg, k), r in rss.items()]
    lines += ['Cross-check: RSS high-water rise over 2 steps in a fresh process (inputs and '
              'state resident before) vs XLA accounting:', '',
              C.markdown_table(['algorithm', 'K', 'XLA peak MB', 'RSS rise MB'], rows), '']
  return '\n'.join(lines)


def targets(shape, built, times, torch_times, ks, torch_repeats=1, torch_device='cpu'):
  """Target lines of one shape (the issue states them for the Omniglot shape; the
  miniImageNet shape gets the same lines, for comparison).

  A time ratio is the median of the per-round ratios with its 95% confidence interval
  (:func:`benchmarks.common.ratio_interval`): MET when the whole interval is within the
  target, NOT MET when all of it is beyond, WITHIN NOISE otherwise (more rounds, or a
  quieter machine, decide). Peak memory is deterministic.
  """
  out = []
  def line(name, limit, detail, ratio=None, rounds=None):
    if rounds is not None:
      ratio, lo, hi = C.ratio_interval(*rounds)
    if rounds is None or lo != lo:  # deterministic, or too few rounds for an interval
      verdict, ci = ('MET' if ratio <= limit else 'NOT MET'), ''
      if rounds is not None:
        ci = f', no 95% CI from {len(rounds[0])} rounds'
    else:
      verdict = 'MET' if hi <= limit else 'NOT MET' if lo > limit else 'WITHIN NOISE'
      ci = f', 95% CI [{lo:.3f}, {hi:.3f}] over {len(rounds[0])} rounds'
    out.append(f'- [{verdict}] {name}: {ratio:.3f}{ci} (target ≤ {limit}) {detail}')
  have = lambda *keys: all(k in built for k in keys)
  for alg, name in (('maml', 'MAML'), ('metamida', 'MetaMiDA')):
    ref = {v: ts for (a, v), ts in torch_times.items() if a == alg}
    if not (have((alg, 5)) and ref):
      continue
    t = C.median(times[alg, 5])
    best_v = min(ref, key=lambda v: C.median(ref[v]))
    # The reference runs torch_repeats steps between two JAX rounds: its per-round median.
    ts = ref[best_v]
    per_round = [C.median(ts[i:i + torch_repeats]) for i in range(0, len(ts), torch_repeats)]
    # The targets, stated for MAML (MetaMiDA is held to the same bars): <= 0.8x
    # PyTorch's time on CPU, >= 3x faster on a GPU.
    line(f'mirrormeta {name} K=5 / PyTorch {name} reference on {torch_device} (fastest '
         'variant)', TARGETS['vs_torch' if torch_device == 'cpu' else 'vs_torch_gpu'],
         f'({t:.3f} s vs `{best_v}` {C.median(ts):.3f} s; min/min: '
         f'{min(times[alg, 5]) / min(ts):.2f}; ' + ', '.join(
             f'vs `{v}`: {t / C.median(vs):.2f}' for v, vs in ref.items()) + ')',
         rounds=(times[alg, 5], per_round))
  for k in ks:
    if have(('metamida', k), ('maml', k)):
      line(f'MetaMiDA / MAML time at K={k}', TARGETS['mida_vs_maml_time'],
           f'({C.median(times["metamida", k]):.3f} s vs {C.median(times["maml", k]):.3f} s)',
           rounds=(times['metamida', k], times['maml', k]))
  if have(('metamida', 1), ('maml', 5)):
    # Where time follows work, the FLOP ratio is this ratio's floor: on the Omniglot shape
    # the 75-image query pass, the same at every K, keeps it far above the paper's 0.31.
    line('MetaMiDA K=1 / MAML K=5 time', TARGETS['mida_k1_vs_maml_k5'],
         f'({C.median(times["metamida", 1]):.3f} s vs {C.median(times["maml", 5]):.3f} s; '
         f'work: {built["metamida", 1].flops / built["maml", 5].flops:.2f} of the FLOPs, '
         "XLA's count)", rounds=(times['metamida', 1], times['maml', 5]))
  for k in ks:
    if have(('metamida', k), ('maml', k)):
      a, b = built['metamida', k].memory['peak'], built['maml', k].memory['peak']
      line(f'MetaMiDA / MAML peak memory at K={k}', TARGETS['mida_vs_maml_memory'],
           f'({C.mb(a):.1f} MB vs {C.mb(b):.1f} MB)', ratio=a / b)
  out.append('- checkpointing target (K=20 ≤ 2x K=1 with jax.checkpoint): measured by '
             '`python -m benchmarks.memory`, see memory_<backend>.md')
  return out


def flops_lines(built, times, ceilings):
  """Achieved FLOP/s of each step at the largest K against the measured float32 matmul
  ceilings."""
  out = []
  k_max = max(k for _, k in built)
  for (alg, k), b in built.items():
    if k != k_max:
      continue
    rate = b.flops / C.median(times[alg, k]) / 1e12
    out.append(f'- achieved FLOP/s, {alg} K={k}: {rate:.2f} TFLOP/s ({b.flops / 1e9:.1f} '
               f'GFLOP/step) = {rate / ceilings["matmul_default_tflops"]:.1%} of the measured '
               f'default-precision matmul rate, {rate / ceilings["matmul_highest_tflops"]:.1%} '
               'of the float32 one')
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--shapes', type=C.csv_list, default=['omniglot', 'mini'])
  p.add_argument('--algorithms', type=C.csv_list, default=list(ALGORITHMS))
  p.add_argument('--ks', type=C.int_list, default=[1, 2, 3, 4, 5])
  p.add_argument('--repeats', type=int, default=7,
                 help='interleaved timed rounds (a 95%% CI of a median needs >= 6)')
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--torch', type=C.csv_list, default=['loops', 'func'],
                 help="PyTorch reference variants ('' for none)")
  p.add_argument('--torch_algorithms', type=C.csv_list, default=None,
                 help='algorithms of the PyTorch reference (default: maml and metamida where '
                      '--algorithms has them)')
  p.add_argument('--torch_repeats', type=int, default=3, help='torch timed steps per round')
  p.add_argument('--torch_device', default=None,
                 help="where the PyTorch reference runs (default: 'cuda' when JAX's backend "
                      "is a GPU, else 'cpu')")
  p.add_argument('--torch_warmup', type=int, default=2, help='untimed torch steps per round')
  p.add_argument('--rss', action='store_true', help='RSS cross-check in fresh processes')
  p.add_argument('--no_cache', action='store_true', help='no persistent compilation cache')
  p.add_argument('--default_malloc', action='store_true',
                 help="glibc's default malloc (no mirrormeta.runtime.retain_freed_memory)")
  p.add_argument('--low_memory_schedule', action='store_true',
                 help="XLA:CPU's memory-ordered scheduler (mirrormeta.runtime.low_memory_schedule)")
  p.add_argument('--threaded_convolutions', action='store_true',
                 help="XLA:CPU's own convolutions (mirrormeta.runtime.threaded_convolutions)")
  p.add_argument('--ceilings', action=argparse.BooleanOptionalAction, default=None,
                 help='measure the device\'s matmul and copy rates and report achieved FLOP/s '
                      'against them (default: on a GPU)')
  C.add_deadline_flag(p)
  C.add_compile_workers_flag(p)
  p.add_argument('--cpu_devices', type=int, default=1,
                 help='XLA:CPU devices to split the host and each step\'s tasks into (the '
                      'runner\'s cpu_devices; memory and FLOPs are summed over them)')
  p.add_argument('--out', default='table5')
  args = p.parse_args(argv)
  args.deadline = C.deadline_after(args.deadline_s)
  if args.torch_algorithms is None:
    args.torch_algorithms = [a for a in ('maml', 'metamida') if a in args.algorithms]
  if not set(args.torch_algorithms) <= {'maml', 'metamida'}:
    p.error(f'--torch_algorithms: the PyTorch reference has maml and metamida, got '
            f'{",".join(args.torch_algorithms)}')
  C.setup(args.no_cache, args.default_malloc, args.low_memory_schedule,
          args.threaded_convolutions, cpu_devices=args.cpu_devices)
  if args.torch_device is None:
    args.torch_device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
  env = C.environment()
  print(env)
  cmd = C.command('table5', argv)
  sections = [f'# Table 5: meta-step time and peak memory ({jax.default_backend()})', '',
              f'`{cmd}`  ', env, '']
  target_sections = []
  ceilings = {}
  if args.ceilings if args.ceilings is not None else jax.default_backend() == 'gpu':
    ceilings = C.measured_ceilings()
    text = ('Measured ceilings of this device: float32 matrix product '
            f'{ceilings["matmul_default_tflops"]:.1f} TFLOP/s at default precision, '
            f'{ceilings["matmul_highest_tflops"]:.1f} at \'highest\'; copy '
            f'{ceilings["copy_tbps"]:.2f} TB/s (read + write).')
    print(text, flush=True)
    sections += [text, '']

  def shape_text(shape, res):
    """The shape's table and its target lines (None when there are none to state)."""
    lines = targets(shape, res[0], res[1], res[2], args.ks, args.torch_repeats,
                    args.torch_device)
    if ceilings:
      lines += flops_lines(res[0], res[1], ceilings)
    return (report_shape(shape, args.algorithms, args.ks, *res),
            '\n'.join([f'### Targets ({shape.name}-shaped, ratios from this run)', '']
                      + lines) if len(lines) > 1 else None)  # > the benchmarks.memory line

  def save_partial(shape, built, times, torch_times, torch_rss, torch_info, rounds):
    if rounds == args.repeats:
      return  # the whole shape is saved next
    table, lines = shape_text(shape, (built, times, torch_times, torch_rss, torch_info, {}))
    note = C.partial_note(rounds, args.repeats, f' of the {shape.name} shape')
    C.save(args.out, '\n'.join(sections + [note, '', table, ''] + target_sections
                               + ([lines, ''] if lines else [])))

  for name in args.shapes:
    shape = C.SHAPES[name]
    res = run_shape(shape, args.algorithms, args.ks, args,
                    on_round=lambda *a, shape=shape: save_partial(shape, *a))
    text, lines = shape_text(shape, res)
    print('\n' + text, flush=True)
    sections += [text, '']
    if lines:
      target_sections.append(lines)
    for b in res[0].values():
      b.free()
  for text in target_sections:
    print('\n' + text)
    sections += [text, '']
  path = C.save(args.out, '\n'.join(sections))
  print(f'\nsaved {path}')


if __name__ == '__main__':
  main()
