"""The meta-objective and a pure meta-training step (DESIGN.md §1, §5.3).

    L(θ) = 1/B Σ_tasks ℓ_val(φ_K(θ)),   θ = (θ_z, θ_h),   φ_K = adapt(h*, θ_h, θ_z, ...)

differentiated through the K mirror steps (second order) or with the inner gradients
stopped (first order), then an optax update of θ.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mirrormeta import core
from mirrormeta.errors import MirrormetaError

PyTree = Any


class Strategy(NamedTuple):
  """How the same math is executed; chosen per backend by measurement (see default_strategy).

  Attributes:
    tasks: 'vmap' maps the per-task computation over the task axis; 'loop' unrolls a Python
      loop over tasks inside the one jitted program.
    unroll: ``lax.scan`` unroll of the K inner steps (True: fully unrolled). Note that
      ``True == 1`` in Python, so Strategy(unroll=True) == Strategy(unroll=1): never key a
      cache of compiled steps by Strategy alone.
    remat: ``jax.checkpoint`` each inner step (memory ∝ K iterates instead of activations).
    map_remat: how the meta-gradient recomputes φ = ∇h*(z) (``core.primal_map``):
      'checkpoint' (any differentiation mode) or 'tied' (reverse mode only).
  """
  tasks: str = 'vmap'
  unroll: int | bool = 1
  remat: bool = False
  map_remat: str = 'checkpoint'


def default_strategy(backend: str | None = None) -> Strategy:
  """The fastest measured strategy for a backend ('cpu', 'gpu', 'tpu'; default: current).

  CPU: per-task weights under ``vmap`` turn every convolution into a grouped convolution,
  slow on XLA:CPU, and a scan boundary blocks fusion across steps: unroll both. MAML Conv4
  K=5, against unrolled loops: ``vmap`` over tasks 3.5x the time, scan over steps 5.0x,
  both 8.3x (benchmarks/results/strategies_cpu.md).
  GPU/TPU: grouped convolutions are native, so ``vmap`` keeps one batched kernel per layer;
  steps stay unrolled (K is small, fusion helps). Not yet chosen by measurement: on an H100
  only this default has been timed (mini_1shot's step, 42 ms; 40-100 s to compile,
  benchmarks/results/strategies_gpu.md), not 'loop' or scan against it.
  The map's recomputation is 'tied' on CPU: XLA:CPU drops the optimization barriers that
  keep ``jax.checkpoint``'s recomputation apart from the forward pass, so it was merged with
  it and held until the backward pass (MetaMiDA Conv4 K=5: 649 vs 441 MB, MAML 420;
  ``core._tied_grad``). GPU/TPU keep the barriers, and 'checkpoint' allows forward mode.
  """
  backend = backend or jax.default_backend()
  if backend == 'cpu':
    return Strategy(tasks='loop', unroll=True, map_remat='tied')
  return Strategy(tasks='vmap', unroll=True)


class MetaParams(NamedTuple):
  """θ = (θ_z, θ_h): the dual initialisation and the conjugate's parameters."""
  z: PyTree
  h: PyTree


class TrainState(NamedTuple):
  step: jax.Array
  params: MetaParams
  opt_state: optax.OptState


