"""Shared pieces of the meta-step benchmarks: build, compile, time and size a meta-step.

A configuration is (algorithm, shape, K, strategy). It is built exactly as the runner
(``mirrormeta.train.build_experiment`` / ``make_runner``) builds it:

    alg  = mirrormeta.algorithms.get(name)                       # conjugate + first_order
    meta = mm.make_meta_step(alg.conjugate.apply,
                             models.classification_loss(model.apply), optax.adam(1e-3),
                             steps=K, lr=inner_lr, first_order=alg.first_order,
                             strategy=strategy or mm.default_strategy())
    step = jax.jit(meta.step, donate_argnums=0)                  # the state is donated

on random inputs of the benchmark's task shape: 5-way 1-shot, 15 query, 4 tasks
(support ``[4, 5, H, W, C]``, query ``[4, 75, H, W, C]``), Conv4 with transductive BN.

Peak memory (deterministic, no run needed) is XLA's own accounting of the compiled step,
``jax.jit(step).lower(...).compile().memory_analysis()``::

    peak_bytes = argument + output + temp − alias

``argument``/``output``: the step's input/output buffers (state, tasks; new state,
metrics); ``temp``: the buffer-assignment slab of every intermediate, already packed by
liveness (so it is the most the program holds at once, activations of the unrolled inner
loops included); ``alias``: outputs written in place into donated inputs (counted once).
Generated code is not counted. An optional cross-check (:func:`rss_peak_mb`) runs the step
in a fresh subprocess and reads the process's RSS high-water mark over the steps.

Timing: :func:`time_interleaved` warms every compiled step up, then runs rounds
A B C ... A B C ... and reports each one's median, so that load from other processes on
a shared machine hits every variant alike; compare ratios from one run, never across runs.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mirrormeta as mm
from benchmarks.torch_reference import available_cores  # torch-free: shared with its workers
from mirrormeta import algorithms, models, parallel, runtime

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results'

# The benchmark task: N-way 1-shot, 15 query, 4 tasks per meta-batch.
N_WAY, SHOT, QUERY, TASKS = 5, 1, 15, 4
# Inner (dual-space) step size: the configs' default (experiments/configs/base.py). It does
# not change the work per step; the PyTorch reference is given the same value.
INNER_LR = 0.01
META_LR = 1e-3


class Shape(NamedTuple):
  """A benchmark shape: image (H, W, C) and Conv4 width."""
  name: str
  image: tuple[int, int, int]
  filters: int


SHAPES = {
    'omniglot': Shape('omniglot', (28, 28, 1), 64),   # Omniglot-shaped, Conv4-64
    'mini': Shape('mini', (84, 84, 3), 32),           # miniImageNet-shaped, Conv4-32
    'mini64': Shape('mini64', (84, 84, 3), 64),       # the mini_1shot config's Conv4-64
}


_SETUP: dict[str, Any] = {}  # setup()'s arguments, for build_all's compiling processes


def setup(no_cache: bool = False, default_malloc: bool = False,
          low_memory_schedule: bool = False, threaded_convolutions: bool = False,
          synchronous_dispatch: bool = True, arenas: str = 'auto',
          cpu_devices: int = 1) -> None:
  """What every benchmark does first: the persistent compilation cache, glibc malloc
  retention (``mirrormeta.runtime.retain_freed_memory``) and synchronous CPU dispatch
  (``mirrormeta.runtime.synchronous_dispatch``) as the runner has them; optionally
  XLA:CPU's memory-ordered scheduler (``mirrormeta.runtime.low_memory_schedule``) or its
  own convolutions (``mirrormeta.runtime.threaded_convolutions``), the runner's config
  fields of the same names, which must be set before JAX starts. ``arenas``: malloc's
  arenas under retention (``runtime.retain_freed_memory``; ``benchmarks.arenas``).
  ``cpu_devices``: XLA:CPU devices the host is split into (``runtime.cpu_devices``, the
  runner's field of that name); with more than one, :func:`build` splits each step's
  tasks over them as the runner does."""
  _SETUP.update(no_cache=no_cache, default_malloc=default_malloc,
                low_memory_schedule=low_memory_schedule,
                threaded_convolutions=threaded_convolutions,
                synchronous_dispatch=synchronous_dispatch, arenas=arenas,
                cpu_devices=cpu_devices)
  if cpu_devices > 1:
    runtime.cpu_devices(cpu_devices)
  if low_memory_schedule:
    runtime.low_memory_schedule()
  if threaded_convolutions:
    runtime.threaded_convolutions()
  if synchronous_dispatch:
    runtime.synchronous_dispatch()
  if not no_cache:
    enable_compilation_cache()
  if not default_malloc:
    runtime.retain_freed_memory(arenas)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> None:
  """Persists compiled steps (``.jax_cache`` at the repo root, git-ignored): a rerun of an
  unchanged configuration loads instead of recompiling. Keys include the HLO, so a change
  in ``mirrormeta`` recompiles."""
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    jax.config.update('jax_compilation_cache_dir', str(path or REPO / '.jax_cache'))


def unroll_label(s: mm.Strategy) -> str:
  """'full' for full unrolling (unroll=True), else the scan's unroll factor."""
  return 'full' if s.unroll is True else str(s.unroll)


def strategy_label(s: mm.Strategy) -> str:
  return f'tasks={s.tasks} unroll={unroll_label(s)} remat={s.remat} map_remat={s.map_remat}'


def strategy_key(s: mm.Strategy) -> tuple:
  """A hashable key that tells unroll=True from unroll=1 (equal as Python values)."""
  return (s.tasks, type(s.unroll).__name__, s.unroll, s.remat, s.map_remat)


def memory_bytes(compiled, devices: int = 1) -> dict[str, int]:
  """XLA's memory accounting of a compiled executable; 'peak' = arg + out + temp − alias.
  A program split over ``devices`` reports one device's share: scaled to all of them."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
             temp=int(m.temp_size_in_bytes), alias=int(m.alias_size_in_bytes),
             code=int(m.generated_code_size_in_bytes))
  out = {k: v * devices for k, v in out.items()}
  out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


@dataclasses.dataclass
class Built:
  """One compiled configuration and the live buffers to run it on."""
  algorithm: str
  shape: Shape
  steps: int
  strategy: mm.Strategy
  first_order: bool
  compiled: Any             # jax.stages.Compiled: (state, support, query) -> (state, metrics)
  state: Any
  support: Any
  query: Any
  compile_s: float          # lower + compile (a persistent-cache hit makes this small)
  memory: dict[str, int]
  flops: float              # XLA's count of the step's floating-point operations
  loaded: bool = False      # from the persistent compilation cache

  @property
  def label(self) -> str:
    return f'{self.algorithm} {self.shape.name} K={self.steps}'

  def run(self) -> None:
    """One meta-step, blocking (the donated state is replaced by the new one)."""
    self.state, metrics = self.compiled(self.state, self.support, self.query)
    jax.block_until_ready(metrics)

  def free(self) -> None:
    self.compiled = self.state = self.support = self.query = None


def random_tasks(shape: Shape, seed: int = 0, tasks: int = TASKS):
  """Gaussian images and balanced integer labels of the benchmark's task shape."""
  rng = np.random.default_rng(seed)
  def split(per_class):
    x = rng.standard_normal((tasks, N_WAY * per_class) + shape.image).astype(np.float32)
    y = np.tile(np.repeat(np.arange(N_WAY, dtype=np.int32), per_class), (tasks, 1))
    return jnp.asarray(x), jnp.asarray(y)
  return split(SHOT), split(QUERY)


def make_step(algorithm: str, shape: Shape, steps: int, strategy: mm.Strategy | None = None,
              first_order: bool | None = None, inner_lr: float = INNER_LR,
              conv: str = 'mirrormeta', layout: str = 'NHWC', block_major: bool = True,
              native: bool | None = None):
  """(meta: MetaStep, theta: MetaParams, support, query, first_order) as the runner builds;
  ``native``: MetaMiDA's map as the CPU kernel (None: ``mirrormeta.native.default``, as the
  runner's ``strategy.icnn_map='auto'``)."""
  if native is None:
    native = mm.native.default()
  alg = algorithms.get(algorithm, icnn={'block_major': block_major, 'native': native},
                       **({} if first_order is None else {'first_order': first_order}))
  support, query = random_tasks(shape)
  model = models.functional(models.Conv4(num_classes=N_WAY, filters=shape.filters, conv=conv,
                                         layout=layout),
                            jnp.zeros(shape.image, jnp.float32)[None])
  meta = mm.make_meta_step(alg.conjugate.apply, models.classification_loss(model.apply),
                           optax.adam(META_LR), steps=steps, lr=inner_lr,
                           first_order=alg.first_order,
                           strategy=strategy or mm.default_strategy(),
                           **({'axis_name': parallel.TASK_AXIS} if devices() > 1 else {}))
  k_model, k_conj = jax.random.split(jax.random.key(0))
  params = jax.jit(model.init)(k_model)
  theta = mm.MetaParams(z=params, h=jax.jit(alg.conjugate.init)(k_conj, params))
  return meta, theta, support, query, alg.first_order


def devices() -> int:
  """The devices a step's tasks are split over: the CPU devices of :func:`setup` (the
  runner's ``cpu_devices``), else 1."""
  return len(jax.devices()) if jax.default_backend() == 'cpu' else 1


_BUILT: dict[tuple, Built] = {}
_cache_hits = [0]  # persistent-cache hits in this process, counted by JAX's monitoring events


def _count_cache_hit(event: str, **_) -> None:
  if event == '/jax/compilation_cache/cache_hits':
    _cache_hits[0] += 1


jax.monitoring.register_event_listener(_count_cache_hit)


def _build_key(algorithm: str, shape: Shape | str, steps: int,
               strategy: mm.Strategy | None = None, first_order: bool | None = None,
               conv: str = 'mirrormeta', layout: str = 'NHWC', block_major: bool = True,
               native: bool | None = None, **_) -> tuple:
  """What identifies a built program (build's arguments, with the defaults filled in)."""
  shape = SHAPES[shape] if isinstance(shape, str) else shape
  strategy = strategy or mm.default_strategy()
  native = mm.native.default() if native is None else native
  # Not the Strategy itself: Strategy(unroll=True) == Strategy(unroll=1) (True == 1 in
  # Python), but full unrolling and lax.scan are different programs.
  return (algorithm, shape, steps, strategy_key(strategy), first_order, conv, layout,
          block_major, native)


def _mappings() -> tuple[int, int] | None:
  """(this process's memory mappings, the kernel's limit), on Linux; else None."""
  try:
    with open('/proc/self/maps') as f:
      count = sum(1 for _ in f)
    with open('/proc/sys/vm/max_map_count') as f:
      return count, int(f.read())
  except (OSError, ValueError):
    return None


_MAPPINGS_PER_PROGRAM = [0]  # the most one loaded program has added in this process


def _check_mappings(label: str, m: tuple[int, int] | None) -> None:
  """Stops before loading a program that would pass the kernel's memory-mapping limit
  (``m``: :func:`_mappings` now).

  Why: XLA:CPU maps each compiled kernel's code and data separately (three mappings per
  loop fusion), and LLVM aborts the whole process when mmap fails ('Unable to allocate
  section memory'), losing a run's measurements. A Conv4 meta-step adds 1,300-3,400
  mappings (MAML K=5: 1,363 with XLA's whole-batch weight gradients, 2,936 with the
  per-image ones, Omniglot shape), so twenty of them in one process reach Linux's default
  limit of 65,530."""
  if m is None or not _MAPPINGS_PER_PROGRAM[0]:
    return
  count, limit = m
  if count + 1.25 * _MAPPINGS_PER_PROGRAM[0] > limit:
    raise SystemExit(
        f'loading {label} would pass this process\'s memory-mapping limit ({count} of '
        f'vm.max_map_count={limit} in use, ~{_MAPPINGS_PER_PROGRAM[0]} per compiled step): '
        'raise it (sudo sysctl -w vm.max_map_count=262144) or time fewer programs per run '
        '(--algorithms, --ks)')


def build(algorithm: str, shape: Shape | str, steps: int, strategy: mm.Strategy | None = None,
          first_order: bool | None = None, verbose: bool = True,
          conv: str = 'mirrormeta', layout: str = 'NHWC', block_major: bool = True,
          native: bool | None = None, compiled_elsewhere_s: float | None = None) -> Built:
  """Compiles (once per process and configuration) the jitted, state-donating meta-step.
  ``compiled_elsewhere_s``: the compile time in another process (:func:`build_all`), whose
  executable this process loads from the persistent cache; ``compile_s`` if it loads."""
  shape = SHAPES[shape] if isinstance(shape, str) else shape
  strategy = strategy or mm.default_strategy()
  if native is None:
    native = mm.native.default()
  key = _build_key(algorithm, shape, steps, strategy, first_order, conv, layout, block_major,
                   native)
  if key in _BUILT and _BUILT[key].compiled is not None:
    return _BUILT[key]
  meta, theta, support, query, fo = make_step(algorithm, shape, steps, strategy, first_order,
                                              conv=conv, layout=layout,
                                              block_major=block_major, native=native)
  state = jax.jit(meta.init)(theta)
  n = devices()
  step = jax.jit(meta.step, donate_argnums=0)
  if n > 1:  # as the runner's make_runner: tasks split over a mesh, state replicated
    mesh = parallel.task_mesh(n)
    step = parallel.shard_step(meta, mesh)
    state = parallel.replicate(state, mesh)
    support, query = parallel.global_batch(mesh, support, query)
  before = _mappings()
  _check_mappings(f'{algorithm} {shape.name} K={steps}', before)
  t, hits = time.perf_counter(), _cache_hits[0]
  compiled = step.lower(state, support, query).compile()
  here_s = time.perf_counter() - t
  if before is not None:
    _MAPPINGS_PER_PROGRAM[0] = max(_MAPPINGS_PER_PROGRAM[0], _mappings()[0] - before[0])
  loaded = _cache_hits[0] > hits
  compile_s = compiled_elsewhere_s if loaded and compiled_elsewhere_s is not None else here_s
  b = Built(algorithm, shape, steps, strategy, fo, compiled, state, support, query,
            compile_s, memory_bytes(compiled, n), n * flop_count(compiled), loaded)
  if compiled_elsewhere_s is not None and not loaded:
    print(f'  {b.label}: compiled in another process but not found in the compilation cache '
          f'(compiled here again, {here_s:.1f} s)', flush=True)
  elif verbose:
    where = (f' (in a compiling process; loaded here in {here_s:.1f} s)'
             if compiled_elsewhere_s is not None else ' (from the cache)' if loaded else '')
    print(f'  compiled {b.label} [{strategy_label(strategy)}] in {compile_s:.1f} s{where}, '
          f'peak {mb(b.memory.get("peak", 0)):.1f} MB', flush=True)
  _BUILT[key] = b
  return b


def compile_workers() -> int:
  """How many programs :func:`build_all` compiles at once: one per core, at most 8."""
  return min(8, available_cores())


def build_all(specs: Mapping[Hashable, dict], workers: int | None = None,
              verbose: bool = True) -> dict[Hashable, Built]:
  """``{name: build(**spec)}`` for every spec. The programs are built here, cheapest (fewest
  inner steps) first, while the persistent compilation cache holds them; from the first
  one it did not, the rest are compiled by up to ``workers`` fresh processes at once
  (default :func:`compile_workers`), which fill the cache, and this process loads each as
  soon as it is compiled.

  Why processes: XLA compiles one program at a time per process, on about one core. Two
  threads compiling two meta-steps in one process take as long as one after the other
  (MAML and MetaMiDA K=1, Omniglot shape, on 2 cores: 17.9 s vs 17.3 s), although the GIL
  is released; two processes overlap (21.7 s vs 28.0 s, imports included). Compiles are
  most of a benchmark's start: 40-100 s per Conv4 step on an H100. Why here first: a
  program in the cache would be read twice, there and here (MAML and MetaMiDA K=1, 5 on 2
  cores from a warm cache: 60-64 s in 2 processes, 45-46 s here alone). Sequential here
  when ``workers`` is 1, without :func:`setup` or with ``no_cache``; a program whose
  compiling process fails is compiled here (its error printed)."""
  specs = dict(specs)
  done = {name: _BUILT.get(_build_key(**spec)) for name, spec in specs.items()}
  built = {name: b for name, b in done.items() if b is not None and b.compiled is not None}
  todo = sorted((name for name in specs if name not in built), key=lambda n: specs[n]['steps'])
  here = lambda: {name: build(**spec, verbose=verbose) for name, spec in specs.items()}
  workers = min(len(todo) - 1, compile_workers() if workers is None else workers)
  if workers <= 1 or not _SETUP or _SETUP['no_cache']:
    return here()
  while todo:  # here, while the cache holds them: a compiling process would read them too
    name = todo.pop(0)
    built[name] = build(**specs[name], verbose=verbose)
    if not built[name].loaded:
      break
  workers = min(workers, len(todo))
  if workers <= 1:  # one left: a process would compile it while this one waits
    return here()  # (build returns those already built)
  t = time.perf_counter()
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn'),
      initializer=_compiler_init,
      initargs=(dict(_SETUP), jax.config.jax_compilation_cache_dir,
                jax.config.jax_persistent_cache_min_compile_time_secs)) as pool:
    # Costlier programs (more inner steps) first, so that the last to finish is short.
    futures = {pool.submit(_compile_one, specs[name]): name for name in reversed(todo)}
    for future in concurrent.futures.as_completed(futures):
      name = futures[future]
      try:
        seconds = future.result()
      except Exception as e:  # pylint: disable=broad-except
        print(f'  compiling {name} in another process failed ({type(e).__name__}: {e}); '
              'compiling it here', flush=True)
        seconds = None
      built[name] = build(**specs[name], verbose=verbose, compiled_elsewhere_s=seconds)
  if verbose:
    print(f'  built {len(todo)} more programs, compiled in {workers} processes, in '
          f'{time.perf_counter() - t:.1f} s', flush=True)
  return {name: built[name] for name in specs}


