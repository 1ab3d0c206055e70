"""Omniglot 5-way 1-shot (Vinyals split, 28x28, rotations), Conv4-64 (MAML paper: 98.7%).

    python -m experiments.run --config=omniglot_5w1s --workdir=runs/omniglot_5w1s \
        [--config.algorithm=maml]

The authors' settings (K=5, inner lr 1e-2, 4 tasks, Adam 1e-3, 15 query); MAML's own
Omniglot recipe instead: --config.inner_lr=0.4 --config.inner_steps=1
--config.eval_inner_steps=3 --config.meta_batch=32. data_dir defaults to the project's
../shared/data/omniglot (images_background.zip + images_evaluation.zip). On CPU the host
is split into 2 devices (cpu_devices; --config.cpu_devices=1 for one).
"""
from experiments.configs import base


def get_config():
  c = base.omniglot(n_way=5, shot=1)
  c.name = 'omniglot_5w1s'
  # On CPU, the host split into 2 XLA:CPU devices, 2 tasks each, compiled ahead: a first
  # run's MetaMiDA steps 3.14 steps/s against 2.84-2.86 on one device, 184 s against
  # 208-234 s for 300 steps (benchmarks/results/first_run*_cpu.md). No effect elsewhere.
  c.cpu_devices = 2
  return c
