"""Models for the few-shot benchmarks, as pure functions of a parameter pytree.

The inner loop needs ``apply(params, x)`` with every adapted quantity in ``params``. Batch
norm is transductive (the paper's code): it normalises with the statistics of the batch it
sees and keeps no running averages, so there is no state outside ``params``.
"""
from __future__ import annotations

import functools
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


def max_pool_2x2(x: jax.Array, layout: str = 'NHWC') -> jax.Array:
  """2x2 max-pool, stride 2, floor mode, as the larger of each pair of a window's corners
  (``layout``: NHWC or NCHW). NaN propagates.

  Why not ``nn.max_pool``: its ``reduce_window`` differentiates to select-and-scatter, which
  on XLA:CPU doubled the backward time of a Conv4 meta-step (DESIGN.md §3). Why not
  ``reshape(...).max(axis)`` (this function's earlier form): JAX differentiates a max by
  comparing each input with the output for equality, and XLA recomputes the pool's input
  (batch norm's arithmetic) in the fusions that make the comparison, and on XLA:CPU (jaxlib
  0.10.2) the recomputed values need not round as the max's did: those windows lost their
  gradient. Conv4-64's compiled meta-gradients were off by 0.06-0.7 (relative, float32; by
  O(1) or NaN in float64) against the op-by-op ones (tests/test_core.py). Comparing the
  corners with each other never compares a value with a recomputation of itself.
  """
  if layout == 'NCHW':
    n, c, h, w = x.shape
    x = x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2)
    a, b, c_, d = (x[:, :, :, i, :, j] for i in (0, 1) for j in (0, 1))
  else:
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    a, b, c_, d = (x[:, :, i, :, j] for i in (0, 1) for j in (0, 1))
  return _larger(_larger(a, b), _larger(c_, d))


def _larger(a: jax.Array, b: jax.Array) -> jax.Array:
  """max(a, b), NaN if either is; its derivative selects the larger's tangent."""
  return jnp.where((a >= b) | jnp.isnan(a), a, b)


# ``conv`` field of the models: how convolutions (and their derivatives) are computed.
# Default: mirrormeta.conv, whose derivatives of every order stay canonical convolutions
# (the Conv4 MAML K=5 meta-step on XLA:CPU: 0.25 vs 0.46 s with lax's own rules,
# benchmarks/results/conv_cpu.md), with weight gradients summed image by image where that
# is faster on CPU (conv._per_image); 'mirrormeta_batched_wgrad' keeps XLA's whole-batch
# weight gradient; ``lax.conv_general_dilated`` is the plain alternative.
CONVOLUTIONS = {
    'mirrormeta': conv_lib.conv_general_dilated,
    'mirrormeta_batched_wgrad': functools.partial(conv_lib.conv_general_dilated,
                                                  wgrad_form='batched'),
    'lax': lax.conv_general_dilated}

# ``layout`` field: the memory layout of the activations inside Conv4 / ResNet-12. Inputs
# (NHWC), parameters (kernels HWIO) and outputs are the same in both, so a checkpoint or a
# conjugate does not depend on it. mirrormeta.conv is NHWC only: with 'NCHW' the
# convolutions are lax's. Which is faster is the backend's business (default_layout).
LAYOUTS = ('NHWC', 'NCHW')


def default_layout() -> str:
  """The measured faster activation layout: NHWC, on every backend so far.

  CPU: XLA:CPU's fast convolutions take NHWC. On the Conv4 MAML K=5 step
  (Omniglot-shaped, interleaved, benchmarks/results/layout_cpu.md) NCHW took 1.79x the
  default's time, 1.29x that of NHWC with the same lax convolutions. GPU/TPU: not yet
  measured (XLA chooses the convolutions' physical layouts there itself).
  """
  return 'NHWC'


class Conv(nn.Module):
  """``nn.Conv``'s 'SAME' convolution on channels-first (NCHW) activations, with its
  parameters (kernel HWIO, bias) and initialisers. Named ``Conv`` so that Flax names its
  instances Conv_0, Conv_1, ... as it names nn.Conv's: the parameter pytree, hence
  checkpoints and conjugates, is the same in both layouts."""
  features: int
  kernel_size: tuple[int, int]
  use_bias: bool = True
  conv: str = 'mirrormeta'  # a key of CONVOLUTIONS

  @nn.compact
  def __call__(self, x_NCHW):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        tuple(self.kernel_size) + (x_NCHW.shape[1], self.features))
    y = CONVOLUTIONS[self.conv](x_NCHW, kernel, (1, 1), 'SAME',
                                dimension_numbers=('NCHW', 'HWIO', 'NCHW'))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros_init(), (self.features,))[:, None, None]
    return y


class _Layers(NamedTuple):
  """The layers of Conv4 / ResNet-12 in one activation layout (a key of LAYOUTS)."""
  layout: str
  conv_impl: str

  def enter(self, x_NHWC):
    return x_NHWC if self.layout == 'NHWC' else jnp.transpose(x_NHWC, (0, 3, 1, 2))

  def leave(self, x):
    """Back to NHWC before the head, so its weights see features in one order."""
    return x if self.layout == 'NHWC' else jnp.transpose(x, (0, 2, 3, 1))

  def conv(self, features, kernel_size, use_bias=True):
    if self.layout == 'NHWC':
      return nn.Conv(features, kernel_size, padding='SAME', use_bias=use_bias,
                     conv_general_dilated=CONVOLUTIONS[self.conv_impl])
    return Conv(features, kernel_size, use_bias, self.conv_impl)

  def batch_norm(self):
    return nn.BatchNorm(use_running_average=False, momentum=0.0,
                        axis=-1 if self.layout == 'NHWC' else 1)

  def pool(self, x):
    return max_pool_2x2(x, self.layout)


class Conv4(nn.Module):
  """Four [conv3x3 → transductive BN → ReLU → max-pool 2x2] blocks and a linear head."""
  num_classes: int
  filters: int = 64
  conv: str = 'mirrormeta'  # a key of CONVOLUTIONS
  layout: str = 'NHWC'  # a key of LAYOUTS

  @nn.compact
  def __call__(self, x_NHWC):
    layers = _Layers(self.layout, self.conv)
    x = layers.enter(x_NHWC)
    for _ in range(4):
      x = layers.conv(self.filters, (3, 3))(x)
      x = layers.batch_norm()(x)
      x = layers.pool(nn.relu(x))
    x = layers.leave(x)
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class ResNet12(nn.Module):
  """ResNet-12: four residual blocks of three 3x3 convs, each block then max-pooled."""
  num_classes: int
  widths: Sequence[int] = (64, 160, 320, 640)
  conv: str = 'mirrormeta'  # a key of CONVOLUTIONS
  layout: str = 'NHWC'  # a key of LAYOUTS

  @nn.compact
  def __call__(self, x_NHWC):
    layers = _Layers(self.layout, self.conv)
    x = layers.enter(x_NHWC)
    for width in self.widths:
      shortcut = layers.batch_norm()(layers.conv(width, (1, 1), use_bias=False)(x))
      for i in range(3):
        x = layers.batch_norm()(layers.conv(width, (3, 3), use_bias=False)(x))
        if i < 2:
          x = nn.leaky_relu(x, 0.1)
      x = layers.pool(nn.leaky_relu(x + shortcut, 0.1))
    return nn.Dense(self.num_classes)(layers.leave(x).mean(axis=(1, 2)))


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
