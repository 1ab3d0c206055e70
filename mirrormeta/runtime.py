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


def retain_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of returning it to the OS.

  Why: XLA:CPU allocates the temporaries of every execution with malloc (one slab of
  ~400 MB for a Conv4 meta-step). By default glibc serves blocks over 32 MB with a fresh
  ``mmap`` and unmaps them on ``free``, and trims the heap top, so every meta-step
  page-faults its whole working set in again: on the Conv4 MAML step that was a third of
  the time (0.45 → 0.34 s/step; writing 33 MB of new buffer 27 → 4 ms;
  benchmarks/results/conv_cpu.md). With mmap off, trimming off and one arena, the second
  step reuses the first one's pages. Trimming is off entirely (threshold −1, i.e. never)
  rather than at the largest finite threshold (2 GB): with several ~1.4-1.9 GB
  miniImageNet-shaped steps in one process the free heap top passed 2 GB, glibc gave it
  back, and a third of the steps faulted 1.4 GB in again (MAML K=1 0.80 → 1.1-1.5 s/step).
  Cost: resident memory stays at its high-water mark, which a training process reaches
  anyway. Other allocators (tcmalloc, jemalloc via ``LD_PRELOAD``) cache freed memory
  themselves; this is then a harmless no-op.

  Returns:
    True if applied (Linux with glibc; idempotent), False where there is no glibc malloc.
  """
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if sys.platform.startswith('linux'):
    try:
      libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
      if hasattr(libc, 'gnu_get_libc_version') and hasattr(libc, 'mallopt'):
        _applied = all(libc.mallopt(p, v) == 1 for p, v in
                       ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1)))
    except OSError:
      pass
  return _applied


LOW_MEMORY_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def low_memory_schedule() -> None:
  """Makes XLA:CPU order each compiled program to hold fewer buffers at once, trading time.

  Why: XLA:CPU's default scheduler orders instructions for concurrency and keeps many
  intermediates live together; its memory-ordered scheduler packs them. On the Conv4
  meta-step (Omniglot-shaped, K=5, benchmarks/results/table5_lowmem_cpu.md) peak memory
  falls from 420 to 280 MB (MAML) and from 588 to 301 MB (MetaMiDA), but each step takes
  ~1.35x longer (MAML 0.35 → 0.47 s in one paired run): so it is off by default, for runs
  bound by memory (``jax.checkpoint``, ``Strategy(remat=True)``, is the other knob).

  It is an XLA flag because XLA:CPU reads this option only from ``XLA_FLAGS`` (passing it as
  ``jax.jit(..., compiler_options=...)`` has no effect in jax 0.10), and XLA reads the flags
  once, when the backend starts: call this before the first JAX computation. No effect on
  GPU/TPU programs.

  Raises:
    MirrormetaError: JAX's backends have already started (the flag could not apply).
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if LOW_MEMORY_FLAG in flags.split():
    return
  try:  # No public API tells whether the backends started; without it, skip the check.
    from jax._src.xla_bridge import backends_are_initialized  # pylint: disable=g-import-not-at-top
  except ImportError:
    backends_are_initialized = lambda: False
  if backends_are_initialized():
    raise MirrormetaError('low_memory_schedule() must be called before the first JAX '
                          'computation (XLA reads its flags when the backend starts): call it '
                          f'first, or set XLA_FLAGS="{LOW_MEMORY_FLAG}" before starting Python')
  os.environ['XLA_FLAGS'] = f'{flags} {LOW_MEMORY_FLAG}'.strip()
