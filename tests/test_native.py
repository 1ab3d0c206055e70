"""The native CPU kernel of MetaMiDA's map (mirrormeta.native, icnn(native=True)): the same
function and reverse-mode derivatives as XLA's map, and clear errors where it cannot run."""
import functools
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mirrormeta as mm
from mirrormeta import conjugates, models, native
from mirrormeta.errors import MirrormetaError

OK, WHY = native.available()
needs_kernel = pytest.mark.skipif(not OK, reason=f'native ICNN map unavailable: {WHY}')
# 'wide': 37 channels, so whole vectors of channels and a zero-padded rest (16 + 16 + 5 or
# 4 x 8 + 5), and 6 rows, so a block of rows and single rows; the others: channels < a vector.
PARAMS = {'conv': jnp.zeros((3, 3, 2, 4)), 'dense': jnp.zeros((5, 3)), 'bias': jnp.zeros(3),
          'wide': jnp.zeros((6, 37))}


def random_like(tree, seed, scale=1.0):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, jnp.float32)
                                      for k, x in zip(keys, leaves)])


def assert_trees_close(a, b, rtol):
  """Leafwise, to rtol of the largest entry of b: leaves that are 0 in exact arithmetic (a
  conv bias's gradient before batch norm) are rounding noise in both."""
  scale = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale)


@needs_kernel
@pytest.mark.parametrize('map_remat', ['tied', 'checkpoint'])
def test_native_map_and_its_derivatives_equal_xlas(map_remat):
  """φ and the VJP of <φ, v> in θ_h and z (what the meta-gradient uses), for θ_h far from
  its init, alone and under vmap over z (tasks): equal to XLA's map to float32 rounding."""
  xla, nat = conjugates.icnn(), conjugates.icnn(native=True)
  theta_h = jax.tree.map(jnp.add, xla.init(jax.random.key(0), PARAMS),
                         random_like(xla.init(jax.random.key(0), PARAMS), 1, 0.7))
  z, v = random_like(PARAMS, 2), random_like(PARAMS, 3)
  zs = jax.tree.map(lambda *x: jnp.stack(x), z, random_like(PARAMS, 4), random_like(PARAMS, 5))

  def map_v(conj, t, x):
    phi = mm.primal_map(conj.apply, t, x, remat=map_remat)
    return sum(jnp.vdot(a, jnp.sin(b)) for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(v)))

  grads = lambda c: jax.jit(jax.value_and_grad(functools.partial(map_v, c), argnums=(0, 1)))
  (va, ga), (vb, gb) = grads(nat)(theta_h, z), grads(xla)(theta_h, z)
  np.testing.assert_allclose(va, vb, rtol=1e-6)
  for a, b in zip(ga, gb):  # θ_h, then z
    assert_trees_close(a, b, rtol=2e-5)
  assert float(jnp.abs(gb[0]['conv']['out']).max()) > 1e-3  # θ_h's gradient is not ~0
  batched = lambda c: jax.jit(jax.grad(
      lambda t, xs: jnp.sum(jax.vmap(functools.partial(map_v, c, t))(xs)), argnums=(0, 1)))
  for a, b in zip(batched(nat)(theta_h, zs), batched(xla)(theta_h, zs)):
    assert_trees_close(a, b, rtol=2e-5)


@needs_kernel
def test_native_map_accuracy_and_nan():
  """Per coordinate, over the sigmoids' whole range, the kernel's φ (its own exp) against
  the formula in float64; a NaN in z stays a NaN in φ (the runner stops on it)."""
  conj = conjugates.icnn(native=True)
  theta_h = jax.tree.map(jnp.add, conj.init(jax.random.key(0), PARAMS),
                         random_like(conj.init(jax.random.key(0), PARAMS), 1, 2.0))
  z = {'conv': jnp.linspace(-40.0, 40.0, 72).reshape(3, 3, 2, 4), 'dense': jnp.full((5, 3), 1e-3),
       'bias': jnp.array([0.0, -3.0, 7.0]), 'wide': jnp.linspace(-12.0, 12.0, 222).reshape(6, 37)}
  phi = mm.primal_map(conj.apply, theta_h, z)
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
    exact = mm.primal_map(conjugates.icnn().apply, f64(theta_h), f64(z))
  for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(exact)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  z['conv'] = z['conv'].at[1, 2, 0, 3].set(jnp.nan)
  phi = mm.primal_map(conj.apply, theta_h, z)['conv']
  assert np.isnan(phi[1, 2, 0, 3]) and np.isfinite(phi).sum() == phi.size - 1


