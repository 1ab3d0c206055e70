"""Meta-training and evaluation of one config: build, train, validate, checkpoint, test, report.

    from mirrormeta import train
    results = train.train_and_evaluate(config, workdir)     # resumes a run found in workdir
    results = train.evaluate_checkpoint(config, workdir)    # tests its best checkpoint again

``config`` is an ``ml_collections.ConfigDict`` with the fields of
``experiments/configs/base.py``. Determinism: everything random derives from
``config.seed``; the tasks of step t are tasks 0..meta_batch-1 of the stream
``fold_in(data_key, t)``, so a run stopped at any step and resumed from its checkpoint ends
with the same parameters as one never stopped (bit for bit on CPU).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mirrormeta as mm
from mirrormeta import (ahead, algorithms, checkpoint, core, data, evaluate, models, native,
                        parallel, runtime)
from mirrormeta.errors import MirrormetaError

PyTree = Any
MODELS = ('conv4', 'resnet12', 'mlp')
OPTIMIZERS = ('sgd', 'adam')
_MIN_IMAGE = 16  # Conv4 / ResNet-12 halve the image 4 times.


class NonFiniteError(MirrormetaError):
  """The meta-loss or the meta-parameters became NaN/inf; the run stopped."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during training; ``message`` says where the run was saved."""

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message


# --------------------------------------------------------------------------- config checks


def _fail(field: str, value: Any, why: str) -> None:
  raise MirrormetaError(f'config.{field}={value!r} {why}')


