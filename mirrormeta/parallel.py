"""Tasks across devices and hosts with JAX's own runtime (DESIGN.md §5.4).

The meta-batch is split over a 1-D mesh axis 'tasks': each device adapts its share of the
tasks, ``lax.pmean`` averages loss and meta-gradients, and the (replicated) meta-parameters
take the same optax update everywhere. Global batch = per-device batch × devices. The same
code runs on 1 device, 8 fake CPU devices, several GPUs, or every host of a TPU pod
(``jax.distributed`` + one process per host, each feeding its own tasks).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mirrormeta.errors import MirrormetaError
from mirrormeta.meta import MetaStep

PyTree = Any
TASK_AXIS = 'tasks'

_ENV = {'coordinator_address': 'MIRRORMETA_COORDINATOR',
        'num_processes': 'MIRRORMETA_NUM_PROCESSES',
        'process_id': 'MIRRORMETA_PROCESS_ID'}


def maybe_initialize_distributed(config: Any = None) -> bool:
  """Calls ``jax.distributed.initialize`` when this run spans several processes.

  Settings come from ``config.distributed`` (coordinator_address, num_processes, process_id,
  auto) or the environment (MIRRORMETA_COORDINATOR, MIRRORMETA_NUM_PROCESSES,
  MIRRORMETA_PROCESS_ID). ``auto=True`` lets JAX detect the cluster (TPU pods, Slurm), so one
  command runs unchanged on every host. Must run before any other JAX call.

  Returns:
    True if the distributed runtime was initialised.
  """
  settings = dict(getattr(config, 'distributed', None) or {})
  # Explicit None checks: process_id 0 is a valid setting.
  kwargs = {k: settings[k] if settings.get(k) is not None else os.environ.get(env)
            for k, env in _ENV.items()}
  kwargs = {k: v for k, v in kwargs.items() if v not in (None, '')}
  if not kwargs and not settings.get('auto'):
    return False
  if kwargs and 'coordinator_address' not in kwargs:
    raise MirrormetaError('a multi-process run needs a coordinator address: set '
                          'config.distributed.coordinator_address or MIRRORMETA_COORDINATOR')
  for k in ('num_processes', 'process_id'):
    if k in kwargs:
      kwargs[k] = int(kwargs[k])
  jax.distributed.initialize(**kwargs)
  return True


def is_main_process() -> bool:
  """Only process 0 writes logs, checkpoints and results."""
  return jax.process_index() == 0


def task_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh with axis 'tasks' over the first ``num_devices`` (default: all) devices."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if not 1 <= n <= len(devices):
    raise MirrormetaError(f'num_devices={n} but {len(devices)} devices are visible '
                          f'({jax.default_backend()}); use a value in 1..{len(devices)} or 0 for all')
  return jax.make_mesh((n,), (TASK_AXIS,), devices=devices[:n])


def check_batch(global_batch: int, mesh: Mesh) -> int:
  """Tasks per device; the global batch must split evenly over devices and processes."""
  n = mesh.devices.size
  if global_batch % n or global_batch % jax.process_count():
    raise MirrormetaError(
        f'meta_batch={global_batch} tasks do not split evenly over {n} devices in '
        f'{jax.process_count()} processes; use a multiple of {n}')
  return global_batch // n


def shard_step(meta: MetaStep, mesh: Mesh, donate: bool = True) -> Callable:
  """Jits ``meta.step`` with the task axis of support/query split across ``mesh``.

  Args:
    meta: built by ``make_meta_step(..., axis_name='tasks')``.
    mesh: from :func:`task_mesh`.
    donate: donate the old state's buffers (the step replaces it).

  Returns:
    ``step(state, support, query) -> (state, metrics)``; state and metrics replicated.
  """
  if meta.axis_name != TASK_AXIS:
    raise MirrormetaError(f"shard_step needs make_meta_step(..., axis_name='{TASK_AXIS}') so "
                          'gradients are averaged over devices')
  # check_vma=False: every value in the body is device-local, and the step's pmean is the
  # only reduction. With the check on, AD sums over devices the gradient of a per-device
  # value w.r.t. any replicated input (θ, or a constant inside a user's conjugate), which
  # would mix all devices' tasks into each inner step.
  sharded = jax.shard_map(meta.step, mesh=mesh, in_specs=(P(), P(TASK_AXIS), P(TASK_AXIS)),
                          out_specs=(P(), P()), check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,) if donate else ())


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a host value (identical on every process) on all devices of ``mesh``."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)


def global_batch(mesh: Mesh, *local: PyTree) -> PyTree:
  """Assembles each process's tasks into global arrays split over the 'tasks' axis.

  Every process passes its own slice of the global batch (see :func:`process_task_slice`);
  with one process that slice is the whole batch.
  """
  sharding = NamedSharding(mesh, P(TASK_AXIS))
  out = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
  return out if len(local) > 1 else out[0]


def process_task_slice(global_batch_size: int) -> range:
  """The task indices this process samples: disjoint across processes, covering the batch."""
  per = global_batch_size // jax.process_count()
  start = jax.process_index() * per
  return range(start, start + per)


def sample_tasks(sample: Callable, key: jax.Array, indices: range) -> PyTree:
  """Tasks ``indices`` of a global batch, each drawn from its own key ``fold_in(key, i)``.

  Keys per task index make the global batch the same whatever the number of processes
  (and so the same training run): a process samples only its ``indices``.

  Args:
    sample: ``sample(key, batch_size) -> Episode`` (e.g. ``EpisodeSampler.sample``).
    key: the step's data key.
    indices: task indices of the global batch.
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(indices.start, indices.stop))
  episodes = jax.vmap(lambda k: sample(k, 1))(keys)
  return jax.tree.map(lambda x: x[:, 0], episodes)
