"""What MetaMiDA's mirror map alone costs next to a MAML meta-step (figures, not a test).

    python -m benchmarks.map_cost [--shape=omniglot] [--steps=5] [--repeats=7]

MetaMiDA's meta-step is MAML's plus the ICNN map φ = ∇h*(z) and its derivative: with B
tasks and K inner steps, 1 + B·K maps forward (φ_0 is shared) and as many backward (the
recomputation and the transpose, θ_h and z cotangents). This times exactly that work alone,
a jitted function that evaluates the map at 1 + B·K different z on the Conv4 parameter
shapes and pulls a cotangent back through each, interleaved with the MAML and MetaMiDA
meta-steps (``benchmarks.common.build``, the runner's build). The map's share of the MAML
step is what MetaMiDA / MAML − 1 costs unless the map overlaps other work. Both forms of
the map are timed: XLA's and, where it builds, the native kernel (``mirrormeta.native``,
the CPU default).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import mirrormeta as mm
from benchmarks import common as C
from mirrormeta import algorithms


def map_work(shape: C.Shape, maps: int, strategy: mm.Strategy, native: bool):
  """(compiled fn, args): ``maps`` forward + backward passes of the ICNN map (``native``:
  ``mirrormeta.native``'s kernel, else XLA's)."""
  conj = algorithms.get('metamida', icnn={'native': native}).conjugate
  _, theta, *_ = C.make_step('metamida', shape, 1)  # the meta-steps' θ_z and θ_h
  params, theta_h = theta.z, theta.h
  keys = jax.random.split(jax.random.key(2), 2 * maps)
  noise = lambda k: jax.tree.map(lambda x: 0.1 * jax.random.normal(k, x.shape), params)
  zs = [jax.tree.map(jnp.add, params, noise(k)) for k in keys[:maps]]
  cts = [noise(k) for k in keys[maps:]]

  def work(theta_h, zs, cts):
    total = None
    for z, ct in zip(zs, cts):  # unrolled, as the CPU strategy unrolls tasks and steps
      phi, vjp = jax.vjp(lambda t, x: mm.primal_map(conj.apply, t, x,
                                                    remat=strategy.map_remat), theta_h, z)
      # φ is returned too: unused, XLA would drop the forward map.
      out = (phi, *vjp(ct))
      total = out if total is None else jax.tree.map(jnp.add, total, out)
    return total

  args = (theta_h, zs, cts)
  return jax.jit(work).lower(*args).compile(), args


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--shape', default='omniglot', choices=sorted(C.SHAPES))
  p.add_argument('--steps', type=int, default=5, help='K')
  p.add_argument('--repeats', type=int, default=7)
  args = p.parse_args()
  C.setup()
  shape, strategy = C.SHAPES[args.shape], mm.default_strategy()
  maps = 1 + C.TASKS * args.steps
  print(C.environment())
  maml = C.build('maml', shape, args.steps)
  mida = C.build('metamida', shape, args.steps)
  runs, cost = {'maml': maml.run, 'metamida': mida.run}, {}
  for native in ([True] if mm.native.available()[0] else []) + [False]:
    compiled, work_args = map_work(shape, maps, strategy, native)
    form = 'native' if native else 'XLA'
    cost[form] = compiled.cost_analysis() or {}
    runs[f'{maps} maps forward + backward ({form})'] = (
        lambda c=compiled, a=work_args: jax.block_until_ready(c(*a)))
  times = C.time_interleaved(runs, repeats=args.repeats, warmup=2)
  def per_round(name):
    mid, lo, hi = C.ratio_interval(times[name], times['maml'])
    return f'{mid:.3f}' + ('' if lo != lo else f' [{lo:.3f}, {hi:.3f}]')
  rows = [[name, f'{C.median(ts):.3f}', per_round(name)] for name, ts in times.items()]
  text = '\n'.join([
      f'### The ICNN map alone vs the meta-steps: {shape.name}-shaped Conv4-{shape.filters}, '
      f'K={args.steps}, {C.TASKS} tasks, strategy [{C.strategy_label(strategy)}]', '',
      C.environment(), '',
      C.markdown_table(['work', 's (median)', '/ MAML step (per round; 95% CI)'], rows),
      '', f'XLA\'s maps alone: {cost["XLA"].get("flops", 0) / 1e9:.2f} GFLOP, '
      f'{cost["XLA"].get("bytes accessed", 0) / 1e9:.2f} GB accessed (XLA cost analysis; '
      'it does not see into the native kernel).', ''])
  print(text)
  print('saved', C.save(f'map_cost_{shape.name}', text))


if __name__ == '__main__':
  main()