def check_config(config) -> None:
  """Refuses impossible settings with one clear message (MirrormetaError).

  The data-dependent ones (n_way above a split's classes, shot+query above a class's
  images) are checked by the data layer when the samplers are built, before anything runs.
  """
  c = config
  if c.algorithm not in algorithms.ALGORITHMS:
    _fail('algorithm', c.algorithm, f'is unknown; choose one of {", ".join(algorithms.ALGORITHMS)}')
  if c.dataset not in data.DATASETS:
    _fail('dataset', c.dataset, f'is unknown; choose one of {", ".join(data.DATASETS)}')
  if c.model not in MODELS:
    _fail('model', c.model, f'is unknown; choose one of {", ".join(MODELS)}')
  if (c.dataset == 'sinusoid') != (c.model == 'mlp'):
    _fail('model', c.model, "does not fit the data: sinusoid regression needs model='mlp', "
          "image datasets 'conv4' or 'resnet12'")
  if c.dataset != 'sinusoid' and c.n_way < 2:
    _fail('n_way', c.n_way, 'must be >= 2 (classes per task)')
  for field in ('shot', 'query', 'eval_query', 'meta_batch', 'val_tasks', 'test_tasks',
                'eval_every', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if c[field] < 1:
      _fail(field, c[field], 'must be >= 1')
  for field in ('inner_steps', 'num_steps', 'eval_batch', 'num_devices'):
    if c[field] < 0:
      _fail(field, c[field], 'must be >= 0')
  if c.get('cpu_devices', 1) < 1:
    _fail('cpu_devices', c.cpu_devices, 'must be >= 1 (XLA:CPU devices the host is split into)')
  if c.eval_inner_steps is not None and c.eval_inner_steps < 0:
    _fail('eval_inner_steps', c.eval_inner_steps, 'must be >= 0 (or None: inner_steps)')
  if not (c.inner_lr > 0 and math.isfinite(c.inner_lr)):
    _fail('inner_lr', c.inner_lr, 'must be > 0 (the inner mirror-descent step size)')
  if c.eval_checkpoint not in ('best', 'latest'):
    _fail('eval_checkpoint', c.eval_checkpoint, "must be 'best' or 'latest'")
  if c.image_size is not None and c.model != 'mlp' and c.image_size < _MIN_IMAGE:
    _fail('image_size', c.image_size, f'must be >= {_MIN_IMAGE} for {c.model}')
  if c.model == 'conv4' and c.filters < 1:
    _fail('filters', c.filters, 'must be >= 1')
  for field in ('resnet_widths', 'mlp_hidden'):
    if not c[field] or min(c[field]) < 1:
      _fail(field, tuple(c[field]), 'must be a non-empty tuple of positive widths')
  o = c.optimizer
  if o.name not in OPTIMIZERS:
    _fail('optimizer.name', o.name, f'is unknown; choose one of {", ".join(OPTIMIZERS)}')
  if not o.lr > 0:
    _fail('optimizer.lr', o.lr, 'must be > 0')
  if not 0 <= o.momentum < 1:
    _fail('optimizer.momentum', o.momentum, 'must be in [0, 1)')
  for field in ('weight_decay', 'decay_every', 'clip_norm'):
    if o[field] < 0:
      _fail(f'optimizer.{field}', o[field], 'must be >= 0')
  if not 0 < o.decay_factor <= 1:
    _fail('optimizer.decay_factor', o.decay_factor, 'must be in (0, 1]')
  if c.strategy.tasks not in ('auto', 'vmap', 'loop'):
    _fail('strategy.tasks', c.strategy.tasks, "must be 'auto', 'vmap' or 'loop'")
  if _conv(c) not in models.CONVOLUTIONS:
    _fail('strategy.conv', _conv(c), f'must be one of {", ".join(models.CONVOLUTIONS)}')
  if _layout(c) not in models.LAYOUTS:  # 'auto' is resolved by _layout
    _fail('strategy.layout', _layout(c), f"must be 'auto' or one of {', '.join(models.LAYOUTS)}")
  if _map_remat(c) not in ('auto',) + core.MAP_REMATS:
    _fail('strategy.map_remat', _map_remat(c),
          f"must be 'auto' or one of {', '.join(core.MAP_REMATS)}")
  if _icnn_map(c) not in ICNN_MAPS:
    _fail('strategy.icnn_map', _icnn_map(c), f"must be one of {', '.join(ICNN_MAPS)}")
  if _icnn_map(c) == 'native' and c.algorithm == 'metamida' and not _icnn_covered(c):
    _fail('strategy.icnn_map', 'native', "covers icnn.depth=1 and icnn.granularity='channel' "
          "only; use 'auto' or 'xla'")
  if c.strategy.unroll < 0:
    _fail('strategy.unroll', c.strategy.unroll, 'must be >= 0 (0: fully unrolled)')


# ------------------------------------------------------------------------------ building


def make_optimizer(opt) -> tuple[optax.GradientTransformation, Callable]:
  """The meta-optimizer over MetaParams and its learning-rate schedule.

  SGD (optionally Nesterov) or Adam with a staircase decay of the lr by ``decay_factor``
  every ``decay_every`` steps (PyTorch's StepLR), weight decay added to the gradient of
  θ_z only (PyTorch's coupled ``weight_decay``), optional global-norm clipping first.
  """
  if opt.decay_every:
    schedule = optax.exponential_decay(opt.lr, opt.decay_every, opt.decay_factor,
                                       staircase=True)
  else:
    schedule = optax.constant_schedule(opt.lr)
  parts = []
  if opt.clip_norm:
    parts.append(optax.clip_by_global_norm(opt.clip_norm))
  if opt.weight_decay:
    parts.append(optax.masked(optax.add_decayed_weights(opt.weight_decay),
                              mm.MetaParams(z=True, h=False)))
  if opt.name == 'sgd':
    parts.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
  else:
    parts.append(optax.adam(schedule))
  return optax.chain(*parts), schedule


def _conv(config) -> str:
  return config.strategy.get('conv', 'mirrormeta')  # runs stored before the field existed


def _icnn_block_major(config) -> bool:
  return config.strategy.get('icnn_block_major', True)  # runs stored before the field existed


ICNN_MAPS = ('auto', 'native', 'xla')  # config.strategy.icnn_map


def _icnn_map(config) -> str:
  return config.strategy.get('icnn_map', 'auto')  # runs stored before the field existed


def _icnn_covered(config) -> bool:
  icnn = config.icnn.to_dict()
  return native.covers(icnn.get('depth', 1), icnn.get('granularity', 'channel'))


def _icnn_native(config) -> bool:
  """Whether the MetaMiDA map runs as mirrormeta.native's CPU kernel: icnn_map 'native',
  or 'auto' (the default) on CPU where the kernel covers the ICNN and builds."""
  if config.algorithm != 'metamida' or _icnn_map(config) == 'xla':
    return False
  if _icnn_map(config) == 'native':
    native.require()  # one clear error where it cannot build
    return True
  if jax.default_backend() != 'cpu' or not _icnn_covered(config):
    return False
  ok, why = native.available()
  if not ok:
    warnings.warn(f"MetaMiDA runs with XLA's map, slower on CPU: {why}", RuntimeWarning)
  return ok


def _layout(config) -> str:
  """The activations' layout; 'auto' is the backend's measured faster one."""
  layout = config.strategy.get('layout', 'auto')  # runs stored before the field existed
  return models.default_layout() if layout == 'auto' else layout


def _map_remat(config) -> str:
  return config.strategy.get('map_remat', 'auto')  # runs stored before the field existed


def make_algorithm(config) -> algorithms.Algorithm:
  """The config's algorithm: for MetaMiDA the conjugate of ``config.icnn``, computed as
  ``config.strategy.icnn_block_major`` and ``icnn_map`` say."""
  return algorithms.get(config.algorithm, first_order=config.first_order,
                        icnn=dict(config.icnn.to_dict(), block_major=_icnn_block_major(config),
                                  native=_icnn_native(config)))


def make_model(config, example_x: np.ndarray) -> models.Model:
  """The base learner φ: Conv4, ResNet-12 or MLP, as pure (init, apply)."""
  if config.model == 'conv4':
    module = models.Conv4(num_classes=config.n_way, filters=config.filters, conv=_conv(config),
                          layout=_layout(config))
  elif config.model == 'resnet12':
    module = models.ResNet12(num_classes=config.n_way, widths=tuple(config.resnet_widths),
                             conv=_conv(config), layout=_layout(config))
  else:
    module = models.MLP(hidden=tuple(config.mlp_hidden), out=1)
  return models.functional(module, jnp.asarray(example_x)[None])


def make_strategy(config) -> mm.Strategy:
  """config.strategy → mm.Strategy; 'auto' is the backend's measured best (vmap for MLPs)."""
  s = config.strategy
  auto = mm.default_strategy()
  tasks = s.tasks if s.tasks != 'auto' else ('vmap' if config.model == 'mlp' else auto.tasks)
  map_remat = _map_remat(config)
  return mm.Strategy(tasks=tasks, unroll=True if s.unroll == 0 else int(s.unroll),
                     remat=bool(s.remat),
                     map_remat=auto.map_remat if map_remat == 'auto' else map_remat)


def make_sampler(config, split: str):
  """The task sampler of one split (training tasks use ``query``, others ``eval_query``)."""
  query = config.query if split == 'train' else config.eval_query
  if config.dataset == 'sinusoid':
    return data.make_sampler('sinusoid', shot=config.shot, query=query)
  kw = {}
  if config.image_size is not None:
    kw['image_size'] = config.image_size
  if config.cache_dir:
    kw['cache_dir'] = config.cache_dir
  return data.make_sampler(config.dataset, config.data_dir or None, split, config.n_way,
                           config.shot, query, **kw)


@dataclasses.dataclass
class Experiment:
  """Everything one config builds: model, algorithm, optimizer, steps and task streams.

  Attributes:
    config: the config.
    algorithm: conjugate and gradient order (mirrormeta.algorithms).
    model: the base learner.
    metric: 'accuracy' (classification, higher is better) or 'mse' (regression).
    schedule: meta learning rate as a function of the step.
    meta: the meta-training step (mm.MetaStep).
    strategy: execution strategy of training and evaluation.
    eval_fn: jitted per-task query curves after 0..K_eval steps (mirrormeta.evaluate).
    val_fn: validation's: ``eval_fn``, or after step K_eval only (``config.val_curve``).
    eval_batch: tasks per evaluation call.
    draw: {split: jitted (key, start, size) -> (support, query)}.
    num_devices: devices the meta-batch is split over.
  """
  config: Any
  algorithm: algorithms.Algorithm
  model: models.Model
  metric: str
  schedule: Callable
  meta: mm.MetaStep
  strategy: mm.Strategy
  eval_fn: Callable
  val_fn: Callable
  eval_batch: int
  draw: dict
  num_devices: int

  @property
  def eval_steps(self) -> int:
    c = self.config
    return c.inner_steps if c.eval_inner_steps is None else c.eval_inner_steps

  @property
  def best_mode(self) -> str:
    return 'max' if self.metric == 'accuracy' else 'min'

  def keys(self) -> dict[str, jax.Array]:
    """Independent streams from config.seed: init, train tasks, val tasks, test tasks."""
    root = jax.random.key(self.config.seed)
    return {name: jax.random.fold_in(root, i)
            for i, name in enumerate(('init', 'train', 'val', 'test'))}

  def init_state(self) -> mm.TrainState:
    """The TrainState at step 0: θ_z = the model's init, θ_h = the conjugate's init."""
    k_model, k_conj = jax.random.split(self.keys()['init'])
    # Jitted: one (cacheable) compilation instead of ~100 small eager ones (seconds on CPU).
    params = jax.jit(self.model.init)(k_model)
    theta = mm.MetaParams(z=params, h=jax.jit(self.algorithm.conjugate.init)(k_conj, params))
    return self.meta.init(theta)


def cpu_devices(config) -> int:
  """The XLA:CPU devices a run splits the host into (config.cpu_devices; runs stored
  before the field existed: 1)."""
  return config.get('cpu_devices', 1)


def build_experiment(config, splits=('train', 'val', 'test')) -> Experiment:
  """Checks the config, loads the data of ``splits`` and builds everything else.

  Every bad setting (config or data) raises MirrormetaError here, before anything runs.
  """
  check_config(config)
  alg = make_algorithm(config)
  draw, example_x = {}, None
  for split in splits:
    sampler = make_sampler(config, split)
    draw[split] = evaluate.task_batch_fn(sampler.sample)
    if example_x is None:
      example_x = (np.zeros((1,), np.float32) if config.dataset == 'sinusoid' else
                   np.zeros(sampler.dataset.images.shape[1:], np.float32))
  classification = config.dataset != 'sinusoid'
  model = make_model(config, example_x)
  loss_fn = (models.classification_loss if classification else models.regression_loss)(
      model.apply)
  optimizer, schedule = make_optimizer(config.optimizer)
  strategy = make_strategy(config)
  num_devices = config.num_devices or len(jax.devices())
  if config.num_devices == 1 and jax.default_backend() == 'cpu':  # the host, maybe split
    num_devices = min(cpu_devices(config), len(jax.devices()))
  sharded = num_devices > 1 or jax.process_count() > 1
  meta = mm.make_meta_step(alg.conjugate.apply, loss_fn, optimizer, steps=config.inner_steps,
                           lr=config.inner_lr, first_order=alg.first_order, strategy=strategy,
                           **({'axis_name': parallel.TASK_AXIS} if sharded else {}))
  eval_steps = config.inner_steps if config.eval_inner_steps is None else config.eval_inner_steps
  eval_fn, val_fn = (evaluate.make_eval_fn(alg.conjugate.apply, loss_fn, steps=eval_steps,
                                           lr=config.inner_lr, strategy=strategy,
                                           classification=classification, curve=curve)
                     for curve in (True, False))
  if config.get('val_curve', True):  # runs stored before the field existed had the curve
    val_fn = eval_fn
  eval_batch = config.eval_batch or (1 if strategy.tasks == 'loop' else 25)
  return Experiment(config, alg, model, 'accuracy' if classification else 'mse', schedule,
                    meta, strategy, eval_fn, val_fn, eval_batch, draw, num_devices)


# ------------------------------------------------------------------------ device placement


class Runner(NamedTuple):
  """How the meta-step runs on the devices: the one place that decides it.

  Attributes:
    step: jitted ``(state, support, query) -> (state, metrics)``.
    place_state: puts a host/device TrainState where ``step`` wants it.
    place_batch: turns this process's tasks into the step's (global) inputs.
    tasks: the task indices of the global batch this process draws.
  """
  step: Callable
  place_state: Callable
  place_batch: Callable
  tasks: range


def make_runner(exp: Experiment) -> Runner:
  """One device: ``jax.jit`` of the step. Several devices or processes: the meta-batch is
  split over a 'tasks' mesh (mirrormeta.parallel), gradients averaged, state replicated."""
  batch = exp.config.meta_batch
  if exp.meta.axis_name is None:
    return Runner(jax.jit(exp.meta.step, donate_argnums=0), _on_first_device,
                  lambda support, query: (support, query), range(batch))
  mesh = parallel.task_mesh(exp.num_devices)
  parallel.check_batch(batch, mesh)
  return Runner(parallel.shard_step(exp.meta, mesh), lambda s: parallel.replicate(s, mesh),
                lambda support, query: parallel.global_batch(mesh, support, query),
                parallel.process_task_slice(batch))


PROGRAM_SPLITS = {'step': 'train', 'val': 'val', 'test': 'test'}  # the data each one needs


def lowered_programs(exp: Experiment, runner: Runner, state: mm.TrainState,
                     names=tuple(PROGRAM_SPLITS)) -> dict:
  """The run's large programs (the meta-step, validation's and the test's), lowered for
  the arguments the run gives them, for those of ``names`` whose split ``exp`` loaded."""
  keys, out = exp.keys(), {}
  if 'step' in names and 'train' in exp.draw:
    tasks = runner.tasks
    support, query = exp.draw['train'](jax.random.fold_in(keys['train'], 0), tasks.start,
                                       len(tasks))
    out['step'] = runner.step.lower(state, *runner.place_batch(support, query))
  theta = _local(state.params)
  for name, fn in (('val', exp.val_fn), ('test', exp.eval_fn)):
    split = PROGRAM_SPLITS[name]
    if name in names and split in exp.draw:
      out[name] = fn.lower(theta, *exp.draw[split](keys[split], 0, exp.eval_batch))
  return out


def _lower_for_config(config, names) -> dict:
  """lowered_programs of a run of ``config`` just started: what a compiling process of
  mirrormeta.ahead rebuilds."""
  exp = build_experiment(config, splits=tuple(dict.fromkeys(PROGRAM_SPLITS[n] for n in names)))
  runner = make_runner(exp)
  return lowered_programs(exp, runner, runner.place_state(exp.init_state()), names)


def compiles_ahead(config) -> bool:
  """Whether the run compiles its large programs in fresh processes (mirrormeta.ahead): on
  CPU, in a single-process run, with the persistent cache on, if config.compile_ahead is
  True, or None (its default) and all threads share one malloc arena.

  Why 'one arena' for None: there a compile in the run slowed every later step (MetaMiDA,
  omniglot_5w1s, cpu_devices=2, first runs: 2.01 steps/s compiled in the run, 3.14
  compiled ahead; 248 vs 184 s for 300 steps). With an arena per thread (one CPU device)
  the steps ran alike (2.84 vs 2.86 steps/s), and loading the three programs back from the
  cache made the whole command slower (208 vs 234 s): benchmarks/results/first_run*_cpu.md.
  """
  wanted = config.get('compile_ahead', None)
  if wanted is None:
    wanted = runtime.applied_arenas() == 'one'
  return (wanted and jax.default_backend() == 'cpu' and jax.process_count() == 1
          and ahead.cache_dir() is not None)


def _on_first_device(tree: PyTree) -> PyTree:
  """``tree`` committed to this process's first device, as a restored checkpoint's arrays
  are: committed and uncommitted arguments lower to different programs, so a fresh run, a
  resumed one and the test would each compile (and cache) a program of their own."""
  return jax.device_put(tree, jax.local_devices()[0])


def _local(tree: PyTree) -> PyTree:
  """A replicated multi-device pytree as one copy on the default device (evaluation runs
  there), committed there (_on_first_device)."""
  return _on_first_device(jax.tree.map(
      lambda x: x if len(x.devices()) == 1 else np.asarray(x.addressable_data(0)), tree))


@jax.jit
def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# --------------------------------------------------------------------------------- logging


class _Log:
  """TensorBoard scalars and the progress bar; silent on processes other than 0."""

  def __init__(self, workdir: Path, exp: Experiment, start: int, enabled: bool):
    self.enabled = enabled
    self.writer = None
    self.bar = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    # tensorboardX names event files by the second and host only: a run resumed within
    # the same second as its crash would overwrite the crashed run's file. The sub-second
    # suffix keeps both, in creation order (readers sort by name).
    self.writer = SummaryWriter(str(workdir / 'tensorboard'), purge_step=start or None,
                                filename_suffix=f'.{time.time_ns() % 10**9:09d}')
    c = exp.config
    self.bar = tqdm(total=c.num_steps, initial=start, desc=f'{c.name} {c.algorithm}',
                    unit='step', dynamic_ncols=True, disable=not c.progress, file=sys.stderr,
                    smoothing=0.1, mininterval=0.1 if sys.stderr.isatty() else 10.0)

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    for name, value in values.items():
      value = np.asarray(value)
      if value.ndim == 0:
        self.writer.add_scalar(name, float(value), step)
      else:  # per-step curves: one scalar per inner step k
        for k, v in enumerate(value.reshape(-1)):
          self.writer.add_scalar(f'{name}/step_{k}', float(v), step)

  def advance(self, n: int = 1, **postfix) -> None:
    if self.bar is not None:
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)
      self.bar.update(n)

  def message(self, text: str) -> None:
    if self.enabled:
      (self.bar.write if self.bar is not None else print)(text, file=sys.stderr)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()


