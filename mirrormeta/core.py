"""Learnable mirror descent: the inner loop of MetaMiDA (DESIGN.md §1).

With a conjugate distance-generating function h*(z; θ_h), convex and smooth in z:

    z_0     = θ_z
    φ_k     = ∇_z h*(z_k; θ_h)                 # primal_map
    z_{k+1} = z_k − α ∇_φ ℓ_trn(φ_k)           # mirror_step
    φ_K     = adapt(...)                        # K steps

A conjugate is any function ``h_star(theta_h, z) -> scalar`` over a parameter pytree ``z``;
``h*(z) = ½‖z‖²`` gives φ = z and the loop is exactly MAML's.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mirrormeta.errors import MirrormetaError

PyTree = Any
Conjugate = Callable[[PyTree, PyTree], jax.Array]  # (theta_h, z) -> scalar
LossFn = Callable[[PyTree, PyTree], Any]  # (params, batch) -> loss or (loss, aux)


def _output_shape(fn: Callable, what: str, fix: str, *args) -> Any:
  """``jax.eval_shape(fn, *args)``, with a user's shape error turned into one clear line."""
  try:
    return jax.eval_shape(fn, *args)
  except MirrormetaError:
    raise
  except (TypeError, ValueError) as e:
    raise MirrormetaError(f'{what} failed on these inputs ({type(e).__name__}: '
                          f'{str(e).splitlines()[0]}); {fix}') from None


def _check_scalar_conjugate(h_star: Conjugate, theta_h: PyTree, z: PyTree) -> None:
  """Raises a clear error unless h*(θ_h, z) is a real scalar (trace-time only)."""
  out = _output_shape(h_star, 'the conjugate h*(theta_h, z)',
                      'check that theta_h was made by conj.init(key, params) for the same '
                      'parameter pytree as z', theta_h, z)
  if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == ()
          and jnp.issubdtype(out.dtype, jnp.floating)):
    raise MirrormetaError(
        f'the conjugate h*(theta_h, z) must return a real scalar, got {out}; '
        'sum your per-coordinate terms, e.g. `return jnp.sum(...)`')


def _check_same_structure(a: PyTree, b: PyTree, what_a: str, what_b: str) -> None:
  sa, sb = jax.tree.structure(a), jax.tree.structure(b)
  if sa != sb:
    raise MirrormetaError(f'{what_a} and {what_b} are different pytrees:\n  {sa}\nvs\n  {sb}')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.shape(x) != jnp.shape(y):
      raise MirrormetaError(
          f'{what_a} and {what_b} have leaves of different shapes: {jnp.shape(x)} vs {jnp.shape(y)}')


def _check_lr(lr: Any) -> None:
  """Checks a concrete learning rate; traced (e.g. learned) rates are their owner's to check."""
  for leaf in jax.tree.leaves(lr):
    try:
      positive = bool(np.all(np.asarray(leaf) > 0))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      continue
    if not positive:
      raise MirrormetaError(f'the inner learning rate must be > 0, got {leaf}')


def _remat_grad(h_star: Conjugate) -> Callable:
  """∇_z h* that the meta-gradient recomputes instead of storing.

  Why: the meta-gradient differentiates φ = ∇h*(z), itself a backward pass, so by default
  it keeps every intermediate of h* for each inner step and task (params × width floats
  for an ICNN). Recomputing the map costs a few elementwise passes; storing it cost 1.7x
  MAML's memory on Conv4 (benchmarks/table5.py). On CPU, XLA drops the barriers that keep
  the recomputation out of the forward pass: see :func:`_tied_grad`.
  """
  return jax.checkpoint(jax.grad(h_star, argnums=1),
                        policy=jax.checkpoint_policies.nothing_saveable)


def _tied_grad(h_star: Conjugate) -> Callable:
  """∇_z h* whose backward pass recomputes the map from z only once the cotangent exists.

  Why: XLA:CPU removes optimization barriers early in its pipeline, so the recomputation
  of :func:`_remat_grad` is merged with (CSE) or placed next to the forward map, and its
  values stay live from the forward to the backward pass (before the optimizations the
  program has the barriers; after them, none). Here the recomputation starts from
  z + min(|c|, 0), with c one entry of the cotangent: the term is exactly 0 for any c but
  NaN (which makes the gradient NaN anyway), yet it is a new value that depends on the
  cotangent, so XLA can neither merge the recomputation with the forward pass nor
  schedule it before the cotangent. Conv4 Omniglot-shaped meta-step, K=5, CPU: MetaMiDA's
  peak 649 → 441 MB (MAML 420). Reverse mode only (a custom VJP): forward-mode users keep
  'checkpoint'.
  """
  grad = jax.grad(h_star, argnums=1)

  @jax.custom_vjp
  def phi(theta_h, z):
    return grad(theta_h, z)

  def fwd(theta_h, z):
    return grad(theta_h, z), (theta_h, z)

  def bwd(res, cotangent):
    theta_h, z = res
    zero = jnp.minimum(jnp.abs(jnp.ravel(jax.tree.leaves(cotangent)[0])[0]), 0)
    z = jax.tree.map(lambda x: x + zero.astype(x.dtype), z)
    return jax.vjp(grad, theta_h, z)[1](cotangent)

  phi.defvjp(fwd, bwd)
  return phi


