"""Task samplers: N-way k-shot q-query classification episodes and sinusoid regression.

Both are pure, jitted functions of a ``jax.random`` key, so a key fixes the batch of tasks
on any backend, and the data never leaves the device: the classification sampler keeps
the whole split (uint8) on the device and gathers each batch there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mirrormeta.data.base import ClassDataset, DataError, Episode


class EpisodeSampler:
  """Draws N-way, k-shot, q-query classification tasks from a ClassDataset.

  Per task: ``n_way`` distinct classes uniformly at random, in random order, then
  ``shot + query`` distinct images of each class uniformly at random, in random order;
  the first ``shot`` go to the support set, the rest to the query set. Examples are
  ordered class by class and labelled by the position of their class in the drawn list
  (see `Episode`). Classes may hold different numbers of images (e.g. CUB).

  Attributes:
    dataset: the ClassDataset (host copy).
    n_way, shot, query: task shape.
    images: device array uint8 ``[N, H, W, C]``.
    offsets, counts: device arrays int32 ``[num_classes]``: first image and number of
      images of each class.
  """

  def __init__(self, dataset: ClassDataset, n_way: int, shot: int, query: int):
    """Validates the task shape against the dataset and puts the images on the device.

    Raises:
      DataError: ``n_way`` exceeds the number of classes, ``shot`` or ``query`` < 1, or
        a class has fewer than ``shot + query`` images.
    """
    where = f'{dataset.name}/{dataset.split}'
    if min(n_way, shot, query) < 1:
      raise DataError(f'{where}: n_way={n_way}, shot={shot}, query={query} must all be '
                      '>= 1')
    if n_way > dataset.num_classes:
      raise DataError(f'{where}: n_way={n_way} but the split has only '
                      f'{dataset.num_classes} classes; use n_way <= {dataset.num_classes}')
    counts = dataset.class_counts
    if counts.min() < shot + query:
      c = int(counts.argmin())
      raise DataError(f'{where}: class {dataset.class_names[c]!r} has {counts[c]} images, '
                      f'fewer than shot+query={shot + query}; use shot+query <= '
                      f'{counts.min()}')
    self.dataset, self.n_way, self.shot, self.query = dataset, n_way, shot, query
    self.images = jax.device_put(dataset.images)
    self.offsets = jax.device_put(dataset.class_offsets.astype(np.int32))
    self.counts = jax.device_put(counts.astype(np.int32))

  def sample(self, key: jax.Array, batch_size: int) -> Episode:
    """A batch of tasks, a deterministic function of ``key``.

    Args:
      key: a ``jax.random`` key.
      batch_size: number of tasks B (static: each value compiles once).

    Returns:
      Episode with ``support_x`` float32 ``[B, n_way*shot, H, W, C]`` in [0, 1],
      ``support_y`` int32 ``[B, n_way*shot]``, ``query_x`` float32
      ``[B, n_way*query, H, W, C]``, ``query_y`` int32 ``[B, n_way*query]``.
    """
    return sample_episodes(self.images, self.offsets, self.counts, key,
                           batch_size=batch_size, n_way=self.n_way, shot=self.shot,
                           query=self.query)


def distinct_ints(bits: jax.Array, n, k: int) -> jax.Array:
  """``k`` distinct ints uniform from ``[0, n)``, in uniformly random order.

  Floyd's algorithm: for ``j = n-k .. n-1`` draw ``t ~ U{0..j}`` and take ``t`` unless
  already taken, else ``j``; this gives a uniform k-subset in O(k^2) work whatever ``n``.
  Sorting the picks by random keys then randomises their order. ``t = bits % (j + 1)``,
  whose bias (at most ``n / 2**32`` relative) and that of ties among the sort keys
  (probability ~``k**2 / 2**33``) are far below sampling noise. Drawing all random bits
  up front keeps this cheap to compile and run: on XLA:CPU, ~100x faster than
  ``jax.random.choice(replace=False)``, which shuffles all ``n``.

  Args:
    bits: uint32 ``[2k]`` random bits (``jax.random.bits``).
    n: population size, a Python int or a traced int32 scalar, ``n >= k``.
    k: sample size (static).

  Returns:
    int32 ``[k]``.
  """
  draw, order = bits[:k], bits[k:]
  j = n - k + jnp.arange(k, dtype=jnp.int32)
  t = (draw % (j + 1).astype(jnp.uint32)).astype(jnp.int32)

  def take(i, chosen):
    return chosen.at[i].set(jnp.where(jnp.any(chosen == t[i]), j[i], t[i]))
  chosen = jax.lax.fori_loop(0, k, take, jnp.full((k,), -1, jnp.int32))
  return chosen[jnp.argsort(order)]


@functools.partial(jax.jit, static_argnames=('batch_size', 'n_way', 'shot', 'query'))
def sample_episodes(images, offsets, counts, key, *, batch_size: int, n_way: int,
                    shot: int, query: int) -> Episode:
  """`EpisodeSampler.sample` as a function of the device arrays (see there).

  Args:
    images: uint8 ``[N, H, W, C]``, grouped by class.
    offsets: int32 ``[K]`` first image of each class.
    counts: int32 ``[K]`` images per class, each ``>= shot + query``.
    key: a ``jax.random`` key.
    batch_size, n_way, shot, query: task batch shape.
  """
  per_class = shot + query

  def one_task(bits):
    classes = distinct_ints(bits[:2 * n_way], counts.shape[0], n_way)          # [n_way]
    within = jax.vmap(distinct_ints, (0, 0, None))(
        bits[2 * n_way:].reshape(n_way, 2 * per_class), counts[classes],
        per_class)                                                   # [n_way, s+q]
    x = images[offsets[classes][:, None] + within].astype(jnp.float32) / 255.0
    x_s = x[:, :shot].reshape((n_way * shot,) + images.shape[1:])
    x_q = x[:, shot:].reshape((n_way * query,) + images.shape[1:])
    return x_s, x_q

  bits = jax.random.bits(key, (batch_size, 2 * n_way * (1 + per_class)), jnp.uint32)
  x_s, x_q = jax.vmap(one_task)(bits)
  y_s = jnp.broadcast_to(jnp.repeat(jnp.arange(n_way, dtype=jnp.int32), shot),
                         (batch_size, n_way * shot))
  y_q = jnp.broadcast_to(jnp.repeat(jnp.arange(n_way, dtype=jnp.int32), query),
                         (batch_size, n_way * query))
  return Episode(x_s, y_s, x_q, y_q)


class SinusoidSampler:
  """Sinusoid regression tasks of the MAML paper (Finn et al. 2017, §5.1).

  A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase
  ``phi ~ U[0, pi]``; inputs ``x ~ U[-5, 5]`` are drawn independently for the ``shot``
  support and ``query`` query points (as in the MAML code).
  """

  def __init__(self, shot: int, query: int, *, amplitude=(0.1, 5.0),
               phase=(0.0, math.pi), x_range=(-5.0, 5.0)):
    if min(shot, query) < 1:
      raise DataError(f'sinusoid: shot={shot} and query={query} must be >= 1')
    self.shot, self.query = shot, query
    self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

  def sample(self, key: jax.Array, batch_size: int) -> Episode:
    """A batch of tasks: ``support_x``/``support_y`` float32 ``[B, shot, 1]``,
    ``query_x``/``query_y`` float32 ``[B, query, 1]``; deterministic for ``key``."""
    return sample_sinusoids(key, batch_size=batch_size, shot=self.shot,
                            query=self.query, amplitude=tuple(self.amplitude),
                            phase=tuple(self.phase), x_range=tuple(self.x_range))


@functools.partial(jax.jit, static_argnames=('batch_size', 'shot', 'query', 'amplitude',
                                             'phase', 'x_range'))
def sample_sinusoids(key, *, batch_size: int, shot: int, query: int, amplitude=(0.1, 5.0),
                     phase=(0.0, math.pi), x_range=(-5.0, 5.0)) -> Episode:
  """`SinusoidSampler.sample` as a function (see there)."""
  k_a, k_p, k_x = jax.random.split(key, 3)
  amp = jax.random.uniform(k_a, (batch_size, 1, 1), minval=amplitude[0],
                           maxval=amplitude[1])
  ph = jax.random.uniform(k_p, (batch_size, 1, 1), minval=phase[0], maxval=phase[1])
  x = jax.random.uniform(k_x, (batch_size, shot + query, 1), minval=x_range[0],
                         maxval=x_range[1])
  y = amp * jnp.sin(x - ph)
  return Episode(x[:, :shot], y[:, :shot], x[:, shot:], y[:, shot:])