def _progress(exp: Experiment, desc: str):
  if not (exp.config.progress and parallel.is_main_process()):
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return lambda it: tqdm(it, desc=desc, unit='batch', leave=False, dynamic_ncols=True,
                         file=sys.stderr)


# --------------------------------------------------------------------------------- training


def validate(exp: Experiment, theta: mm.MetaParams, split: str = 'val',
             num_tasks: int | None = None) -> dict:
  """Query metric after 0..K_eval steps on ``num_tasks`` tasks of ``split`` (on 'val'
  after step K_eval only, unless ``config.val_curve``).

  Validation always uses the same tasks (the 'val' stream), so values are comparable
  across steps. Returns evaluate.summarize's dict (accuracy in %).
  """
  num_tasks = num_tasks or (exp.config.val_tasks if split == 'val' else exp.config.test_tasks)
  fn = exp.val_fn if split == 'val' else exp.eval_fn
  theta = _local(theta)  # the run's placement, whatever the caller's: the run's program
  per_task = evaluate.evaluate(fn, theta, exp.draw[split], exp.keys()[split],
                               num_tasks, exp.eval_batch, _progress(exp, split))
  return evaluate.summarize(per_task, exp.metric,
                            None if fn is exp.eval_fn else [exp.eval_steps])


def _mean(acc: list[dict]) -> dict:
  return jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *acc)


