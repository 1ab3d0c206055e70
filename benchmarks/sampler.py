"""Task-sampler throughput next to the meta-step it feeds (figures, not a test).

    JAX_PLATFORMS=cpu python -m benchmarks.sampler [--data_dir ../shared/data/omniglot]
        [--iters 50] [--mini_images_per_class 600] [--no_meta_step]

Prints, per configuration, the time to sample one batch of tasks (jitted, on device; best
of 3 rounds of ``--iters`` calls with fresh keys, after a compile call) and tasks/s. Omniglot
uses the real Vinyals train split when ``--data_dir`` has it, else a random stand-in of the
same shape (4112 classes x 20 x 28x28x1); miniImageNet is a random stand-in of its train
split's shape (64 classes x 600 x 84x84x3, uint8, ~0.8 GB; lower
``--mini_images_per_class`` on a small machine: the gather cost does not depend on it).

With the meta-step on (default), it also times one second-order MAML meta-step
(``mirrormeta.make_meta_step``, Conv4-64, K=5, 4 tasks, Adam) on Omniglot 5-way 1-shot
15-query, the DESIGN.md §3 reference configuration, and prints the sampler's share of it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from mirrormeta import data


def _time(fn, iters: int, rounds: int = 3) -> float:
  """Seconds per call of ``fn(key)``, best of ``rounds`` rounds of ``iters`` calls (fresh
  keys; after one compile call): the round least disturbed by other load."""
  keys = list(jax.random.split(jax.random.key(0), iters + 1))
  jax.block_until_ready(fn(keys[0]))
  best = float('inf')
  for _ in range(rounds):
    t = time.perf_counter()
    for k in keys[1:]:
      out = fn(k)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / iters)
  return best


def _random_dataset(name, classes, per_class, shape, seed=0) -> data.ClassDataset:
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (classes * per_class,) + shape, dtype=np.uint8)
  labels = np.repeat(np.arange(classes, dtype=np.int32), per_class)
  return data.ClassDataset(name, 'train', images, labels, classes,
                           tuple(f'c{i}' for i in range(classes)))


def _meta_step_seconds(sampler: data.EpisodeSampler, iters: int) -> float:
  """Seconds per second-order MAML meta-step (Conv4-64, K=5) on ``sampler``'s tasks."""
  import optax  # pylint: disable=g-import-not-at-top
  import mirrormeta as mm  # pylint: disable=g-import-not-at-top
  ep = sampler.sample(jax.random.key(0), 4)
  model = mm.models.functional(mm.models.Conv4(sampler.n_way), ep.support_x[0])
  conj = mm.conjugates.euclidean()
  theta = mm.init_meta_params(conj, model.init(jax.random.key(1)), jax.random.key(2))
  meta = mm.make_meta_step(conj.apply, mm.models.classification_loss(model.apply),
                           optax.adam(1e-3), steps=5, lr=0.4)
  step = jax.jit(meta.step)
  state = meta.init(theta)
  support, query = (ep.support_x, ep.support_y), (ep.query_x, ep.query_y)
  state, _ = jax.block_until_ready(step(state, support, query))  # Compile.
  t = time.perf_counter()
  for _ in range(iters):
    state, metrics = step(state, support, query)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - t) / iters


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=str(
      Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'omniglot'))
  parser.add_argument('--iters', type=int, default=50)
  parser.add_argument('--mini_images_per_class', type=int, default=600)
  parser.add_argument('--meta_step_iters', type=int, default=3)
  parser.add_argument('--no_meta_step', action='store_true')
  args = parser.parse_args(argv)

  print(f'backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), '
        f'jax {jax.__version__}')
  t = time.perf_counter()
  try:
    omniglot = data.load_dataset('omniglot', args.data_dir, 'train')
    print(f'omniglot: real Vinyals train split, loaded in {time.perf_counter() - t:.2f} s '
          '(decode on the first run, cache after)')
  except data.DataError as e:
    print(f'omniglot: random stand-in ({e})')
    omniglot = _random_dataset('omniglot', 4112, 20, (28, 28, 1))
  mini = _random_dataset('miniimagenet', 64, args.mini_images_per_class, (84, 84, 3))

  configs = [('omniglot', omniglot, 5, 1, 15, 4), ('omniglot', omniglot, 20, 1, 15, 4),
             ('omniglot', omniglot, 20, 5, 15, 4), ('miniimagenet', mini, 5, 1, 15, 4),
             ('miniimagenet', mini, 5, 5, 15, 4)]
  print(f'{"dataset":<14}{"task":<18}{"B":>3}{"ms/batch":>11}{"tasks/s":>10}')
  samplers = {}
  for name, ds, n_way, shot, query, batch in configs:
    sampler = data.EpisodeSampler(ds, n_way, shot, query)
    samplers[name, n_way, shot] = sampler
    s = _time(lambda k, sampler=sampler, batch=batch: sampler.sample(k, batch), args.iters)
    print(f'{name:<14}{f"{n_way}w{shot}s{query}q":<18}{batch:>3}{s * 1e3:>11.2f}'
          f'{batch / s:>10.0f}')
  sinusoid = data.SinusoidSampler(10, 10)
  s = _time(lambda k: sinusoid.sample(k, 25), args.iters)
  print(f'{"sinusoid":<14}{"10-shot 10-query":<18}{25:>3}{s * 1e3:>11.2f}{25 / s:>10.0f}')

  if not args.no_meta_step:
    sampler = samplers['omniglot', 5, 1]
    step_s = _meta_step_seconds(sampler, args.meta_step_iters)
    sample_s = _time(lambda k: sampler.sample(k, 4), args.iters)
    print(f'meta-step (MAML 2nd order, Conv4-64, K=5, omniglot 5w1s15q, B=4): '
          f'{step_s:.3f} s; sampling its batch: {sample_s * 1e3:.2f} ms = '
          f'{100 * sample_s / step_s:.2f}% of the step')


if __name__ == '__main__':
  main()
