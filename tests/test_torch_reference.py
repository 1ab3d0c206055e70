"""Checks of the PyTorch MAML reference in benchmarks/torch_reference.py.

torch is an optional benchmark dependency: without it these tests skip, except the one
that checks the module still imports and fails clearly.
"""

import os
import subprocess
import sys

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


@pytest.mark.parametrize('first_order', [False, True])
def test_func_variant_equals_loops(tr, first_order):
  import torch  # pylint: disable=g-import-not-at-top
  params, tasks = _tiny_problem(tr, torch)
  loss = tr.meta_loss_loops(params, tasks, 2, 0.4, first_order)
  grads = torch.autograd.grad(loss, params)
  grads_func, loss_func = torch.func.grad_and_value(tr.meta_loss_func)(
      [p.detach() for p in params], tasks, 2, 0.4, first_order)
  assert float(loss_func) == pytest.approx(float(loss.detach()), rel=1e-12)
  for g, gf in zip(grads, grads_func):
    torch.testing.assert_close(gf, g, rtol=1e-9, atol=1e-12)


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
