"""A native CPU kernel for MetaMiDA's map: the depth-1 ICNN map and its derivative.

``icnn_slope(b, c, vb, quad, slope0, x)`` computes, for every coordinate u of a tensor
x [..., C] (C channel blocks, each with its own parameters; vb = v b)

    φ(u) = Q u + Σ_w vb_w σ(b_w u + c_w) − slope0,

the map ``conjugates.icnn`` computes at depth 1, and its reverse-mode derivative, with the
two handlers of ``icnn_map.cc`` (XLA FFI custom calls). It is an execution option of that
conjugate (``icnn(native=True)``), not new math: the same function, float32, reverse mode.

Why: XLA:CPU computes the map and its meta-gradient as ``[coordinates, W]`` sigmoid buffers
that dots over each block's coordinates then read back, and that memory traffic was most of
MetaMiDA's overhead over MAML on CPU (benchmarks/README.md, "The map on CPU"). The kernel
keeps each unit's sigmoids in registers, vectorised over the channels (16 at a time with
AVX-512), and sums them as they are made; it reads a tensor in its own order (no
block-major copies).

The library is compiled on first use with the system C++ compiler (``$CXX``, else ``c++``)
against jaxlib's FFI headers, for this machine's CPU (``-march=native``), and cached by a
hash of the source, the flags, jaxlib's version and the CPU in ``$MIRRORMETA_CACHE``
(default ``~/.cache/mirrormeta``). :func:`available` says whether that worked, and why not.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

from mirrormeta.errors import MirrormetaError

_SOURCE = Path(__file__).with_name('icnn_map.cc')
# No -ffast-math (nor -funsafe-math-optimizations): a library built with it sets
# flush-to-zero for the whole process when it is loaded (GCC's crtfastmath), and every float
# in JAX and numpy would lose its subnormals (hypothesis noticed). The kernel needs no
# floating-point flags: its loops are written on explicit vectors (icnn_map.cc).
_FLAGS = ('-O3', '-march=native', '-shared', '-fPIC', '-std=c++17', '-w')
_FWD, _BWD = 'mirrormeta_icnn_map_fwd', 'mirrormeta_icnn_map_bwd'
_registered: list[Path] = []


def _cpu_id() -> str:
  try:
    text = Path('/proc/cpuinfo').read_text()
    return next((l for l in text.splitlines() if l.startswith(('flags', 'Features'))), '')
  except OSError:
    return platform.processor()


def _compile(compiler: str, out: Path, extra_flags: tuple[str, ...] = ()) -> str:
  """Compiles the kernel's library to ``out``: '' or why it failed."""
  cmd = [compiler, *_FLAGS, *extra_flags, f'-I{jax.ffi.include_dir()}', str(_SOURCE), '-o',
         str(out)]
  try:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f'compiling {_SOURCE.name} failed: {e}'
  if run.returncode != 0:
    return f'compiling {_SOURCE.name} failed: {run.stderr.strip()[-500:]}'
  return ''


def _register(lib: Path, fwd: str, bwd: str) -> str:
  """Loads ``lib`` and registers its handlers as the FFI targets fwd and bwd: '' or why not."""
  try:
    handle = ctypes.cdll.LoadLibrary(str(lib))
  except OSError as e:
    return f'loading {lib} failed: {e}'
  jax.ffi.register_ffi_target(fwd, jax.ffi.pycapsule(handle.IcnnMapFwd), platform='cpu')
  jax.ffi.register_ffi_target(bwd, jax.ffi.pycapsule(handle.IcnnMapBwd), platform='cpu')
  return ''


def _compiler() -> str | None:
  """The C++ compiler's path ($CXX, else c++), or None when it is not on PATH."""
  return shutil.which(os.environ.get('CXX', 'c++'))


