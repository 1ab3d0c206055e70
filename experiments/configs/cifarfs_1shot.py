"""CIFAR-FS 5-way 1-shot (Bertinetto split 64/16/20, 32x32), Conv4-64, K=5.

    python -m experiments.run --config=cifarfs_1shot --workdir=runs/cifarfs_1shot \
        --config.data_dir=~/data/cifar100 [--config.algorithm=maml]

data_dir holds cifar-100-python/{train,test,meta}, or a prepared TFDS cifar100.
"""
from experiments.configs import base


def get_config():
  c = base.get_config('cifarfs')
  c.name = 'cifarfs_1shot'
  return c
