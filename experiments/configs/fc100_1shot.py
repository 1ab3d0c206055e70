"""FC100 5-way 1-shot (Oreshkin superclass split 60/20/20, 32x32), Conv4-64, K=5.

    python -m experiments.run --config=fc100_1shot --workdir=runs/fc100_1shot \
        --config.data_dir=~/data/cifar100 [--config.algorithm=maml]

data_dir holds cifar-100-python/{train,test,meta}, or a prepared TFDS cifar100.
"""
from experiments.configs import base


def get_config():
  c = base.get_config('fc100')
  c.name = 'fc100_1shot'
  return c
