"""tieredImageNet 5-way 5-shot, Conv4-64, K=5.

    python -m experiments.run --config=tiered_5shot --workdir=runs/tiered_5shot \
        --config.data_dir=~/data/tieredimagenet [--config.algorithm=maml]
"""
from experiments.configs import base


def get_config():
  c = base.get_config('tieredimagenet')
  c.name = 'tiered_5shot'
  c.shot = 5
  return c
