"""CUB-200-2011 5-way 1-shot (100/50/50 classes, 84x84), Conv4-64, K=5.

    python -m experiments.run --config=cub_1shot --workdir=runs/cub_1shot \
        --config.data_dir=~/data/cub [--config.algorithm=maml]

data_dir holds CUB_200_2011/images/<NNN.Name>/*.jpg, or a prepared TFDS caltech_birds2011.
"""
from experiments.configs import base


def get_config():
  c = base.get_config('cub')
  c.name = 'cub_1shot'
  return c
