"""Omniglot 5-way 1-shot (Vinyals split, 28x28, rotations), Conv4-64 (MAML paper: 98.7%).

    python -m experiments.run --config=omniglot_5w1s --workdir=runs/omniglot_5w1s \
        [--config.algorithm=maml]

The authors' settings (K=5, inner lr 1e-2, 4 tasks, Adam 1e-3, 15 query); MAML's own
Omniglot recipe instead: --config.inner_lr=0.4 --config.inner_steps=1
--config.eval_inner_steps=3 --config.meta_batch=32. data_dir defaults to the project's
../shared/data/omniglot (images_background.zip + images_evaluation.zip).
"""
from experiments.configs import base


def get_config():
  c = base.omniglot(n_way=5, shot=1)
  c.name = 'omniglot_5w1s'
  return c
