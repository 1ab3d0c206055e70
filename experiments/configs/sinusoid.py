"""Sinusoid regression (MAML paper §5.1): 10-shot, MLP 40-40, MSE, 1 step in training.

    python -m experiments.run --config=sinusoid --workdir=runs/sinusoid \
        [--config.algorithm=maml]

A ~ U[0.1, 5], phase ~ U[0, π], x ~ U[-5, 5]; MAML's settings: 25 tasks per meta-batch,
Adam 1e-3, inner lr 0.01, 1 inner step in training and 10 at test (results report the MSE
after every step 0..10). n_way is unused; the metric is the query MSE (lower is better).
"""
from experiments.configs import base


def get_config():
  c = base.get_config('sinusoid')
  c.name = 'sinusoid'
  c.model = 'mlp'
  c.n_way = 1
  c.shot = 10
  c.query = 10
  c.eval_query = 10
  c.inner_steps = 1
  c.eval_inner_steps = 10
  c.meta_batch = 25
  c.num_steps = 70000
  c.optimizer.name = 'adam'
  c.optimizer.weight_decay = 0.0
  c.optimizer.decay_every = 0
  c.eval_every = 5000
  c.checkpoint_every = 5000
  c.compile_ahead = False  # small MLP programs: a compiling process costs more to start
  return c
