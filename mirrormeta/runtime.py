"""Process-level settings for XLA:CPU meta-steps: full speed, or less memory.

Each is an explicit call (the runner, the benchmarks and the tests make it): a library
import should not change how its host process allocates memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from mirrormeta.errors import MirrormetaError

# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_applied: bool | None = None
_arenas: str | None = None  # what retain_freed_memory applied


ARENAS = ('auto', 'one', 'per_thread')


def retain_freed_memory(arenas: str = 'auto') -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of returning it to the OS.

  Why: XLA:CPU allocates the temporaries of every execution with malloc (one slab of
  ~400 MB for a Conv4 meta-step). By default glibc serves blocks over 32 MB with a fresh
  ``mmap`` and unmaps them on ``free``, and trims the heap top, so every meta-step
  page-faults its whole working set in again: on the Conv4 MAML step that was a third of
  the time (0.45 → 0.34 s/step; writing 33 MB of new buffer 27 → 4 ms;
  benchmarks/results/conv_cpu.md). With mmap off and trimming off, the second step reuses
  the first one's pages. Trimming is off entirely (threshold −1, i.e. never) rather than
  at the largest finite threshold (2 GB): with several ~1.4-1.9 GB miniImageNet-shaped
  steps in one process the free heap top passed 2 GB, glibc gave it back, and a third of
  the steps faulted 1.4 GB in again (MAML K=1 0.80 → 1.1-1.5 s/step).

  Arenas: a slab over 64 MB fits only glibc's main arena (other arenas' heaps are 64 MB
  at most, and there glibc falls back to ``mmap`` whatever ``M_MMAP_MAX`` says), so the
  thread that allocates it must use the main arena. Under :func:`synchronous_dispatch` on
  one CPU device that is the caller's (the main) thread, and every other thread keeps its
  own arena ('per_thread', glibc's default), which matters: YNNPACK's convolutions malloc
  scratch tiles on the worker threads thousands of times a step, and in one shared arena
  that a compile has fragmented (XLA's compiler runs in the process) malloc's search took
  a fifth of the step's CPU time (perf). A first run of the runner compiles its step in
  the process: Conv4 MAML K=5 steps compiled there took 0.725x the time with an arena per
  thread (Omniglot shape, 0.324 vs 0.440 s/step; miniImageNet shape 0.880x) and compiled
  in 0.73x the time; loaded from the compilation cache, 1.00x either way
  (``python -m benchmarks.arenas``). With JAX's asynchronous dispatch, or several CPU
  devices (:func:`cpu_devices`; JAX dispatches their programs asynchronously), a worker
  thread allocates the slab, so 'auto' keeps one arena for every thread ('one'). (Letting
  XLA split the slab into blocks a thread's arena holds, ``--xla_multiheap_size_constraint
  _per_heap``, fixed both, but XLA:CPU cannot serialize such an executable: the
  compilation cache would not keep it.) Cost: resident memory stays at its high-water
  mark, which a training process reaches anyway; the threads' arenas add 0.3-0.5 GB to it
  (1.16-1.25x on those steps). Other allocators (tcmalloc, jemalloc via ``LD_PRELOAD``)
  cache freed memory themselves; this is then a harmless no-op.

  Args:
    arenas: 'auto' (call it after :func:`synchronous_dispatch` and :func:`cpu_devices`, if
      at all): 'per_thread' under synchronous dispatch on one CPU device, else 'one'; or
      either of those.

  Returns:
    True if applied (Linux with glibc; the first call's setting holds), False where there
    is no glibc malloc.
  """
  global _applied, _arenas
  if arenas not in ARENAS:
    raise MirrormetaError(f'retain_freed_memory arenas must be one of {ARENAS}, got {arenas!r}')
  if _applied is not None:
    return _applied
  if arenas == 'auto':
    arenas = 'one' if _temporaries_on_worker_threads() else 'per_thread'
  _applied = False
  options = [(_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)] + (
      [(_M_ARENA_MAX, 1)] if arenas == 'one' else [])
  if sys.platform.startswith('linux'):
    try:
      libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
      if hasattr(libc, 'gnu_get_libc_version') and hasattr(libc, 'mallopt'):
        _applied = all(libc.mallopt(p, v) == 1 for p, v in options)
    except OSError:
      pass
  if _applied:
    _arenas = arenas
  return _applied


def applied_arenas() -> str | None:
  """The arenas :func:`retain_freed_memory` set ('one', 'per_thread'), or None."""
  return _arenas


