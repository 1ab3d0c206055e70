"""Process-level settings that XLA:CPU meta-steps need to run at full speed.

Each is an explicit call (the runner, the benchmarks and the tests make it): a library
import should not change how its host process allocates memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_applied: bool | None = None


def retain_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse instead of returning it to the OS.

  Why: XLA:CPU allocates the temporaries of every execution with malloc (one slab of
  ~400 MB for a Conv4 meta-step). By default glibc serves blocks over 32 MB with a fresh
  ``mmap`` and unmaps them on ``free``, and trims the heap top, so every meta-step
  page-faults its whole working set in again: on the Conv4 MAML step that was a third of
  the time (0.45 → 0.34 s/step; writing 33 MB of new buffer 27 → 4 ms;
  benchmarks/results/conv_cpu.md). With mmap off, no trimming and one arena, the second
  step reuses the first one's pages. Cost: resident memory stays at its high-water mark,
  which a training process reaches anyway. Other allocators (tcmalloc, jemalloc via
  ``LD_PRELOAD``) cache freed memory themselves; this is then a harmless no-op.

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
                       ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1)))
    except OSError:
      pass
  return _applied