MAP_REMATS = ('checkpoint', 'tied')


def primal_map(h_star: Conjugate, theta_h: PyTree, z: PyTree, *,
               remat: str = 'checkpoint') -> PyTree:
  """φ = ∇_z h*(z; θ_h): maps dual variables to model parameters.

  Args:
    h_star: the conjugate DGF, ``(theta_h, z) -> scalar``, convex in ``z``.
    theta_h: its parameters.
    z: dual variables, a pytree shaped like the model parameters.
    remat: how a reverse-mode derivative recomputes the map instead of storing it:
      'checkpoint' (``jax.checkpoint``; any differentiation mode) or 'tied' (recomputed
      after the cotangent, reverse mode only; the CPU default, see :func:`_tied_grad`).

  Returns:
    φ, a pytree with the structure of ``z``.
  """
  _check_scalar_conjugate(h_star, theta_h, z)
  if remat == 'checkpoint':
    return _remat_grad(h_star)(theta_h, z)
  if remat == 'tied':
    return _tied_grad(h_star)(theta_h, z)
  raise MirrormetaError(f'primal_map remat must be one of {MAP_REMATS}, got {remat!r}')


def mirror_step(h_star: Conjugate, theta_h: PyTree, z: PyTree, grads: PyTree, lr: Any) -> PyTree:
  """One mirror-descent step in dual space: z_{k+1} = z_k − α ∇_φ ℓ(φ_k).

  The step is linear in dual space; the geometry enters through φ = ∇h*(z). ``h_star`` and
  ``theta_h`` are part of the signature so that any step of this shape can stand in for it
  (e.g. one that also returns φ_{k+1}); they are checked, not used by the update itself.

  Args:
    h_star: the conjugate, ``(theta_h, z) -> scalar``.
    theta_h: its parameters.
    z: current dual variables.
    grads: ∇_φ ℓ(φ_k), the loss gradient w.r.t. the primal parameters, shaped like ``z``.
    lr: the step size α > 0, a scalar or a pytree of scalars/arrays shaped like ``z``.

  Returns:
    z_{k+1}, shaped like ``z``.
  """
  _check_scalar_conjugate(h_star, theta_h, z)
  _check_same_structure(z, grads, 'the dual variables z', 'the gradients')
  _check_lr(lr)
  if jax.tree.structure(lr) == jax.tree.structure(z):
    return jax.tree.map(lambda zi, gi, ai: zi - ai * gi, z, grads, lr)
  return jax.tree.map(lambda zi, gi: zi - lr * gi, z, grads)


def as_loss_with_aux(loss_fn: LossFn, params: PyTree, batch: PyTree) -> Callable:
  """Wraps ``loss_fn`` to always return ``(loss, aux)``; checks the loss is a scalar."""
  out = _output_shape(loss_fn, 'loss_fn(params, batch)',
                      'check the batch shapes and the parameter pytree', params, batch)
  has_aux = isinstance(out, tuple) and len(out) == 2
  loss_shape = out[0] if has_aux else out
  if getattr(loss_shape, 'shape', None) != ():
    raise MirrormetaError(
        f'loss_fn(params, batch) must return a scalar loss or (loss, aux), got {out}')
  if has_aux:
    return loss_fn
  return lambda p, b: (loss_fn(p, b), {})


def tree_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _traced_once(fn: Callable) -> Callable:
  """``fn`` for a Python loop that calls it with the same shapes every time: traced once.

  Why: a nested ``jax.jit`` is traced, differentiated and lowered once for all the loop's
  calls (JAX reuses the jaxprs of its derivatives), and XLA inlines it before optimising,
  so it compiles to the plain loop's computation (sums may associate differently, float32
  rounding; Conv4: 9,793 fusions instead of 9,796). The unrolled loops over tasks and inner
  steps were traced anew per call: tracing and lowering were a fifth of the time to build
  MetaMiDA's Conv4 meta-step on CPU, and a hit in the compilation cache still pays them
  (``python -m benchmarks.build_time``).
  """
  return jax.jit(fn)


class AdaptInfo(NamedTuple):
  """What happened during K inner steps (arrays with a leading axis of K+1 or K).

  Attributes:
    loss: [K+1] training loss at φ_0..φ_K.
    aux: the loss's aux (e.g. ``{'accuracy': [K+1]}``) at φ_0..φ_K.
    eval_loss: [K+1] loss on ``eval_batch`` at φ_0..φ_K (None without one).
    eval_aux: its aux (None without ``eval_batch``).
    grad_norm: [K] ‖∇_φ ℓ_trn(φ_k)‖, the primal gradient norm of each step.
    primal_step_norm: [K] ‖φ_{k+1} − φ_k‖, how far each mirror step moved the model.
  """
  loss: jax.Array
  aux: PyTree
  eval_loss: jax.Array | None
  eval_aux: PyTree
  grad_norm: jax.Array
  primal_step_norm: jax.Array