def _compiler_init(setup_kwargs: dict, cache_dir: str, min_compile_s: float) -> None:
  # Several processes on one GPU: each takes memory as it needs it, not 75% at start.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  setup(**setup_kwargs)
  if cache_dir:  # the calling process's, however it was set
    jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_s)


def _compile_one(spec: dict) -> float:
  seconds = build(**spec, verbose=False).compile_s
  _BUILT.clear()  # the executable is in the cache; keep the compiling process small
  return seconds


def flop_count(compiled) -> float:
  """XLA's cost analysis of a compiled step: its floating-point operations (a multiply-add
  counts 2; padded taps of a convolution are not counted); nan if the backend has none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return float('nan')
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def measured_ceilings(size: int = 8192, repeats: int = 10) -> dict[str, float]:
  """The device's measured rates, the denominators of achieved FLOP/s (datasheet peaks
  are leads, not facts): a ``size``² float32 matrix product at JAX's default precision
  (tensor cores' TF32 on NVIDIA GPUs) and at 'highest' (true float32), in TFLOP/s, and a
  device-to-device copy in TB/s (bytes read + written). Median of ``repeats`` calls on
  random data after a warm-up."""
  key = jax.random.key(1)
  a, b = jax.random.normal(key, (2, size, size), jnp.float32)
  out = {}
  def rate(fn, *args):
    run = lambda: jax.block_until_ready(fn(*args))
    return median(time_interleaved({'fn': run}, repeats=repeats)['fn'])
  for name, prec in (('matmul_default_tflops', None), ('matmul_highest_tflops', 'highest')):
    fn = jax.jit(lambda x, y, p=prec: jnp.matmul(x, y, precision=p))
    out[name] = 2 * size**3 / rate(fn, a, b) / 1e12
  big = jax.random.normal(key, (64 * 2**20,), jnp.float32)  # 256 MiB
  out['copy_tbps'] = 2 * big.nbytes / rate(jax.jit(lambda x: x * 2.0), big) / 1e12
  return out


def mb(n_bytes: float) -> float:
  return n_bytes / 2**20


def time_interleaved(fns: dict[Any, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
                     between: Callable[[int], None] | None = None,
                     label: Callable[[Any], str] | None = None,
                     deadline: float | None = None) -> dict[Any, list[float]]:
  """Seconds per call of each ``fn``: ``warmup`` untimed calls each, then ``repeats`` rounds
  calling every fn once in turn (A B C A B C ...); ``between(round)`` runs after each round
  (e.g. another framework's measurement, interleaved at round granularity; called as
  ``between(round, times)`` with the samples so far, e.g. to save them). With ``label``
  (name -> text), each round's times are printed as it ends, so that a run cut short (a
  time limit on a lent machine) still leaves its figures. With ``deadline`` (a
  ``time.monotonic()`` instant, see :func:`deadline_after`), no round starts that the last
  round's duration says would end after it: fewer rounds, but the caller gets to report
  them (at least one round always runs).

  Returns every sample; summarise with :func:`median`.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  last = 0.0
  for r in range(repeats):
    if r and deadline is not None and time.monotonic() + last > deadline:
      print(f'  stopping after {r} of {repeats} rounds: another would pass the deadline',
            flush=True)
      break
    start = time.monotonic()
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
    if label is not None:
      print(f'  round {r + 1}/{repeats}: ' + ', '.join(
          f'{label(name)} {1e3 * ts[-1]:.1f} ms' for name, ts in times.items()), flush=True)
    if between is not None:
      between(r, times)
    last = time.monotonic() - start
  return times


