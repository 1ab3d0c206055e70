"""How long a named config's whole run takes here, projected from a measured part of it.

    python -m benchmarks.train_time [--config=mini_1shot] [--steps=1000] [--data_dir=DIR]
        [--standin_images=60] [--target_minutes=30] [--set field=value ...] [--out=NAME]

Runs the runner's own ``mirrormeta.train.train_and_evaluate`` (sampling, meta-steps,
metrics, logging, checkpoints, validation, test) in a temporary workdir, on the config's
data when ``data_dir`` holds it, else on random stand-in files written in the dataset's
real layout (miniImageNet pickles: 64/16/20 classes x ``--standin_images`` images; the
per-step work does not depend on how many images a class has). Three measured parts:

  1. warm-up: a few steps, a validation and a test: every function compiles;
  2. the same run resumed for a few steps (what a resumption compiles once), then for
     ``--steps`` more steps, then for 2 x ``--steps`` more; each ends with a checkpoint,
     a validation and a test of one evaluation batch, so the difference of the last two
     training times is ``--steps`` steps (with their logging), free of what a resumption
     costs once (restoring, tracing) and of the evaluations' own noise;
  3. the config's validation alone (compiled), also with ``val_curve`` flipped on (the
     test's compiled function), and its test.

    step  = (training time of 2 x steps − training time of steps) / steps
    total = num_steps · step + ⌈num_steps / eval_every⌉ · validation + test + warm-up

which is printed next to ``--target_minutes`` (the run's periodic checkpoints, saved
asynchronously by orbax, are not counted). The per-step time is also compared with
the bare compiled step (the same ``runner.step`` on one batch, no sampling, no per-step
host synchronisation): their ratio is what the training loop adds around the step.
Results: ``benchmarks/results/train_time_<config>_<backend>.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import common as C


def write_mini_standin(root: Path, per_class: int, size: int = 84, seed: int = 0) -> Path:
  """miniImageNet's pickle layout (``mini-imagenet-cache-<split>.pkl``), random pixels."""
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  for split, n_classes in (('train', 64), ('val', 16), ('test', 20)):
    images = rng.integers(0, 256, (n_classes * per_class, size, size, 3), np.uint8)
    class_dict = {f'n{split}{c:05d}': list(range(c * per_class, (c + 1) * per_class))
                  for c in range(n_classes)}
    with open(root / f'mini-imagenet-cache-{split}.pkl', 'wb') as f:
      pickle.dump({'image_data': images, 'class_dict': class_dict}, f, protocol=4)
  return root


STANDINS = {'miniimagenet': write_mini_standin}


def _parse_value(v: str):
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return {'true': True, 'false': False}.get(v.lower(), v)


def override(config, item: str) -> None:
  """Applies ``field.subfield=value`` to a locked ConfigDict (unknown fields and wrong
  types are refused by ml_collections)."""
  path, _, value = item.partition('=')
  *parents, leaf = path.split('.')
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = _parse_value(value)


