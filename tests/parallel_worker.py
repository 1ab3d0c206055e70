"""Trains a small sinusoid MetaMiDA model for a few steps on a task mesh; saves θ.

Run as a subprocess by tests/test_parallel.py (device count and processes are fixed at JAX
start-up): ``python tests/parallel_worker.py OUT.npz NUM_DEVICES [COORD NPROC PID]``.
"""
import os
import sys

if len(sys.argv) > 3:
  os.environ['MIRRORMETA_COORDINATOR'], os.environ['MIRRORMETA_NUM_PROCESSES'], \
      os.environ['MIRRORMETA_PROCESS_ID'] = sys.argv[3:6]

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mirrormeta as mm  # noqa: E402
from mirrormeta import conjugates, data, models, parallel  # noqa: E402


def main(out, num_devices):
  parallel.maybe_initialize_distributed()
  mesh = parallel.task_mesh(num_devices)
  model = models.functional(models.MLP(hidden=(16, 16)), np.zeros((1, 1), np.float32))
  conj = conjugates.icnn(width=4)
  # SGD, not Adam: Adam divides roundoff-sized gradients (1e-9) by their own size, so
  # a reduction-order difference would become a full step and hide what is compared here.
  meta = mm.make_meta_step(conj.apply, models.regression_loss(model.apply), optax.sgd(0.05),
                           steps=2, lr=0.01, strategy=mm.Strategy('vmap', 1),
                           axis_name=parallel.TASK_AXIS)
  theta = mm.init_meta_params(conj, model.init(jax.random.key(0)), jax.random.key(1))
  state = parallel.replicate(meta.init(theta), mesh)
  step = parallel.shard_step(meta, mesh)
  sampler = data.SinusoidSampler(shot=5, query=10)
  batch = 8
  parallel.check_batch(batch, mesh)
  for t in range(4):
    ep = parallel.sample_tasks(sampler.sample, jax.random.fold_in(jax.random.key(2), t),
                               parallel.process_task_slice(batch))
    support, query = parallel.global_batch(mesh, (ep.support_x, ep.support_y),
                                           (ep.query_x, ep.query_y))
    state, metrics = step(state, support, query)
  flat = {'/'.join(map(str, k)): np.asarray(v) for k, v in
          jax.tree.leaves_with_path(jax.tree.map(np.asarray, state.params))}
  flat['loss'] = np.asarray(metrics['loss'])
  if parallel.is_main_process():
    np.savez(out, **flat)


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]))
