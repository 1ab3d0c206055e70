"""Where a meta-step's time goes: per XLA operation, by kind and by the code that made it
(figures, not a test).

    python -m benchmarks.profile [--shape=omniglot] [--algorithms=maml,metamida] [--steps=5]
        [--strategy=SPEC] [--rounds=5] [--top=12] [--out=profile] [--trace_dir=DIR]

Traces each algorithm's meta-step (``benchmarks.common.build``, the runner's build) with
``jax.profiler`` for ``--rounds`` steps after a warm-up (interleaved; figures are medians
over them), and adds up the time of every XLA operation in the trace: on CPU the time of
each thunk on the thread that ran it (summed over threads, so it is the step's work and
exceeds its wall time when both cores are busy), on a GPU each kernel's time on the device.
Each operation is named back, through the compiled HLO, to

* its kind: convolution, dot, reduction, elementwise, data movement (a fusion is named by
  the heaviest operation inside it);
* the project code that made it: the innermost frame in ``mirrormeta/`` of the Python stack
  that XLA keeps with an operation (the HLO's stack-frame table; convolutions are one row),
  and whether ``mirrormeta.core.primal_map`` is on that stack: the mirror map φ = ∇h*(z)
  and its derivatives, the part of MetaMiDA's step that MAML's identity map does not
  have. An operation that XLA fused or simplified together with others keeps one origin's
  frames, some keep none: the time under ``primal_map`` is a lower bound of the map's
  (``benchmarks.map_cost`` times the map alone).

SPEC is ``benchmarks.strategies``'s ``tasks:unroll[:map_remat[:conv[:layout[:icnn]]]]``
(default: the backend's defaults). On a GPU, kernels that XLA runs inside command buffers
(CUDA graphs) may come without their operation's name; ``XLA_FLAGS=
--xla_gpu_enable_command_buffer=`` turns those off (and changes the timing). Results:
``benchmarks/results/<out>_<shape>_<backend>.md``.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Callable, NamedTuple

import jax

import mirrormeta as mm
from benchmarks import common as C
from benchmarks import strategies

PACKAGE = os.path.dirname(os.path.abspath(mm.__file__))
# Operations that only hold others (a loop, a branch): their own events span the operations
# inside them, which the trace also has, so counting them would count that time twice. (A
# GPU command buffer is a 'call' whose kernels may not have events of their own: counted.)
_CONTAINERS = {'while', 'conditional'}
_MOVEMENT = {'copy', 'transpose', 'bitcast', 'broadcast', 'reshape', 'slice', 'concatenate',
             'pad', 'parameter', 'constant', 'tuple', 'get-tuple-element', 'reverse',
             'dynamic-slice', 'dynamic-update-slice', 'iota', 'copy-start', 'copy-done'}
_REDUCTIONS = {'reduce', 'reduce-window', 'select-and-scatter', 'scatter', 'sort', 'gather'}
_CALL = 'benchmarks.profile call '  # the annotation of each traced call


class Op(NamedTuple):
  kind: str | None   # see _kind; None for a container (not counted)
  source: str        # 'file.py:function' of the innermost frame in ``roots``, else
                     # '(convolutions)', '(elsewhere)' or '(not recorded)'
  in_map: bool       # mirrormeta.core.primal_map is on its Python stack


def _table(text: str, name: str) -> dict[int, str]:
  """One of the HLO text's numbered tables ('FileNames', 'StackFrames', ...)."""
  match = re.search(rf'^{name}\n((?:\d+ .*\n)*)', text, re.M)
  return dict((int(i), v) for i, v in re.findall(r'^(\d+) (.*)$', match[1], re.M)) if match else {}


