"""tieredImageNet 5-way 1-shot, Conv4-64, K=5.

    python -m experiments.run --config=tiered_1shot --workdir=runs/tiered_1shot \
        --config.data_dir=~/data/tieredimagenet [--config.algorithm=maml]

data_dir holds {train,val,test}_images_png.pkl (or _images.npz) + {split}_labels.pkl.
"""
from experiments.configs import base


def get_config():
  c = base.get_config('tieredimagenet')
  c.name = 'tiered_1shot'
  return c
