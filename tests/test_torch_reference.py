"""Checks of the PyTorch MAML reference in benchmarks/torch_reference.py.

torch is an optional benchmark dependency: without it these tests skip, except the one
that checks the module still imports and fails clearly.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmarks/ is a top-level folder of the repository, not part of an installed package.
sys.path.insert(0, ROOT)


@pytest.fixture(name='tr')
def _tr():
  torch = pytest.importorskip('torch')
  from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
  # Tiny problems: one thread avoids thread-pool waits on a shared, busy CPU.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield torch_reference
  torch.set_num_threads(threads)


def _tiny_problem(tr, torch):
  # 16x16 is the smallest image that survives four floor max-pools.
  params = tr.init_conv4((16, 16, 1), filters=4, n_way=3, dtype=torch.float64, seed=1)
  tasks = tr.random_tasks(2, (16, 16, 1), n_way=3, shot=1, query=2,
                          dtype=torch.float64, seed=2)
  return params, tasks


def _directional(grads, direction):
  return float(sum((g * d).sum() for g, d in zip(grads, direction)))


def test_second_order_meta_gradient_matches_finite_differences(tr):
  import torch  # pylint: disable=g-import-not-at-top
  params, tasks = _tiny_problem(tr, torch)
  steps, lr = 2, 0.4
  grads = torch.autograd.grad(tr.meta_loss_loops(params, tasks, steps, lr), params)
  grads_fo = torch.autograd.grad(
      tr.meta_loss_loops(params, tasks, steps, lr, first_order=True), params)

  theta = [p.detach() for p in params]

  def meta_loss_at(t, direction):
    # Leaves again: the inner steps differentiate w.r.t. them.
    shifted = [(p + t * d).requires_grad_() for p, d in zip(theta, direction)]
    return float(tr.meta_loss_loops(shifted, tasks, steps, lr).detach())

  gen = torch.Generator().manual_seed(3)
  eps = 1e-5
  for _ in range(3):
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in theta]
    fd = (meta_loss_at(eps, direction) - meta_loss_at(-eps, direction)) / (2 * eps)
    assert _directional(grads, direction) == pytest.approx(fd, rel=1e-6, abs=1e-8)
    # The check has teeth: dropping the second-order terms is visibly wrong here.
    assert abs(_directional(grads_fo, direction) - fd) > 1e-3 * abs(fd)


@pytest.mark.parametrize('algorithm', ['maml', 'metamida'])
@pytest.mark.parametrize('first_order', [False, True])
def test_func_variant_equals_loops(tr, first_order, algorithm):
  import torch  # pylint: disable=g-import-not-at-top
  params, tasks = _tiny_problem(tr, torch)
  theta_h = tr.init_icnn(params, seed=3) if algorithm == 'metamida' else []
  leaves = params + theta_h
  n = len(params)
  loss = tr.meta_loss_loops(params, tasks, 2, 0.4, first_order, theta_h or None)
  grads = torch.autograd.grad(loss, leaves)
  grads_func, loss_func = torch.func.grad_and_value(
      lambda ls: tr.meta_loss_func(ls[:n], tasks, 2, 0.4, first_order, ls[n:] or None))(
          [p.detach() for p in leaves])
  assert float(loss_func) == pytest.approx(float(loss.detach()), rel=1e-12)
  for g, gf in zip(grads, grads_func):
    torch.testing.assert_close(gf, g, rtol=1e-9, atol=1e-12)


# mirrormeta's Conv4 parameter paths in the reference's order.
_TORCH_ORDER = [f'{layer}_{i}/{name}' for i in range(4)
                for layer, name in (('Conv', 'kernel'), ('Conv', 'bias'),
                                    ('BatchNorm', 'scale'), ('BatchNorm', 'bias'))
                ] + ['Dense_0/kernel', 'Dense_0/bias']


def _icnn_to_torch(theta_h):
  """The ICNN's raw parameters as the reference's flat list; its blocks are the output
  channels, so the arrays are the same in both layouts."""
  return [np.asarray(theta_h[k][f][0] if f in ('skip', 'bias') else theta_h[k][f])
          for k in _TORCH_ORDER for f in ('skip', 'bias', 'out', 'quad')]


def _to_torch(torch, params):
  """mirrormeta's Conv4 parameters (flax names, kernels HWIO, NHWC features) as the
  reference's list: [w OIHW, b, γ, β] per block, then the head [n, C·H·W] in NCHW order."""
  out = []
  for i in range(4):
    conv, bn = params[f'Conv_{i}'], params[f'BatchNorm_{i}']
    out += [np.transpose(conv['kernel'], (3, 2, 0, 1)), conv['bias'], bn['scale'], bn['bias']]
  head = params['Dense_0']['kernel']  # [H·W·C, n]; C = the last block's channels
  c = out[-4].shape[0]
  hw = int(round((head.shape[0] // c) ** 0.5))
  out += [np.transpose(np.reshape(head, (hw, hw, c, -1)), (3, 2, 0, 1)).reshape(head.shape[1], -1),
          params['Dense_0']['bias']]
  return [torch.tensor(np.asarray(x, np.float64), requires_grad=True) for x in out]


@pytest.mark.parametrize('algorithm,strategy', [('maml', 'default'), ('maml', 'vmap'),
                                               ('metamida', 'default'), ('metamida', 'scan')])
def test_reference_computes_mirrormetas_meta_gradient(tr, algorithm, strategy):
  """The reference and mirrormeta (MetaMiDA: its closed-form map with hand-derived
  derivatives; the CPU default strategy with the tied recomputation and block-major
  kernels, a lax.scan over the steps with jax.checkpoint's recomputation, and vmap over
  tasks) agree on the meta-loss and every meta-gradient, in float64: the two benchmark
  sides do the same work, and mirrormeta's meta-gradient equals plain autograd's in another
  framework. (4 filters; test_core.py::test_conv4_meta_gradient_compiled_equals_op_by_op
  checks 64, where max-pool's derivative once went wrong under XLA's fusion.)"""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import mirrormeta as mm  # pylint: disable=g-import-not-at-top
  from mirrormeta import algorithms, models  # pylint: disable=g-import-not-at-top
  n_way, shot, query, size, steps, lr = 3, 1, 2, 32, 2, 0.4
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(2, n_way * shot, size, size, 1))
  xq = rng.normal(size=(2, n_way * query, size, size, 1))
  ys = np.tile(np.repeat(np.arange(n_way), shot), (2, 1))
  yq = np.tile(np.repeat(np.arange(n_way), query), (2, 1))
  alg = algorithms.get(algorithm)
  with jax.enable_x64(True):
    model = models.functional(models.Conv4(num_classes=n_way, filters=4),
                              jnp.zeros((1, size, size, 1)))
    f64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
    params = f64(model.init(jax.random.key(1)))
    # Raw conjugate parameters far from their init, so the map is far from the identity.
    theta_h = jax.tree.map(lambda x: x + rng.normal(size=x.shape),
                           f64(alg.conjugate.init(jax.random.key(2), params)))
    theta = mm.MetaParams(params, theta_h)
    loss_fn = models.classification_loss(model.apply)
    (loss, _), grads = jax.value_and_grad(mm.meta_loss, has_aux=True)(
        theta, (xs, ys), (xq, yq), h_star=alg.conjugate.apply, loss_fn=loss_fn,
        steps=steps, lr=lr,
        strategy={'default': mm.default_strategy(), 'scan': mm.Strategy('loop', 1),
                  'vmap': mm.Strategy('vmap', True)}[strategy])
    if algorithm == 'metamida':
      moved = jax.tree.map(jnp.subtract, mm.primal_map(alg.conjugate.apply, theta_h, params),
                           params)
      assert float(mm.core.tree_norm(moved)) > 0.1 * float(mm.core.tree_norm(params))

  p_t = _to_torch(torch, params)
  h_t = ([torch.tensor(x, requires_grad=True) for x in _icnn_to_torch(theta_h)]
         if algorithm == 'metamida' else [])
  tasks = [tuple(torch.tensor(a[i]) for a in (np.moveaxis(xs, -1, 2), ys,
                                              np.moveaxis(xq, -1, 2), yq)) for i in range(2)]
  loss_t = tr.meta_loss_loops(p_t, tasks, steps, lr, theta_h=h_t or None)
  g_t = torch.autograd.grad(loss_t, p_t + h_t)
  assert loss_t.item() == pytest.approx(float(loss), rel=1e-10)
  for want, got in zip(_to_torch(torch, grads.z), g_t):
    np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-8, atol=1e-12)
  if algorithm == 'metamida':
    want_h = _icnn_to_torch(grads.h)
    assert max(np.max(np.abs(w)) for w in want_h) > 1e-6  # θ_h does get a meta-gradient
    for want, got in zip(want_h, g_t[len(p_t):]):
      np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize('variant', ['loops', 'func'])
def test_meta_step_updates_params(tr, variant):
  import torch  # pylint: disable=g-import-not-at-top
  params, tasks = _tiny_problem(tr, torch)
  before = [p.detach().clone() for p in params]
  loss = tr.make_meta_step(variant, params, steps=1, inner_lr=0.4)(tasks)
  assert torch.isfinite(loss)
  assert all(not torch.equal(b, p) for b, p in zip(before, params))


def test_time_meta_step_smoke(tr):
  r = tr.time_meta_step('loops', image_shape=(16, 16, 1), filters=4, n_way=3,
                        query=2, tasks=1, steps=1, warmup=1, repeats=2, threads=1)
  assert len(r['all']) == 2 and r['seconds_per_step'] > 0
  assert r['threads'] == 1 and r['peak_rss_mb'] >= 0


def test_imports_without_torch_and_fails_clearly():
  code = ('import sys; sys.modules["torch"] = None\n'
          'from benchmarks import torch_reference as tr\n'
          'try:\n'
          '    tr.time_meta_step()\n'
          'except ImportError as e:\n'
          '    assert "pip install" in str(e), e\n'
          'else:\n'
          '    raise SystemExit("no ImportError")\n')
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, timeout=60)


def test_worker_keeps_one_process_across_measurements(tr):
  with tr.Worker('loops', (16, 16, 1), filters=4, n_way=3, query=2, tasks=1, steps=1,
                 threads=1) as worker:
    first, second = worker.measure(warmup=1, repeats=2), worker.measure(warmup=0, repeats=3)
  assert len(first['all']) == 2 and len(second['all']) == 3
  assert first['device'] == 'cpu' and second['seconds_per_step'] > 0
  assert first['loss'] != second['loss']  # the same parameters kept training


def test_worker_reports_the_childs_error(tr):
  worker = tr.Worker('nonsense', (16, 16, 1), filters=4, threads=1)
  with pytest.raises(RuntimeError, match='variant must be one of'):
    worker.measure()
  worker.close()
