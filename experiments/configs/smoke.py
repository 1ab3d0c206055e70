"""Smoke test: a few steps of MAML on real Omniglot 5-way 1-shot, end to end in < 1 min.

    python -m experiments.run --config=smoke --workdir=/tmp/mirrormeta_smoke

Trains a small Conv4 (16 filters, 1 inner step, 2 tasks per step) for 40 steps, validates
twice, checkpoints, tests on 100 tasks with 3 inner steps and writes the full report: a
check that everything runs, not a result. Any algorithm works, e.g.
--config.algorithm=metamida; on a 2-core CPU its larger program compiles for 1-2 minutes
the first time (cached in ~/.cache/mirrormeta/jax afterwards).
"""
from experiments.configs import base


def get_config():
  c = base.omniglot(n_way=5, shot=1)
  c.name = 'smoke'
  c.algorithm = 'maml'
  c.filters = 16
  c.query = 5
  c.inner_steps = 1
  c.eval_inner_steps = 3
  c.inner_lr = 0.4
  c.meta_batch = 2
  c.num_steps = 40
  c.optimizer.decay_every = 0
  c.eval_every = 20
  c.val_tasks = 50
  c.test_tasks = 100
  c.log_every = 5
  c.checkpoint_every = 20
  # Its programs compile in seconds: fresh compiling processes would cost more than they
  # save (a first run took 35 instead of 28 s; benchmarks.first_run).
  c.compile_ahead = False
  return c
