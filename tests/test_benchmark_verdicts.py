"""The benchmarks' target verdicts: a time ratio is judged by its confidence interval."""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks/ is a top-level folder, not an installed package

from benchmarks import common as C  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import table5  # noqa: E402  pylint: disable=g-import-not-at-top


class _Built:
  def __init__(self, peak, flops=1e9):
    self.memory = {'peak': peak}
    self.flops = flops


def test_ratio_interval_brackets_the_median_of_per_round_ratios():
  rng = np.random.default_rng(0)
  b = rng.uniform(0.3, 0.5, 15)
  a = b * rng.normal(1.1, 0.02, 15)
  mid, lo, hi = C.ratio_interval(a, b)
  assert mid == np.median(a / b)
  assert lo <= mid <= hi and 1.05 < lo and hi < 1.15
  assert np.isnan(C.ratio_interval(a[:5], b[:5])[1])  # 5 rounds: no 95% interval


def test_targets_read_met_not_met_or_within_noise():
  rng = np.random.default_rng(1)
  maml = list(rng.uniform(0.3, 0.5, 11))
  times = {('maml', 1): maml, ('maml', 5): maml,
           ('metamida', 1): [t * 0.3 for t in maml],  # K=1 / K=5: clearly above 0.25
           ('metamida', 5): [t * r for t, r in zip(maml, rng.normal(1.05, 0.03, 11))]}
  built = {key: _Built(100.0, flops=(19.3e9 if key == ('metamida', 1) else 31.8e9))
           for key in times}
  # Three torch steps per round, each round's median 2x MAML's: ratio 0.5, MET.
  torch_times = {('maml', 'loops'): [2 * t * f for t in maml for f in (0.9, 1.0, 1.1)]}
  lines = table5.targets(None, built, times, torch_times, [1, 5], torch_repeats=3)
  verdict = lambda prefix: next(l for l in lines if prefix in l).split(']')[0][3:]
  assert verdict('PyTorch') == 'MET' and ': 0.500,' in lines[0]
  assert verdict('time at K=5') == 'WITHIN NOISE'
  assert verdict('K=1 / MAML K=5') == 'NOT MET'
  assert 'work: 0.61 of the FLOPs' in next(l for l in lines if 'K=1 / MAML K=5' in l)
  assert verdict('memory at K=5') == 'MET'
  # MetaMiDA against its own PyTorch reference, held to the same bar.
  torch_times[('metamida', 'loops')] = [t for t in times['metamida', 5] for _ in range(3)]
  lines = table5.targets(None, built, times, torch_times, [5], torch_repeats=3)
  line = next(l for l in lines if 'PyTorch MetaMiDA' in l)
  assert line.startswith('- [NOT MET] mirrormeta MetaMiDA K=5 / PyTorch MetaMiDA') and ': 1.000' in line