def adapt(h_star: Conjugate, theta_h: PyTree, z0: PyTree, loss_fn: LossFn, batch: PyTree,
          steps: int, lr: Any, *, first_order: bool = False, unroll: int | bool = 1,
          remat: bool = False, map_remat: str = 'checkpoint', eval_batch: PyTree | None = None,
          phi0: PyTree | None = None) -> tuple[PyTree, AdaptInfo]:
  """K mirror-descent steps from z_0 on ``loss_fn(·, batch)``; returns φ_K = ∇h*(z_K).

  The steps run as ``lax.scan`` so the program stays the same size for any K; ``unroll``
  trades compile time for speed (full unrolling lets XLA fuse across steps, see
  ``mirrormeta.meta.Strategy``) and ``remat`` recomputes each step in the backward pass,
  so memory grows with K by one dual iterate instead of all activations.

  Args:
    h_star: the conjugate, ``(theta_h, z) -> scalar``.
    theta_h: its parameters.
    z0: the dual initialisation θ_z, a pytree shaped like the model parameters.
    loss_fn: ``(params, batch) -> loss`` or ``(loss, aux)``, a scalar training loss ℓ_trn.
    batch: the task's support set, any pytree ``loss_fn`` accepts.
    steps: K ≥ 0.
    lr: α > 0, scalar or pytree shaped like ``z0`` (e.g. learned per-layer rates).
    first_order: stop gradients through ∇ℓ_trn (no second derivatives of the loss).
    unroll: ``lax.scan`` unroll factor (True: fully unrolled).
    remat: wrap each step in ``jax.checkpoint``.
    map_remat: how the meta-gradient recomputes φ = ∇h*(z), see :func:`primal_map`.
    eval_batch: optional query set; its loss/aux are recorded at every step 0..K.
    phi0: ∇h*(z0) if already computed (it is the same for every task of a meta-batch).

  Returns:
    (φ_K, AdaptInfo).
  """
  if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 0:
    raise MirrormetaError(f'steps must be an integer >= 0, got {steps!r}')
  _check_lr(lr)
  if phi0 is None:
    phi0 = primal_map(h_star, theta_h, z0, remat=map_remat)
  loss_aux = as_loss_with_aux(loss_fn, phi0, batch)
  eval_fn = None if eval_batch is None else as_loss_with_aux(loss_fn, phi0, eval_batch)

  def evaluate(phi):
    loss, aux = loss_aux(phi, batch)
    ev = (None, None) if eval_fn is None else eval_fn(phi, eval_batch)
    return loss, aux, ev

  def step(carry, _):
    z, phi = carry
    (loss, aux), g = jax.value_and_grad(loss_aux, has_aux=True)(phi, batch)
    if first_order:
      g = jax.lax.stop_gradient(g)
    ev = (None, None) if eval_fn is None else eval_fn(phi, eval_batch)
    z = mirror_step(h_star, theta_h, z, g, lr)
    phi_next = primal_map(h_star, theta_h, z, remat=map_remat)
    step_norm = tree_norm(jax.tree.map(jnp.subtract, phi_next, phi))
    return (z, phi_next), (loss, aux, ev, tree_norm(g), step_norm)

  if remat:
    step = jax.checkpoint(step)
  if steps >= 1 and (unroll is True or unroll >= steps):
    # Fully unrolled: a Python loop, the program lax.scan would unroll to, except at K=1,
    # where scan lowers to a one-trip while loop whatever `unroll` says; XLA:CPU kept it,
    # and the layouts inside sent the weight gradients to a generic convolution kernel
    # (the K=1 meta-step took 1.4x the K=5 one in `benchmarks.table5`).
    carry, outs = (z0, phi0), []
    step = _traced_once(step)
    for _ in range(steps):
      carry, out = step(carry, None)
      outs.append(out)
    (_, phi_K), (losses, auxs, evs, gnorms, snorms) = carry, jax.tree.map(
        lambda *xs: jnp.stack(xs), *outs)
  else:
    (_, phi_K), (losses, auxs, evs, gnorms, snorms) = jax.lax.scan(
        step, (z0, phi0), None, length=steps, unroll=unroll)

  # The loss after the last step: the K+1-th point of the adaptation curve.
  loss_K, aux_K, ev_K = evaluate(phi_K)
  append = lambda xs, x: jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), xs, x)
  info = AdaptInfo(
      loss=append(losses, loss_K), aux=append(auxs, aux_K),
      eval_loss=None if eval_fn is None else append(evs[0], ev_K[0]),
      eval_aux=None if eval_fn is None else append(evs[1], ev_K[1]),
      grad_norm=gnorms, primal_step_norm=snorms)
  return phi_K, info