@needs_kernel
def test_native_meta_step_equals_xlas():
  """Two second-order meta-steps of MetaMiDA on a small Conv4 (K=2, the CPU default
  strategy): the same losses and parameters with the native map as with XLA's."""
  model = models.functional(models.Conv4(num_classes=3, filters=4), jnp.zeros((1, 28, 28, 1)))
  loss_fn = models.classification_loss(model.apply)
  rng = np.random.default_rng(0)
  support = (jnp.asarray(rng.normal(size=(2, 3, 28, 28, 1)), jnp.float32),
             jnp.tile(jnp.arange(3), (2, 1)))
  query = (jnp.asarray(rng.normal(size=(2, 6, 28, 28, 1)), jnp.float32),
           jnp.tile(jnp.repeat(jnp.arange(3), 2), (2, 1)))
  params = model.init(jax.random.key(0))
  results = []
  for native_map in (False, True):
    conj = conjugates.icnn(native=native_map)
    theta = mm.init_meta_params(conj, params, jax.random.key(1))
    # SGD, not Adam: Adam's m/√v turns the rounding noise of gradients that are 0 in exact
    # arithmetic (a conv bias before batch norm) into ±lr steps.
    meta = mm.make_meta_step(conj.apply, loss_fn, optax.sgd(0.5), steps=2, lr=0.3)
    state, step = meta.init(theta), jax.jit(meta.step)
    losses = []
    for _ in range(2):
      state, metrics = step(state, support, query)
      losses.append(float(metrics['loss']))
    results.append((losses, state.params))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
  assert_trees_close(results[1][1], results[0][1], rtol=1e-4)


@needs_kernel
def test_native_kernel_leaves_the_floating_point_state_alone():
  """Loading and running the kernel keeps subnormal floats (a library built with
  -ffast-math turns on flush-to-zero for the whole process when it is loaded)."""
  conj = conjugates.icnn(native=True)
  jax.block_until_ready(mm.primal_map(conj.apply, conj.init(jax.random.key(0), PARAMS), PARAMS))
  tiny = np.array([1e-40], np.float32)
  assert (tiny * np.float32(1.0))[0] != 0 and np.finfo(np.float32).smallest_subnormal > 0


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ('x86_64', 'AMD64'), reason='x86 ISA flags')
@pytest.mark.parametrize('isa', ['-mno-avx512f', '-mno-avx'])
def test_native_kernel_without_avx512_or_avx(tmp_path, monkeypatch, isa):
  """The kernel's other branches, for CPUs without AVX-512 (8-lane vectors, AVX max/min) or
  without AVX (the portable clamps), built here with those ISA extensions turned off,
  compute what this machine's build computes, φ and its VJP (du and every sum, through the
  parameters' cotangents): a batch of 2, 37 channels (whole vectors and a padded rest), 6
  rows (a block and single rows)."""
  lib, name = tmp_path / 'icnn_map.so', 'test_icnn_map' + isa.replace('-', '_')
  assert native._compile(native._compiler(), lib, (isa,)) == ''
  assert native._register(lib, name + '_fwd', name + '_bwd') == ''
  keys = jax.random.split(jax.random.key(7), 7)
  normal = lambda k, *shape: jax.random.normal(k, (2,) + shape, jnp.float32)
  args = (normal(keys[1], 8, 37), normal(keys[2], 8, 37), normal(keys[3], 8, 37),
          1 + jnp.abs(normal(keys[4], 37)), normal(keys[5], 37), 3 * normal(keys[0], 6, 37))
  g = normal(keys[6], 6, 37)

  def map_and_vjp():  # traced anew on each call: the kernel is the one _FWD, _BWD name now
    phi, vjp = jax.vjp(native.icnn_slope, *args)
    return (phi, *vjp(g))

  reference = map_and_vjp()
  monkeypatch.setattr(native, '_FWD', name + '_fwd')
  monkeypatch.setattr(native, '_BWD', name + '_bwd')
  for a, b in zip(map_and_vjp(), reference, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_native_map_rejects_what_it_does_not_cover():
  for kwargs in ({'depth': 2}, {'granularity': 'tensor'}, {'granularity': 'coordinate'}):
    with pytest.raises(MirrormetaError, match='native=False'):
      conjugates.icnn(native=True, **kwargs)


def test_native_map_without_a_compiler_is_one_clear_error(monkeypatch, tmp_path):
  """No compiler: available() says why, and tracing the map raises one MirrormetaError that
  names the fix, not a compiler or JAX stack trace."""
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  monkeypatch.setenv('MIRRORMETA_CACHE', str(tmp_path))
  native._build.cache_clear()
  try:
    ok, why = native.available()
    assert not ok and 'no C++ compiler' in why
    conj = conjugates.icnn(native=True)
    theta_h = conj.init(jax.random.key(0), PARAMS)
    with pytest.raises(MirrormetaError, match='native=False'):
      mm.primal_map(conj.apply, theta_h, PARAMS)
  finally:
    native._build.cache_clear()