def _temporaries_on_worker_threads() -> bool:
  """Whether XLA:CPU's executions allocate their temporaries on worker threads: under
  asynchronous dispatch, or when several CPU devices run a program's shards."""
  import jax  # pylint: disable=g-import-not-at-top
  return bool(jax.config.read('jax_cpu_enable_async_dispatch')) or configured_cpu_devices() > 1


def configured_cpu_devices() -> int:
  """The CPU devices JAX's CPU backend has or will start with (``jax_num_cpu_devices``, else
  ``--xla_force_host_platform_device_count``, else 1)."""
  return explicit_cpu_devices() or 1


def explicit_cpu_devices() -> int | None:
  """The CPU device count this process was given (:func:`cpu_devices`,
  ``jax_num_cpu_devices`` or ``XLA_FLAGS=--xla_force_host_platform_device_count``), or None."""
  import jax  # pylint: disable=g-import-not-at-top
  n = jax.config.jax_num_cpu_devices
  if n is not None and n > 0:
    return n
  for flag in os.environ.get('XLA_FLAGS', '').split():
    if flag.startswith('--xla_force_host_platform_device_count='):
      return int(flag.split('=', 1)[1])
  return None


def cpu_devices(n: int) -> None:
  """Splits the host into ``n`` XLA:CPU devices, so that a meta-batch split over them
  (``mirrormeta.parallel``, the runner's ``cpu_devices``) runs as ``n`` programs at once.

  Why: XLA:CPU's executor runs a program's operations as their buffers allow, and its
  buffer assignment reuses the memory of dead temporaries, so an operation also waits for
  every earlier reader of the memory it writes. In the unrolled task loop these false
  dependencies chained the tasks' query-set convolutions one after another while the other
  core idled (MetaMiDA's Conv4 K=5 step: 147 ms of dependent work instead of 67 ms of true
  dependencies; a simulation of the executor on the measured operation times gave 348 ms
  with them and 261 ms without, against 321 ms measured). And the executor hands ready
  operations to another thread only when one holds more than 8, while YNNPACK runs each
  convolution on one thread: 4 independent query-set convolutions in one program kept
  1.05 cores busy, split over 2 devices 1.68 (``benchmarks.executor``). A device's
  program has buffers and a thread of its own, so two devices' tasks never wait for each
  other, and each program is half the size (half the compile time). Figures: README,
  Performance.

  A setting of JAX's CPU client, read when the backend starts: call it before the first
  JAX computation (and before :func:`retain_freed_memory`). No effect on GPU/TPU devices.

  Raises:
    MirrormetaError: ``n`` is not a positive integer, or JAX's backends have started.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise MirrormetaError(f'cpu_devices needs an integer >= 1, got {n!r}')
  if configured_cpu_devices() == n:
    return
  _refuse_after_start('cpu_devices')
  jax.config.update('jax_num_cpu_devices', n)


def _backends_started() -> bool:
  try:  # No public API tells whether the backends started; without it, assume not.
    from jax._src.xla_bridge import backends_are_initialized  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return backends_are_initialized()


LOW_MEMORY_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'
THREADED_CONVOLUTIONS_FLAG = ('--xla_cpu_experimental_ynn_fusion_type='
                              '-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION')


def low_memory_schedule() -> None:
  """Makes XLA:CPU order each compiled program to hold fewer buffers at once, trading time.

  Why: XLA:CPU's default scheduler orders instructions for concurrency and keeps many
  intermediates live together; its memory-ordered scheduler packs them. On the Conv4
  meta-step (Omniglot-shaped, K=5, benchmarks/results/table5_lowmem_cpu.md) peak memory
  falls from 420 to 280 MB (MAML) and from 588 to 301 MB (MetaMiDA), but each step takes
  ~1.35x longer (MAML 0.35 → 0.47 s in one paired run): so it is off by default, for runs
  bound by memory (``jax.checkpoint``, ``Strategy(remat=True)``, is the other knob).

  A process-wide XLA flag because XLA:CPU reads this option only from ``XLA_FLAGS``
  (``jax.jit(..., compiler_options=...)`` has no effect on it in jax 0.10): call it before
  the first JAX computation. No effect on GPU/TPU programs.

  Raises:
    MirrormetaError: JAX's backends have already started (the flag could not apply).
  """
  _add_xla_flag(LOW_MEMORY_FLAG, 'low_memory_schedule')


def threaded_convolutions() -> None:
  """Makes XLA:CPU run convolutions in its own multi-threaded kernels instead of YNNPACK's.

  Why: YNNPACK runs each convolution on one thread (a 75-image 84x84x3 → 32 convolution:
  77 ms on 2 cores, 74 ms on one), so the cores stay busy only while independent
  convolutions run side by side, and XLA:CPU's executor hands ready work to another thread
  only when more than 8 thunks are ready. MetaMiDA's miniImageNet-shaped step (84x84x3,
  Conv4-32) ran its four tasks' query convolutions one after another while the other
  thread idled. Alternating processes, two each: MetaMiDA / MAML 1.09-1.10 (K=1) and
  1.12-1.13 (K=5) with YNNPACK, 0.97-1.00 and 1.04 with this, and both steps faster (MAML
  K=1 0.82-0.85 → 0.71-0.72 s, MetaMiDA 0.90-0.93 → 0.70 s). Not everywhere: with Conv4-64
  on the same images the two were within noise of each other (one pair slower, one
  faster), and the Omniglot-shaped steps (28x28x1) took 1.1-1.6x longer with it on
  2026-12-03, but 0.83-0.92x the time on 2026-12-08 (two pairs, another machine). So it
  is off by default until that is settled; measure your model with it (README,
  Performance).

  A process-wide XLA flag because its ``-`` form removes convolutions from the YNNPACK
  fusion types this XLA version enables, while ``jax.jit(..., compiler_options=...)``
  accepts only an exact list, which would pin the others: call it before the first JAX
  computation. No effect on GPU/TPU programs.

  Raises:
    MirrormetaError: JAX's backends have already started (the flag could not apply).
  """
  _add_xla_flag(THREADED_CONVOLUTIONS_FLAG, 'threaded_convolutions')


def synchronous_dispatch() -> None:
  """Makes JAX run each CPU computation inline, returning when it is done, instead of
  dispatching it asynchronously.

  Why: XLA:CPU frees an execution's temporaries only after its outputs are marked ready,
  so with asynchronous dispatch the next step (dispatched before the last one's metrics
  are fetched, as the runner does, or right after ``block_until_ready``) allocates its
  slab while the previous one's is still held. Under ``retain_freed_memory`` the heap then
  keeps three or four slabs, and the steps run slower on them. MAML K=5 steps, 20 per
  fresh process (``python -m benchmarks.dispatch``): the resident high-water rise was 3.0x
  XLA's peak asynchronously, 1.0x inline (Omniglot shape; 3.9x vs 0.9x miniImageNet-
  shaped), and the steps took 0.89x (0.74x) the time inline, 0.92x (0.88x) over the last
  ten steps; over 60 steps the last 30 still took 0.91x. The host has nothing to overlap
  on CPU: the cores run the step. Only computations on one device (JAX's setting leaves
  parallel ones asynchronous); no effect on GPU/TPU programs.

  A setting of JAX's CPU client, read when the backend starts: call it before the first
  JAX computation.

  Raises:
    MirrormetaError: JAX's backends have already started (the setting could not apply).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.read('jax_cpu_enable_async_dispatch'):
    return  # already set (a test process's conftest, then a benchmark's setup)
  _refuse_after_start('synchronous_dispatch')
  jax.config.update('jax_cpu_enable_async_dispatch', False)


def _refuse_after_start(caller: str, env: str = '') -> None:
  """Raises if JAX's backends have started: XLA reads its flags, and JAX its client
  settings, once, when the backend starts."""
  if _backends_started():
    raise MirrormetaError(f'{caller}() must be called before the first JAX computation (it '
                          'applies when the backend starts): call it first' +
                          (f', or set {env} before starting Python' if env else ''))


def _has_xla_flag(flag: str) -> bool:
  return flag in os.environ.get('XLA_FLAGS', '').split()


def ynnpack_convolutions() -> bool:
  """Whether XLA:CPU runs this process's convolutions in YNNPACK (its default), that is,
  :func:`threaded_convolutions` is off."""
  return not _has_xla_flag(THREADED_CONVOLUTIONS_FLAG)


def _add_xla_flag(flag: str, caller: str) -> None:
  """Adds ``flag`` to ``XLA_FLAGS``, refusing once JAX's backends have started (XLA reads
  the flags once, when the backend starts)."""
  if _has_xla_flag(flag):
    return
  _refuse_after_start(caller, f'XLA_FLAGS="{flag}"')
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {flag}'.strip()