def partial_note(rounds: int, repeats: int, of: str = '') -> str:
  """The line that marks a results file saved after ``rounds`` of ``repeats`` rounds, while
  the run went on (``table5`` and ``strategies`` save after every round, so that a run killed
  before its end keeps what it timed); ``of`` names the part measured."""
  return (f'**Partial: {rounds} of {repeats} rounds{of}**, saved after each round while the '
          'run went on.')


def add_compile_workers_flag(parser) -> None:
  """``--compile_workers``, for :func:`build_all`."""
  parser.add_argument('--compile_workers', type=int, default=None,
                      help='processes compiling the programs at once (default: one per core, '
                           'at most 8; 1: one after the other, in this process)')


def add_deadline_flag(parser) -> None:
  """``--deadline_s``, read with :func:`deadline_after` right after parsing."""
  parser.add_argument('--deadline_s', type=float, default=None,
                      help='time fewer rounds so that the run reports and saves within this '
                           "many seconds of its start (a lent machine's per-command limit)")


def deadline_after(seconds: float | None, reserve: float = 30.0) -> float | None:
  """The ``time.monotonic()`` instant ``seconds`` from now, less ``reserve`` for reporting
  and saving (None: no deadline). For ``--deadline_s``: a lent machine's per-command limit
  kills a run, and a killed run saves nothing."""
  return None if seconds is None else time.monotonic() + seconds - reserve