def map_tasks(fn: Callable, tasks: PyTree, strategy: Strategy) -> PyTree:
  """fn over the leading (task) axis of ``tasks``, stacked; vmap or an unrolled loop."""
  if strategy.tasks == 'vmap':
    return jax.vmap(fn)(tasks)
  if strategy.tasks == 'loop':
    n = jax.tree.leaves(tasks)[0].shape[0]
    fn = core._traced_once(fn)
    outs = [fn(jax.tree.map(lambda x: x[i], tasks)) for i in range(n)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  raise MirrormetaError(f"strategy.tasks must be 'vmap' or 'loop', got {strategy.tasks!r}")


def _check_tasks(support: PyTree, query: PyTree) -> None:
  sizes = {x.shape[0] if jnp.ndim(x) else None for x in jax.tree.leaves((support, query))}
  if len(sizes) != 1 or None in sizes:
    raise MirrormetaError(
        'support and query batches need one leading task axis of the same size on every array, '
        f'got leading sizes {sorted(map(str, sizes))}; stack tasks as [tasks, examples, ...]')


def meta_loss(theta: MetaParams, support: PyTree, query: PyTree, *, h_star: core.Conjugate,
              loss_fn: core.LossFn, steps: int, lr: Any, first_order: bool = False,
              strategy: Strategy = Strategy(), track_query: bool = False):
  """L(θ): mean query loss after K mirror steps on each task's support set.

  Args:
    theta: MetaParams(z=θ_z, h=θ_h).
    support, query: pytrees of per-task batches with a leading task axis [B, ...].
    h_star, loss_fn, steps, lr, first_order: as in :func:`mirrormeta.core.adapt`.
    strategy: execution strategy.
    track_query: also record the query loss/aux after every step 0..K (evaluation curves).

  Returns:
    (loss, metrics): metrics hold per-task arrays: 'query_loss' [B], the query aux (e.g.
    'query_accuracy' [B]), 'support_loss' [B, K+1], the support aux per step, 'grad_norm'
    [B, K], 'primal_step_norm' [B, K], and with track_query 'query_loss_per_step' [B, K+1] and
    '<aux>_per_step'.
  """
  _check_tasks(support, query)
  phi0 = core.primal_map(h_star, theta.h, theta.z,  # shared by all tasks: computed once
                         remat=strategy.map_remat)

  def one_task(task):
    s, q = task
    phi_K, info = core.adapt(h_star, theta.h, theta.z, loss_fn, s, steps, lr,
                             first_order=first_order, unroll=strategy.unroll,
                             remat=strategy.remat, map_remat=strategy.map_remat,
                             eval_batch=q if track_query else None,
                             phi0=phi0)
    q_loss, q_aux = core.as_loss_with_aux(loss_fn, phi_K, q)(phi_K, q)
    m = {'query_loss': q_loss, 'support_loss': info.loss, 'grad_norm': info.grad_norm,
         'primal_step_norm': info.primal_step_norm}
    m.update({f'query_{k}': v for k, v in q_aux.items()})
    m.update({f'support_{k}': v for k, v in info.aux.items()})
    if track_query:
      m['query_loss_per_step'] = info.eval_loss
      m.update({f'query_{k}_per_step': v for k, v in info.eval_aux.items()})
    return q_loss, m

  losses, metrics = map_tasks(one_task, (support, query), strategy)
  return jnp.mean(losses), metrics


class MetaStep(NamedTuple):
  """``init(theta) -> TrainState`` and ``step(state, support, query) -> (state, metrics)``.

  ``axis_name`` is the device axis the step averages over (None: no collective), so that
  :func:`mirrormeta.parallel.shard_step` can check the step fits its mesh.
  """
  init: Callable[[MetaParams], TrainState]
  step: Callable[[TrainState, PyTree, PyTree], tuple[TrainState, dict]]
  axis_name: str | None = None


def make_meta_step(h_star: core.Conjugate, loss_fn: core.LossFn,
                   optimizer: optax.GradientTransformation, *, steps: int, lr: Any,
                   first_order: bool = False, strategy: Strategy | None = None,
                   axis_name: str | None = None) -> MetaStep:
  """Builds a pure, jittable meta-training step.

  Args:
    h_star: the conjugate ``(theta_h, z) -> scalar`` (``conj.apply``).
    loss_fn: ``(params, batch) -> loss`` or ``(loss, aux)``; the same loss serves ℓ_trn, ℓ_val.
    optimizer: an optax transformation over MetaParams.
    steps, lr, first_order: the inner loop, as in :func:`mirrormeta.core.adapt`.
    strategy: execution strategy (default: :func:`default_strategy` of the current backend).
    axis_name: a device axis (inside ``shard_map``) whose shards hold different tasks: loss,
      gradients and metrics are averaged over it before the (then identical) update.

  Returns:
    MetaStep(init, step). ``step`` reports 'loss', the mean of every per-task metric, the
    meta-gradient norm, and the inner-loop curves 'support_loss' [K+1].
  """
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
    raise MirrormetaError(f'steps must be an integer >= 0, got {steps!r}')
  core._check_lr(lr)
  strategy = strategy or default_strategy()

  def objective(theta, support, query):
    return meta_loss(theta, support, query, h_star=h_star, loss_fn=loss_fn, steps=steps,
                     lr=lr, first_order=first_order, strategy=strategy)

  def init(theta: MetaParams) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), theta, optimizer.init(theta))

  def step(state: TrainState, support: PyTree, query: PyTree):
    (loss, per_task), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, support, query)
    metrics = jax.tree.map(lambda x: jnp.mean(x, axis=0), per_task)
    if axis_name is not None:  # equal task counts per shard, so the mean of means is the mean
      loss, grads, metrics = jax.lax.pmean((loss, grads, metrics), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(loss=loss, meta_grad_norm=optax.tree.norm(grads))
    return TrainState(state.step + 1, params, opt_state), metrics

  return MetaStep(init, step, axis_name)


def init_meta_params(conj, model_params: PyTree, key: jax.Array) -> MetaParams:
  """θ_z = the model's initial parameters, θ_h = conj.init(key, params).

  Every conjugate here starts at ∇h* = identity (exactly, or ≈ for icnn), so φ_0 is the
  model's initialisation and training starts as MAML does.
  """
  return MetaParams(z=model_params, h=conj.init(key, model_params))