def _nonfinite(step: int, what: str, ckpts: checkpoint.Checkpoints) -> NonFiniteError:
  last = ckpts.step('latest')
  where = (f'last good checkpoint at {ckpts.path("latest", last)}' if last is not None
           else 'no checkpoint was saved')
  return NonFiniteError(f'non-finite {what} at step {step}; {where} (try a lower inner_lr '
                        'or optimizer.lr, or optimizer.clip_norm)')


def train_and_evaluate(config, workdir, *, experiment: Experiment | None = None) -> dict:
  """Meta-trains ``config`` in ``workdir`` (resuming a run found there), then tests it.

  Writes (process 0) ``config.json``, ``checkpoints/{latest,best}``, ``tensorboard/`` and
  the report (results.json, results.md, <metric>_vs_step.png); see mirrormeta.checkpoint.

  Args:
    config: the run's ConfigDict.
    workdir: the run's folder (created if needed).
    experiment: ``build_experiment(config)``, to reuse one across calls (its jitted
      functions then trace and compile once); built here if None. It may come from a
      config that differs in num_steps or the logging/checkpoint intervals only.

  Returns:
    The results dict (as in results.json).

  Raises:
    MirrormetaError: a bad config or data (before anything is written), a workdir holding
      a different run (nothing written), or NonFiniteError (the run stopped; checkpoints
      hold only finite states).
    Interrupted: Ctrl-C; the state was checkpointed, rerunning resumes it.
  """
  workdir = Path(workdir).expanduser()
  check_config(config)
  checkpoint.check_workdir(workdir, config)
  exp = (dataclasses.replace(experiment, config=config) if experiment is not None
         else build_experiment(config))
  runner = make_runner(exp)  # checks the meta-batch splits over the devices
  main = parallel.is_main_process()
  c = config
  if main:  # nothing is written before this point
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_config(workdir, config)
  ckpts = checkpoint.Checkpoints(workdir / 'checkpoints', keep=c.keep_checkpoints,
                                 best_mode=exp.best_mode)
  state = exp.init_state()
  start = ckpts.step('latest') or 0
  if start:
    state = ckpts.restore('latest', state)
  state = runner.place_state(state)
  log = _Log(workdir, exp, min(start, c.num_steps), main)
  if start >= c.num_steps:
    log.message(f'{workdir} finished its {start} steps; testing it again (raise '
                '--config.num_steps to train further)')
  elif start:
    log.message(f'resuming {workdir} from step {start}')
  keys = exp.keys()
  if start < c.num_steps and compiles_ahead(c):  # before anything large compiles here
    ahead.compile_ahead(lowered_programs(exp, runner, state),
                        functools.partial(_lower_for_config, config), log=log.message)
  bounds = jax.jit(exp.algorithm.conjugate.bounds)
  tasks = runner.tasks
  t0, window, last_log, acc = time.perf_counter(), time.perf_counter(), start, []
  pending = None  # (step, its metrics on the device), not yet fetched

  def settle():
    """Fetches the pending step's metrics (waiting for that step only) and checks its loss."""
    nonlocal pending
    if pending is not None:
      done, metrics = pending[0], jax.device_get(pending[1])
      pending = None
      if not math.isfinite(float(metrics['loss'])):
        raise _nonfinite(done, 'meta-loss', ckpts)
      acc.append(metrics)

  step = start
  try:
    for step in range(start + 1, c.num_steps + 1):
      support, query = exp.draw['train'](jax.random.fold_in(keys['train'], step - 1),
                                         tasks.start, len(tasks))
      state, metrics = runner.step(state, *runner.place_batch(support, query))
      # The previous step's metrics are fetched only now, after this step was dispatched,
      # so that an accelerator runs step s while the host draws and dispatches step s+1
      # (the smoke step's dispatch alone takes 1.3-2.3 ms of host time) instead of idling
      # through it. On CPU, where both share the cores, it is neutral (smoke config, 7
      # rounds of 100 steps: 12.43 vs 12.29 ms per step); not yet measured on a GPU.
      settle()
      pending = (step, metrics)
      log_now = step % c.log_every == 0 or step == c.num_steps
      save_latest = step % c.checkpoint_every == 0 or step == c.num_steps
      validate_now = step % c.eval_every == 0 or step == c.num_steps
      if log_now or save_latest or validate_now:
        settle()  # these need this step's loss checked (and logged) first
      postfix = {}
      if log_now:
        m = _mean(acc)
        now = time.perf_counter()
        scalars = {'train/loss': m['loss'], 'train/meta_grad_norm': m['meta_grad_norm'],
                   'inner/support_loss': m['support_loss'],
                   'inner/grad_norm': m['grad_norm'],
                   'inner/primal_step_norm': m['primal_step_norm'],
                   'optim/meta_lr': exp.schedule(step - 1), 'optim/inner_lr': c.inner_lr,
                   'perf/steps_per_sec': (step - last_log) / (now - window)}
        if exp.metric == 'accuracy':  # in %, as validation and test
          scalars['train/accuracy'] = 100 * m['query_accuracy']
          scalars['inner/support_accuracy'] = 100 * m['support_accuracy']
        scalars.update({f'conjugate/{k}': v for k, v in
                        jax.device_get(bounds(_local(state.params.h))).items()})
        log.scalars(step, scalars)
        acc, window, last_log = [], now, step
        postfix = {'loss': f'{float(m["loss"]):.3f}'}
        if exp.metric == 'accuracy':
          postfix['acc'] = f'{100 * float(m["query_accuracy"]):.1f}%'
      if (save_latest or validate_now) and not bool(_all_finite(state.params)):
        raise _nonfinite(step, 'meta-parameters', ckpts)
      if validate_now:
        val = validate(exp, state.params)
        value = val[exp.metric]
        if not math.isfinite(value):
          raise _nonfinite(step, f'validation {exp.metric}', ckpts)
        val_scalars = {f'val/{exp.metric}': value,
                       f'val/{exp.metric}_ci95': val[f'{exp.metric}_ci95']}
        if len(val['per_step']['step']) > 1:  # config.val_curve
          val_scalars[f'val/{exp.metric}_per_step'] = np.array(
              val['per_step']['accuracy' if exp.metric == 'accuracy' else 'loss'])
        log.scalars(step, val_scalars)
        ckpts.save_best(step, state, value)
        postfix['val'] = f'{value:.2f}{"%" if exp.metric == "accuracy" else ""}'
      if save_latest:
        ckpts.save_latest(step, state)
      log.advance(**postfix)
  except KeyboardInterrupt:
    saved = None
    try:  # The state of the last finished step; keep it unless it is not finite.
      done = int(jax.device_get(state.step))
      if done > (ckpts.step('latest') or 0) and bool(_all_finite(state.params)):
        ckpts.save_latest(done, state)
      ckpts.wait()
      saved = ckpts.step('latest')
    except Exception:  # pylint: disable=broad-except
      saved = ckpts.step('latest')
    log.close()
    ckpts.close()
    where = (f'checkpoint at {ckpts.path("latest", saved)}' if saved is not None
             else 'no checkpoint')
    raise Interrupted(f'interrupted at step {step}; {where}; rerun the same command to '
                      'resume') from None
  except BaseException:
    log.close()
    ckpts.wait()
    ckpts.close()
    raise
  train_time = time.perf_counter() - t0
  log.close()
  ckpts.wait()
  results = _test(exp, ckpts, workdir, state)
  results['train'] = {'steps': c.num_steps, 'resumed_from': start,
                      'wall_s': round(train_time, 2)}
  if main:
    evaluate.write_report(workdir, results)
  ckpts.close()
  return results