def csv_list(s: str) -> list[str]:
  """A command-line list, 'a,b,c' -> ['a', 'b', 'c'] (empty items dropped)."""
  return [x for x in s.split(',') if x]


def int_list(s: str) -> list[int]:
  """'1,5' -> [1, 5] (e.g. ``--ks``)."""
  return [int(x) for x in csv_list(s)]


def median(xs: Sequence[float]) -> float:
  return statistics.median(xs) if xs else float('nan')


def ratio_interval(a: Sequence[float], b: Sequence[float],
                   confidence: float = 0.95) -> tuple[float, float, float]:
  """(median, low, high) of the per-round ratios a[i] / b[i]: their median and a
  distribution-free confidence interval for it (order statistics, scipy's
  ``quantile_test``). Rounds pair the two so that load hitting a round hits both; the
  interval says whether a ratio's distance from a target is more than the machine's noise.
  low and high are nan when there are too few rounds for that confidence (< 6 at 95%).
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  ratios = np.asarray(a, np.float64) / np.asarray(b, np.float64)
  mid = float(np.median(ratios))
  ci = stats.quantile_test(ratios, q=mid, p=0.5).confidence_interval(confidence)
  return mid, float(ci.low), float(ci.high)


def environment() -> str:
  import platform  # pylint: disable=g-import-not-at-top
  cores = available_cores()
  return (f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax '
          f'{jax.__version__}, {cores} cores available, python {platform.python_version()}, '
          f'{time.strftime("%Y-%m-%d %H:%M")}'
          + (f', XLA_FLAGS={os.environ["XLA_FLAGS"]}' if os.environ.get('XLA_FLAGS') else ''))


def command(module: str, argv: Sequence[str] | None) -> str:
  """The command line that ran ``benchmarks.<module>`` (for the results file's header)."""
  args = ' '.join(argv if argv is not None else sys.argv[1:])
  return f'python -m benchmarks.{module} {args}'.strip()


def child_json(module: str, flags: Sequence[str], what: str) -> Any:
  """Runs ``python -m benchmarks.<module> --child <flags>`` in a fresh process (for
  settings a process takes once, when JAX starts) and returns the JSON its last line
  prints; exits with the child's error output, naming ``what`` it measured, if it fails."""
  proc = subprocess.run([sys.executable, '-m', f'benchmarks.{module}', '--child', *flags],
                        capture_output=True, text=True, check=False, cwd=REPO)
  if proc.returncode:
    raise SystemExit(f'{what} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.splitlines()[-1])


def add_fresh_process_args(p, shapes: str, pairs_help: str, out: str) -> None:
  """The flags of a benchmark that measures each setting in fresh processes, alternating."""
  p.add_argument('--shapes', default=shapes)
  p.add_argument('--algorithm', default='maml')
  p.add_argument('--steps', type=int, default=5, help='inner steps K')
  p.add_argument('--runs', type=int, default=20, help='steps per process')
  p.add_argument('--pairs', type=int, default=3, help=pairs_help)
  p.add_argument('--out', default=out)
  p.add_argument('--child', action='store_true', help='(internal) measure and print JSON')


def fresh_process_flags(args) -> list[str]:
  """The flags of :func:`add_fresh_process_args` that a child process is passed on."""
  return [f'--algorithm={args.algorithm}', f'--steps={args.steps}', f'--runs={args.runs}']


def runner_like_steps(b: 'Built', runs: int) -> tuple[float, float]:
  """Runs ``runs`` steps of ``b`` as the runner does (dispatch step s+1, then fetch step
  s's metrics); returns the seconds per step over all of them and over their last half."""
  pending, half = None, runs // 2
  t = time.perf_counter()
  for i in range(runs):
    if i == half:
      t_half = time.perf_counter()
    b.state, metrics = b.compiled(b.state, b.support, b.query)
    if pending is not None:
      jax.device_get(pending)
    pending = metrics
  jax.device_get(pending)
  end = time.perf_counter()
  return (end - t) / runs, (end - t_half) / (runs - half)


def paired_ratio_note(label: str, a: Sequence[dict], b: Sequence[dict], key: str) -> str:
  """'- label: ratio [CI] (pairs: ...)' of ``key`` between paired fresh-process results."""
  ratio, lo, hi = ratio_interval([r[key] for r in a], [r[key] for r in b])
  ci = f' [{lo:.3f}, {hi:.3f}]' if lo == lo else ''
  pairs = ', '.join(f'{x[key] / y[key]:.3f}' for x, y in zip(a, b))
  return f'- {label}: {ratio:.3f}{ci} (pairs: {pairs})'


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def save(name: str, text: str) -> Path:
  """Writes ``benchmarks/results/<name>_<backend>.md``; returns the path."""
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f'{name}_{jax.default_backend()}.md'
  path.write_text(text)
  return path


# ------------------------------------------------------------------ RSS cross-check

_RSS_CHILD = '''import json, sys
sys.path.insert(0, sys.argv[1])
from benchmarks.common import _rss_measure
print(json.dumps(_rss_measure(json.loads(sys.stdin.read()))))
'''


def high_water_kb() -> int | None:
  """This process's resident-memory high-water mark (Linux ``VmHWM``), or None."""
  try:
    for line in Path('/proc/self/status').read_text().splitlines():
      if line.startswith('VmHWM:'):
        return int(line.split()[1])
  except OSError:
    pass
  return None


def resident_kb() -> int:
  """This process's resident memory now (Linux ``/proc/self/statm``)."""
  pages = int(Path('/proc/self/statm').read_text().split()[1])
  return pages * os.sysconf('SC_PAGE_SIZE') // 1024


def reset_high_water() -> None:
  """Sets the high-water mark to the current resident memory (Linux ``clear_refs`` ← 5)."""
  Path('/proc/self/clear_refs').write_text('5')


def _rss_measure(cfg: dict) -> dict:
  """In a fresh process: compile, then reset the RSS high-water mark and run the steps;
  the high-water rise is the steps' peak."""
  setup()
  strategy = mm.Strategy(**cfg['strategy'])
  b = build(cfg['algorithm'], cfg['shape'], cfg['steps'], strategy, verbose=False)
  current_kb = resident_kb()
  reset_high_water()
  base = high_water_kb()
  for _ in range(cfg['runs']):
    b.run()
  return dict(rss_peak_delta_mb=(high_water_kb() - base) / 1024, rss_base_mb=current_kb / 1024,
              xla_peak_mb=mb(b.memory['peak']))


def rss_peak_mb(algorithm: str, shape: str, steps: int, strategy: mm.Strategy | None = None,
                runs: int = 2) -> dict:
  """Cross-check of the XLA accounting: RSS rise over ``runs`` steps in a fresh process
  (inputs and state already resident, so it approximates temp + output − alias). Linux only;
  uses the persistent compilation cache, so run it after the same configuration compiled."""
  strategy = strategy or mm.default_strategy()
  cfg = dict(algorithm=algorithm, shape=shape, steps=steps, runs=runs,
             strategy=strategy._asdict())
  proc = subprocess.run([sys.executable, '-c', _RSS_CHILD, str(REPO)], input=json.dumps(cfg),
                        capture_output=True, text=True, check=False)
  if proc.returncode:  # A cross-check: report the failure, keep the other results.
    print(f'  RSS measurement failed: {proc.stderr.strip().splitlines()[-1:]}', flush=True)
    return dict(rss_peak_delta_mb=float('nan'), rss_base_mb=float('nan'),
                xla_peak_mb=float('nan'))
  return json.loads(proc.stdout.splitlines()[-1])
