"""Conjugate distance-generating functions h*(z; θ_h) (DESIGN.md §1).

Each factory returns a :class:`ConjugateDGF` ``(init, apply, bounds)``:

* ``init(key, params) -> theta_h`` builds θ_h for a model-parameter pytree;
* ``apply(theta_h, z) -> scalar`` is h*(z; θ_h), convex in z, so φ = ∇h*(z) is a mirror map;
* ``bounds(theta_h) -> {'mu': μ, 'lipschitz': L}``: μ I ⪯ ∇²h* ⪯ L I for every z, i.e. ∇h*
  is μ-strongly monotone and L-Lipschitz (the constants of the paper's convergence analysis).

A quadratic h*(z) = ½ zᵀPz gives the preconditioned step φ_{k+1} = φ_k − α P ∇ℓ(φ_k):

==========  ===========================================  ==============
factory     h*(z)                                        method
==========  ===========================================  ==============
euclidean   ½‖z‖²                                         MAML
diagonal    ½ Σ p_i z_i², p = exp(raw) > 0                MetaSGD
kronecker   ½ ⟨Z, Z ×₁ A₁ ⋯ ×ₙ Aₙ⟩ per tensor, Aₘ SPD      MetaCurvature
icnn        Σ_i (μ+λ)/2 z_i² + ICNN(z_i), ICNN convex     MetaMiDA
==========  ===========================================  ==============
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax.custom_derivatives import SymbolicZero

from mirrormeta import native as _native
from mirrormeta.errors import MirrormetaError

PyTree = Any


class ConjugateDGF(NamedTuple):
  """A learnable conjugate DGF: ``init(key, params)``, ``apply(theta_h, z)``, ``bounds(theta_h)``."""
  init: Callable[[jax.Array, PyTree], PyTree]
  apply: Callable[[PyTree, PyTree], jax.Array]
  bounds: Callable[[PyTree], dict]


def by_path(tree: PyTree) -> dict[str, jax.Array]:
  """{'Conv_0/kernel': leaf, ...}: per-tensor conjugate parameters are keyed by these paths
  (plain dicts, so optimizers and checkpoints see ordinary pytrees)."""
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path): x
          for path, x in jax.tree.leaves_with_path(tree)}


def _matched(per_tensor: dict, z: PyTree, name: str) -> list[tuple[Any, jax.Array]]:
  """Pairs θ_h's per-tensor entries with z's leaves; clear error if built for another pytree."""
  leaves = by_path(z)
  if set(per_tensor) != set(leaves):
    missing = sorted(set(leaves) - set(per_tensor))[:3]
    extra = sorted(set(per_tensor) - set(leaves))[:3]
    raise MirrormetaError(
        f'{name} conjugate parameters were built for a different parameter pytree than z '
        f'(z has {missing or "no"} extra tensors, theta_h has {extra or "no"} extra); '
        'call conj.init(key, params) with the parameters of the model you adapt')
  return [(per_tensor[k], x) for k, x in leaves.items()]


def _is_zero(t: Any) -> bool:
  return isinstance(t, SymbolicZero)


def _theta_tangent(h_star: Callable, theta_h: PyTree, z: PyTree, d_theta: PyTree):
  """⟨∇_θ h*(θ, z), dθ⟩ by forward mode, or 0 where dθ is symbolically zero: the θ term of a
  closed-form JVP (``jax.grad`` in z, the usual call, never computes it)."""
  if all(map(_is_zero, jax.tree.leaves(d_theta, is_leaf=_is_zero))):
    return 0.0
  d_theta = jax.tree.map(lambda t, x: jnp.zeros_like(x) if _is_zero(t) else t,
                         d_theta, theta_h, is_leaf=_is_zero)
  return jax.jvp(lambda t: h_star(t, z), (theta_h,), (d_theta,))[1]


# ---------------------------------------------------------------------------- euclidean


def euclidean() -> ConjugateDGF:
  """h*(z) = ½‖z‖², so φ = z and mirror descent is gradient descent: MAML."""
  def apply(theta_h, z):
    del theta_h
    return 0.5 * sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(z))

  return ConjugateDGF(init=lambda key, params: {}, apply=apply,
                      bounds=lambda theta_h: {'mu': jnp.float32(1.0), 'lipschitz': jnp.float32(1.0)})


# ----------------------------------------------------------------------------- diagonal


def diagonal(init_scale: float = 1.0) -> ConjugateDGF:
  """h*(z) = ½ Σ_i p_i z_i² with p = init_scale·exp(raw) > 0: MetaSGD's per-coordinate rates.

  φ = p ⊙ z, so a step moves φ by −α p ⊙ ∇ℓ. ``exp`` keeps p positive for any raw value and
  is exactly ``init_scale`` at raw = 0 (unit scale reproduces MAML bit for bit).
  """
  if init_scale <= 0:
    raise MirrormetaError(f'diagonal(init_scale) must be > 0, got {init_scale}')

  def apply(theta_h, z):
    return 0.5 * sum(jnp.sum(init_scale * jnp.exp(r) * jnp.square(x))
                     for r, x in _matched(theta_h, z, 'diagonal'))

  def bounds(theta_h):
    p = [init_scale * jnp.exp(r) for r in theta_h.values()]
    return {'mu': jnp.min(jnp.stack([jnp.min(x) for x in p])),
            'lipschitz': jnp.max(jnp.stack([jnp.max(x) for x in p]))}

  def init(key, params):
    del key
    return {k: jnp.zeros(np.shape(x), jnp.float32) for k, x in by_path(params).items()}

  return ConjugateDGF(init, apply, bounds)


# ---------------------------------------------------------------------------- kronecker


def _spd(raw: jax.Array) -> jax.Array:
  """A = L Lᵀ with L lower-triangular, diag(L) = exp(·): SPD for any raw, I at raw = 0."""
  lower = jnp.tril(raw, -1) + jnp.diag(jnp.exp(jnp.diag(raw)))
  return lower @ lower.T


def _mode_product(x: jax.Array, a: jax.Array, mode: int) -> jax.Array:
  """x ×_mode a: multiplies the mode-th axis of x by the matrix a.

  As one (batched) matrix product on x in its own memory order, [before, d, after]: as
  ``tensordot`` + ``moveaxis``, XLA:CPU multiplied transposed copies (e.g. a 3x3 factor
  over a 3x3x64x64 kernel).
  """
  p, d, q = math.prod(x.shape[:mode]), x.shape[mode], math.prod(x.shape[mode + 1:])
  if q == 1:
    return (x.reshape(p, d) @ a.T).reshape(x.shape)
  if p == 1:
    return (a @ x.reshape(d, q)).reshape(x.shape)
  return jnp.einsum('pab,pbq->paq', jnp.broadcast_to(a, (p, d, d)),
                    x.reshape(p, d, q)).reshape(x.shape)


def kronecker(max_factor_dim: int = 512) -> ConjugateDGF:
  """h*(Z) = ½ ⟨Z, Z ×₁ A₁ ×₂ ⋯ ×ₙ Aₙ⟩ per tensor, each Aₘ SPD: MetaCurvature.

  ∇h*(Z) = Z ×₁ A₁ ⋯ ×ₙ Aₙ = (Aₙ ⊗ ⋯ ⊗ A₁) vec Z, an SPD Kronecker preconditioner per
  layer with one factor per tensor mode. Modes longer than ``max_factor_dim`` keep the
  identity (a factor there would cost d² parameters). Identity factors give MAML exactly.
  """
  # θ_h = {tensor path: {'mode index': raw factor}}; A = _spd(raw).
  def precondition(raws, x):
    """M x = x ×₁ A₁ ⋯ ×ₙ Aₙ for one tensor."""
    for mode, raw in raws.items():
      x = _mode_product(x, _spd(raw), int(mode))
    return x

  def h_star(theta_h, z):
    return sum(0.5 * jnp.vdot(x, precondition(raws, x))
               for raws, x in _matched(theta_h, z, 'kronecker'))

  apply = jax.custom_jvp(h_star)

  # ∇_z h* = M z in closed form (M is symmetric): one pass of mode products per map, where
  # reverse mode through ½⟨z, Mz⟩ made two (½ Mz + ½ Mᵀz) for the meta-gradient to
  # differentiate.
  @functools.partial(apply.defjvp, symbolic_zeros=True)
  def apply_jvp(primals, tangents):
    theta_h, z = primals
    d_theta, d_z = tangents
    pairs = _matched(theta_h, z, 'kronecker')
    px = [precondition(raws, x) for raws, x in pairs]
    out = sum(0.5 * jnp.vdot(x, p) for (_, x), p in zip(pairs, px))
    d_out = jnp.zeros_like(out) + _theta_tangent(h_star, theta_h, z, d_theta)
    for p, t in zip(px, jax.tree.leaves(d_z, is_leaf=_is_zero)):  # z's leaf order
      if not _is_zero(t):
        d_out += jnp.vdot(p, t)
    return out, d_out

  def bounds(theta_h):
    # Eigenvalues of a Kronecker product are products of the factors' eigenvalues.
    lo, hi = [jnp.float32(1.0)], [jnp.float32(1.0)]
    for raws in theta_h.values():
      if raws:
        eig = [jnp.linalg.eigvalsh(_spd(r)) for r in raws.values()]
        lo.append(jnp.prod(jnp.stack([jnp.min(e) for e in eig])))
        hi.append(jnp.prod(jnp.stack([jnp.max(e) for e in eig])))
    return {'mu': jnp.min(jnp.stack(lo)), 'lipschitz': jnp.max(jnp.stack(hi))}

  def init(key, params):
    del key
    return {k: {str(m): jnp.zeros((d, d), jnp.float32)
                for m, d in enumerate(np.shape(x)) if 1 < d <= max_factor_dim}
            for k, x in by_path(params).items()}

  return ConjugateDGF(init, apply, bounds)


# --------------------------------------------------------------------------------- icnn


GRANULARITIES = ('tensor', 'channel', 'coordinate')




def icnn(width: int = 8, depth: int = 1, mu: float = 1e-2, hidden_bound: float = 1.0,
         skip_bound: float = 8.0, out_bound: float = 1.0, out_init: float = 1e-3,
         granularity: str = 'channel', block_major: bool = True,
         native: bool = False) -> ConjugateDGF:
  """MetaMiDA's learned conjugate: a separable input-convex network (Theorem 1, Remark 1).

  For every coordinate u of z (a scalar), with the parameters of its block b:

      a_1     = σ(B_0 u + c_0)
      a_{i+1} = σ(W_i a_i + B_i u + c_i),     i = 1..depth−1
      h*_b(u) = (μ + λ)/2 u² + vᵀ a_depth(u) − u · (vᵀ a_depth)'(0)

  σ = softplus (convex, non-decreasing, 0 ≤ σ'' ≤ ¼); W_i = M_W·sigmoid(Ŵ_i) ∈ [0, M_W] and
  v = M_v·sigmoid(v̂) ∈ [0, M_v] are non-negative and bounded, so every a_i is convex in u;
  the skips B_i = M_B·tanh(B̂_i) have any sign (bounded so L stays finite for any raw value);
  λ = softplus(λ̂) ≥ 0 and μ > 0 fixed. Hence h*''(u) ≥ μ + λ ≥ μ (∇h* strongly monotone,
  invertible) and h*''(u) ≤ μ + λ + vᵀH with H from the recursion in :func:`_curvature_bound`.

  h*(z) = Σ_i h*_{b(i)}(z_i) is separable: its Hessian is diagonal, so these per-coordinate
  bounds are the bounds of ∇h* on the whole parameter vector. ``granularity`` says which
  coordinates share one block's parameters: 'tensor' (one network per parameter tensor),
  'channel' (one per slice of the last axis, e.g. a conv output channel), 'coordinate'.
  At init λ = 1 − μ and v is small, so ∇h* ≈ identity and MetaMiDA starts as MAML.

  Args:
    width: hidden units per layer.
    depth: number of hidden layers (≥ 1). Default 1: for a scalar input a non-negative sum
      of softplus ridges already approximates any smooth convex function, and deeper is
      dear: on the Omniglot-shaped Conv4 meta-step (CPU, K=5, timed interleaved) depth 2
      costs 4.7x MAML's step time and 5.6x its peak memory, depth 1 1.2x and 1.4x (the
      per-coordinate width x width products of the hidden layer dominate; measured before
      the tied map recomputation and the contractions, after which depth 1 costs 1.07-1.15x
      and 1.03x, the time varying between runs on the shared 2-core CPU).
    mu: strong-convexity constant μ > 0.
    hidden_bound, skip_bound, out_bound: M_W, M_B, M_v.
    out_init: initial v (small: the start is ≈ MAML).
    granularity: one of GRANULARITIES.
    block_major: how 'channel' blocks of kernels are computed, not what: as [channels,
      rest] (True) or in the kernel's own order (False); the same function, parameters and
      derivatives either way. See blocks_leading below for why True is the default, and where
      False was faster.
    native: compute the map and its reverse-mode derivative with the CPU kernel of
      :mod:`mirrormeta.native`, on each tensor in its own order (``block_major`` then
      concerns XLA's map only); depth 1 and 'channel' granularity; float32 tensors of rank
      >= 1 (others use XLA's map). The same function; reverse mode only (like
      ``map_remat='tied'``); built on first use with the system C++ compiler. Why: see
      :mod:`mirrormeta.native`.
  """
  sigma, kappa = jax.nn.softplus, 0.25  # σ and sup σ'' (enters the Lipschitz bound)
  if granularity not in GRANULARITIES:
    raise MirrormetaError(f'icnn granularity must be one of {GRANULARITIES}, got {granularity!r}')
  if depth < 1 or width < 1:
    raise MirrormetaError(f'icnn needs depth >= 1 and width >= 1, got depth={depth}, width={width}')
  if not 0 < mu < 1:
    raise MirrormetaError(f'icnn mu must be in (0, 1) (the init is ∇h* ≈ identity), got {mu}')
  if not 0 < out_init < out_bound:
    raise MirrormetaError(f'icnn out_init must be in (0, out_bound={out_bound}), got {out_init}')
  if native and not _native.covers(depth, granularity):
    raise MirrormetaError(
        "icnn's native map covers depth 1 and granularity 'channel', got "
        f'depth={depth}, granularity={granularity!r}; use native=False for the others')

  def constrained(p):
    return {
        'skip': [skip_bound * jnp.tanh(b) for b in p['skip']],
        'bias': p['bias'],
        'hidden': [hidden_bound * jax.nn.sigmoid(w) for w in p['hidden']],
        'out': out_bound * jax.nn.sigmoid(p['out']),
        'quad': mu + jax.nn.softplus(p['quad']),
    }

  def network(q, u):
    """vᵀ a_depth(u) for every coordinate of u (shape S; q's leaves broadcast against S)."""
    u1 = u[..., None]
    a = sigma(q['skip'][0] * u1 + q['bias'][0])
    for w, b, c in zip(q['hidden'], q['skip'][1:], q['bias'][1:]):
      a = sigma(_matvec(w, a) + b * u1 + c)
    return jnp.sum(q['out'] * a, axis=-1)

  def network_slope(q, u):
    """d/du vᵀ a_depth(u) per coordinate, by the chain rule carried forward (σ' = sigmoid):

        s_1 = B_0 u + c_0,                    s_1' = B_0
        s_{i+1} = W_i σ(s_i) + B_i u + c_i,   s_{i+1}' = W_i (σ'(s_i) ⊙ s_i') + B_i
        (vᵀ a_depth)' = vᵀ (σ'(s_depth) ⊙ s_depth')
    """
    u1 = u[..., None]
    s, ds = q['skip'][0] * u1 + q['bias'][0], q['skip'][0]
    for w, b, c in zip(q['hidden'], q['skip'][1:], q['bias'][1:]):
      s, ds = (_matvec(w, sigma(s)) + b * u1 + c,
               _matvec(w, jax.nn.sigmoid(s) * ds) + b)
    return _contract_units(jax.nn.sigmoid(s) * ds, q['out'])

  def block(p):
    """Block p's constrained parameters, plus 'slope0' = ICNN'(0): the affine term
    −u·ICNN'(0) (convexity and curvature unchanged) pins ∇h*(0) = 0, so the map is
    ≈ identity at init rather than identity plus an offset."""
    q = constrained(p)
    q['slope0'] = network_slope(q, jnp.zeros(jnp.shape(q['quad'])))
    return q

  def value(q, x):
    return jnp.sum(0.5 * q['quad'] * jnp.square(x) + network(q, x) - q['slope0'] * x)

  def slope(q, x):
    """∂h*/∂x per coordinate (h* is a sum of scalar functions): φ = ∇h*(z) on tensor x."""
    if depth == 1 and x.ndim <= 1:
      return vector_slope(q, x, jax.nn.sigmoid(q['skip'][0] * x[..., None] + q['bias'][0]))
    return q['quad'] * x + network_slope(q, x) - q['slope0']

  def vector_slope(q, x, t):
    """Depth 1's map Q u + Σ_w v_w B_w t_w − slope0 on a vector (bias, normalisation scale),
    given t_w = σ'(B_w u + c_w), as one contraction of the units [t, u, 1] with
    [v B, Q, −slope0].

    Why: such a φ is broadcast over a layer's activations, and XLA:CPU fuses elementwise
    producers into their consumers, so as Q u + (contraction) − slope0 the map's vector
    arithmetic (Q = μ + softplus(Q̂) included) was redone for every activation element: 28
    such ops per element in the query set's batch-norm gradients, MAML's φ = z − α g 17. A
    contraction's output is computed once. Conv4 Omniglot-shaped, CPU: the vector work
    redone per element over the K=1 program fell from 2152M to 617M element-ops (MAML 1007M);
    MetaMiDA / MAML step time, interleaved, 1.100 → 1.072 at K=1 (15 rounds), 1.157 → 1.117
    at K=5 (15 rounds).
    """
    one = jnp.ones_like(x)[..., None]
    return _contract_units(
        jnp.concatenate([t, x[..., None], one], axis=-1),
        jnp.concatenate([q['out'] * q['skip'][0], q['quad'][..., None],
                         -q['slope0'][..., None]], axis=-1))

  if depth == 1:
    slope = jax.custom_jvp(slope)

    @slope.defjvp
    def slope_jvp(primals, tangents):
      """The map's derivatives at depth 1, where per coordinate (t = σ'(s), d = σ''(s)):

          slope = Q u + Σ_w v_w B_w t_w − slope0,        s_w = B_w u + c_w
          d slope = (Q + Σ_w v_w B_w² d_w) du + u dQ − d slope0
                    + Σ_w [(dv_w B_w + v_w dB_w) t_w + (v_w B_w dB_w u + v_w B_w dc_w) d_w]

      The per-block factors (dv B + v dB, ...) are formed before they meet the coordinates,
      so the meta-gradient's transpose reduces only Σ_u φ̄ t, Σ_u φ̄ u d, Σ_u φ̄ d over
      coordinates, three reductions with one sigmoid per unit, instead of the chain that
      reverse mode through ``network_slope`` reduces (Conv4 Omniglot-shaped, K=5, CPU,
      interleaved: MetaMiDA / MAML step time 1.23 vs 1.28, peak 441 vs 449 MB). The terms
      linear in dq are contractions (:func:`_contract_units`), so the transpose reduces
      each over the coordinates as a dot rather than a broadcast product, and the
      coefficient of dx sums its units in the loop that computes them (:func:`_sum_units`):
      with the tied map, 1.17-1.19 vs 1.22 and 432.6 vs 440.6 MB (MAML 419.6); with the forward
      map's sum over units a contraction too, 1.14 and 431.7 MB; with vectors' coefficient a
      contraction, 1.08 (K=5) and 1.10 (K=1).
      """
      (q, x), (dq, dx) = primals, tangents
      b, c, v = q['skip'][0], q['bias'][0], q['out']
      db, dc, dv = dq['skip'][0], dq['bias'][0], dq['out']
      x1 = x[..., None]
      t = jax.nn.sigmoid(b * x1 + c)
      d = t * (1 - t)
      vb = v * b
      out = (vector_slope(q, x, t) if x.ndim <= 1
             else q['quad'] * x + _contract_units(t, vb) - q['slope0'])
      # The map's curvature Σ_w v_w B_w² d_w, the coefficient of dx (see _sum_units for why
      # two forms).
      curv = _contract_units(d, vb * b) if x.ndim <= 1 else _sum_units(vb * b * d)
      d_out = ((q['quad'] + curv) * dx + dq['quad'] * x - dq['slope0']
               + _contract_units(t, dv * b + v * db) + _contract_units(d, vb * db) * x
               + _contract_units(d, vb * dc))
      return out, d_out

  def blocks_leading(p, x):
    """(block p's parameters, tensor x), with x's coordinates as [channels, rest] for
    'channel' blocks of a tensor of rank >= 2 (a kernel).

    Per tensor, its blocks' parameters broadcast against it, rather than one flat vector of
    all coordinates with per-coordinate copies of the parameters: the copies' cotangents
    (params × width floats per inner step and task) dominated MetaMiDA's meta-step on CPU.
    Blocks leading: the map and its meta-gradient contract [..., width] sigmoids with each
    block's parameters and reduce them over each block's coordinates, dots whose batch axis
    is the block, and XLA:CPU's dots take the batch axis leading; with 'channel' blocks on a
    kernel's last axis it copied the sigmoids into that order (two transposing copies, 41-46
    ms of the Conv4 K=5 step's 685-841 ms thread time). Computed in this order from the
    start, only x and its tangent (width times smaller) are moved: on one core MetaMiDA /
    MAML step time 1.154 -> 1.105, peak 431.7 -> 427.4 MB (MAML 419.6); on two cores the
    freed thread time was idle time, within noise (K=5: 1.094 vs 1.092 and 1.131 vs 1.096;
    K=1: 1.066 vs 1.061 and 1.076 vs 1.057). Vectors keep their own form (vector_slope).
    By K, block_major=False / True step time (15 interleaved rounds, 95% CI; MetaMiDA,
    Omniglot-shaped Conv4, benchmarks/results/icnn_order_cpu.md): 1.022 [1.006, 1.031],
    0.949 [0.918, 0.969], 0.991 [0.955, 1.035], 1.030 [1.005, 1.087], 1.061 [1.030, 1.067]
    at K=1..5. At K=2 both do the same work (thread time 476 vs 479 ms per step, profiled)
    but in the block-major program XLA:CPU's executor runs two query-set kernel-gradient
    convolutions alone while the other core idles; hence the option.
    """
    if not reordered(x):
      return block(p), x
    return block(jax.tree.map(lambda a: a[:, None], p)), _blocks_first(x)  # q: [C, 1, ...]

  def reordered(x):
    return block_major and granularity == 'channel' and x.ndim >= 2 and not native_for(x)

  def native_for(x):
    return native and x.ndim >= 1 and x.dtype == jnp.float32

  def block_map(q, x):
    """φ of (q, x) from :func:`blocks_leading`: the native kernel's, on x in its own order
    ([..., C] as [R, C]; q's leaves [C, W] and [C]), else :func:`slope`."""
    if native_for(x):
      b, c, v = (a.T for a in (q['skip'][0], q['bias'][0], q['out']))  # [W, C]
      phi = _native.icnn_slope(b, c, v * b, q['quad'], q['slope0'], x.reshape(-1, x.shape[-1]))
      return phi.reshape(x.shape)
    return slope(q, x)

  def h_star(theta_h, z):
    return sum(value(*blocks_leading(p, x)) for p, x in _matched(theta_h, z, 'icnn'))

  apply = jax.custom_jvp(h_star)

  # ∇_z h* = slope, in closed form, rather than reverse mode through the network: the
  # meta-gradient then differentiates an elementwise map instead of a backward pass (with
  # the layout above, MetaMiDA's Conv4 meta-step went from 2.5x to 1.3x MAML's on CPU in
  # `benchmarks.table5`).
  @functools.partial(apply.defjvp, symbolic_zeros=True)
  def apply_jvp(primals, tangents):
    theta_h, z = primals
    d_theta, d_z = tangents
    blocks = [blocks_leading(p, x) for p, x in _matched(theta_h, z, 'icnn')]
    out = sum(value(q, x) for q, x in blocks)
    d_out = jnp.zeros_like(out) + _theta_tangent(h_star, theta_h, z, d_theta)
    for (q, x), t in zip(blocks, jax.tree.leaves(d_z, is_leaf=_is_zero)):  # z's leaf order
      if not _is_zero(t):
        d_out += jnp.vdot(block_map(q, x), _blocks_first(t) if reordered(t) else t)
    return out, d_out

  def bounds(theta_h):
    mus, lips = [], []
    for p in theta_h.values():
      q = constrained(p)
      mus.append(jnp.min(q['quad']))
      lips.append(jnp.max(q['quad'] + _curvature_bound(q, kappa)))
    return {'mu': jnp.min(jnp.stack(mus)), 'lipschitz': jnp.max(jnp.stack(lips))}

  def init(key, params):
    leaves = by_path(params)
    keys = jax.random.split(key, len(leaves))
    return {name: _init_block(k, x) for k, (name, x) in zip(keys, leaves.items())}

  def _init_block(key, x):
    shape = np.shape(x)
    group = {'tensor': (), 'channel': shape[-1:], 'coordinate': shape}[granularity]
    k_skip, k_bias, k_hidden = jax.random.split(key, 3)
    full = lambda *s: jnp.zeros(group + s, jnp.float32)
    logit = lambda p: float(np.log(p) - np.log1p(-p))
    return dict(
        skip=[full(width) + 0.5 * jax.random.normal(k, (width,))
              for k in jax.random.split(k_skip, depth)],
        # Kinks spread over [-2, 2] so the network bends at different places.
        bias=[full(width) + jnp.linspace(-2.0, 2.0, width) + 0.1 * jax.random.normal(k, (width,))
              for k in jax.random.split(k_bias, depth)],
        hidden=[full(width, width) + logit(0.5 / width) + 0.1 * jax.random.normal(k, (width, width))
                for k in jax.random.split(k_hidden, depth - 1)],
        out=full(width) + logit(out_init / out_bound),
        quad=full() + float(np.log(np.expm1(1.0 - mu))),  # softplus⁻¹(1 − μ)
    )

  return ConjugateDGF(init, apply, bounds)


def _blocks_first(x: jax.Array) -> jax.Array:
  """x [..., channels] as [channels, rest]: 'channel' blocks leading."""
  return jnp.moveaxis(x, -1, 0).reshape(x.shape[-1], -1)


def _sum_units(a: jax.Array) -> jax.Array:
  """Σ over the last (width) axis, as a chain of adds of slices.

  Why, for the coefficient of dz in the map's JVP: XLA:CPU hands ``jnp.sum(a, axis=-1)`` to
  a YNNPACK fusion that takes ``a`` as a materialised ``[..., width]`` buffer, while adds of
  slices stay in the elementwise loop that computes ``a``. Not for the forward map: there
  XLA:CPU then materialised the sigmoids and added the slices in each consumer of φ (Conv4
  meta-step, with the contractions elsewhere: 1.52x MAML's time with slices in the forward
  map too, 1.17-1.19x with them here only); it uses :func:`_contract_units`.

  Nor for vectors (biases, normalisation scales): their φ's tangent is broadcast over a
  layer's activations, and XLA:CPU fused these adds into those elementwise loops, summing
  the units again for every activation (the support set's max-pool gradient took 1.7 ms
  instead of 0.2). As a contraction the coefficient is computed once (Conv4, interleaved:
  MetaMiDA / MAML time 1.123 -> 1.084 at K=5 over 11 rounds, 1.137 -> 1.095 at K=1 over 15).
  """
  out = a[..., 0]
  for i in range(1, a.shape[-1]):
    out = out + a[..., i]
  return out


def _contract_units(a: jax.Array, w: jax.Array) -> jax.Array:
  """Σ_k a[..., k] · w[..., k], with w's leading axes matching a's trailing ones (a block's
  parameters, broadcast against the coordinates): an einsum, whose transpose in w is a dot
  over the coordinates.

  Why: as ``jnp.sum(a * w, axis=-1)``, XLA:CPU ran the product and sum in a YNNPACK fusion
  that takes every operand materialised, the block's parameters broadcast to the full
  ``[..., width]`` shape included, and the transpose in w materialised the broadcast
  cotangent and its product with ``a`` before reducing them over the coordinates. As a dot,
  ``a`` is the only ``[..., width]`` buffer (the ICNN map's Conv4 meta-step: 1.14x vs 1.22x
  MAML's time, 431.7 vs 440.6 MB). Full float32 precision on every backend: it stands for
  an exact sum.
  """
  letters = 'abcdefghijklmnopqrstuvwxy'[:a.ndim - 1]
  return jnp.einsum(f'{letters}z,{letters[a.ndim - w.ndim:]}z->{letters}', a, w,
                    precision=jax.lax.Precision.HIGHEST)


def _matvec(w: jax.Array, a: jax.Array) -> jax.Array:
  """(W a) per coordinate: w [..., j, k], a [..., k] (broadcast), as multiply + sum.

  Why not ``jnp.matmul``: per coordinate these are tiny (width²) products; as a batched
  matmul XLA:CPU runs one small GEMM per coordinate, while multiply + sum fuses into the
  surrounding elementwise loop.
  """
  return jnp.sum(w * a[..., None, :], axis=-1)


def _curvature_bound(q: dict, kappa: float) -> jax.Array:
  """Upper bound of vᵀ a_depth''(u) over all u, per block.

  With s_i the pre-activations, G_i ≥ |a_i'| and H_i ≥ a_i'' ≥ 0 elementwise:
    G_1 = |B_0|,               H_1 = κ B_0²
    G_{i+1} = W_i G_i + |B_i|, H_{i+1} = κ G_{i+1}² + W_i H_i
  since a_{i+1}'' = σ''(s)(s')² + σ'(s) W_i a_i'' with 0 ≤ σ' ≤ 1, 0 ≤ σ'' ≤ κ, W_i ≥ 0.
  """
  g = jnp.abs(q['skip'][0])
  h = kappa * jnp.square(g)
  for w, b in zip(q['hidden'], q['skip'][1:]):
    g = _matvec(w, g) + jnp.abs(b)
    h = kappa * jnp.square(g) + _matvec(w, h)
  return jnp.sum(q['out'] * h, axis=-1)