@functools.cache
def _build() -> tuple[bool, str]:
  """Compiles, loads and registers the handlers once per process: (ok, why not)."""
  compiler = _compiler()
  if compiler is None:
    return False, f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} is not on PATH; set $CXX)"
  source = _SOURCE.read_bytes()
  key = hashlib.sha256(b'\0'.join([source, ' '.join(_FLAGS).encode(), compiler.encode(),
                                    jaxlib.__version__.encode(), _cpu_id().encode()]))
  cache = Path(os.environ.get('MIRRORMETA_CACHE', Path.home() / '.cache' / 'mirrormeta'))
  lib = cache / f'icnn_map-{key.hexdigest()[:16]}.so'
  if not lib.exists():
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # then renamed: concurrent builds are safe
      out = Path(tmp) / lib.name
      why = _compile(compiler, out)
      if why:
        return False, why
      os.replace(out, lib)
  if not _registered:  # once per process, also when a test clears _build's cache
    why = _register(lib, _FWD, _BWD)
    if why:
      return False, why
    _registered.append(lib)
  return True, ''


def available() -> tuple[bool, str]:
  """Whether the kernel can run here (the CPU backend, a C++ compiler): (ok, why not)."""
  if jax.default_backend() != 'cpu':
    return False, f'the native ICNN map is a CPU kernel; the backend is {jax.default_backend()}'
  return _build()


def covers(depth: int = 1, granularity: str = 'channel') -> bool:
  """Whether the kernel computes ``conjugates.icnn``'s map with these settings."""
  return depth == 1 and granularity == 'channel'


def default(depth: int = 1, granularity: str = 'channel') -> bool:
  """Whether MetaMiDA's map is native by default (the runner's ``strategy.icnn_map='auto'``,
  the benchmarks' default): on CPU, where the kernel covers the settings and builds.

  Why: on the 2-core CPU the 21 maps and derivatives of MetaMiDA's Omniglot-shaped Conv4
  K=5 meta-step cost 0.036 of a MAML step with it and 0.110 with XLA's map, and the step
  took 0.935-0.951 of XLA's map's time (21 interleaved rounds; benchmarks/README.md, "The
  native map").
  """
  return covers(depth, granularity) and available()[0]


def require() -> None:
  """Raises one clear error if the kernel cannot run here."""
  ok, why = available()
  if not ok:
    raise MirrormetaError(f'the native ICNN map cannot run here: {why}. Use XLA\'s map: '
                          'conjugates.icnn(native=False), or --config.strategy.icnn_map=xla')


def _call(name, results, *args):
  require()  # builds and registers the handlers on first use
  # broadcast_all: under vmap every argument gets the batch axes, which the kernel loops over.
  return jax.ffi.ffi_call(name, results, vmap_method='broadcast_all')(*args)


@jax.custom_vjp
def icnn_slope(b, c, vb, quad, slope0, x):
  """φ = Q x + Σ_w vb_w σ(b_w x + c_w) − slope0 per channel (column) of x [..., R, C].

  b, c, vb: [..., W, C]; quad, slope0: [..., C]. All float32.
  """
  return _call(_FWD, jax.ShapeDtypeStruct(x.shape, x.dtype), x, b, c, vb, quad, slope0)


def _fwd(b, c, vb, quad, slope0, x):
  return icnn_slope(b, c, vb, quad, slope0, x), (b, c, vb, quad, x)


def _bwd(res, g):
  b, c, vb, quad, x = res
  width = b.shape[-2]
  du, red = _call(_BWD, (jax.ShapeDtypeStruct(x.shape, x.dtype),
                         jax.ShapeDtypeStruct(b.shape[:-2] + (3 * width + 2, b.shape[-1]),
                                              x.dtype)),
                  x, b, c, vb, quad, g)
  sum_gt, sum_gud, sum_gd = (red[..., i * width:(i + 1) * width, :] for i in range(3))
  # φ = Q x + Σ vb σ(b x + c) − slope0: ∂/∂vb = σ, ∂/∂b = vb σ' x, ∂/∂c = vb σ'.
  return (vb * sum_gud, vb * sum_gd, sum_gt, red[..., 3 * width, :], -red[..., 3 * width + 1, :],
          du)


icnn_slope.defvjp(_fwd, _bwd)
