"""How XLA:CPU runs independent convolutions: in one program, or split over CPU devices
(figures, not a test).

    python -m benchmarks.executor [--convs=4,16] [--images=75] [--repeats=11] [--out=executor]

The meta-step's heaviest operation on the Omniglot shape is a task's query-set convolution
of the second layer (75 images, 14x14x64 → 64, 3x3): YNNPACK runs it on one thread. This
times, in one process split into 2 XLA:CPU devices (``mirrormeta.runtime.cpu_devices``):

* ``1 conv``: one such convolution, the unit;
* ``N convs, 1 device``: N independent ones in one program, each on its own inputs
  (program arguments, so no temporaries and no buffer the executor could make them share);
* ``N convs, 2 devices``: the same N split over the 2 devices with ``jax.shard_map``
  (N/2 per device's program), as ``cpu_devices=2`` splits the runner's tasks.

"cores busy" is N x (1 conv) / time: 1.0 when the N ran one after another. XLA:CPU's
executor hands ready work to another thread only when a thread holds more than 8 ready
operations, so 4 independent convolutions (a meta-batch's 4 tasks) are expected to run on
one core and 16 on two; each device's program runs on a thread of its own. Interleaved
rounds; ratios are medians of per-round ratios with a 95% interval
(``benchmarks.common.ratio_interval``). Results: ``benchmarks/results/<out>_<backend>.md``.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import common as C

DEVICES = 2


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _convs(xs, ws):
  """Independent convolutions, one per pair (a Python loop: no batching)."""
  return [_conv(x, w) for x, w in zip(xs, ws)]


def programs(n: int, images: int) -> dict[str, tuple]:
  """{label: (jitted function, arguments)} for the unit and ``n`` convolutions on 1 and on
  2 devices."""
  rng = np.random.default_rng(0)
  xs = rng.standard_normal((n, images, 14, 14, 64), np.float32)
  ws = 0.05 * rng.standard_normal((n, 3, 3, 64, 64), np.float32)
  first = jax.devices()[0]
  on_first = lambda a: jax.device_put(a, first)
  mesh = jax.make_mesh((DEVICES,), ('tasks',), devices=jax.devices()[:DEVICES])
  split = NamedSharding(mesh, P('tasks'))
  # Each device's program slices its N/2 pairs out of its shard (copies of ~0.3 ms each,
  # which the one-device program, given N separate arguments, does not pay).
  sharded = jax.jit(jax.shard_map(lambda x, w: jnp.stack(_convs(list(x), list(w))), mesh=mesh,
                                  in_specs=(P('tasks'), P('tasks')), out_specs=P('tasks')))
  return {
      '1 conv': (jax.jit(_conv), (on_first(xs[0]), on_first(ws[0]))),
      f'{n} convs, 1 device': (jax.jit(_convs), (list(map(on_first, xs)),
                                                 list(map(on_first, ws)))),
      f'{n} convs, {DEVICES} devices': (sharded, (jax.device_put(xs, split),
                                                 jax.device_put(ws, split))),
  }


def _call(fn, args):
  jax.block_until_ready(fn(*args))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--convs', type=C.int_list, default=[4, 16],
                 help='numbers of independent convolutions (even: split over 2 devices)')
  p.add_argument('--images', type=int, default=75, help='images per convolution (query set)')
  p.add_argument('--repeats', type=int, default=11)
  p.add_argument('--out', default='executor')
  args = p.parse_args(argv)
  if any(n % DEVICES for n in args.convs):
    p.error(f'--convs must be multiples of {DEVICES} (they are split over {DEVICES} devices)')
  C.setup(cpu_devices=DEVICES)
  env = C.environment()
  print(env, flush=True)
  fns, counts = {}, {}
  for n in args.convs:
    for label, (fn, a) in programs(n, args.images).items():
      if label not in fns:
        fns[label] = functools.partial(_call, fn, a)
        counts[label] = 1 if label == '1 conv' else n
  times = C.time_interleaved(fns, repeats=args.repeats, warmup=2, label=str)
  unit = times['1 conv']
  rows = []
  for label, ts in times.items():
    n = counts[label]
    mid, lo, hi = C.ratio_interval([n * u for u in unit], ts)
    rows.append([label, f'{1e3 * C.median(ts):.2f}', f'{1e3 * C.median(ts) / n:.2f}',
                 f'{mid:.2f} [{lo:.2f}, {hi:.2f}]'])
  text = '\n'.join([
      '# Independent convolutions in XLA:CPU: one program vs two devices', '',
      f'`{C.command("executor", argv)}`  ', env, '',
      f'Each convolution: {args.images} images, 14x14x64 → 64, 3x3, NHWC, float32 (the '
      "query set's second Conv4-64 layer on the Omniglot shape). Median of "
      f'{args.repeats} interleaved rounds; "cores busy": N x (1 conv) / time, per round, '
      'median and 95% interval.', '',
      C.markdown_table(['program', 'ms', 'ms per conv', 'cores busy'], rows)])
  print('\n' + text)
  print(f'saved {C.save(args.out, text)}')


if __name__ == '__main__':
  main()