def _test(exp: Experiment, ckpts: checkpoint.Checkpoints, workdir: Path,
          template: PyTree, which: str | None = None) -> dict:
  """Tests the chosen checkpoint on config.test_tasks test tasks; the results dict."""
  c = exp.config
  which = which or c.eval_checkpoint
  if ckpts.step(which) is None and which == 'best':
    which = 'latest'  # e.g. a run stopped before its first validation
  step = ckpts.step(which)
  if step is None:
    raise MirrormetaError(f'no checkpoint in {workdir}; train there first')
  state = ckpts.restore(which, template)
  t0 = time.perf_counter()
  summary = validate(exp, state.params, 'test')
  results = {
      'name': c.name, 'algorithm': c.algorithm, 'dataset': c.dataset, 'n_way': c.n_way,
      'shot': c.shot, 'metric': exp.metric, 'split': 'test', 'num_tasks': c.test_tasks,
      'query': c.eval_query, 'inner_steps': exp.eval_steps, 'inner_lr': c.inner_lr,
      'checkpoint': {'which': which, 'step': int(step), 'path': str(ckpts.path(which, step))},
      **summary,
      'best_val': {'step': ckpts.step('best'), exp.metric: ckpts.best_value()},
      'eval_wall_s': round(time.perf_counter() - t0, 2),
      'backend': jax.default_backend(), 'devices': exp.num_devices,
  }
  return results


def evaluate_checkpoint(config, workdir, which: str | None = None, *,
                        experiment: Experiment | None = None) -> dict:
  """Tests a trained run's checkpoint again (``--eval_only``) and rewrites its report.

  Evaluation settings may differ from training (test_tasks, eval_inner_steps, eval_query,
  eval_batch); run-defining ones must match the workdir's config.

  Args:
    config: the run's config (evaluation fields may be changed).
    workdir: a folder trained by :func:`train_and_evaluate`.
    which: 'best' or 'latest' (default: config.eval_checkpoint).
    experiment: a prebuilt ``build_experiment(config)`` (needs its 'test' split).
  """
  workdir = Path(workdir).expanduser()
  check_config(config)
  checkpoint.check_workdir(workdir, config, must_exist=True)
  exp = (dataclasses.replace(experiment, config=config) if experiment is not None
         else build_experiment(config, splits=('test',)))
  ckpts = checkpoint.Checkpoints(workdir / 'checkpoints', keep=config.keep_checkpoints,
                                 best_mode=exp.best_mode)
  try:
    results = _test(exp, ckpts, workdir, exp.init_state(), which)
  finally:
    ckpts.close()
  if parallel.is_main_process():
    evaluate.write_report(workdir, results)
  return results
