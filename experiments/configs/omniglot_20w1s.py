"""Omniglot 20-way 1-shot (Vinyals split, 28x28, rotations), Conv4-64 (MAML paper: 95.8%).

    python -m experiments.run --config=omniglot_20w1s --workdir=runs/omniglot_20w1s \
        [--config.algorithm=maml]

The authors' settings (K=5, inner lr 1e-2, 4 tasks, Adam 1e-3, 15 query); MAML's own
20-way recipe instead: --config.inner_lr=0.1 --config.meta_batch=16.
"""
from experiments.configs import base


def get_config():
  c = base.omniglot(n_way=20, shot=1)
  c.name = 'omniglot_20w1s'
  return c
