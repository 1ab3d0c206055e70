"""CUB-200-2011 5-way 5-shot (100/50/50 classes, 84x84), Conv4-64, K=5.

    python -m experiments.run --config=cub_5shot --workdir=runs/cub_5shot \
        --config.data_dir=~/data/cub [--config.algorithm=maml]
"""
from experiments.configs import base


def get_config():
  c = base.get_config('cub')
  c.name = 'cub_5shot'
  c.shot = 5
  return c