def bare_step_s(exp, runner, state, repeats: int) -> float:
  """Seconds per call of the compiled step on one batch, dispatched back to back."""
  support, query = runner.place_batch(*exp.draw['train'](jax.random.key(1), runner.tasks.start,
                                                         len(runner.tasks)))
  state, m = runner.step(state, support, query)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(repeats):
    state, m = runner.step(state, support, query)
  jax.block_until_ready((state, m))
  return (time.perf_counter() - t) / repeats


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='mini_1shot')
  p.add_argument('--steps', type=int, default=1000, help='measured steps (part 2)')
  p.add_argument('--warmup_steps', type=int, default=10)
  p.add_argument('--data_dir', default=None, help="default: the config's data_dir")
  p.add_argument('--standin_images', type=int, default=60,
                 help='images per class of the stand-in data')
  p.add_argument('--target_minutes', type=float, default=30.0)
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='override a config field (e.g. --set algorithm=maml, '
                      '--set strategy.tasks=loop)')
  p.add_argument('--no_cache', action='store_true')
  p.add_argument('--out', default=None,
                 help='benchmarks/results/<out>_<backend>.md; default train_time_<config>')
  args = p.parse_args(argv)
  C.setup(args.no_cache)
  from experiments import configs  # pylint: disable=g-import-not-at-top
  from mirrormeta import data, train  # pylint: disable=g-import-not-at-top

  config = configs.get(args.config)
  config.lock()
  for item in args.set:
    try:
      override(config, item)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      p.error(f'--set {item}: {e}')
  config.progress = False
  if args.data_dir:
    config.data_dir = args.data_dir
  tmp = Path(tempfile.mkdtemp(prefix='train_time_'))
  source = f'data in {os.path.relpath(Path(config.data_dir).expanduser(), C.REPO)}'
  t = time.perf_counter()
  try:
    exp = train.build_experiment(config)
  except data.DataError as e:
    if config.dataset not in STANDINS:
      sys.exit(f'{e}\n(no stand-in writer for {config.dataset}: pass --data_dir)')
    config.data_dir = str(STANDINS[config.dataset](tmp / 'data', args.standin_images))
    config.cache_dir = str(tmp / 'cache')
    source = (f'random stand-in files in the real layout ({args.standin_images} images '
              'per class)')
    t = time.perf_counter()
    exp = train.build_experiment(config)
  build_s = time.perf_counter() - t
  env = C.environment()
  print(env, '\n', source, flush=True)

  num_steps, eval_every = config.num_steps, config.eval_every
  workdir = tmp / 'run'

  def part(steps):
    c = config.copy_and_resolve_references()
    # Each part ends with a checkpoint and one-batch evaluations (timed in full below), so
    # the difference of two parts holds steps (and their logging) only.
    c.num_steps = c.eval_every = steps
    c.val_tasks = c.test_tasks = exp.eval_batch
    t = time.perf_counter()
    res = train.train_and_evaluate(c, workdir, experiment=exp)
    return res, time.perf_counter() - t

  print(f'built the experiment in {build_s:.1f} s', flush=True)
  _, warm_s = part(args.warmup_steps)
  print(f'part 1 (compiles, {args.warmup_steps} steps, one-batch validation and test): '
        f'{warm_s:.1f} s', flush=True)
  # A first resumption: restoring a checkpoint, once (it compiles nothing new).
  part(2 * args.warmup_steps)
  res_a, _ = part(2 * args.warmup_steps + args.steps)
  print(f'part 2: {args.steps} steps in {res_a["train"]["wall_s"]:.1f} s', flush=True)
  res_b, _ = part(2 * args.warmup_steps + 3 * args.steps)
  print(f'part 2: {2 * args.steps} steps in {res_b["train"]["wall_s"]:.1f} s', flush=True)
  train_a, train_b = res_a['train']['wall_s'], res_b['train']['wall_s']
  step_s = (train_b - train_a) / args.steps
  state = exp.init_state()
  def evaluation_s(e, split='val'):
    t = time.perf_counter()
    train.validate(e, state.params, split)
    return time.perf_counter() - t
  val_s = evaluation_s(exp)
  # The other validation (config.val_curve flipped): the test's function, already compiled.
  curve = exp.val_fn is exp.eval_fn
  curve_s = val_s if curve else evaluation_s(dataclasses.replace(exp, val_fn=exp.eval_fn))
  test_s = evaluation_s(exp, 'test')
  runner = train.make_runner(exp)
  bare_s = bare_step_s(exp, runner, runner.place_state(state), min(args.steps, 200))
  validations = math.ceil(num_steps / eval_every)
  total_s = num_steps * step_s + validations * val_s + test_s + build_s + warm_s
  verdict = 'MET' if total_s <= 60 * args.target_minutes else 'NOT MET'

  cmd = C.command('train_time', argv)
  c = config
  rows = [
      ['one training step (runner loop)', f'{1e3 * step_s:.1f} ms',
       f'({train_b:.1f} s for {2 * args.steps} steps − {train_a:.1f} s for {args.steps}) '
       f'/ {args.steps}'],
      ['bare compiled step', f'{1e3 * bare_s:.1f} ms',
       f'loop / bare = {step_s / bare_s:.2f}'],
      ['one validation', f'{val_s:.2f} s', f'{c.val_tasks} tasks, K={exp.eval_steps}, '
       f'val_curve={curve}'],
      ['one validation with the per-step curve', f'{curve_s:.2f} s',
       f'val_curve=True: {curve_s / val_s:.2f}x'],
      ['test', f'{test_s:.2f} s', f'{c.test_tasks} tasks'],
      ['build + compile + warm-up', f'{build_s + warm_s:.1f} s', ''],
      [f'projected whole run', f'{total_s / 60:.1f} min',
       f'{num_steps} steps, {validations} validations, test'],
  ]
  text = '\n'.join([
      f'# Whole-run time of `{args.config}` ({jax.default_backend()})', '',
      f'`{cmd}`  ', env + '  ', f'{c.algorithm}, {c.model}-{c.filters}, '
      f'{c.n_way}-way {c.shot}-shot {c.query} query, {c.meta_batch} tasks, K={c.inner_steps}, '
      f'strategy [{C.strategy_label(exp.strategy)}]; {source}.', '',
      C.markdown_table(['part', 'time', 'how'], rows), '',
      f'- [{verdict}] projected whole run {total_s / 60:.1f} min (target ≤ '
      f'{args.target_minutes:g} min)',
      ''])
  print('\n' + text)
  print(f'saved {C.save(args.out or f"train_time_{args.config}", text)}')


if __name__ == '__main__':
  main()
