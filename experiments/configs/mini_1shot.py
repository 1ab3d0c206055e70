"""miniImageNet 5-way 1-shot, Conv4-64, K=5 (paper: MetaMiDA 56.04%, MAML 54.08%).

    python -m experiments.run --config=mini_1shot --workdir=runs/mini_1shot \
        --config.data_dir=~/data/miniimagenet [--config.algorithm=maml]

data_dir holds mini-imagenet-cache-{train,val,test}.pkl, or images/*.jpg with the Ravi &
Larochelle CSVs (shipped in ../shared/data/fewshot_splits).
"""
from experiments.configs import base


def get_config():
  c = base.get_config('miniimagenet')
  c.name = 'mini_1shot'
  return c
