"""Compiling a run's large programs in fresh processes, into JAX's persistent cache.

    lowered = {'step': jax.jit(step).lower(state, support, query), ...}
    ahead.compile_ahead(lowered, functools.partial(lower_for, config))

Why: an XLA compile leaves this process's malloc heap fragmented, and the programs run
after it pay for that on each of XLA:CPU's scratch allocations. With one arena (several
CPU devices, ``runtime.cpu_devices``) a first run's MetaMiDA step ran 1.28-1.31x the time
of the same program loaded from the cache (README, Performance). Loading does not
fragment: so fresh processes compile the programs, one per core at once (XLA compiles one
program at a time per process, on about one core), and this process loads them.

JAX has no public query for "does the cache hold this program", and loading takes about as
long as the parent's own load (8-16 s for a Conv4 K=5 step on 2 cores), so a process spent
on a program already cached is lost time. Hence a marker file per program, named by a
fingerprint of its lowered module and of what else goes into the compile (versions, XLA
flags, devices), written beside the cache's entries once a process compiled it: a rerun
finds the markers and starts nothing. A stale marker (the cache was cleared) only means
this process compiles the program itself, as it would without any of this.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax

# jax.config settings the compiling processes take from this one (XLA_FLAGS and the other
# environment variables they inherit): those that change the program or where it is cached.
_SETTINGS = ('jax_num_cpu_devices', 'jax_cpu_enable_async_dispatch', 'jax_enable_x64',
             'jax_default_matmul_precision', 'jax_compilation_cache_dir',
             'jax_persistent_cache_min_compile_time_secs',
             'jax_persistent_cache_min_entry_size_bytes')
MARKERS = 'mirrormeta_compiled'  # the markers' folder inside the cache folder


def cache_dir() -> Path | None:
  """The persistent compilation cache's folder, if it is on and a local folder."""
  path = jax.config.jax_compilation_cache_dir
  if not path or '://' in str(path):
    return None
  return Path(path).expanduser()


def fingerprint(lowered) -> str:
  """What decides the compiled program: its module (without locations) and the versions,
  XLA flags and devices it is compiled with."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  parts = (lowered.as_text(debug_info=False), jax.__version__, jaxlib.__version__,
           os.environ.get('XLA_FLAGS', ''), device.platform, device.client.platform_version,
           str(jax.devices()))
  return hashlib.sha256('\0'.join(parts).encode()).hexdigest()[:32]


def compile_ahead(lowered: Mapping[str, Any], lower_for: Callable[[list[str]], Mapping[str, Any]],
                  *, workers: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, float]:
  """Compiles the programs of ``lowered`` that no earlier run compiled, each in a fresh
  process, into the persistent cache; this process then loads them when it calls them.

  Args:
    lowered: {name: a ``jax.jit(...).lower(...)`` of this process}.
    lower_for: picklable; ``lower_for(names)`` rebuilds ``{name: lowered}`` in a fresh
      process (with this process's jax settings and environment).
    workers: processes at once (default: one per core, at most one per program).
    log: where progress lines go.

  Returns:
    {name: seconds its compile took} for the programs compiled. Nothing is raised for a
    program that could not be compiled ahead: it is logged, and compiles here when called.
  """
  folder = cache_dir()
  if folder is None:
    return {}
  todo: dict[str, str] = {}
  for name, low in lowered.items():
    fp = fingerprint(low)
    if not (folder / MARKERS / fp).exists() and fp not in todo.values():
      todo[name] = fp
  if not todo:
    return {}
  workers = min(len(todo), workers or len(os.sched_getaffinity(0)))
  log(f'compiling {", ".join(todo)} in {workers} fresh process{"es" * (workers > 1)} '
      f'(into the compilation cache {folder})')
  settings = {k: _read(k) for k in _SETTINGS}
  t, done = time.perf_counter(), {}
  # Threads that each wait on a `python -m mirrormeta.ahead` process, not multiprocessing's
  # spawn: that re-imports the caller's __main__, and a script without a __main__ guard
  # would start its own run in each process.
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {pool.submit(_run, pickle.dumps((settings, lower_for, name, fp))): name
               for name, fp in todo.items()}
    for future in concurrent.futures.as_completed(futures):
      name = futures[future]
      try:
        done[name] = future.result()
      except Exception as e:  # pylint: disable=broad-except
        log(f'compiling {name} ahead failed ({e}); it compiles here')
  if done:
    log(f'compiled {", ".join(f"{n} ({s:.0f} s)" for n, s in done.items())} in '
        f'{time.perf_counter() - t:.0f} s')
  return done


def _read(setting: str) -> Any:
  try:  # settings with a context manager are read as attributes, the others with read()
    return getattr(jax.config, setting)
  except AttributeError:
    return jax.config.read(setting)


def _run(payload: bytes) -> float:
  proc = subprocess.run([sys.executable, '-m', 'mirrormeta.ahead'], input=payload,
                        capture_output=True, check=False)
  if proc.returncode:
    lines = proc.stderr.decode(errors='replace').strip().splitlines() or ['no output']
    raise RuntimeError(f'exit status {proc.returncode}: {lines[-1]}')
  return float(proc.stdout.decode().split()[-1])


def _compile(settings: dict, lower_for: Callable, name: str, expected: str) -> float:
  """In the compiling process: ``name``'s compile into the cache (seconds) and its marker."""
  for key, value in settings.items():
    jax.config.update(key, value)
  low = lower_for([name])[name]
  if fingerprint(low) != expected:  # this process would not find it in the cache
    raise RuntimeError('a fresh process lowers it to another program')
  t = time.perf_counter()
  low.compile()
  seconds = time.perf_counter() - t
  # Also for a program too quick for JAX to cache: the run compiles it in no time, and
  # without a marker every rerun would start a process for it.
  folder = cache_dir() / MARKERS
  folder.mkdir(parents=True, exist_ok=True)
  (folder / expected).touch()
  return seconds


if __name__ == '__main__':
  print(_compile(*pickle.load(sys.stdin.buffer)))
