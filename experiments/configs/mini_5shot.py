"""miniImageNet 5-way 5-shot, Conv4-64, K=5 (MAML paper: 63.11%).

    python -m experiments.run --config=mini_5shot --workdir=runs/mini_5shot \
        --config.data_dir=~/data/miniimagenet [--config.algorithm=maml]
"""
from experiments.configs import base


def get_config():
  c = base.get_config('miniimagenet')
  c.name = 'mini_5shot'
  c.shot = 5
  return c
