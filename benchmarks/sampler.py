"""Task-sampler throughput next to the meta-step it feeds (figures, not a test).

    JAX_PLATFORMS=cpu python -m benchmarks.sampler [--data_dir ../shared/data/omniglot]
        [--iters 50] [--mini_images_per_class 600] [--no_meta_step] [--out sampler]

Prints and saves (``benchmarks/results/<out>_<backend>.md``), per configuration, the time
to sample one batch of tasks (jitted, on device; best of 3 rounds of ``--iters`` calls with
fresh keys, after a compile call) and tasks/s. Omniglot uses the real Vinyals train split
when ``--data_dir`` has it, else a random stand-in of the same shape (4112 classes x 20 x
28x28x1); miniImageNet is a random stand-in of its train split's shape (64 classes x 600 x
84x84x3, uint8, ~0.8 GB; lower ``--mini_images_per_class`` on a small machine: the gather
cost does not depend on it).

With the meta-step on (default), it also times the second-order MAML meta-step at K=5 on
4 tasks of the benchmark shapes (``benchmarks.common.build``, as the runner builds it:
Conv4-64 for Omniglot 5-way 1-shot 15-query, the DESIGN.md §3 reference configuration;
Conv4-32 for miniImageNet 5-way 1-shot) and prints the sampler's share of it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import common as C
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


def _meta_step_seconds(shape: str, repeats: int) -> float:
  """Median seconds per second-order MAML meta-step (K=5, 4 tasks of ``shape``), built as
  the runner builds it (:func:`benchmarks.common.build`)."""
  built = C.build('maml', shape, 5)
  return C.median(C.time_interleaved({shape: built.run}, repeats)[shape])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data_dir', default=str(
      Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'omniglot'))
  parser.add_argument('--iters', type=int, default=50)
  parser.add_argument('--mini_images_per_class', type=int, default=600)
  parser.add_argument('--meta_step_iters', type=int, default=5,
                      help='timed meta-steps per shape (after one warm-up)')
  parser.add_argument('--no_meta_step', action='store_true')
  parser.add_argument('--out', default='sampler', help='benchmarks/results/<out>_<backend>.md')
  args = parser.parse_args(argv)
  C.setup()

  lines = [f'# Task sampler throughput vs the meta-step ({jax.default_backend()})', '',
           f'`{C.command("sampler", argv)}`  ', C.environment(), '']

  def say(text):
    print(text, flush=True)
    lines.append(text)

  t = time.perf_counter()
  try:
    omniglot = data.load_dataset('omniglot', args.data_dir, 'train')
    say(f'Omniglot: the real Vinyals train split, loaded in {time.perf_counter() - t:.2f} s.')
  except data.DataError as e:
    say(f'Omniglot: a random stand-in of its shape ({e}).')
    omniglot = _random_dataset('omniglot', 4112, 20, (28, 28, 1))
  mini = _random_dataset('miniimagenet', 64, args.mini_images_per_class, (84, 84, 3))
  say(f'miniImageNet: a random stand-in of its train split ({args.mini_images_per_class} '
      'images per class).')
  say('')

  configs = [('omniglot', omniglot, 5, 1, 15, 4), ('omniglot', omniglot, 20, 1, 15, 4),
             ('omniglot', omniglot, 20, 5, 15, 4), ('miniimagenet', mini, 5, 1, 15, 4),
             ('miniimagenet', mini, 5, 5, 15, 4)]
  rows = []
  for name, ds, n_way, shot, query, batch in configs:
    sampler = data.EpisodeSampler(ds, n_way, shot, query)
    s = _time(lambda k, sampler=sampler, batch=batch: sampler.sample(k, batch), args.iters)
    step = ''
    # The benchmark shapes' meta-step (Conv4-64 on Omniglot, Conv4-32 on miniImageNet).
    shape = {('omniglot', 5, 1): 'omniglot', ('miniimagenet', 5, 1): 'mini'}.get(
        (name, n_way, shot))
    if shape and not args.no_meta_step:
      step_s = _meta_step_seconds(shape, args.meta_step_iters)
      step = f'{step_s:.3f} s ({100 * s / step_s:.2f}%)'
    rows.append((name, f'{n_way}w{shot}s{query}q', batch, f'{s * 1e3:.2f}', f'{batch / s:.0f}',
                 step))
    print(f'  {rows[-1]}', flush=True)
  sinusoid = data.SinusoidSampler(10, 10)
  s = _time(lambda k: sinusoid.sample(k, 25), args.iters)
  rows.append(('sinusoid', '10-shot 10-query', 25, f'{s * 1e3:.2f}', f'{25 / s:.0f}', ''))
  say(C.markdown_table(
      ['dataset', 'task', 'tasks per batch', 'ms per batch (best of 3 rounds)', 'tasks/s',
       'MAML K=5 meta-step (median) and the batch\'s share of it'], rows))
  say('')
  say('Sampling is jitted on the device; the meta-step is second-order MAML at K=5 on the '
      'benchmark shape (benchmarks.common.build), timed after one warm-up step.')
  print(f'saved {C.save(args.out, chr(10).join(lines) + chr(10))}')


if __name__ == '__main__':
  main()