def _frames(text: str) -> dict[int, tuple[str, str, int | None]]:
  """stack_frame_id -> (file, function, parent frame id or None)."""
  files = {k: v.strip('"') for k, v in _table(text, 'FileNames').items()}
  funcs = {k: v.strip('"') for k, v in _table(text, 'FunctionNames').items()}
  fields = lambda v: {k: int(x) for k, x in re.findall(r'(\w+)=(\d+)', v)}
  locs = {k: fields(v) for k, v in _table(text, 'FileLocations').items()}
  out = {}
  for k, v in _table(text, 'StackFrames').items():
    f = fields(v)
    loc = locs[f['file_location_id']]
    # The text prints a frame's parent one above its id, a root as itself (checked by
    # tests/test_benchmark_tools.py on a known call chain).
    parent = f['parent_frame_id'] - 1
    out[k] = (files[loc['file_name_id']], funcs[loc['function_name_id']],
              parent if 0 < parent != k else None)
  return out


def _stack(frames: dict, frame_id: int | None) -> list[tuple[str, str]]:
  """(file, function) from the innermost frame outwards."""
  out, seen = [], set()
  while frame_id in frames and frame_id not in seen:
    seen.add(frame_id)
    file, func, frame_id = frames[frame_id]
    out.append((file, func))
  return out


def _kind(opcode: str, inside: set[str], target: str) -> str | None:
  """An operation's kind from its opcode, the opcodes inside it (a fusion's) and its
  custom-call target (cuDNN's convolutions, cuBLAS's products)."""
  ops = inside | {opcode}
  if opcode in _CONTAINERS:
    return None
  if opcode == 'call':
    return 'call (several operations)'
  if 'convolution' in ops or 'conv' in target.lower():
    return 'convolution'
  if 'dot' in ops or any(s in target.lower() for s in ('gemm', 'matmul', 'dot')):
    return 'dot'
  if ops & _REDUCTIONS:
    return 'reduction'
  if ops <= _MOVEMENT | {'fusion'}:
    return 'data movement'
  return 'elementwise'


def hlo_ops(compiled, roots: tuple[str, ...] = (PACKAGE,)) -> dict[str, Op]:
  """{operation name: Op} of a compiled function; ``roots`` are the folders whose code an
  operation is attributed to."""
  text = compiled.as_text()
  frames = _frames(text)
  inside, instructions, current = collections.defaultdict(set), [], None
  for line in text.splitlines():
    head = re.match(r'^(?:ENTRY )?%(\S+) .*\{$', line)
    if head:
      current = head[1]
      continue
    m = re.match(r'^\s*(?:ROOT )?%(\S+) = .*? ([a-z][\w-]*)\(', line)
    if m:
      inside[current].add(m[2])
      calls = re.search(r'calls=%([\w.-]+)', line)
      target = re.search(r'custom_call_target="([^"]+)"', line)
      frame = re.search(r'stack_frame_id=(\d+)', line)
      instructions.append((m[1], m[2], calls and calls[1], target[1] if target else '',
                           int(frame[1]) if frame else None))
  ops = {}
  for name, opcode, calls, target, frame in instructions:
    stack = _stack(frames, frame)
    kind = _kind(opcode, inside.get(calls, set()), target)
    own = [(f, fn) for f, fn in stack if any(f.startswith(r + os.sep) for r in roots)]
    # Convolutions are the model's, one row: XLA can give one the metadata of an operation
    # it absorbed (MAML's map φ = z is a multiplication by 1, folded into kernel gradients).
    source = ('(convolutions)' if kind == 'convolution' else
              f'{os.path.basename(own[0][0])}:{own[0][1].replace(".<locals>", "")}' if own
              else '(elsewhere)' if stack else '(not recorded)')
    in_map = kind != 'convolution' and any(
        fn == 'primal_map' and f.endswith(os.path.join('mirrormeta', 'core.py'))
        for f, fn in stack)
    ops[name] = Op(kind, source, in_map)
  return ops


