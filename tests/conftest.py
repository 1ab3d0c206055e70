"""Shared test set-up: CPU, a persistent compilation cache, and the shared data folder."""
import os
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

from mirrormeta import runtime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Compiling a Conv4 meta-step takes 15-20 s on a 2-core CPU; the cache makes reruns cheap.
jax.config.update('jax_compilation_cache_dir', os.environ.get(
    'MIRRORMETA_JAX_CACHE', str(REPO / '.jax_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
runtime.synchronous_dispatch()  # as the runner does: one step's temporaries held, not 3-4
runtime.retain_freed_memory()  # as the runner does (after the above): steps ~1.3x faster on CPU

SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def omniglot_dir():
  d = SHARED_DATA / 'omniglot'
  if not (d / 'images_background.zip').exists():
    pytest.skip(f'real Omniglot not found at {d} (the shared data folder beside the repo)')
  return d
