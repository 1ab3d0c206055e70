"""Models for the few-shot benchmarks, as pure functions of a parameter pytree.

The inner loop needs ``apply(params, x)`` with every adapted quantity in ``params``. Batch
norm is transductive (the paper's code): it normalises with the statistics of the batch it
sees and keeps no running averages, so there is no state outside ``params``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from mirrormeta import conv as conv_lib

PyTree = Any


class Model(NamedTuple):
  """``init(key) -> params`` and ``apply(params, x) -> outputs``, both pure."""
  init: Callable[[jax.Array], PyTree]
  apply: Callable[[PyTree, jax.Array], jax.Array]


def functional(module: nn.Module, example_x: jax.Array) -> Model:
  """Turns a Flax module into a :class:`Model` whose only state is its ``params``.

  Collections other than ``params`` (BatchNorm's running averages) are created empty and
  discarded after each call: with ``use_running_average=False`` they never feed the output.
  """
  shapes = jax.eval_shape(module.init, jax.random.key(0), example_x)
  extra = {c: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), v)
           for c, v in shapes.items() if c != 'params'}

  def init(key):
    return module.init(key, example_x)['params']

  def apply(params, x):
    if not extra:
      return module.apply({'params': params}, x)
    return module.apply({'params': params, **extra}, x, mutable=list(extra))[0]

  return Model(init, apply)


def max_pool_2x2(x_NHWC: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2, floor mode, written as reshape + max.

  Why not ``nn.max_pool``: its ``reduce_window`` differentiates to select-and-scatter, which
  on XLA:CPU doubled the backward time of a Conv4 meta-step (DESIGN.md §3); reshape + max
  differentiates to cheap elementwise ops and is exact (ties aside) on every backend.
  """
  n, h, w, c = x_NHWC.shape
  x = x_NHWC[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


# ``conv`` field of the models: how convolutions (and their derivatives) are computed.
# Default: mirrormeta.conv, whose derivatives of every order stay canonical convolutions
# (the Conv4 MAML K=5 meta-step on XLA:CPU: 0.34 vs 0.50 s with lax's own rules,
# benchmarks/results/conv_cpu.md); ``lax.conv_general_dilated`` is the plain alternative.
CONVOLUTIONS = {'mirrormeta': conv_lib.conv_general_dilated, 'lax': lax.conv_general_dilated}


class Conv4(nn.Module):
  """Four [conv3x3 → transductive BN → ReLU → max-pool 2x2] blocks and a linear head."""
  num_classes: int
  filters: int = 64
  conv: str = 'mirrormeta'  # a key of CONVOLUTIONS

  @nn.compact
  def __call__(self, x_NHWC):
    x = x_NHWC
    for _ in range(4):
      x = nn.Conv(self.filters, (3, 3), padding='SAME',
                  conv_general_dilated=CONVOLUTIONS[self.conv])(x)
      x = nn.BatchNorm(use_running_average=False, momentum=0.0)(x)
      x = max_pool_2x2(nn.relu(x))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class ResNet12(nn.Module):
  """ResNet-12: four residual blocks of three 3x3 convs, each block then max-pooled."""
  num_classes: int
  widths: Sequence[int] = (64, 160, 320, 640)
  conv: str = 'mirrormeta'  # a key of CONVOLUTIONS

  @nn.compact
  def __call__(self, x_NHWC):
    x = x_NHWC
    bn = lambda: nn.BatchNorm(use_running_average=False, momentum=0.0)
    conv = lambda w, k: nn.Conv(w, k, padding='SAME', use_bias=False,
                                conv_general_dilated=CONVOLUTIONS[self.conv])
    for width in self.widths:
      shortcut = bn()(conv(width, (1, 1))(x))
      for i in range(3):
        x = bn()(conv(width, (3, 3))(x))
        if i < 2:
          x = nn.leaky_relu(x, 0.1)
      x = max_pool_2x2(nn.leaky_relu(x + shortcut, 0.1))
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class MLP(nn.Module):
  """ReLU MLP, 1-40-40-1 for the sinusoid (MAML paper)."""
  hidden: Sequence[int] = (40, 40)
  out: int = 1

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.out)(x)


def classification_loss(apply: Callable) -> Callable:
  """``loss_fn(params, (x, y)) -> (cross-entropy, {'accuracy': ...})`` for integer labels."""
  def loss_fn(params, batch):
    x, y = batch
    logits = apply(params, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {'accuracy': jnp.mean(jnp.argmax(logits, -1) == y)}
  return loss_fn


def regression_loss(apply: Callable) -> Callable:
  """``loss_fn(params, (x, y)) -> (mean squared error, {})``."""
  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean(jnp.square(apply(params, x) - y)), {}
  return loss_fn