def trace_calls(calls: list[Callable[[], None]], keep: str | None = None
                ) -> tuple[list[dict[str, float]], list[float]]:
  """Runs ``calls`` (each blocking until its work is done) in order under ``jax.profiler``;
  for each, ({operation name: seconds}, wall seconds). Device time where the trace has
  device events (GPU), else the host threads' (CPU thunks). An operation belongs to the call
  whose annotated span, on the trace's one timeline, it starts in, so calls of different
  programs can be interleaved. ``keep``: a folder to leave the trace in (for Perfetto or
  TensorBoard), else it is deleted."""
  walls = []
  with tempfile.TemporaryDirectory() as d:
    d = keep or d
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for i, call in enumerate(calls):
        with jax.profiler.TraceAnnotation(f'{_CALL}{i}'):
          start = time.perf_counter()
          call()
          walls.append(time.perf_counter() - start)
    path = max(glob.glob(os.path.join(d, '**', '*.trace.json.gz'), recursive=True),
               key=os.path.getmtime)  # a kept folder may hold earlier traces
    with gzip.open(path) as f:
      events = json.load(f)['traceEvents']
  process = {e['pid']: e['args']['name'] for e in events
             if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  events = [e for e in events if e.get('ph') == 'X' and 'dur' in e]
  spans = sorted((e['ts'], e['ts'] + e['dur'], int(e['name'][len(_CALL):]))
                 for e in events if e['name'].startswith(_CALL))
  if len(spans) != len(calls):
    raise RuntimeError(f'the trace has {len(spans)} of the {len(calls)} calls')
  starts = [start for start, _, _ in spans]
  ops = [e for e in events if 'hlo_op' in e.get('args', {}) and not e['name'].startswith('end: ')]
  ops = [e for e in ops if process.get(e['pid'], '').startswith('/device:')] or ops
  out = [collections.Counter() for _ in calls]
  for e in ops:
    i = bisect.bisect_right(starts, e['ts']) - 1
    if i >= 0 and e['ts'] <= spans[i][1]:
      out[spans[i][2]][e['args']['hlo_op']] += e['dur'] * 1e-6  # µs in the trace
  return [dict(c) for c in out], walls


class Profile(NamedTuple):
  walls: list[float]               # s per traced step
  rounds: list[dict[str, float]]   # per traced step: operation -> s
  info: dict[str, Op]


def profile(built: dict[str, C.Built], rounds: int, keep: str | None = None
            ) -> dict[str, Profile]:
  """Each compiled step's profile over ``rounds`` interleaved traced rounds (A B A B ...,
  as the timing benchmarks do, so that the machine's drift hits all alike), after a warm-up."""
  for b in built.values():
    b.run()  # so that the first traced call pays for nothing once-only
  names = list(built) * rounds
  times, walls = trace_calls([built[n].run for n in names], keep)
  return {n: Profile([w for m, w in zip(names, walls) if m == n],
                     [t for m, t in zip(names, times) if m == n], hlo_ops(b.compiled))
          for n, b in built.items()}


# An operation the trace names but the HLO text does not (none seen so far).
_UNNAMED = Op('elementwise', '(not in the HLO)', False)


def grouped(p: Profile, key) -> dict:
  """Seconds per step by ``key(Op)``, containers left out: the median over the rounds of
  each group's sum (one slow round does not move it)."""
  per_round = []
  for ops in p.rounds:
    sums = collections.Counter()
    for name, s in ops.items():
      op = p.info.get(name, _UNNAMED)
      if op.kind is not None:
        sums[key(op)] += s
    per_round.append(sums)
  return collections.defaultdict(float, {
      k: C.median([r[k] for r in per_round]) for k in set().union(*per_round)})


def report(profiles: dict[str, Profile], top: int) -> list[str]:
  """Markdown: the totals, the time by kind and by source side by side (with each one's
  difference from the first), and each one's slowest operations."""
  names = list(profiles)
  header = [*names, *(f'{n} − {names[0]}' for n in names[1:])]
  busy = {n: grouped(p, lambda op: 'all')['all'] for n, p in profiles.items()}

  def row(label, seconds, share=True):
    """label, each profile's ms (and share of its operations' time), differences."""
    return [label, *(f'{1e3 * seconds[n]:.1f}'
                     + (f' ({seconds[n] / busy[n]:.1%})' if share else '') for n in names),
            *(f'{1e3 * (seconds[n] - seconds[names[0]]):+.1f}' for n in names[1:])]

  lines = [C.markdown_table(['ms per step', *header], [
      row('wall time', {n: C.median(p.walls) for n, p in profiles.items()}, share=False),
      row("operations' time", busy, share=False),
      row('… under `primal_map` (a lower bound, see below)',
          {n: grouped(p, lambda op: op.in_map)[True] for n, p in profiles.items()})]), '']
  for title, key in (('kind', lambda op: op.kind), ('source', lambda op: op.source)):
    groups = {n: grouped(p, key) for n, p in profiles.items()}
    keys = sorted(set().union(*groups.values()),
                  key=lambda k: -max(g[k] for g in groups.values()))
    if len(keys) > top:  # the rest in one row
      rest = keys[top - 1:]
      keys = keys[:top - 1] + [f'{len(rest)} more']
      for g in groups.values():
        g[keys[-1]] = sum(g.pop(k, 0.0) for k in rest)
    lines += [f"By {title} (ms per step, share of the operations' time):", '',
              C.markdown_table([title, *header], [row(k, {n: groups[n][k] for n in names})
                                                  for k in keys]), '']
  for n, p in profiles.items():
    per_op = {name: C.median([r.get(name, 0.0) for r in p.rounds])
              for name in set().union(*p.rounds) if p.info.get(name, _UNNAMED).kind}
    rows = [[f'`{name}`', op.kind, op.source, 'yes' if op.in_map else '', f'{1e3 * s:.1f}']
            for name, s in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
            for op in [p.info.get(name, _UNNAMED)]]
    lines += [f'Slowest operations, {n}:', '',
              C.markdown_table(['operation', 'kind', 'source', 'map', 'ms per step'], rows), '']
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--shape', default='omniglot', choices=sorted(C.SHAPES))
  p.add_argument('--algorithms', type=C.csv_list, default=['maml', 'metamida'])
  p.add_argument('--steps', type=int, default=5, help='K')
  p.add_argument('--strategy', default=None,  # parsed after setup(), as in strategies
                 help='tasks:unroll[:map_remat[:conv[:layout[:icnn]]]] (default: the defaults)')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--top', type=int, default=12)
  C.add_compile_workers_flag(p)
  p.add_argument('--out', default='profile')
  p.add_argument('--trace_dir', default=None,
                 help='keep the trace here (view it in Perfetto or TensorBoard)')
  args = p.parse_args(argv)
  C.setup()
  env = C.environment()
  print(env)
  spec = (strategies.parse_specs(p, [args.strategy])[0] if args.strategy else
          strategies.default_spec())
  shape = C.SHAPES[args.shape]
  built = C.build_all({a: spec.build_spec(a, shape, args.steps) for a in args.algorithms},
                      workers=args.compile_workers)
  profiles = profile(built, args.rounds, args.trace_dir)
  text = '\n'.join([
      f'# Where the meta-step\'s time goes ({jax.default_backend()})', '',
      f'`{C.command("profile", argv)}`  ', env, '',
      f'Second order, K={args.steps}, {shape.name}-shaped {shape.image} Conv4-{shape.filters}, '
      f'{C.N_WAY}-way {C.SHOT}-shot {C.QUERY} query, {C.TASKS} tasks, strategy '
      f'`{spec.name}`; {args.rounds} traced steps each, interleaved, after a warm-up; every '
      'figure is a median over them. '
      "Operations' time: " + ("each kernel's time on the device." if jax.default_backend() != 'cpu'
                              else "each thunk's time on the thread that ran it, summed over "
                                   'threads.'), '',
      'Kinds are read from the compiled HLO. Sources are the Python frames XLA keeps with '
      'each operation: one that XLA fused or simplified together with others keeps one '
      "origin's frames, and some keep none (`(not recorded)`); convolutions are one row. So "
      'the time under `primal_map` is a lower bound of the map\'s; `benchmarks.map_cost` '
      'times the map alone.', '',
      *report(profiles, args.top)])
  print('\n' + text)
  print(f'saved {C.save(f"{args.out}_{shape.name}", text)}')


if __name__ == '__main__':
  main()
